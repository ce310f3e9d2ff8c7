"""Top-k / top-p token sampling (official `sample_with_top_k_top_p_` + `torch.multinomial`), sort-free.

The official filter keeps the logits >= the k-th largest, then, in ascending order of the kept ones'
probabilities, removes the prefix whose cumulative probability is <= 1 - top_p (the largest always
stays), and draws from the softmax of what is left. Both cuts are thresholds on the logit's value, so
they are found by radix selection on the logits' order-preserving uint32 keys (32 passes of a count or
a masked sum over the vocabulary, no sort), and the draw is the inverse CDF of the kept weights in
vocabulary order with one uniform per token (as `torch.multinomial`), not a Gumbel variate per
candidate. At d8 batch 2's last scale (512 rows of 4096 logits, k = 900) `lax.top_k` alone took 79 ms
on a 2-core CPU; this sampler takes ~20 ms (docs/benchmarks.md).

Ties at a threshold are all kept (the official sort keeps some of them by position); probabilities are
summed in XLA's order rather than the official sequential cumsum, so a cumulative probability within
float32 rounding of 1 - top_p may fall on the other side.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_SIGN = 0x80000000
BLOCK = 64          # codes per block of the two-level inverse-CDF draw


def sortable_keys(x: Array) -> Array:
  """float32 -> uint32 with the same order (-inf lowest, +inf highest; -0.0 and 0.0 one key)."""
  x = x.astype(jnp.float32)
  u = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
  return jnp.where(u >= jnp.uint32(_SIGN), ~u, u | jnp.uint32(_SIGN))


def _largest_key_where(pred, shape: tuple[int, ...]) -> Array:
  """The largest T in [0, 2^32) with pred(T) true, (..., 1) uint32, for a predicate monotone in T
  (true up to some T, false above) and true at 0: set the bits from the top, keeping each that
  leaves pred true."""
  def body(i, t):
    cand = t | jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    return jnp.where(pred(cand), cand, t)
  return jax.lax.fori_loop(0, 32, body, jnp.zeros(shape[:-1] + (1,), jnp.uint32))


def kept_threshold(logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """(B, l, 1) uint32: the key (`sortable_keys`) of the smallest logit the official filter keeps."""
  vocab = logits_BlV.shape[-1]
  x = logits_BlV.astype(jnp.float32)
  key = sortable_keys(x)
  thr = jnp.zeros(key.shape[:-1] + (1,), jnp.uint32)
  if 0 < top_k < vocab:                                    # the k-th largest: count(key >= T) >= k
    thr = _largest_key_where(lambda t: jnp.sum(key >= t, axis=-1, keepdims=True) >= top_k, key.shape)
  if top_p > 0:
    kept = key >= thr
    w = jnp.where(kept, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    p = w / jnp.sum(w, axis=-1, keepdims=True)
    # a logit stays iff the mass of the kept ones <= it exceeds 1 - top_p: keys >= the largest T
    # whose mass below it is <= 1 - top_p; never above the largest logit (the official keeps it)
    below = _largest_key_where(
        lambda t: jnp.sum(jnp.where(key < t, p, 0.0), axis=-1, keepdims=True) <= 1 - top_p, key.shape)
    thr = jnp.maximum(thr, jnp.minimum(below, jnp.max(key, axis=-1, keepdims=True)))
  return thr


def top_k_top_p_filter(logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """Official `sample_with_top_k_top_p_` masking: removed logits become -inf (top_k <= 0 or >= V: no
  top-k; top_p <= 0: no top-p)."""
  keep = sortable_keys(logits_BlV) >= kept_threshold(logits_BlV, top_k, top_p)
  return jnp.where(keep, logits_BlV, -jnp.inf)


def _first_above(cum_XN: Array, u_X1: Array, w_XN: Array) -> Array:
  """(X,) index of the first cumulative weight > u, never one of weight 0 (u rounding to or past the
  total: the last positive one)."""
  idx = jnp.sum(cum_XN <= u_X1, axis=-1)
  last = jnp.max(jnp.where(w_XN > 0, jnp.arange(w_XN.shape[-1]), 0), axis=-1)
  return jnp.minimum(idx, last)


def sample_top_k_top_p(key: Array, logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """(B, l) int32 codes drawn from the softmax of the filtered logits (top_k=1: exactly greedy, ties
  at the maximum aside): one uniform u per token, the first code whose cumulative kept weight (in
  vocabulary order) exceeds u x their total, found in two levels (blocks of `BLOCK` codes, then the
  codes of the block) so that no cumulative sum runs over the vocabulary."""
  x = logits_BlV.astype(jnp.float32)
  *lead, V = x.shape
  keep = sortable_keys(x) >= kept_threshold(x, top_k, top_p)
  w = jnp.where(keep, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0).reshape(-1, V)
  nb = -(-V // BLOCK)
  w_XNb = jnp.pad(w, ((0, 0), (0, nb * BLOCK - V))).reshape(-1, nb, BLOCK)
  bsum_XN = w_XNb.sum(-1)
  bcum_XN = jnp.cumsum(bsum_XN, axis=-1)
  u_X1 = jax.random.uniform(key, (w.shape[0], 1)) * bcum_XN[:, -1:]
  blk = _first_above(bcum_XN, u_X1, bsum_XN)                                       # (X,)
  w_Xb = jnp.take_along_axis(w_XNb, blk[:, None, None], axis=1)[:, 0]
  below_X1 = jnp.take_along_axis(bcum_XN - bsum_XN, blk[:, None], axis=1)      # mass before the block
  j = _first_above(jnp.cumsum(w_Xb, axis=-1), jnp.maximum(u_X1 - below_X1, 0.0), w_Xb)
  return (blk * BLOCK + j).reshape(lead).astype(jnp.int32)
