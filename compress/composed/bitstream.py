"""Variable-width codes packed into a fixed-size bitstream per entry.

An entry holds R integer codes with per-head widths w_R in [0, MAX_WIDTH] (traced: they may differ
between heads and layers); code j occupies bits [o_j, o_j + w_j) of the entry's E-bit stream, o = the
exclusive cumulative sum of w, least significant bit first. The stream is stored as ceil(E / 8) uint8
bytes, so the array a state holds is exactly its memory. Requires sum(w) <= E.

Both directions work heads first, on whole rows of little-endian uint32 words: the codes of a head
laid out (R, B x M), its stream (words, B x M). Packing adds each code's two word-pieces into their
word rows (a scatter of 2R rows per head), unpacking gathers each code's two words, so no index grows
with the batch or the entries (a per-element index cost ~3x the time in the composed step; packing
bit by bit cost 8 x bytes rows). The stream moves between the entries' layout (B, H, M, bytes) and
heads first as uint32 words: the same transpose on uint8 bytes cost ~4x. Packing first holds the
codes in memory as uint16, unpacking the words and the codes: left to XLA's fusion, the codes' producer (the
quantiser, the merge) was recomputed for each piece in transposed order (over half of the composed
step's time at d16, docs/composed.md, "Packing from memory"), and the transposed stream inside the
read-back's table gather (~20x that gather's time at d16's last scale).
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


def held(x: jax.Array, valid: jax.Array) -> jax.Array:
  """x, computed into memory before its consumers run: XLA fuses no producer across a conditional
  (its optimisation barrier is dropped on CPU). `valid`: a traced True (e.g. all(widths >= 0))."""
  return jax.lax.cond(valid, lambda a: a, jnp.zeros_like, x)


def _to_bytes(words_BHMW: jax.Array, nbytes: int) -> jax.Array:
  """uint32 words (..., W) -> their first `nbytes` little-endian bytes (..., nbytes) uint8: the words'
  memory read as bytes (XLA's bitcast, in the machine's byte order: little-endian on every device XLA
  targets; tests/test_composed_codes.py checks the bytes against numpy's packing). Packing d16's scale
  8 (423 entries of 504 bits, 32 sequence-heads) takes 1.2 ms with it against 1.5 shifting out each
  byte; 254 entries of 840 bits 0.42 against 0.69."""
  parts = jax.lax.bitcast_convert_type(words_BHMW, jnp.uint8)                    # (..., W, 4)
  return parts.reshape(*words_BHMW.shape[:-1], -1)[..., :nbytes]


def _to_words(stream_BHMP: jax.Array) -> jax.Array:
  """uint8 bytes (..., P) -> uint32 little-endian words (..., ceil(P / 4)) (missing bytes 0); the last,
  partial word apart (padding the uint8 stream to whole words cost more than the rest at d16)."""
  P = stream_BHMP.shape[-1]
  whole, rest = divmod(P, 4)
  quads = stream_BHMP[..., :4 * whole].reshape(*stream_BHMP.shape[:-1], whole, 4).astype(jnp.uint32)
  words = sum(quads[..., j] << (8 * j) for j in range(4))
  if not rest:
    return words
  tail = sum(stream_BHMP[..., 4 * whole + j].astype(jnp.uint32) << (8 * j) for j in range(rest))
  return jnp.concatenate([words, tail[..., None]], axis=-1)


def _layout(width_HR: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Where each code sits: (first word (H, R), bit offset in it (H, R, 1) uint32, width mask (H, R, 1)
  uint32, a traced True for `held`)."""
  w = width_HR.astype(jnp.int32)
  offset = jnp.cumsum(w, axis=-1) - w                                           # (H, R)
  mask = (jnp.uint32(1) << w.astype(jnp.uint32)) - 1
  valid = jnp.all(w >= 0)                            # always true; traced, so XLA keeps the boundary
  return offset // 32, (offset % 32).astype(jnp.uint32)[..., None], mask[..., None], valid


def pack_heads_first(codes_HRBM: jax.Array, width_HR: jax.Array, num_bits: int) -> jax.Array:
  """Codes heads first (H, R, B, M) (< 2^w) -> (B, H, M, ceil(num_bits / 8)) uint8 streams.

  Stream bit e is bit e - o_j of the code j that holds it (0 past the last code). The stream is built
  as little-endian uint32 words: a code of <= 16 bits shifted to its word's bit offset spans at most
  two words, and each of its two pieces is added (= or-ed: the codes' bit ranges are disjoint) into its
  word row, whole rows per head; the words are transposed to the entries' layout as uint32 (a uint8
  transpose of the bytes cost ~4x), then split into bytes."""
  H, R, B, M = codes_HRBM.shape
  nbytes = -(-num_bits // 8)
  nwords = -(-nbytes // 4)
  first, shift, mask, valid = _layout(width_HR)
  # the codes as uint16, held in memory (module doc: fused into the pieces below, their whole producer
  # ran once per piece)
  code = held(codes_HRBM.astype(jnp.uint32).astype(jnp.uint16).reshape(H, R, B * M), valid)
  code = code.astype(jnp.uint32) & mask                                         # (H, R, BM)
  low = code << shift                                # the bits that stay in word o // 32
  high = (code >> 1) >> (31 - shift)                 # the rest, in the next word (0 when shift = 0)
  rows = jnp.concatenate([first, first + 1], axis=1)                            # (H, 2R)
  pieces = jnp.concatenate([low, high], axis=1)                                 # (H, 2R, BM)
  # pieces past the stream are zero (sum(w) <= num_bits): they land in a spare row, then dropped
  word = jax.vmap(lambda r, p: jnp.zeros((nwords + 1, B * M), jnp.uint32).at[r].add(p, mode='drop'))(
      jnp.minimum(rows, nwords), pieces)
  return _to_bytes(_heads_back(word[:, :nwords], B, M), nbytes)


def unpack_heads_first(stream_BHMP: jax.Array, width_HR: jax.Array) -> jax.Array:
  """Inverse of `pack_heads_first`: (B, H, M, P) uint8 -> (H, R, B, M) int32 codes.

  The stream as uint32 words, heads first (H, W, B * M), and the codes held in memory (module doc); a
  code of <= 16 bits spans at most two words: gather their rows, shift, mask."""
  B, H, M, P = stream_BHMP.shape
  first, shift, mask, valid = _layout(width_HR)
  words = held(_heads_first(_to_words(stream_BHMP)), valid)                    # (H, W, BM)
  # a word past the stream is clipped to its last one: a code ending before it masks it out
  low = _rows(words, first) >> shift
  high = (_rows(words, first + 1) << 1) << (31 - shift)                         # 0 when shift = 0
  codes = (low | high) & mask
  # held as uint16 (every code fits): half the bytes of the int32 copy that `held` makes
  return held(codes.astype(jnp.uint16), valid).astype(jnp.int32).reshape(H, -1, B, M)

