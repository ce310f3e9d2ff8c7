"""Sliding window plus a running summary of everything evicted (Haris & Onak, COLT 2025).

Haris & Onak (arXiv 2502.15955, "Compression Barriers in Autoregressive Transformers") give an O(dW)
space algorithm for sliding-window attention in which the tokens outside the window are not masked
out but enter the softmax with a constant logit (their "unmasked value cache"): then the W most
recent tokens plus the running sum of the evicted values and their count answer every query exactly,
since the evicted tokens contribute count * exp(c) to the normaliser and exp(c) * sum(v) to the
numerator.

For softmax attention over VAR caches we keep, per head, the W most recent tokens (in token order:
later scales, raster order inside a scale) and a summary of every evicted token: the sums of their
keys and values (float32) and their count (uint16). The summary enters attention as one extra entry
at the mean key, with the mean value and logit bias log(count). This is exact in Haris-Onak's setting
and whenever every evicted key gives a query the same logit (e.g. identical evicted keys), because
then q.mean_key = that logit; for general softmax attention it is the first-order (mean-key)
approximation of the evicted block.

Memory: W entries of keys and values at the geometry dtype, a 16-bit count of kept entries, and the
summary header (2 * head_dim float32 sums + a 16-bit count). W is the most the budget leaves room for;
a budget below the header keeps a plain sliding window without a summary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from compress.core.accounting import COUNT_DTYPE, dtype_bits
from compress.core.attention import attend_output
from compress.core.registry import register
from compress.core.slot_compressor import SlotCompressor
from compress.core.slots import empty_slots, gather_entries

SUM_DTYPE = jnp.float32
EVICTED_DTYPE = jnp.uint16


@register
@dataclasses.dataclass(frozen=True)
class WindowSum(SlotCompressor):
  """The W most recent tokens exactly, plus one mean-key summary entry for all evicted tokens."""
  name = 'window_sum'
  family = 'window'

  def summary_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    D = self.geometry.head_dim
    return {'ksum': ((D,), SUM_DTYPE), 'vsum': ((D,), SUM_DTYPE), 'evicted': ((), EVICTED_DTYPE)}

  @property
  def summary_bits(self) -> int:
    return sum(math.prod(s) * dtype_bits(d) for s, d in self.summary_fields().values())

  @property
  def has_summary(self) -> bool:
    """Whether the budget holds the summary header."""
    return self.budget.bits >= self.summary_bits

  def header_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return self.summary_fields() if self.has_summary else {}

  @property
  def capacity(self) -> int:
    """W: window entries that fit beside the summary (and the 16-bit entry count when W > 0)."""
    entry = 2 * self.geometry.head_dim * self.geometry.kv_bits
    header = (self.summary_bits if self.has_summary else 0) + dtype_bits(COUNT_DTYPE)
    return self.slot_capacity(entry, header)

  def init_compressed(self, batch: int, num_heads: int):
    m = self.capacity
    state = empty_slots(batch, num_heads, m, (self.geometry.head_dim,), self.geometry.kv_dtype,
                        header=self.header_fields())
    return state.replace(count_implied=(m == 0))   # an always-empty window stores no count

  def summary_entry(self, state) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The summary as one cache entry: key, value (B, H, 1, D), valid and bias (B, H, 1)."""
    n_BH = state.header['evicted'].astype(jnp.float32)
    inv = (1.0 / jnp.maximum(n_BH, 1.0))[..., None]
    k = (state.header['ksum'] * inv)[:, :, None]
    v = (state.header['vsum'] * inv)[:, :, None]
    return k, v, (n_BH > 0)[..., None], jnp.log(jnp.maximum(n_BH, 1.0))[..., None]

  def compress_step(self, params, state, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    f32 = jnp.float32
    ck, cv, cvalid = state.k.astype(f32), state.v.astype(f32), state.valid
    cbias = jnp.zeros(cvalid.shape, f32)
    if self.has_summary:
      sk, sv, svalid, sbias = self.summary_entry(state)
      cat = lambda a, b: jnp.concatenate([a, b], axis=2)
      ck, cv, cvalid, cbias = cat(ck, sk), cat(cv, sv), cat(cvalid, svalid), cat(cbias, sbias)
    out = attend_output(q_BHSD, ck, cv, cvalid, cbias, k_BHSD, v_BHSD)
    if self.is_last(scale):
      return out, state
    return out, self.absorb(state, k_BHSD, v_BHSD)

  def absorb(self, state, k_BHSD, v_BHSD):
    """Appends the new scale, keeps the last W tokens, adds the rest to the summary."""
    f32 = jnp.float32
    B, H, S, _ = k_BHSD.shape
    W = state.capacity
    cat = lambda a, b: jnp.concatenate([a, b], axis=2)
    k = cat(state.k.astype(f32), k_BHSD.astype(f32))                 # (B, H, M + S, D), token order
    v = cat(state.v.astype(f32), v_BHSD.astype(f32))
    valid = cat(state.valid, jnp.ones((B, H, S), bool))
    rank = jnp.cumsum(valid, axis=2) - 1                            # position among the valid ones
    n = valid.sum(axis=2, keepdims=True)
    keep = valid & (rank >= n - W)
    evict = valid & ~keep
    if self.has_summary:
      ev = evict[..., None].astype(f32)
      header = {'ksum': state.header['ksum'] + (ev * k).sum(axis=2),
                'vsum': state.header['vsum'] + (ev * v).sum(axis=2),
                'evicted': (state.header['evicted'].astype(jnp.int32) + evict.sum(axis=2)
                            ).astype(EVICTED_DTYPE)}
      state = state.replace(header=header)
    if W == 0:
      return state
    idx = jnp.argsort(~keep, axis=2, stable=True)[:, :, :W]        # kept tokens, in token order
    keep_W = jnp.take_along_axis(keep, idx, axis=2)
    zero = lambda x: jnp.where(keep_W[..., None], x, 0.0)
    return state.replace(k=zero(gather_entries(k, idx)).astype(state.k.dtype),
                         v=zero(gather_entries(v, idx)).astype(state.v.dtype),
                         count=keep_W.sum(axis=2).astype(COUNT_DTYPE))
