"""Torch-exact 2-D resizing as explicit interpolation matrices.

`jax.image.resize` matches neither of the two modes the official VQ-VAE uses, so both are built here as
(out, in) matrices (numpy, computed once per size pair) and applied separably over H and W:

- `bicubic`: `F.interpolate(mode='bicubic', align_corners=False)`: source coordinate
  `(dst + 0.5) * in/out - 0.5`, Keys cubic kernel with A = -0.75, taps at floor-1 .. floor+2 with indices
  clamped to the border (edge replication).
- `area`: `F.interpolate(mode='area')` = `adaptive_avg_pool2d`: output i averages input rows
  `[floor(i*in/out), ceil((i+1)*in/out))`.

Weights follow torch's float32 arithmetic for float32 inputs, so a resize agrees with torch to ~1e-7.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['CUBIC_A', 'area_matrix', 'bicubic_matrix', 'resize_area', 'resize_bicubic']

CUBIC_A = -0.75  # torch's bicubic coefficient (PIL / OpenCV use -0.5)


def _check_sizes(n_in: int, n_out: int) -> None:
  if int(n_in) != n_in or int(n_out) != n_out or n_in < 1 or n_out < 1:
    raise ValueError(f'interpolation sizes must be positive integers, got in={n_in}, out={n_out}')


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys cubic weights (A=-0.75) of the taps at offsets -1, 0, 1, 2 for fractional positions t: (n, 4)."""
  a = np.float32(CUBIC_A)
  one = np.float32(1)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  u = one - t  # torch evaluates the two right taps from 1 - t
  return np.stack([far(t + one), near(t), near(u), far(u + one)], axis=-1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix of torch bicubic resizing (align_corners=False) along one axis."""
  _check_sizes(n_in, n_out)
  scale = np.float32(n_in) / np.float32(n_out)
  src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  # torch's guard_index_and_lambda: index = min(floor(src), n_in - 1), lambda clamped to [0, 1].
  base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)
  w_o4 = _cubic_weights(t)
  idx_o4 = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
  mat = np.zeros((n_out, n_in), np.float32)
  np.add.at(mat, (np.repeat(np.arange(n_out), 4), idx_o4.reshape(-1)), w_o4.reshape(-1))
  mat.setflags(write=False)
  return mat


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix of adaptive average pooling (torch 'area') along one axis."""
  _check_sizes(n_in, n_out)
  mat = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil
    mat[i, start:end] = np.float32(1) / np.float32(end - start)
  mat.setflags(write=False)
  return mat


def _apply(x_BhwC: jax.Array, mat_h: np.ndarray, mat_w: np.ndarray) -> jax.Array:
  if x_BhwC.ndim != 4:
    raise ValueError(f'expected an NHWC array (B, h, w, C), got shape {x_BhwC.shape}')
  y_BHwC = jnp.einsum('Hh,BhwC->BHwC', jnp.asarray(mat_h, x_BhwC.dtype), x_BhwC,
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('Ww,BHwC->BHWC', jnp.asarray(mat_w, x_BhwC.dtype), y_BHwC,
                    precision=jax.lax.Precision.HIGHEST)


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_bicubic(x_BhwC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Torch `F.interpolate(x, size, mode='bicubic')` on NHWC input; returns (B, H, W, C)."""
  (out_h, out_w), (_, in_h, in_w, _) = _size_hw(size), x_BhwC.shape
  return _apply(x_BhwC, bicubic_matrix(in_h, out_h), bicubic_matrix(in_w, out_w))


def resize_area(x_BhwC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """Torch `F.interpolate(x, size, mode='area')` on NHWC input; returns (B, H, W, C)."""
  (out_h, out_w), (_, in_h, in_w, _) = _size_hw(size), x_BhwC.shape
  return _apply(x_BhwC, area_matrix(in_h, out_h), area_matrix(in_w, out_w))
