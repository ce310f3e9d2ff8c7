"""Top-k selection over the last axis, the one implementation every compressor uses.

Only valid entries are ever selected; among equal scores the lower index wins (`jax.lax.top_k`'s
order), so a mask and the indices of the same scores pick the same entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax.token_sampling import first_max_index  # noqa: F401  (one implementation, shared)
from var_jax.token_sampling import kth_largest_key, sortable_keys


def _masked(score_BN: jax.Array, valid_BN: jax.Array) -> jax.Array:
  return jnp.where(valid_BN, score_BN.astype(jnp.float32), -jnp.inf)


def topk_indices(score_BN: jax.Array, valid_BN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(..., k) indices of the k best valid entries (best first) and whether each of them is valid
  (False where there are fewer than k valid entries)."""
  _, idx = jax.lax.top_k(_masked(score_BN, valid_BN), k)
  return idx, jnp.take_along_axis(valid_BN, idx, axis=-1)


def topk_mask(score_BN: jax.Array, valid_BN: jax.Array, k: int) -> jax.Array:
  """(..., N) bool: the k best valid entries (every valid one if there are fewer), the entries
  `topk_indices` picks, without a sort: the k-th largest score by radix selection on order-preserving
  keys (`var_jax.token_sampling.kth_largest_key`), every entry above it, and of those equal to it the
  lowest-indexed ones that complete k. 4x faster than `lax.top_k` on d16's eviction scores (32 rows of
  506, k = 337: 0.16 against 0.65 ms; 256 rows 1.2 against 5.3 ms)."""
  N = score_BN.shape[-1]
  if k <= 0:
    return jnp.zeros(score_BN.shape, bool)
  if k >= N:
    return valid_BN
  key = sortable_keys(_masked(score_BN, valid_BN))
  thr = kth_largest_key(key, k)
  above, tie = key > thr, key == thr
  rank = jnp.cumsum(tie, axis=-1, dtype=jnp.int32) - tie          # earlier entries equal to the k-th
  return (above | (tie & (rank < k - above.sum(-1, keepdims=True)))) & valid_BN
