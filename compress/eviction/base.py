"""The eviction compressor: keep the `capacity` best candidates under a score (one rule per subclass)."""
from __future__ import annotations

import dataclasses

import jax

from compress.core.interface import StepContext
from compress.core.slot_compressor import Candidates, SlotCompressor
from compress.core.slots import gather_entries, pack, Slots
from compress.core.topk import topk_indices


@dataclasses.dataclass(frozen=True)
class EvictionCompressor(SlotCompressor):
  """Keeps the `capacity` candidates of highest `score`; subclasses define `score` and extras."""

  def score(self, params, state: Slots, cand: Candidates, scale: int, ctx: StepContext) -> jax.Array:
    raise NotImplementedError

  def updated_extra(self, cand: Candidates, scale: int) -> dict[str, jax.Array]:
    """Per-candidate values of the declared extra fields (default: 'pos' from the candidates)."""
    return {'pos': cand.pos} if 'pos' in self.extra_fields() else {}

  def select(self, params, state, cand, scale, ctx):
    if state.capacity == 0:
      return state
    idx, keep = topk_indices(self.score(params, state, cand, scale, ctx), cand.valid, state.capacity)
    extra = {n: gather_entries(a, idx) for n, a in self.updated_extra(cand, scale).items()}
    return pack(gather_entries(cand.k, idx), gather_entries(cand.v, idx), keep, extra, state)
