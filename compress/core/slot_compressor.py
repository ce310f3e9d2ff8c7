"""The slot compressor: a `Slots` state whose step picks from candidates (kept entries + the new scale).

A slot compressor's step: decode the kept entries, attend (compress.core.attention.attend), form the
candidates = kept entries followed by the S new tokens, score them, keep the best `capacity`, store.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from compress.core.attention import attend, attend_output
from compress.core.interface import Compressor, StepContext
from compress.core.slots import empty_slots, Slots


@flax.struct.dataclass
class Candidates:
  """N = M kept + S new entries per head, all float32 except `pos`.

  k, v: (B, H, N, D); valid: (B, H, N); pos: (B, H, N) int32 token positions (-1 if not stored);
  is_new: (B, H, N); attn: (B, H, S, N) the current scale's attention probabilities on each candidate;
  extra: per-entry fields of the kept entries, zero-filled for the new ones (B, H, N, ...).
  """
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  pos: jax.Array
  is_new: jax.Array
  attn: jax.Array
  extra: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SlotCompressor(Compressor):
  """Slot compressor with plain keys/values at the geometry dtype plus declared per-entry fields.

  Subclasses set `extra_fields()` and `select(params, state, cand, scale, ctx) -> Slots`; they may
  override `decode(state)` (e.g. dequantise) and `bias(state)` (per-entry logit bias).
  """

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {}

  def header_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {}

  def layout(self, batch: int = 1, num_heads: int = 1, capacity: int = 0) -> Slots:
    D = self.geometry.head_dim
    return empty_slots(batch, num_heads, capacity, (D,), self.geometry.kv_dtype,
                       extra=self.extra_fields(), header=self.header_fields())

  @property
  def capacity(self) -> int:
    probe = self.layout()
    return self.slot_capacity(probe.entry_bits(), probe.header_bits())

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    m = self.capacity
    if m == 0:  # nothing fits: an empty cache whose (zero) count needs no storage
      D = self.geometry.head_dim
      return empty_slots(batch, num_heads, 0, (D,), self.geometry.kv_dtype).replace(count_implied=True)
    return self.layout(batch, num_heads, m)

  def decode(self, state: Slots) -> tuple[jax.Array, jax.Array]:
    return state.k, state.v

  def bias(self, state: Slots) -> jax.Array | None:
    return None

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int,
                    ctx: StepContext):
    ck, cv = self.decode(state)
    if self.is_last(scale):
      return attend_output(q_BHSD, ck, cv, state.valid, self.bias(state), k_BHSD, v_BHSD), state
    out, p_cache, p_new = attend(q_BHSD, ck, cv, state.valid, self.bias(state), k_BHSD, v_BHSD)
    cand = make_candidates(self.geometry, state, ck, cv, k_BHSD, v_BHSD, p_cache, p_new, scale)
    return out, self.select(params, state, cand, scale, ctx)

  def select(self, params, state: Slots, cand: Candidates, scale: int, ctx: StepContext) -> Slots:
    raise NotImplementedError


def make_candidates(geometry, state: Slots, ck, cv, k_BHSD, v_BHSD, p_cache, p_new, scale: int
                    ) -> Candidates:
  B, H, S, _ = k_BHSD.shape
  f32 = jnp.float32
  start = geometry.scale_starts[scale]
  new_pos = jnp.broadcast_to(start + jnp.arange(S, dtype=jnp.int32), (B, H, S))
  old_pos = state.extra['pos'].astype(jnp.int32) if 'pos' in state.extra else jnp.full(
      state.count.shape + (state.capacity,), -1, jnp.int32)
  cat = lambda a, b: jnp.concatenate([a, b], axis=2)
  extra = {n: cat(a.astype(f32), jnp.zeros((B, H, S) + a.shape[3:], f32))
           for n, a in state.extra.items() if n != 'pos'}
  return Candidates(
      k=cat(ck.astype(f32), k_BHSD.astype(f32)), v=cat(cv.astype(f32), v_BHSD.astype(f32)),
      valid=cat(state.valid, jnp.ones((B, H, S), bool)), pos=cat(old_pos, new_pos),
      is_new=cat(jnp.zeros(state.valid.shape, bool), jnp.ones((B, H, S), bool)),
      attn=jnp.concatenate([p_cache, p_new], axis=-1), extra=extra)
