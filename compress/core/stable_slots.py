"""Eviction into a fixed-slot cache that never moves a kept entry (shared by quantised and low-rank
caches, whose per-slot codes or coefficients must stay where they were written).

Each step: score the kept entries and the new scale's tokens by a rule (`EVICTION_RULES`), keep the best
M, leave survivors in their slots and write the admitted tokens into the freed slots in position order.
  'window': most recent positions (slot positions follow from the schedule, not stored);
  'h2o': attention accumulated over every query so far (stored per entry as float16 by the caller);
  'snapkv': attention of the current scale's queries only (nothing stored).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.slots import gather_entries, Slots
from compress.core.topk import topk_mask

EVICTION_RULES = ('window', 'h2o', 'snapkv')


@functools.lru_cache(maxsize=None)
def window_slot_positions(scale_sizes: tuple[int, ...], capacity: int, scale: int) -> np.ndarray:
  """(M,) token position held by each slot before step `scale` under window eviction (-1: empty).

  Simulates `topk_mask` + `stable_assignment` with score = position, so no positions are stored.
  """
  pos = np.full(capacity, -1, np.int64)
  count, start = 0, 0
  for S in scale_sizes[:scale]:
    new = start + np.arange(S)
    valid_old = np.arange(capacity) < count
    kept = np.sort(np.concatenate([pos[valid_old], new]))[-capacity:] if capacity else new[:0]
    surv = valid_old & np.isin(pos, kept)
    new_kept = new[np.isin(new, kept)]
    free = np.flatnonzero(~surv)[:len(new_kept)]
    pos[free] = new_kept
    count = int(surv.sum()) + len(new_kept)
    start += S
  return pos


def candidate_scores(rule: str, p_cache_BHSM: jax.Array, p_new_BHSS: jax.Array,
                     acc_BHM: jax.Array | None, slot_pos_M: np.ndarray | None, start: int
                     ) -> jax.Array:
  """(B, H, M + S) float32 eviction scores of the kept entries followed by the new scale's tokens."""
  B, H, S, M = p_cache_BHSM.shape
  if rule == 'window':
    pos = np.concatenate([slot_pos_M, start + np.arange(S)]).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(pos), (B, H, M + S))
  mass = jnp.concatenate([p_cache_BHSM.sum(2), p_new_BHSS.sum(2)], axis=-1)   # per key, over queries
  if rule == 'snapkv':
    return mass
  if rule == 'h2o':
    return mass + jnp.pad(acc_BHM.astype(jnp.float32), ((0, 0), (0, 0), (0, S)))
  raise ValueError(f'unknown eviction rule {rule!r}; use one of {EVICTION_RULES}')


def stable_assignment(keep_BHN: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where kept candidates go when survivors stay put: (take_new_BHM, src_BHM, valid_BHM).

  Candidates are the m slots followed by S new tokens. The j-th free slot (in slot order) receives the
  j-th kept new token (in position order): take_new marks those slots, src is the new token's index.
  """
  surv_BHM, keep_new_BHS = keep_BHN[..., :m], keep_BHN[..., m:]
  S = keep_new_BHS.shape[-1]
  free_BHM = ~surv_BHM
  free_rank_BHM = jnp.cumsum(free_BHM, axis=-1) - 1
  order_BHS = jnp.argsort(~keep_new_BHS, axis=-1, stable=True)   # kept new tokens first, in order
  n_new_BH1 = keep_new_BHS.sum(-1, keepdims=True)
  take_new = free_BHM & (free_rank_BHM < n_new_BH1)
  src = jnp.take_along_axis(order_BHS, jnp.clip(free_rank_BHM, 0, S - 1), axis=-1)
  return take_new, src.astype(jnp.int32), surv_BHM | take_new


def static_append(start: int, S: int, m: int, batch_shape: tuple[int, int]
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`stable_assignment` when all start + S <= m candidates are kept: the scale goes to slots
  [start, start + S) (kept entries always fill slots [0, start) then)."""
  slot = np.arange(m)
  take_new = (slot >= start) & (slot < start + S)
  src = np.clip(slot - start, 0, S - 1).astype(np.int32)
  b = lambda x: jnp.broadcast_to(jnp.asarray(x), batch_shape + (m,))
  return b(take_new), b(src), b(slot < start + S)


def plan_slots(evict: str, geometry, state: Slots, p_cache_BHSM, p_new_BHSS, scale: int):
  """Where the new scale goes in a fixed-slot cache that never moves kept entries.

  Returns (take_new_BHM, src_BHM, valid_BHM, score_BHN): which slots take a new token, from which
  new token, which slots are valid after the step, and the candidate scores (M kept + S new).
  """
  M = state.capacity
  B, H, S = p_new_BHSS.shape[:3]
  start = geometry.scale_starts[scale]
  slot_pos = window_slot_positions(geometry.scale_sizes, M, scale) if evict == 'window' else None
  score = candidate_scores(evict, p_cache_BHSM, p_new_BHSS, state.extra.get('score'), slot_pos, start)
  if start + S <= M:   # the scale fits whole (known from the schedule): append, nothing to evict
    return (*static_append(start, S, M, (B, H)), score)
  valid_N = jnp.concatenate([state.valid, jnp.ones((B, H, S), bool)], axis=-1)
  return (*stable_assignment(topk_mask(score, valid_N, M), M), score)


def kept_scores(score_BHN, take_new_BHM, src_BHM, valid_BHM) -> jax.Array:
  """Accumulated scores of the slots after `plan_slots` (float16, zero where invalid)."""
  M = take_new_BHM.shape[-1]
  acc = jnp.where(take_new_BHM, gather_entries(score_BHN[..., M:], src_BHM), score_BHN[..., :M])
  return jnp.where(valid_BHM, acc, 0).astype(jnp.float16)
