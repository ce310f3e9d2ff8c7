"""Merging compressors: ToMe bipartite soft matching and CaM / D2O-style evict-then-merge.

A merged entry stands for `size` tokens and carries the logit bias log(size): attention then gives it
size * exp(q.k_merged), the mass the tokens it replaced had when their keys were identical (exact in
that case; an approximation that degrades with the spread of the merged keys). Sizes are stored per
entry as uint16 (16 bits, counted by `Slots.bits`); keys and values at the geometry dtype.

Both compressors work per head on the candidates (kept entries followed by the new scale); the per-head
rules below are plain functions of (N,)-shaped arrays, vmapped over (B, H).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.base import register
from compress.slots import Candidates, SlotCompressor, pack

SIZE_DTYPE = jnp.uint16          # tokens a merged entry stands for (<= 65535)
_EPS = 1e-12


def unit_rows(x_ND: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x_ND / jnp.maximum(jnp.linalg.norm(x_ND, axis=-1, keepdims=True), _EPS)


def merge_into(target_N: jax.Array, weight_N: jax.Array, x_NF: jax.Array) -> jax.Array:
  """Weighted means of the rows of x grouped by `target` (segment ids in [0, N]; N = dropped).

  Row n of the result is sum_{i: target_i = n} weight_i x_i / sum weight_i (zero for empty groups).
  """
  N = x_NF.shape[0]
  num = jnp.zeros((N + 1, x_NF.shape[1]), jnp.float32).at[target_N].add(weight_N[:, None] * x_NF)
  den = jnp.zeros((N + 1,), jnp.float32).at[target_N].add(weight_N)
  return (num / jnp.maximum(den, 1e-30)[:, None])[:N]


def group_sum(target_N: jax.Array, x_N: jax.Array) -> jax.Array:
  """Per-group sums of x (segment ids in [0, N]; id N is the dropped bin)."""
  N = x_N.shape[0]
  return jnp.zeros((N + 1,), x_N.dtype).at[target_N].add(x_N)[:N]


def packed_order(keep_N: jax.Array) -> jax.Array:
  """Permutation that moves the kept entries to the front, keeping their relative order."""
  return jnp.argsort(~keep_N, stable=True)


# ---- ToMe ---------------------------------------------------------------------------------------
def tome_round(k_ND, v_ND, size_N, valid_N, r):
  """One round of bipartite soft matching over the valid entries (which must be packed in front).

  Valid entries alternate A (even rank) / B (odd rank); each A entry's edge goes to its most similar B
  entry by key cosine; the min(r, |A|) A entries with the most similar edges merge into their B entry
  (size-weighted means of keys and values, sizes add). Returns the updated arrays (merged A entries
  become invalid, order kept) and how many merges remain.
  """
  N = k_ND.shape[0]
  rank_N = jnp.arange(N)
  is_a = valid_N & (rank_N % 2 == 0)
  is_b = valid_N & (rank_N % 2 == 1)
  kn_ND = unit_rows(k_ND)
  sim_NN = jnp.where(is_b[None, :], kn_ND @ kn_ND.T, -jnp.inf)
  best_N = jnp.argmax(sim_NN, axis=1)
  edge_N = jnp.where(is_a, sim_NN.max(axis=1), -jnp.inf)
  r_now = jnp.minimum(r, is_a.sum())
  place_N = jnp.argsort(jnp.argsort(-edge_N, stable=True))   # rank of each edge, best first
  merged_N = is_a & (place_N < r_now)
  target_N = jnp.where(merged_N, best_N, rank_N)
  target_N = jnp.where(valid_N, target_N, N)
  new_size = group_sum(target_N, size_N)
  new_k = merge_into(target_N, size_N, k_ND)
  new_v = merge_into(target_N, size_N, v_ND)
  new_valid = valid_N & ~merged_N
  return new_k, new_v, new_size, new_valid, r - r_now


def tome_merge(k_ND, v_ND, size_N, valid_N, capacity: int):
  """Merges the valid candidates down to at most `capacity` entries (rounds until done).

  Returns (k, v, size, keep) of the first `capacity` entries, in candidate order.
  """
  def pack_front(state):
    k, v, size, valid, r = state
    o = packed_order(valid)
    return k[o], v[o], size[o], valid[o], r

  def body(state):
    return pack_front(tome_round(*state))

  r0 = jnp.maximum(valid_N.sum() - capacity, 0)
  state = pack_front((k_ND.astype(jnp.float32), v_ND.astype(jnp.float32),
                      size_N.astype(jnp.float32), valid_N, r0))
  k, v, size, valid, _ = jax.lax.while_loop(lambda s: s[4] > 0, body, state)
  return k[:capacity], v[:capacity], size[:capacity], valid[:capacity]


@dataclasses.dataclass(frozen=True)
class MergingCompressor(SlotCompressor):
  """Slot cache whose entries carry a uint16 size; the logit bias is log(size)."""

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {'size': ((), SIZE_DTYPE)}

  def bias(self, state) -> jax.Array | None:
    if 'size' not in state.extra:      # capacity 0: an empty cache
      return None
    return jnp.log(jnp.maximum(state.extra['size'].astype(jnp.float32), 1.0))

  @staticmethod
  def candidate_sizes(cand: Candidates) -> jax.Array:
    """(B, H, N) float32 sizes: stored sizes of kept entries, 1 for the new tokens."""
    return jnp.where(cand.is_new, 1.0, cand.extra['size'])


@register
@dataclasses.dataclass(frozen=True)
class ToMe(MergingCompressor):
  """ToMe (Bolya et al., ICLR 2023) bipartite soft matching on keys, with proportional attention.

  Each step merges the candidates (kept entries, then the new scale in raster order) down to the
  capacity: r = candidates - capacity merges by bipartite soft matching (alternating A/B split, key
  cosine, best r edges), repeated in rounds while r exceeds |A|. Merged keys/values are size-weighted
  means; the logit bias log(size) keeps a merged entry's attention mass (ToMe's proportional attention).
  """
  name = 'tome'
  family = 'merging'

  def select(self, params, state, cand: Candidates, scale: int, ctx):
    m = state.capacity
    if m == 0:
      return state
    merge = jax.vmap(jax.vmap(lambda k, v, s, ok: tome_merge(k, v, s, ok, m)))
    k, v, size, keep = merge(cand.k, cand.v, self.candidate_sizes(cand), cand.valid)
    return pack(k, v, keep, {'size': size}, state)


# ---- CaM / D2O ----------------------------------------------------------------------------------
def cam_merge(k_ND, v_ND, size_N, score_N, mass_N, valid_N, capacity: int, threshold: float):
  """Keeps the top-`capacity` candidates by `score`; merges each evicted one into its nearest kept one.

  An evicted entry joins the kept entry of highest key cosine if that cosine is >= `threshold` (else
  it is dropped). A group's key and value are means weighted by the current attention mass `mass`
  (sizes break ties when masses underflow); sizes and scores add. Returns (k, v, size, score, keep) of
  the kept entries (best score first).
  """
  N = k_ND.shape[0]
  _, idx_M = jax.lax.top_k(jnp.where(valid_N, score_N, -jnp.inf), capacity)
  keep_M = valid_N[idx_M]
  kept_N = jnp.zeros((N,), bool).at[idx_M].set(keep_M)
  evicted_N = valid_N & ~kept_N
  kn_ND = unit_rows(k_ND)
  sim_NN = jnp.where(kept_N[None, :], kn_ND @ kn_ND.T, -jnp.inf)
  merged_N = evicted_N & (sim_NN.max(axis=1) >= threshold)
  target_N = jnp.where(kept_N, jnp.arange(N), jnp.where(merged_N, jnp.argmax(sim_NN, axis=1), N))
  weight_N = mass_N + 1e-30 * size_N
  k = merge_into(target_N, weight_N, k_ND)
  v = merge_into(target_N, weight_N, v_ND)
  size = group_sum(target_N, size_N)
  score = group_sum(target_N, score_N)
  take = lambda x: x[idx_M]
  return take(k), take(v), take(size), take(score), keep_M


@register
@dataclasses.dataclass(frozen=True)
class CaM(MergingCompressor):
  """Evict by attention score, then merge each evicted token into its most similar kept token.

  The variant followed is D2O's token-level merging (Wan et al., ICLR 2025), made deterministic and
  mass-preserving:
  - eviction keeps the top-capacity candidates by attention score: by default the current scale's
    attention column sums (as SnapKV / ScaleKV; nothing stored), or with `accumulate=True` H2O's
    accumulated attention (column sums over every scale so far, stored per entry as float16, counted,
    summed on merging). On synthetic VAR-like caches the current scale's score is better (rel. error
    0.056 / 0.030 / 0.012 vs 0.059 / 0.037 / 0.022 at 10 / 25 / 50% of the fp16 cache);
  - each evicted token is matched to its nearest kept token by key cosine and merged when the cosine
    is >= `threshold` (D2O adapts the threshold by an EMA; here it is a fixed setting), else dropped;
  - merge weights are the current scale's attention masses (mean probability over the scale's
    queries), following CaM (Zhang et al., ICML 2024), where a token's merge follows its attention
    score -- but deterministic (CaM draws a Bernoulli merge mask, spreads the value over the next kept
    neighbours and merges values only). Keys and values are both merged (as in D2O);
  - the merged entry carries log(size) as a logit bias (ToMe's proportional attention) so it keeps
    the mass of the tokens it absorbed; D2O and CaM keep no bias. Identical keys merge exactly.
  """
  name = 'cam'
  family = 'merging'
  threshold: float = 0.3
  accumulate: bool = False

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    fields = dict(super().extra_fields())
    if self.accumulate:
      fields['score'] = ((), jnp.float16)
    return fields

  def select(self, params, state, cand: Candidates, scale: int, ctx):
    m = state.capacity
    if m == 0:
      return state
    col_sum_BHN = cand.attn.sum(axis=2)
    score = col_sum_BHN + cand.extra['score'] if self.accumulate else col_sum_BHN
    mass = cand.attn.mean(axis=2)
    merge = jax.vmap(jax.vmap(
        lambda k, v, s, sc, ms, ok: cam_merge(k, v, s, sc, ms, ok, m, self.threshold)))
    k, v, size, score, keep = merge(cand.k, cand.v, self.candidate_sizes(cand), score, mass,
                                    cand.valid)
    extra = {'size': size, 'score': score} if self.accumulate else {'size': size}
    return pack(k, v, keep, extra, state)


