"""Top-k selection over the last axis, the one implementation every compressor uses.

Only valid entries are ever selected; among equal scores the lower index wins (`jax.lax.top_k`'s
order), so a mask and the indices of the same scores pick the same entries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from var_jax.token_sampling import first_max_index  # noqa: F401  (one implementation, shared)


def _masked(score_BN: jax.Array, valid_BN: jax.Array) -> jax.Array:
  return jnp.where(valid_BN, score_BN.astype(jnp.float32), -jnp.inf)


def topk_indices(score_BN: jax.Array, valid_BN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(..., k) indices of the k best valid entries (best first) and whether each of them is valid
  (False where there are fewer than k valid entries)."""
  _, idx = jax.lax.top_k(_masked(score_BN, valid_BN), k)
  return idx, jnp.take_along_axis(valid_BN, idx, axis=-1)


def topk_mask(score_BN: jax.Array, valid_BN: jax.Array, k: int) -> jax.Array:
  """(..., N) bool: the k best valid entries (every valid one if there are fewer)."""
  N = score_BN.shape[-1]
  if k <= 0:
    return jnp.zeros(score_BN.shape, bool)
  if k >= N:
    return valid_BN
  idx, _ = topk_indices(score_BN, valid_BN, k)
  picked = jnp.put_along_axis(jnp.zeros(score_BN.shape, bool), idx, True, axis=-1, inplace=False)
  return picked & valid_BN
