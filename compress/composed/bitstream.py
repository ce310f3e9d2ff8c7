"""Variable-width codes packed into a fixed-size bitstream per entry.

An entry holds R integer codes with per-head widths w_R in [0, MAX_WIDTH] (traced: they may differ
between heads and layers); code j occupies bits [o_j, o_j + w_j) of the entry's E-bit stream, o = the
exclusive cumulative sum of w, least significant bit first. The stream is stored as ceil(E / 8) uint8
bytes, so the array a state holds is exactly its memory. Requires sum(w) <= E.

Both directions move whole rows: the entries of a head are laid out (R or bytes, B x M); packing adds
each code's three byte-pieces into their byte rows (a scatter of 3R rows per head), unpacking gathers
each code's three bytes, so no index grows with the batch or the entries (a per-element index costs ~3x
the time in the composed step, measured on a small case with d16's scale schedule; packing bit by bit
cost 8 x bytes rows). Packing first holds the codes in memory as uint16, in their own layout and then
heads first: left to XLA's fusion, the codes' producer (the quantiser, the merge) was recomputed for
each of the three pieces in transposed order: over half of the composed step's time at d16
(docs/composed.md, "Packing from memory").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_WIDTH = 16


def _rows(x_HNX: jax.Array, idx_HE: jax.Array) -> jax.Array:
  """x[h, min(idx[h, e], N - 1)] for every head h and e: (H, E, X), whole rows gathered."""
  return jax.vmap(lambda x, i: jnp.take(x, i, axis=0, mode='clip'))(x_HNX, idx_HE)


def _heads_first(x_BHMF: jax.Array) -> jax.Array:
  """(B, H, M, F) -> (H, F, B * M)."""
  B, H, M, F = x_BHMF.shape
  return jnp.transpose(x_BHMF, (1, 3, 0, 2)).reshape(H, F, B * M)


def _heads_back(x_HFX: jax.Array, B: int, M: int) -> jax.Array:
  """(H, F, B * M) -> (B, H, M, F)."""
  H, F, _ = x_HFX.shape
  return jnp.transpose(x_HFX.reshape(H, F, B, M), (2, 0, 3, 1))


def _held(x: jax.Array, valid: jax.Array) -> jax.Array:
  """x, computed into memory before its consumers run: XLA fuses no producer across a conditional
  (its optimisation barrier is dropped on CPU). `valid`: a traced True."""
  return jax.lax.cond(valid, lambda a: a, jnp.zeros_like, x)


def pack_stream(codes_BHMR: jax.Array, width_HR: jax.Array, num_bits: int) -> jax.Array:
  """Codes (B, H, M, R) (< 2^w) -> (B, H, M, ceil(num_bits / 8)) uint8 streams.

  Stream bit e is bit e - o_j of the code j that holds it (0 past the last code). A code of <= 16 bits
  shifted to its first byte's bit offset spans at most three bytes: each of its three byte-pieces is
  added (= or-ed: the codes' bit ranges are disjoint) into its byte row, whole rows per head."""
  B, H, M, R = codes_BHMR.shape
  nbytes = -(-num_bits // 8)
  w = width_HR.astype(jnp.int32)
  offset = jnp.cumsum(w, axis=-1) - w                                           # (H, R)
  mask = (jnp.uint32(1) << w.astype(jnp.uint32)) - 1
  # the codes as uint16 in their own layout, then heads first (H, R, BM), each held in memory (module
  # doc: fused into the pieces below, their whole producer ran three times, in transposed order)
  valid = jnp.all(w >= 0)                            # always true; traced, so XLA keeps the boundary
  code = _held(codes_BHMR.astype(jnp.uint32).astype(jnp.uint16), valid)
  code = _held(_heads_first(code), valid).astype(jnp.uint32) & mask[..., None]   # (H, R, BM)
  shifted = code << (offset % 8).astype(jnp.uint32)[..., None]                  # < 2^23
  first = offset // 8
  rows = jnp.concatenate([first + i for i in range(3)], axis=1)                 # (H, 3R)
  pieces = ((shifted[:, None] >> jnp.arange(0, 24, 8, dtype=jnp.uint32)[None, :, None, None]) & 0xFF
            ).reshape(H, 3 * R, B * M)                                          # piece-major, as rows
  # pieces past the stream are zero (sum(w) <= num_bits): they land in two spare rows, then dropped
  byte = jax.vmap(lambda r, p: jnp.zeros((nbytes + 2, B * M), jnp.uint32).at[r].add(p, mode='drop'))(
      jnp.minimum(rows, nbytes + 1), pieces)
  return _heads_back(byte[:, :nbytes].astype(jnp.uint8), B, M)


def unpack_stream(stream_BHMP: jax.Array, width_HR: jax.Array) -> jax.Array:
  """Inverse of `pack_stream`: (B, H, M, P) uint8 -> (B, H, M, R) int32 codes. A code of <= 16 bits
  spans at most three bytes: gather them, shift, mask."""
  B, H, M, P = stream_BHMP.shape
  w = width_HR.astype(jnp.int32)
  offset = jnp.cumsum(w, axis=-1) - w                                           # (H, R)
  first = offset // 8
  s = _heads_first(stream_BHMP)                                                 # (H, P, BM)
  # bytes past the stream are clipped to its last one: a code ending before them masks them out
  word = sum(_rows(s, first + i).astype(jnp.uint32) << (8 * i) for i in range(3))   # (H, R, BM)
  mask = (jnp.uint32(1) << w.astype(jnp.uint32)) - 1
  codes = (word >> (offset % 8).astype(jnp.uint32)[..., None]) & mask[..., None]
  return _heads_back(codes.astype(jnp.int32), B, M)
