"""Top-k / top-p token sampling (the official `sample_with_top_k_top_p_`), sort-free.

The official filter keeps the logits >= the k-th largest, then, in ascending order of the kept ones'
probabilities, removes the prefix whose cumulative probability is <= 1 - top_p (the largest always
stays), and draws from the softmax of what is left. Both cuts are thresholds on the logit's value, so
they are found by radix selection on the logits' order-preserving uint32 keys (32 passes of a count or
a masked sum over the vocabulary, no sort), and the draw is the Gumbel-max over the kept codes with
one variate per vocabulary entry (`sample_top_k_top_p`). At d8 batch 2's last scale (512 rows of 4096
logits, k = 900) `lax.top_k` alone took 79 ms on a 2-core CPU and the whole sampler 86 ms; this one
~25 ms (docs/benchmarks.md).

Ties at a threshold are all kept (the official sort keeps some of them by position); probabilities are
summed in XLA's order rather than the official sequential cumsum, so a cumulative probability within
float32 rounding of 1 - top_p may fall on the other side.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_SIGN = 0x80000000


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


def kth_largest_key(key: Array, k: int) -> Array:
  """(..., 1) uint32: the k-th largest of `key` along the last axis (1 <= k <= its length), by radix
  selection: the largest T with count(key >= T) >= k."""
  return _largest_key_where(lambda t: jnp.sum(key >= t, axis=-1, keepdims=True) >= k, key.shape)


def kept(logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """(B, l, V) bool: the logits the official filter keeps (top_k <= 0 or >= V: no top-k; top_p <= 0:
  no top-p), by their keys against the smallest kept one's."""
  vocab = logits_BlV.shape[-1]
  x = logits_BlV.astype(jnp.float32)
  key = sortable_keys(x)
  thr = jnp.zeros(key.shape[:-1] + (1,), jnp.uint32)
  if 0 < top_k < vocab:
    thr = kth_largest_key(key, top_k)
  if top_p > 0:
    w = jnp.where(key >= thr, jnp.exp(x - jnp.max(x, axis=-1, keepdims=True)), 0.0)
    p = w / jnp.sum(w, axis=-1, keepdims=True)
    # a logit stays iff the mass of the kept ones <= it exceeds 1 - top_p: keys >= the largest T
    # whose mass below it is <= 1 - top_p; never above the largest logit (the official keeps it)
    below = _largest_key_where(
        lambda t: jnp.sum(jnp.where(key < t, p, 0.0), axis=-1, keepdims=True) <= 1 - top_p, key.shape)
    thr = jnp.maximum(thr, jnp.minimum(below, jnp.max(key, axis=-1, keepdims=True)))
  return key >= thr


def top_k_top_p_filter(logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """Official `sample_with_top_k_top_p_` masking: removed logits become -inf (`kept`)."""
  return jnp.where(kept(logits_BlV, top_k, top_p), logits_BlV, -jnp.inf)


def sample_top_k_top_p(key: Array, logits_BlV: Array, top_k: int = 0, top_p: float = 0.0) -> Array:
  """(B, l) int32 codes drawn from the softmax of the filtered logits (top_k=1: exactly greedy): the
  Gumbel-max draw, argmax over the kept codes of logit + a Gumbel variate per vocabulary entry (least
  index among ties).

  The variate belongs to the code, not to its rank among the candidates: two calls with the same key
  on slightly different logits (a compressed cache against the full one) draw the same code unless the
  winner's margin is within the perturbation, which the closed loop's token agreement relies on (an
  inverse-CDF draw, whose choice moves with every weight before it in the vocabulary, agreed on 0.41
  of the built-in model's tokens at kivi 25 % where this draw agrees on 0.85)."""
  x = logits_BlV.astype(jnp.float32)
  keep = kept(x, top_k, top_p)
  # held in memory: fused into both reductions of `first_max_index`, the variates were drawn twice (18
  # against 7 ms at 512 x 4096, one measurement)
  z_BlV = jax.lax.optimization_barrier(
      jnp.where(keep, x + jax.random.gumbel(key, x.shape, jnp.float32), -jnp.inf))
  return first_max_index(z_BlV)


def first_max_index(x_BN: jax.Array) -> jax.Array:
  """(...,) int32: the index of the first maximum along the last axis, as `jnp.argmax` gives it for
  NaN-free rows (an all -inf row gives 0), from two plain reductions (max, then the least index that
  attains it): XLA CPU runs argmax as a variadic (value, index) reduction, 3-4x slower on the merge
  compressors' (candidates x kept) similarity matrices (docs/benchmarks.md). Used by the Gumbel-max draw
  here and by compress.core.topk's users."""
  n = x_BN.shape[-1]
  hit = x_BN == x_BN.max(-1, keepdims=True)
  return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n - 1), axis=-1)
