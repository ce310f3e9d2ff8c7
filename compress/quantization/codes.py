"""Integer quantisers and bit packing for KV caches (asymmetric min-max, fp16 scale and zero point).

A group of coordinates x shares a scale s and a zero point z, both stored as float16; a coordinate is
stored as the code c = clip(round((x - z) / s), 0, 2^b - 1) and read back as x_hat = z + c * s. The zero
point is min(x) rounded DOWN to float16 and the scale (max(x) - z) / (2^b - 1) rounded UP to float16, so
the stored grid covers the whole group and every coordinate obeys |x - x_hat| <= s / 2 (closed form,
up to float32 arithmetic), with the fp16 rounding of s and z already inside that bound.

Codes live packed in uint8 arrays: one int8, two int4 or four int2 codes per byte (little end first), so
a state's arrays are its real memory. Two layouts (KIVI): per token (one entry's channels in groups of
`group` channels share a scale: shapes (..., N, D) -> scales (..., N, ceil(D/group))) and per channel
(each channel of `group` consecutive entries shares a scale: (..., M, D) -> scales (..., ceil(M/group), D)).
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp

BIT_WIDTHS = (2, 4, 8)          # packed integer widths; 16 means plain float16 storage (no codes)
SCALE_DTYPE = jnp.float16       # stored dtype of scales and zero points


def check_bits(bits: int) -> None:
  if bits not in BIT_WIDTHS:
    raise ValueError(f'integer codes are {BIT_WIDTHS} bits wide, got {bits!r}')


def packed_width(n: int, bits: int) -> int:
  """Bytes that hold n codes of `bits` bits."""
  check_bits(bits)
  return math.ceil(n * bits / 8)


def pack_codes(codes_XN: jax.Array, bits: int) -> jax.Array:
  """(..., n) codes < 2^bits -> (..., ceil(n * bits / 8)) uint8; code j of a byte sits at bit j * bits."""
  check_bits(bits)
  per = 8 // bits
  n = codes_XN.shape[-1]
  pad = -n % per
  c = jnp.pad(codes_XN.astype(jnp.uint8), [(0, 0)] * (codes_XN.ndim - 1) + [(0, pad)])
  c = einops.rearrange(c, '... (n j) -> ... n j', j=per)
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  # distinct bit ranges: the sum is a bitwise or
  return jnp.sum(jnp.left_shift(c, shifts), axis=-1, dtype=jnp.uint8)


def unpack_codes(packed_XP: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of `pack_codes`: (..., P) uint8 -> (..., n) uint8 codes."""
  check_bits(bits)
  per = 8 // bits
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  mask = jnp.uint8(2 ** bits - 1)
  c = jnp.right_shift(packed_XP.astype(jnp.uint8)[..., None], shifts) & mask
  return einops.rearrange(c, '... p j -> ... (p j)')[..., :n]


def round_down_f16(x: jax.Array) -> jax.Array:
  """Largest float16 <= x (x float32)."""
  y = x.astype(jnp.float16)
  return jnp.where(y.astype(jnp.float32) > x, jnp.nextafter(y, jnp.float16(-jnp.inf)), y)


def round_up_f16(x: jax.Array) -> jax.Array:
  """Smallest float16 >= x (x float32)."""
  y = x.astype(jnp.float16)
  return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.float16(jnp.inf)), y)


