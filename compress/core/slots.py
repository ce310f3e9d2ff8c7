"""The slot cache every built-in compressor keeps, its accounting, and storing entries into it.

A `Slots` is a fixed-capacity buffer per (sequence, head): M entries, the first `count` valid (kept
packed in front), per-entry fields beside the keys and values and per-head header fields. `bits()`
counts every array it holds at its stored dtype; `allocated_bits()` counts the buffers as allocated.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from compress.core.accounting import COUNT_DTYPE, dtype_bits


@flax.struct.dataclass
class Slots:
  """A fixed-capacity cache: M entries per head, the first `count` valid (kept packed in front).

  k_BHMK, v_BHMV: stored keys/values (floats at the geometry dtype, or packed codes);
  count_BH: kept entries; extra: per-entry fields (B, H, M, ...) e.g. 'pos', 'score', 'logmass';
  header: per-head fields (B, H, ...) always counted, e.g. quantisation scales, running sums.
  """
  k: jax.Array
  v: jax.Array
  count: jax.Array
  extra: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  header: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  # True when the count follows from the schedule alone (the full cache): then it is not stored state
  count_implied: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def capacity(self) -> int:
    return self.k.shape[2]

  @property
  def valid(self) -> jax.Array:
    """(B, H, M) bool."""
    return jnp.arange(self.capacity) < self.count[..., None].astype(jnp.int32)

  def entry_bits(self) -> int:
    """Bits of one kept entry: every per-entry array's trailing elements at their dtype."""
    arrays = [self.k, self.v, *self.extra.values()]
    return sum(int(np.prod(a.shape[3:], dtype=np.int64)) * dtype_bits(a.dtype) for a in arrays)

  def header_bits(self) -> int:
    arrays = ([] if self.count_implied else [self.count]) + list(self.header.values())
    return sum(int(np.prod(a.shape[2:], dtype=np.int64)) * dtype_bits(a.dtype) for a in arrays)

  def bits(self) -> jax.Array:
    """(B, H) int64-safe bits held per head: count * entry bits + header bits."""
    return self.count.astype(jnp.int32) * self.entry_bits() + self.header_bits()

  def allocated_bits(self) -> int:
    """Bits of the buffers as allocated per head (capacity * entry bits + header)."""
    return self.capacity * self.entry_bits() + self.header_bits()


def empty_slots(batch: int, num_heads: int, capacity: int, k_shape: tuple[int, ...], k_dtype: Any,
                v_shape: tuple[int, ...] | None = None, v_dtype: Any = None,
                extra: Mapping[str, tuple[tuple[int, ...], Any]] | None = None,
                header: Mapping[str, tuple[tuple[int, ...], Any]] | None = None) -> Slots:
  """Zeroed Slots; `extra`/`header` map a field name to (trailing shape, dtype)."""
  B, H, M = batch, num_heads, capacity
  v_shape = k_shape if v_shape is None else v_shape
  v_dtype = k_dtype if v_dtype is None else v_dtype
  return Slots(
      k=jnp.zeros((B, H, M, *k_shape), k_dtype), v=jnp.zeros((B, H, M, *v_shape), v_dtype),
      count=jnp.zeros((B, H), COUNT_DTYPE),
      extra={n: jnp.zeros((B, H, M, *s), d) for n, (s, d) in (extra or {}).items()},
      header={n: jnp.zeros((B, H, *s), d) for n, (s, d) in (header or {}).items()})


def gather_entries(x: jax.Array, idx_BHM: jax.Array) -> jax.Array:
  """x (B, H, N, ...) -> (B, H, M, ...) at idx."""
  idx = idx_BHM.reshape(idx_BHM.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, idx, axis=2)


def pack(k_BHMD, v_BHMD, keep_BHM, extra: Mapping[str, jax.Array], state: Slots) -> Slots:
  """Stores selected entries (already gathered, best first, invalid last) at the state's dtypes."""
  count = keep_BHM.sum(-1).astype(COUNT_DTYPE)
  zero = lambda x: jnp.where(keep_BHM.reshape(keep_BHM.shape + (1,) * (x.ndim - 3)), x, 0)
  return state.replace(
      k=zero(k_BHMD).astype(state.k.dtype), v=zero(v_BHMD).astype(state.v.dtype), count=count,
      extra={n: zero(extra[n]).astype(a.dtype) for n, a in state.extra.items()})
