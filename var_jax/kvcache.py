"""KV caches for scale-by-scale VAR sampling, and the cache-policy protocol compressors implement.

A VAR step emits every token of one scale at once: its S = pn^2 queries attend to everything kept
from the earlier scales plus all S tokens of their own scale (block causal, dense inside a scale).
A `CachePolicy` owns what is kept between scales. Sampling (`var_jax.sampling`) first calls
`policy.init(batch, num_heads, head_dim, num_layers, patch_nums=...)` with the model's scale schedule
(a policy built for another schedule must refuse it), then, per scale and layer,
`policy.attend(state[layer], layer, scale, q, k, v)` with

  q_BHSD  the queries already multiplied by the softmax scale (the policy computes plain
          softmax(q k^T) v, no extra scale),
  k_BHSD  the keys after the optional L2 norm (keys have no bias),
  v_BHSD  the values with their bias,

where B counts sequences (2x the images under CFG: conditional half first) and H, D are heads and
head dim. The policy returns the attention output (B, H, S, D) and its new per-layer state.

Layout: the policy state is a tuple over layers, `state[layer]` being any pytree; a compressor may
keep different shapes per layer and per scale (`layer` and `scale` are static Python ints, so a
policy may branch on them). Policies are frozen dataclasses: hashable, usable as static jit args.

`FullCache` is the exact policy: an explicit `KVCache` of fixed capacity L (tokens of the whole
pyramid) per layer, written at the static offset of each scale, with logical axis names in the
style of maxtext's kvcache (`KVCache.AXES`) for sharding annotations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp

from var_jax.blocks import softmax_attention

Array = jax.Array
PolicyState = tuple[Any, ...]   # one pytree per layer


@runtime_checkable
class CachePolicy(Protocol):
  """What survives between scales, and how a new scale attends to it (see the module docstring)."""

  def init(self, batch: int, num_heads: int, head_dim: int, num_layers: int, *,
           patch_nums: Sequence[int]) -> PolicyState:
    """Empty state: a tuple of `num_layers` per-layer pytrees. `batch` counts sequences (2B with CFG);
    `patch_nums` is the model's scale schedule (a policy built for another schedule must refuse it)."""
    ...

  def attend(self, state_layer: Any, layer: int, scale: int, q_BHSD: Array, k_BHSD: Array,
             v_BHSD: Array) -> tuple[Array, Any]:
    """Scale `scale`'s S tokens attend to the state plus themselves; returns (out_BHSD, new state)."""
    ...


def scale_offsets(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """(K + 1,) cumulative token counts: scale k occupies [offsets[k], offsets[k + 1])."""
  out = [0]
  for pn in patch_nums:
    out.append(out[-1] + pn * pn)
  return tuple(out)


@flax.struct.dataclass
class KVCache:
  """Keys and values of one layer in fixed-capacity buffers; the first `length` positions are filled.

  k_BHLD, v_BHLD: (batch, heads, capacity, head_dim); length: () int32.
  """
  k_BHLD: Array
  v_BHLD: Array
  length: Array
  AXES: ClassVar[tuple[str, ...]] = ('cache_batch', 'cache_heads', 'cache_sequence', 'cache_kv')

  @classmethod
  def zeros(cls, batch: int, num_heads: int, capacity: int, head_dim: int,
            dtype: Any = jnp.float32) -> KVCache:
    shape = (batch, num_heads, capacity, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k_BHLD.shape[2]

  def write(self, start: int, k_BHSD: Array, v_BHSD: Array) -> KVCache:
    """Stores S new tokens at the static position `start`; length becomes start + S."""
    end = start + k_BHSD.shape[2]
    if end > self.capacity:
      raise ValueError(f'KV cache overflow: writing tokens [{start}, {end}) into capacity {self.capacity}')
    k = jax.lax.dynamic_update_slice_in_dim(self.k_BHLD, k_BHSD.astype(self.k_BHLD.dtype), start, axis=2)
    v = jax.lax.dynamic_update_slice_in_dim(self.v_BHLD, v_BHSD.astype(self.v_BHLD.dtype), start, axis=2)
    return KVCache(k, v, jnp.asarray(end, jnp.int32))

  def prefix(self, end: int) -> tuple[Array, Array]:
    """Keys and values of positions [0, end) (static), (batch, heads, end, head_dim) each."""
    return self.k_BHLD[:, :, :end], self.v_BHLD[:, :, :end]


@dataclasses.dataclass(frozen=True)
class FullCache:
  """Exact attention over every earlier token: the official KV cache (`CachePolicy`).

  State: tuple over layers of `KVCache` with capacity L = sum(pn^2), stored in `dtype`
  (attention is computed in fp32 either way).
  """
  patch_nums: tuple[int, ...]
  dtype: str = 'float32'

  def init(self, batch: int, num_heads: int, head_dim: int, num_layers: int, *,
           patch_nums: Sequence[int]) -> tuple[KVCache, ...]:
    del patch_nums   # `attend` checks every scale's token count against `self.patch_nums`
    capacity = scale_offsets(self.patch_nums)[-1]
    return tuple(KVCache.zeros(batch, num_heads, capacity, head_dim, jnp.dtype(self.dtype))
                 for _ in range(num_layers))

  def attend(self, state_layer: KVCache, layer: int, scale: int, q_BHSD: Array, k_BHSD: Array,
             v_BHSD: Array) -> tuple[Array, KVCache]:
    del layer
    offsets = scale_offsets(self.patch_nums)
    start, end = offsets[scale], offsets[scale + 1]
    if q_BHSD.shape[2] != end - start:
      raise ValueError(f'scale {scale} of patch_nums {self.patch_nums} has {end - start} tokens, '
                       f'got {q_BHSD.shape[2]}; the FullCache schedule must match the model')
    cache = state_layer.write(start, k_BHSD, v_BHSD)
    k_BHTD, v_BHTD = cache.prefix(end)
    return softmax_attention(q_BHSD, k_BHTD, v_BHTD).astype(q_BHSD.dtype), cache