def minmax_scale_zero(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """float16 (scale, zero) whose grid z + c * s, c = 0..2^b - 1, covers [lo, hi]."""
  f32 = jnp.float32
  zero = round_down_f16(lo.astype(f32))
  scale = round_up_f16(jnp.maximum(hi.astype(f32) - zero.astype(f32), 0.0) / (2 ** bits - 1))
  return scale, zero


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """uint8 codes of x on the grid (scale, zero) (broadcast against x); scale 0 -> code 0."""
  f32 = jnp.float32
  s = scale.astype(f32)
  t = (x.astype(f32) - zero.astype(f32)) / jnp.where(s > 0, s, 1.0)
  c = jnp.clip(jnp.round(jnp.where(s > 0, t, 0.0)), 0, 2 ** bits - 1)
  return c.astype(jnp.uint8)


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """float32 z + c * s (broadcast)."""
  f32 = jnp.float32
  return zero.astype(f32) + codes.astype(f32) * scale.astype(f32)


# ---- per token: an entry's channels in groups ---------------------------------------------------
def token_groups(head_dim: int, group: int) -> tuple[int, int]:
  """(channels per group, groups per entry) of the per-token layout."""
  g = max(1, min(group, head_dim))
  return g, math.ceil(head_dim / g)


def quantize_per_token(x_XND: jax.Array, bits: int, group: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x (..., N, D) -> codes (..., N, D) uint8, scale and zero (..., N, ceil(D / g)) float16."""
  D = x_XND.shape[-1]
  g, ng = token_groups(D, group)
  x = jnp.pad(x_XND.astype(jnp.float32), [(0, 0)] * (x_XND.ndim - 1) + [(0, ng * g - D)], mode='edge')
  x = einops.rearrange(x, '... (k g) -> ... k g', g=g)
  scale, zero = minmax_scale_zero(x.min(-1), x.max(-1), bits)
  codes = quantize(x, scale[..., None], zero[..., None], bits)
  return einops.rearrange(codes, '... k g -> ... (k g)')[..., :D], scale, zero


def dequantize_per_token(codes_XND: jax.Array, scale_XNK: jax.Array, zero_XNK: jax.Array, group: int
                         ) -> jax.Array:
  D = codes_XND.shape[-1]
  g, ng = token_groups(D, group)
  # broadcast each group's scale over its channels (a reshape, no gather): the same z + c * s
  c = jnp.pad(codes_XND, [(0, 0)] * (codes_XND.ndim - 1) + [(0, ng * g - D)])
  c = c.reshape(c.shape[:-1] + (ng, g))
  x = dequantize(c, scale_XNK[..., None], zero_XNK[..., None])
  return x.reshape(x.shape[:-2] + (ng * g,))[..., :D]


# ---- per channel: each channel over groups of consecutive entries -------------------------------
def channel_groups(num_entries: int, group: int) -> tuple[int, int]:
  """(entries per group, groups) of the per-channel layout over `num_entries` slots."""
  g = max(1, group)
  return g, math.ceil(num_entries / g)


def quantize_per_channel(x_XMD: jax.Array, valid_XM: jax.Array, bits: int, group: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x (..., M, D) over valid entries -> codes (..., M, D), scale and zero (..., ceil(M/g), D).

  Invalid entries get code 0 and do not widen their group's range; an all-invalid group gets
  scale = zero = 0.
  """
  M = x_XMD.shape[-2]
  g, ng = channel_groups(M, group)
  pad = [(0, 0)] * (x_XMD.ndim - 2) + [(0, ng * g - M), (0, 0)]
  x = einops.rearrange(jnp.pad(x_XMD.astype(jnp.float32), pad), '... (k g) d -> ... k g d', g=g)
  ok = jnp.pad(valid_XM, pad[:-1])
  ok = einops.rearrange(ok, '... (k g) -> ... k g', g=g)[..., None]
  any_ok = ok.any(-2)
  lo = jnp.where(any_ok, jnp.where(ok, x, jnp.inf).min(-2), 0.0)
  hi = jnp.where(any_ok, jnp.where(ok, x, -jnp.inf).max(-2), 0.0)
  scale, zero = minmax_scale_zero(lo, hi, bits)
  codes = jnp.where(ok, quantize(x, scale[..., None, :], zero[..., None, :], bits), 0)
  codes = einops.rearrange(codes, '... k g d -> ... (k g) d')[..., :M, :]
  return codes.astype(jnp.uint8), scale, zero


def expand_channel_groups(a_XKD: jax.Array, num_entries: int, group: int) -> jax.Array:
  """Per-group (..., K, D) -> per-entry (..., M, D)."""
  g, ng = channel_groups(num_entries, group)
  return jnp.repeat(a_XKD, g, axis=-2, total_repeat_length=ng * g)[..., :num_entries, :]


def dequantize_per_channel(codes_XMD: jax.Array, scale_XKD: jax.Array, zero_XKD: jax.Array,
                           group: int) -> jax.Array:
  M, D = codes_XMD.shape[-2:]
  g, ng = channel_groups(M, group)
  # broadcast each group's scales over its entries (a reshape, no gather): the same z + c * s
  c = jnp.pad(codes_XMD, [(0, 0)] * (codes_XMD.ndim - 2) + [(0, ng * g - M), (0, 0)])
  c = c.reshape(c.shape[:-2] + (ng, g, D))
  x = dequantize(c, scale_XKD[..., :ng, None, :], zero_XKD[..., :ng, None, :])
  return x.reshape(x.shape[:-3] + (ng * g, D))[..., :M, :]
