"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, 2016), for the VQ-VAE
on CPU, where its large 3x3 convolutions are most of a generated image's time.

A 4 x 4 output tile of a 3x3 convolution is A^T [(G k G^T) * (B^T d B)] A over the 6 x 6 input tile d
that covers it: 36 multiplies per channel pair instead of 144 (4x fewer), plus the tile transforms.
Here both transforms are small matmuls (kron(B^T, B^T): 36 -> 36, kron(A^T, A^T): 36 -> 16) and the
36 products one batched matmul over the channels, per strip of tile rows, in a `lax.scan` over
(image, strip) so that a strip's tiles stay in cache and the outputs land in place (no transpose of
the output map). The scan runs over images too: a decode whose batch is sharded over several CPU
devices would gather it (the project's decodes run on one device; accelerators never take this path).

The matrices come from the Cook-Toom construction on the points (0, 1, -1, 2, -1/2) and infinity,
the set of the usual ones (0, +-1, +-2, +-1/2) with the smallest fp32 error measured (random 160-channel
tiles against float64: rms 1.7e-6 of the output's rms, max 4.0e-6 of its largest; (0, +-1, +-2): 2.7e-6
and 1.0e-5; the direct fp32 sum: 2.4e-7). So the convolution is the official one up to ~2e-6 relative
instead of ~2e-7 (tests/test_winograd.py checks it against a float64 convolution).

Measured on the 2-core CPU (`python -m eval.bench.conv`, batch 2, after GroupNorm's SiLU):
see docs/benchmarks.md.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['POINTS', 'applies', 'conv3x3', 'kernel_transform', 'matrices', 'strip_rows']

POINTS = (0.0, 1.0, -1.0, 2.0, -0.5)   # the finite interpolation points (the sixth is infinity)
MIN_SIDE = 64       # maps smaller than this (either side) keep XLA's convolution: it is faster there
MIN_CHANNELS = 32   # so do convolutions with fewer input channels (the RGB conv_in: a K = 3 matmul)
TILES_PER_STEP = 256  # tiles a scan step takes (a strip of rows of one image), rounded to whole rows


def matrices(points=POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(A^T (4, 6), G (6, 3), B^T (6, 6)) float64 of F(4, 3) on `points` and infinity: A^T and G by
  Cook-Toom (A^T[i, j] = p_j^i, G[j] = p_j^(0..2) / prod_l (p_j - p_l)), B^T the solution of
  A^T [(G g) * (B^T d)] = g * d (the correlation) for every g and d."""
  m, r = 4, 3
  n = m + r - 1
  p = np.asarray(points, np.float64)
  if p.shape != (n - 1,) or len(set(p.tolist())) != n - 1:
    raise ValueError(f'Winograd F(4, 3) needs {n - 1} distinct finite points, got {points}')
  a_t, g = np.zeros((m, n)), np.zeros((n, r))
  for j in range(n - 1):
    a_t[:, j] = p[j] ** np.arange(m)
    g[j] = p[j] ** np.arange(r) / np.prod([p[j] - p[i] for i in range(n - 1) if i != j])
  a_t[m - 1, n - 1] = g[n - 1, r - 1] = 1.0
  # output i, tap k, input l: sum_j A^T[i, j] G[j, k] B^T[j, l] = [l == i + k]
  lhs = np.einsum('ij,jk,jJ,lL->iklJL', a_t, g, np.eye(n), np.eye(n)).reshape(m * r * n, n * n)
  rhs = np.asarray([[[float(l == i + k) for l in range(n)] for k in range(r)] for i in range(m)]).ravel()
  b_t = np.linalg.lstsq(lhs, rhs, rcond=None)[0].reshape(n, n)
  assert np.abs(lhs @ b_t.ravel() - rhs).max() < 1e-9, points     # distinct points always solve it
  return a_t, g, b_t


_A_T, _G, _B_T = matrices()
_IN_EE = np.kron(_B_T, _B_T).astype(np.float32)      # (36, 36): tile (a, c) -> transformed (i, j)
_OUT_OE = np.kron(_A_T, _A_T).astype(np.float32)     # (16, 36): products -> output (y, x)


def applies(shape_BHWC: tuple[int, ...], kernel_shape: tuple[int, ...], strides=1,
            dtype=jnp.float32) -> bool:
  """Whether `conv3x3` is the faster way for a SAME 3x3 convolution of this shape, stride (an int or a
  pair; None is 1) and input dtype on this backend (CPU and float32 only: accelerators have their own
  convolution kernels, and lower precisions lack the digits the transforms cancel)."""
  _, H, W, C = shape_BHWC
  strides = (strides or 1,) * 2 if isinstance(strides, int) or strides is None else tuple(strides)
  return (jax.default_backend() == 'cpu' and jnp.dtype(dtype) == jnp.float32
          and tuple(kernel_shape[:2]) == (3, 3)
          and strides == (1, 1) and H % 4 == 0 and W % 4 == 0
          and min(H, W) >= MIN_SIDE and C >= MIN_CHANNELS)


def kernel_transform(kernel_33IO: jax.Array) -> jax.Array:
  """(36, I, O): G k G^T of each channel pair, the tile index (a, c) flattened."""
  g = jnp.asarray(_G, jnp.float32)
  return einops.rearrange(jnp.einsum('ay,yxio,cx->acio', g, kernel_33IO, g), 'a c i o -> (a c) i o')


def strip_rows(H: int, W: int) -> int:
  """Tile rows per scan step: the divisor of H / 4 whose strip holds closest to TILES_PER_STEP tiles."""
  n_rows, per_row = H // 4, W // 4
  divisors = [r for r in range(1, n_rows + 1) if n_rows % r == 0]
  return min(divisors, key=lambda r: abs(np.log(r * per_row / TILES_PER_STEP)))


def conv3x3(x_BHWC: jax.Array, kernel_33IO: jax.Array, bias_O: jax.Array,
            rows: int | None = None) -> jax.Array:
  """conv3x3(SAME, stride 1)(x) + bias, (B, H, W, O), H and W multiples of 4; `rows`: tile rows per
  scan step (default `strip_rows`)."""
  B, H, W, C = x_BHWC.shape
  O = kernel_33IO.shape[-1]
  if H % 4 or W % 4:
    raise ValueError(f'Winograd F(4x4, 3x3) needs a map with sides divisible by 4, got {H} x {W}')
  r = rows or strip_rows(H, W)
  if (H // 4) % r:
    raise ValueError(f'rows={r} must divide the {H // 4} tile rows')
  n_strips, per_row = H // (4 * r), W // 4
  x_pad = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  u_EIO = kernel_transform(kernel_33IO.astype(jnp.float32))
  in_EE, out_OE = jnp.asarray(_IN_EE), jnp.asarray(_OUT_OE)

  def step(_, index):
    b, s = index // n_strips, index % n_strips
    strip = jax.lax.dynamic_slice(x_pad, (b, 4 * r * s, 0, 0), (1, 4 * r + 2, W + 2, C))[0]
    # the 6 x 6 tiles (stride 4), one (r, per_row, C) map per tile position (a, c)
    d_ETC = jnp.stack([strip[a:a + 4 * r:4, c:c + 4 * per_row:4] for a in range(6) for c in range(6)])
    d_ETC = d_ETC.reshape(36, r * per_row, C)
    v_ETC = jnp.einsum('fe,etc->ftc', in_EE, d_ETC)
    m_ETO = jnp.einsum('etc,eco->eto', v_ETC, u_EIO)
    y_YXrwO = jnp.einsum('pe,eto->pto', out_OE, m_ETO).reshape(4, 4, r, per_row, O)
    return None, einops.rearrange(y_YXrwO, 'y x r w o -> (r y) (w x) o') + bias_O

  _, y_NhWO = jax.lax.scan(step, None, jnp.arange(B * n_strips))
  return y_NhWO.reshape(B, H, W, O)
