"""Encoder / decoder of the multi-scale VQ-VAE (official `models/basic_vae.py`), NHWC, flax.nnx.

Attribute names mirror the official module tree (`down[i].block[j].norm1`, `mid.attn_1`, ...) so that a
parameter's nnx path joined with '.' is its torch state-dict key (see `vqvae.load_vqvae_state_dict`).
Dropout is omitted: the official VQ-VAE is always built with dropout=0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from var_jax import winograd

__all__ = ['AttnBlock', 'Decoder', 'Downsample2x', 'Encoder', 'GroupNorm', 'Level', 'MidBlock', 'ResnetBlock',
           'Upsample2x', 'conv', 'conv3x3_narrow', 'direct_clone', 'same_conv', 'uniform_init',
           'upsample_conv3x3']

GN_GROUPS = 32
GN_EPS = 1e-6
NARROW_OUT = 8     # the decoder's conv_out with at most this many outputs runs as `conv3x3_narrow`


def uniform_init(bound: float) -> nnx.Initializer:
  """Initializer drawing U(-bound, bound) (torch's default for conv weights and biases)."""

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def conv(c_in: int, c_out: int, ks: int, *, rngs: nnx.Rngs, stride: int = 1, padding='SAME') -> nnx.Conv:
  """Conv2d with torch's default init (kernel and bias U(+-1/sqrt(fan_in))); kernel is HWIO."""
  bound = 1.0 / math.sqrt(c_in * ks * ks)
  return nnx.Conv(c_in, c_out, (ks, ks), strides=stride, padding=padding,
                  kernel_init=uniform_init(bound), bias_init=uniform_init(bound), rngs=rngs)


def same_conv(layer: nnx.Conv, x_BHWC: jax.Array) -> jax.Array:
  """`layer(x)`, as Winograd F(4x4, 3x3) (`var_jax.winograd`) where that is faster: a 3x3, stride-1
  float32 convolution on CPU of a map >= 64 px a side with >= 32 input channels (the decoder's 256 and
  128 px ResnetBlocks: ~1.7x faster each, ~2e-6 relative rounding instead of ~2e-7)."""
  kernel = layer.kernel[...]
  if layer.padding == 'SAME' and winograd.applies(x_BHWC.shape, kernel.shape, layer.strides, x_BHWC.dtype):
    return winograd.conv3x3(x_BHWC, kernel, layer.bias[...])
  return layer(x_BHWC)


class GroupNorm(nnx.Module):
  """Official `Normalize`: GroupNorm(32 groups, eps 1e-6, affine) over (B, ..., C), exact (two-pass)
  variance; parameters `scale`, `bias` (C,) as `nnx.GroupNorm`'s.

  The statistics are per-channel sums over the spatial axes (C the minor, vectorised axis), added up
  per group afterwards on (B, C)-sized arrays, then one fused scale-and-shift per element, instead of
  reductions over (B, HW, G, C/G) (with `xla_cpu.DECODE`'s YNN sums, GroupNorm + SiLU at 256 px and 160
  channels take 18-20 ms against 25 for `nnx.GroupNorm` without them; its sums alone 1 ms against 14).
  """

  def __init__(self, channels: int, *, num_groups: int = GN_GROUPS, epsilon: float = GN_EPS):
    if channels % num_groups:
      raise ValueError(f'GroupNorm needs channels divisible by {num_groups}, got {channels}; '
                       f'choose ch and ch_mult so that every ch * mult is a multiple of {num_groups}')
    self.num_groups, self.epsilon = num_groups, epsilon
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(self, x_BSC: jax.Array) -> jax.Array:
    B, C = x_BSC.shape[0], x_BSC.shape[-1]
    spatial = tuple(range(1, x_BSC.ndim - 1))
    n = math.prod(x_BSC.shape[1:-1]) * (C // self.num_groups)      # elements per group

    def per_group(sum_BC):                                          # (B, C) -> (B, C): group sums
      sum_BG = einops.reduce(sum_BC, 'b (g c) -> b g', 'sum', g=self.num_groups)
      return einops.repeat(sum_BG, 'b g -> b (g c)', c=C // self.num_groups)

    mean_BC = per_group(jnp.sum(x_BSC, axis=spatial)) / n
    expand = (B,) + (1,) * len(spatial) + (C,)
    d_BSC = x_BSC - mean_BC.reshape(expand)
    var_BC = per_group(jnp.sum(d_BSC * d_BSC, axis=spatial)) / n
    a_BC = jax.lax.rsqrt(var_BC + self.epsilon) * self.scale[...]
    return d_BSC * a_BC.reshape(expand) + self.bias[...]      # not x a + (b - mean a): that cancels


def _phase_taps(k: jax.Array, phase: int, axis: int) -> jax.Array:
  """The 2 taps a 3-tap kernel axis `axis` becomes on a nearest-x2-upsampled input, for outputs of
  parity `phase` along it: even ones read input positions (i-1, i) with taps (k0, k1 + k2), odd ones
  (i, i+1) with (k0 + k1, k2)."""
  k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
  return jnp.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis=axis)


def upsample_conv3x3(x_BhwC: jax.Array, kernel_33IO: jax.Array, bias_O: jax.Array) -> jax.Array:
  """conv3x3(SAME)(nearest_x2(x)) + bias, (B, 2h, 2w, O), without forming the upsampled map.

  Each output pixel of parity (p, q) sees a 2 x 2 window of x, so the conv is four 2 x 2 convs at the
  low resolution, one per parity, whose taps are sums of the 3 x 3 kernel's (`_phase_taps`); their
  outputs interleave. 4 multiply-adds per output pixel and channel pair instead of 9 (2.25x fewer
  FLOPs); the same sums as the official conv but for the taps added before multiplying (fp32 rounding).
  """
  B, h, w, _ = x_BhwC.shape
  pads = ((1, 0), (0, 1))                    # parity 0 reads rows (i-1, i), parity 1 reads (i, i+1)
  rows = []
  for p in range(2):
    k_p = _phase_taps(kernel_33IO, p, axis=0)                      # (2, 3, I, O)
    cols = []
    for q in range(2):
      k_pq = _phase_taps(k_p, q, axis=1)                           # (2, 2, I, O)
      cols.append(jax.lax.conv_general_dilated(x_BhwC, k_pq, (1, 1), (pads[p], pads[q]),
                                               dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    rows.append(jnp.stack(cols, axis=3))                           # (B, h, w, 2 [q], O)
  y_BhpwqO = jnp.stack(rows, axis=2)                               # (B, h, 2 [p], w, 2 [q], O)
  return y_BhpwqO.reshape(B, 2 * h, 2 * w, -1) + bias_O


def conv3x3_narrow(x_BHWC: jax.Array, kernel_33IO: jax.Array, bias_O: jax.Array) -> jax.Array:
  """conv3x3(SAME)(x) + bias for a conv with few outputs (the decoder's RGB `conv_out`): one matmul to
  the 9 taps' outputs (C -> 9 O), then the nine maps shifted into place and summed. XLA's convolution
  runs a 160 -> 3 conv at 256 px at ~40 GFLOP/s (16 ms); this takes ~3 ms. The same products, summed
  in another order (fp32 rounding)."""
  B, H, W, _ = x_BHWC.shape
  taps_BHWyxO = jnp.einsum('bhwi,yxio->bhwyxo', x_BHWC, kernel_33IO)
  pad_BHWyxO = jnp.pad(taps_BHWyxO, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
  # output (i, j) sums tap (y, x) of input (i + y - 1, j + x - 1): padded row i + y, column j + x
  out = sum(pad_BHWyxO[:, y:y + H, x:x + W, y, x] for y in range(3) for x in range(3))
  return out + bias_O


class Upsample2x(nnx.Module):
  """Nearest-neighbour x2 then conv3x3 (official `Upsample2x`), as four low-resolution 2 x 2 convs
  (`upsample_conv3x3`); `direct=True` upsamples then convolves, as the official code."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, direct: bool = False):
    self.conv = conv(channels, channels, 3, rngs=rngs)
    self.direct = direct

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if self.direct:
      return self.conv(jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2))
    return upsample_conv3x3(x_BHWC, self.conv.kernel[...], self.conv.bias[...])


class Downsample2x(nnx.Module):
  """Zero-pad bottom/right by one, then conv3x3 with stride 2 and no padding."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.conv(x_BHWC)


class ResnetBlock(nnx.Module):
  """x -> shortcut(x) + conv2(silu(gn2(conv1(silu(gn1(x)))))); 1x1 `nin_shortcut` iff channels change.
  The 3x3 convolutions run as Winograd's where that is faster (`same_conv`); `direct=True` keeps XLA's
  convolution everywhere, as `Upsample2x`'s flag."""

  def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs, direct: bool = False):
    self.direct = direct
    self.norm1 = GroupNorm(c_in)
    self.conv1 = conv(c_in, c_out, 3, rngs=rngs)
    self.norm2 = GroupNorm(c_out)
    self.conv2 = conv(c_out, c_out, 3, rngs=rngs)
    self.nin_shortcut = conv(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    conv3x3 = (lambda layer, x: layer(x)) if self.direct else same_conv
    h = conv3x3(self.conv1, jax.nn.silu(self.norm1(x_BHWC)))
    h = conv3x3(self.conv2, jax.nn.silu(self.norm2(h)))
    skip = x_BHWC if self.nin_shortcut is None else self.nin_shortcut(x_BHWC)
    return skip + h


def direct_clone(model: nnx.Module, kinds: tuple[type, ...] | None = None) -> nnx.Module:
  """A copy of `model` whose modules of `kinds` (default: `ResnetBlock` and `Upsample2x`) compute their
  convolutions as the official code does (`direct=True`); `model` is left as it is."""
  kinds = (ResnetBlock, Upsample2x) if kinds is None else kinds
  out = nnx.clone(model)
  for _, module in nnx.iter_modules(out):
    if isinstance(module, kinds):
      module.direct = True
  return out


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention over all H*W positions, residual; qkv and proj are 1x1 convs."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.norm = GroupNorm(channels)
    self.qkv = conv(channels, 3 * channels, 1, rngs=rngs)
    self.proj_out = conv(channels, channels, 1, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = x_BHWC.shape
    qkv_BL3C = self.qkv(self.norm(x_BHWC)).reshape(B, H * W, 3 * C)
    q_BLC, k_BLC, v_BLC = jnp.split(qkv_BL3C, 3, axis=-1)  # official channel order: q, k, v
    att_BLL = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q_BLC, k_BLC) * C ** -0.5, axis=-1)
    h_BLC = jnp.einsum('bqk,bkc->bqc', att_BLL, v_BLC)
    return x_BHWC + self.proj_out(h_BLC.reshape(B, H, W, C))


class MidBlock(nnx.Module):
  """ResnetBlock -> AttnBlock (optional) -> ResnetBlock at the lowest resolution."""

  def __init__(self, channels: int, using_sa: bool, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, rngs=rngs)
    self.attn_1 = AttnBlock(channels, rngs=rngs) if using_sa else None
    self.block_2 = ResnetBlock(channels, channels, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.block_1(x_BHWC)
    if self.attn_1 is not None:
      h = self.attn_1(h)
    return self.block_2(h)


class Level(nnx.Module):
  """One resolution level: `n` ResnetBlocks (each optionally followed by attention), then resampling."""

  def __init__(self, c_in: int, c_out: int, n: int, *, using_sa: bool, resample: str | None,
               rngs: nnx.Rngs):
    if resample not in (None, 'down', 'up'):
      raise ValueError(f"resample must be None, 'down' or 'up', got {resample!r}")
    self.block = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, rngs=rngs) for i in range(n)])
    self.attn = nnx.List([AttnBlock(c_out, rngs=rngs) for _ in range(n)] if using_sa else [])
    self.downsample = Downsample2x(c_out, rngs=rngs) if resample == 'down' else None
    self.upsample = Upsample2x(c_out, rngs=rngs) if resample == 'up' else None

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = x_BHWC
    for i, block in enumerate(self.block):
      h = block(h)
      if len(self.attn):
        h = self.attn[i](h)
    if self.downsample is not None:
      h = self.downsample(h)
    if self.upsample is not None:
      h = self.upsample(h)
    return h


class Encoder(nnx.Module):
  """(B, H, W, 3) image -> (B, H/d, W/d, z_channels) features, d = 2 ** (len(ch_mult) - 1)."""

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
               using_sa: bool, using_mid_sa: bool, in_channels: int = 3, rngs: nnx.Rngs):
    n_levels = len(ch_mult)
    in_mult = (1,) + tuple(ch_mult)
    self.conv_in = conv(in_channels, ch, 3, rngs=rngs)
    self.down = nnx.List([
        Level(ch * in_mult[i], ch * ch_mult[i], num_res_blocks,
              using_sa=using_sa and i == n_levels - 1,
              resample='down' if i != n_levels - 1 else None, rngs=rngs)
        for i in range(n_levels)])
    c_top = ch * ch_mult[-1]
    self.mid = MidBlock(c_top, using_mid_sa, rngs=rngs)
    self.norm_out = GroupNorm(c_top)
    self.conv_out = conv(c_top, z_channels, 3, rngs=rngs)

  def __call__(self, img_BHWC: jax.Array) -> jax.Array:
    h = self.conv_in(img_BHWC)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """(B, h, w, z_channels) features -> (B, h*d, w*d, 3) image (unclamped).

  `up[i]` is the level at resolution i (official order); it runs from the last level to the first.
  """

  def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
               using_sa: bool, using_mid_sa: bool, out_channels: int = 3, rngs: nnx.Rngs):
    n_levels = len(ch_mult)
    c_top = ch * ch_mult[-1]
    self.conv_in = conv(z_channels, c_top, 3, rngs=rngs)
    self.mid = MidBlock(c_top, using_mid_sa, rngs=rngs)
    c_ins = [ch * ch_mult[i + 1] if i != n_levels - 1 else c_top for i in range(n_levels)]
    self.up = nnx.List([
        Level(c_ins[i], ch * ch_mult[i], num_res_blocks + 1,
              using_sa=using_sa and i == n_levels - 1,
              resample='up' if i != 0 else None, rngs=rngs)
        for i in range(n_levels)])
    self.norm_out = GroupNorm(ch * ch_mult[0])
    self.conv_out = conv(ch * ch_mult[0], out_channels, 3, rngs=rngs)

  def __call__(self, z_BhwC: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z_BhwC))
    for level in reversed(self.up):
      h = level(h)
    h = jax.nn.silu(self.norm_out(h))
    if self.conv_out.kernel.shape[-1] <= NARROW_OUT:
      return conv3x3_narrow(h, self.conv_out.kernel[...], self.conv_out.bias[...])
    return self.conv_out(h)
