"""What the merging compressors share: entries that stand for `size` tokens, and merge arithmetic.

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

from compress.core.slot_compressor import Candidates, SlotCompressor
from compress.core.topk import first_max_index, topk_indices

SIZE_DTYPE = jnp.uint16          # tokens a merged entry stands for (<= 65535)
_EPS = 1e-12


def unit_rows(x_ND: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (zero rows stay zero)."""
  return x_ND / jnp.maximum(jnp.linalg.norm(x_ND, axis=-1, keepdims=True), _EPS)


def nearest_kept(k_ND: jax.Array, score_N: jax.Array, valid_N: jax.Array, capacity: int,
                 threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eviction by score, then each evicted entry's merge target: (idx (capacity,) the kept entries, best
  score first; keep (capacity,) which of them hold an entry; target (N,) the group of every candidate:
  itself if kept, its kept entry of highest key cosine if that cosine is >= `threshold` (ties: the
  lowest index), else N (dropped)).

  Cosines against the kept entries only (N x capacity, in index order), the nearest by two plain
  reductions (`first_max_index`: XLA CPU's argmax is a variadic reduction, several times slower here).
  Keys enter without gradient (the learned relaxation differentiates the merge weights, not the match).
  """
  N = k_ND.shape[0]
  idx_M, keep_M = topk_indices(score_N, valid_N, capacity)
  kept_N = jnp.zeros((N,), bool).at[idx_M].set(keep_M)
  cols_M = jnp.sort(jnp.where(keep_M, idx_M, N))                 # the kept entries in index order
  kn_ND = unit_rows(jax.lax.stop_gradient(k_ND))
  sim_NM = jnp.where(cols_M[None, :] < N, kn_ND @ kn_ND[jnp.minimum(cols_M, N - 1)].T, -jnp.inf)
  merged_N = valid_N & ~kept_N & (sim_NM.max(axis=1) >= threshold)
  target_N = jnp.where(kept_N, jnp.arange(N), jnp.where(merged_N, cols_M[first_max_index(sim_NM)], N))
  return idx_M, keep_M, target_N


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
