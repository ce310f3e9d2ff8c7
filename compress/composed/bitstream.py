"""Variable-width codes packed into a fixed-size bitstream per entry.

An entry holds R integer codes with per-head widths w_R in [0, MAX_WIDTH] (traced: they may differ
between heads and layers); code j occupies bits [o_j, o_j + w_j) of the entry's E-bit stream, o = the
exclusive cumulative sum of w, least significant bit first. The stream is stored as ceil(E / 8) uint8
bytes, so the array a state holds is exactly its memory. Requires sum(w) <= E.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_WIDTH = 8


def _positions(width_HR: jax.Array, num_bits: int) -> tuple[jax.Array, jax.Array]:
  """(H, R, MAX_WIDTH) bit positions of every code bit (num_bits = unused), and which bits exist."""
  w = width_HR.astype(jnp.int32)
  offset = jnp.cumsum(w, axis=-1) - w
  t = jnp.arange(MAX_WIDTH, dtype=jnp.int32)
  used = t < w[..., None]
  return jnp.where(used, offset[..., None] + t, num_bits), used


def pack_stream(codes_BHMR: jax.Array, width_HR: jax.Array, num_bits: int) -> jax.Array:
  """Codes (B, H, M, R) (< 2^w) -> (B, H, M, ceil(num_bits / 8)) uint8 streams."""
  B, H, M, R = codes_BHMR.shape
  nbytes = -(-num_bits // 8)
  pos_HRT, used_HRT = _positions(width_HR, nbytes * 8)
  t = jnp.arange(MAX_WIDTH, dtype=jnp.uint32)
  bits = (codes_BHMR.astype(jnp.uint32)[..., None] >> t) & 1                       # (B, H, M, R, T)
  bits = jnp.where(used_HRT[:, None], bits, 0).reshape(B, H, M, R * MAX_WIDTH)
  pos = jnp.broadcast_to(pos_HRT.reshape(1, H, 1, R * MAX_WIDTH), bits.shape)
  stream = jnp.zeros((B, H, M, nbytes * 8 + 1), jnp.uint32)
  stream = jax.vmap(jax.vmap(jax.vmap(lambda s, p, b: s.at[p].add(b))))(stream, pos, bits)[..., :-1]
  stream = stream.reshape(B, H, M, nbytes, 8) << jnp.arange(8, dtype=jnp.uint32)
  return stream.sum(-1).astype(jnp.uint8)


def unpack_stream(stream_BHMP: jax.Array, width_HR: jax.Array) -> jax.Array:
  """Inverse of `pack_stream`: (B, H, M, P) uint8 -> (B, H, M, R) int32 codes."""
  B, H, M, P = stream_BHMP.shape
  R = width_HR.shape[-1]
  bits = (stream_BHMP.astype(jnp.uint32)[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1
  bits = jnp.concatenate([bits.reshape(B, H, M, P * 8), jnp.zeros((B, H, M, 1), jnp.uint32)], -1)
  pos_HRT, used_HRT = _positions(width_HR, P * 8)
  pos = jnp.broadcast_to(pos_HRT.reshape(1, H, 1, R * MAX_WIDTH), (B, H, M, R * MAX_WIDTH))
  got = jnp.take_along_axis(bits, pos, axis=-1).reshape(B, H, M, R, MAX_WIDTH)
  got = jnp.where(used_HRT[:, None], got, 0) << jnp.arange(MAX_WIDTH, dtype=jnp.uint32)
  return got.sum(-1).astype(jnp.int32)
