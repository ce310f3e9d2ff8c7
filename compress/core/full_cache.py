"""The plain full cache: the exact reference, and the passthrough state of every compressor whose
budget holds the whole uncompressed cache at its peak."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from compress.core.attention import attend_output
from compress.core.budget import CacheGeometry
from compress.core.slots import empty_slots, Slots


def full_slots(geometry: CacheGeometry, batch: int, num_heads: int) -> Slots:
  D = geometry.head_dim
  slots = empty_slots(batch, num_heads, geometry.prefix_tokens, (D,), geometry.kv_dtype)
  return slots.replace(count_implied=True)


def full_step(geometry: CacheGeometry, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int):
  """Exact attention over everything kept plus the new scale, then append the scale (if not last)."""
  out = attend_output(q_BHSD, state.k, state.v, state.valid, None, k_BHSD, v_BHSD)
  if scale == len(geometry.patch_nums) - 1:
    return out, state
  start, S = geometry.scale_starts[scale], geometry.scale_sizes[scale]
  dt = state.k.dtype
  k = jax.lax.dynamic_update_slice_in_dim(state.k, k_BHSD.astype(dt), start, axis=2)
  v = jax.lax.dynamic_update_slice_in_dim(state.v, v_BHSD.astype(dt), start, axis=2)
  count = jnp.full_like(state.count, start + S)
  return out, state.replace(k=k, v=v, count=count)
