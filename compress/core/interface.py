"""The compressor interface: a pure, jittable state machine per (sequence, layer, head).

At scale s the new queries attend to the persistent state plus their own scale's keys and values; then
the state absorbs the new scale and is compressed back to the budget. Steps are pure and jittable:
fixed-capacity buffers, static shapes, batched over (B, H); the drivers vmap them over layers.

Memory accounting is honest: `bits(state)` counts every array the state holds at its stored dtype
(keys, values, codes, scales, zero points, positions, scores, log-masses, counts). Parameters shared by
all sequences (projections, scorers) are reported apart by `shared_bits(params)`.

When the budget holds the whole uncompressed cache at its peak, every compressor keeps it whole (a cache
that fits needs no policy, and none of the metadata a policy keeps), so full budget = exact attention.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax

from compress.core.accounting import tree_bits
from compress.core.budget import Budget, CacheGeometry
from compress.core.full_cache import full_slots, full_step


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Extra information a step may use. `future_q_BHFD`: every later scale's queries (oracle only)."""
  future_q: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Compressor:
  """Base class. Subclasses are frozen dataclasses (hashable: static under jit) with their settings.

  Subclasses implement `init_compressed(batch, num_heads)` and
  `compress_step(params, state, q, k, v, scale, ctx) -> (out_BHSD, state)`; they may override
  `init_params` / `shared_params` (trainable or calibrated parameters, leading axes (layers, heads)).
  """
  geometry: CacheGeometry
  budget: Budget

  name: ClassVar[str] = ''
  family: ClassVar[str] = ''
  oracle: ClassVar[bool] = False          # uses future queries: an upper reference, not deployable
  learned: ClassVar[bool] = False         # has trained parameters
  # the parameters' shapes and meaning do not depend on the budget (a scorer, not a basis of budget
  # rank): one trained set can serve every budget (eval.frontier's learned.train_budget)
  budget_free_params: ClassVar[bool] = False
  needs_calibration: ClassVar[bool] = False
  respects_budget: ClassVar[bool] = True  # False only for the full-cache reference

  # ---- public API -----------------------------------------------------------------------------
  @property
  def passthrough(self) -> bool:
    """True when the budget holds the whole uncompressed cache: the state is the plain full cache."""
    return self.budget.bits >= self.geometry.full_bits

  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> Any:
    """Parameters with leading axes (num_layers, num_heads, ...), or None."""
    del key, num_layers, num_heads, calibration
    return None

  def check_loaded(self, params: Any) -> None:
    """Raises a ValueError naming the problem and the fix when concrete parameters loaded from a
    checkpoint (leading axes (layers, heads)) do not fit this compressor's layout (default: no check)."""
    del params

  def shared_params(self, params: Any) -> Any:
    """The parameters every sequence shares, as a deployment stores them (default: as they are)."""
    return params

  def shared_bits(self, params: Any) -> int:
    """Bits of the shared parameters at their stored dtype (reported apart from the per-sequence
    budget; 0 without parameters)."""
    return tree_bits(self.shared_params(params))

  def init_state(self, batch: int, num_heads: int) -> Any:
    if self.passthrough:
      return full_slots(self.geometry, batch, num_heads)
    return self.init_compressed(batch, num_heads)

  def step(self, params: Any, state: Any, q_BHSD: jax.Array, k_BHSD: jax.Array, v_BHSD: jax.Array,
           scale: int, ctx: StepContext | None = None) -> tuple[jax.Array, Any]:
    """Attention output of scale `scale`'s queries, and the state after absorbing the scale."""
    S = self.geometry.scale_sizes[scale]
    if q_BHSD.shape[2] != S or k_BHSD.shape[2] != S or v_BHSD.shape[2] != S:
      raise ValueError(f'scale {scale} has {S} tokens (patch {self.geometry.patch_nums[scale]}^2) but '
                       f'q/k/v have {q_BHSD.shape[2]}/{k_BHSD.shape[2]}/{v_BHSD.shape[2]}; pass one '
                       'whole scale per step, shapes (B, H, pn*pn, D)')
    if self.passthrough:
      return full_step(self.geometry, state, q_BHSD, k_BHSD, v_BHSD, scale)
    return self.compress_step(params, state, q_BHSD, k_BHSD, v_BHSD, scale, ctx or StepContext())

  def bits(self, state: Any) -> jax.Array:
    """(B, H) bits the state holds."""
    return state.bits()

  # ---- for subclasses -------------------------------------------------------------------------
  def init_compressed(self, batch: int, num_heads: int) -> Any:
    raise NotImplementedError

  def compress_step(self, params, state, q_BHSD, k_BHSD, v_BHSD, scale, ctx):
    raise NotImplementedError

  def is_last(self, scale: int) -> bool:
    """After the last scale nothing persists: steps keep the state as it was."""
    return scale == len(self.geometry.patch_nums) - 1

  def slot_capacity(self, entry_bits: int, header_bits: int) -> int:
    """Entries that fit the budget with this layout, at most the peak cache length."""
    if entry_bits <= 0:
      raise ValueError(f'{self.name}: an entry must cost > 0 bits, got {entry_bits}')
    m = (self.budget.bits - header_bits) // entry_bits
    return int(max(0, min(m, self.geometry.prefix_tokens)))


def check_param_shapes(name: str, params: Any, want: Mapping[str, tuple[int, ...]], build: str,
                       context: str, fix: str) -> None:
  """Raises a ValueError naming the problem and the fix unless every `want` leaf of one layer's params
  is (heads,) + its trailing shape. build: how to make params (said when params is None)."""
  if params is None:
    raise ValueError(f'{name} needs the parameters from {build}')
  for n, shape in want.items():
    got = None if n not in params else tuple(params[n].shape)
    if got is None or len(got) < len(shape) + 1 or got[len(got) - len(shape):] != tuple(shape):
      raise ValueError(f'{name}: parameter {n!r} must end in {tuple(shape)} ({context}), got {got}; {fix}')
