"""ToMe: bipartite soft matching on keys, with proportional attention (a log(size) logit bias)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from compress.core.registry import register
from compress.core.slot_compressor import Candidates
from compress.core.slots import pack
from compress.core.topk import first_max_index
from compress.merging.base import group_sum, merge_into, MergingCompressor, packed_order, unit_rows


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
  best_N = first_max_index(sim_NN)
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
