"""The compressor interface, the slot cache every built-in compressor keeps, and the registry.

A compressor is a state machine per (sequence, layer, head). At scale s the new queries attend to the
persistent state plus their own scale's keys and values; then the state absorbs the new scale and is
compressed back to the budget. Steps are pure and jittable: fixed-capacity buffers, static shapes,
batched over (B, H); the drivers vmap them over layers.

Memory accounting is honest: `bits(state)` counts every array the state holds at its stored dtype
(keys, values, codes, scales, zero points, positions, scores, log-masses, counts). Parameters shared by
all sequences (projections, codebooks) are reported apart by `shared_bits(params)`.

When the budget holds the whole uncompressed cache at its peak, every compressor keeps it whole (a cache
that fits needs no policy, and none of the metadata a policy keeps), so full budget = exact attention.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from compress.attention import attend
from compress.budget import Budget, CacheGeometry

COUNT_DTYPE = jnp.uint16          # a per-head count of kept entries (16 bits, counted)


def dtype_bits(dtype: Any) -> int:
  return jnp.dtype(dtype).itemsize * 8


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


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Extra information a step may use. `future_q_BHFD`: every later scale's queries (oracle only)."""
  future_q: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Compressor:
  """Base class. Subclasses are frozen dataclasses (hashable: static under jit) with their settings.

  Subclasses implement `init_compressed(batch, num_heads)` and
  `compress_step(params, state, q, k, v, scale, ctx) -> (out_BHSD, state)`; they may override
  `init_params` / `shared_bits` (trainable or calibrated parameters, leading axes (layers, heads)).
  """
  geometry: CacheGeometry
  budget: Budget

  name: ClassVar[str] = ''
  family: ClassVar[str] = ''
  oracle: ClassVar[bool] = False          # uses future queries: an upper reference, not deployable
  learned: ClassVar[bool] = False         # has trained parameters
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

  def shared_bits(self, params: Any) -> int:
    """Bits of parameters shared by every sequence (reported apart from the per-sequence budget)."""
    del params
    return 0

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


# ---- the plain full cache (also the passthrough state of every compressor) ----------------------
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


def full_slots(geometry: CacheGeometry, batch: int, num_heads: int) -> Slots:
  D = geometry.head_dim
  slots = empty_slots(batch, num_heads, geometry.prefix_tokens, (D,), geometry.kv_dtype)
  return slots.replace(count_implied=True)


def full_step(geometry: CacheGeometry, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int):
  """Exact attention over everything kept plus the new scale, then append the scale (if not last)."""
  out, _, _ = attend(q_BHSD, state.k, state.v, state.valid, None, k_BHSD, v_BHSD)
  if scale == len(geometry.patch_nums) - 1:
    return out, state
  start, S = geometry.scale_starts[scale], geometry.scale_sizes[scale]
  dt = state.k.dtype
  k = jax.lax.dynamic_update_slice_in_dim(state.k, k_BHSD.astype(dt), start, axis=2)
  v = jax.lax.dynamic_update_slice_in_dim(state.v, v_BHSD.astype(dt), start, axis=2)
  count = jnp.full_like(state.count, start + S)
  return out, state.replace(k=k, v=v, count=count)


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


# ---- registry -----------------------------------------------------------------------------------
REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
  """Class decorator: adds a compressor under `cls.name` (names are unique)."""
  if not cls.name or not cls.family:
    raise ValueError(f'{cls.__name__} needs class attributes `name` and `family` to be registered')
  if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
    raise ValueError(f'a compressor named {cls.name!r} is already registered ({REGISTRY[cls.name]})')
  REGISTRY[cls.name] = cls
  return cls


def available(*, oracle: bool = True, learned: bool = True, calibrated: bool = True) -> list[str]:
  """Registered names, optionally without oracle / learned / calibration-needing ones."""
  _import_builtin()
  return sorted(n for n, c in REGISTRY.items()
                if (oracle or not c.oracle) and (learned or not c.learned)
                and (calibrated or not c.needs_calibration))


def make(name: str, geometry: CacheGeometry, budget: Budget | str | float | int, **settings: Any
         ) -> Compressor:
  """Builds registered compressor `name` at `budget` (see `Budget.parse`) with its settings."""
  _import_builtin()
  if name not in REGISTRY:
    raise KeyError(f'no compressor named {name!r}; registered: {", ".join(sorted(REGISTRY))}')
  if not isinstance(budget, Budget):
    budget = Budget.parse(budget, geometry)
  cls = REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {'geometry', 'budget'}
  unknown = set(settings) - fields
  if unknown:
    raise TypeError(f'{name} has no setting(s) {sorted(unknown)}; its settings are {sorted(fields)}')
  return cls(geometry=geometry, budget=budget, **settings)


def _import_builtin() -> None:
  import compress.library  # noqa: F401  (registers every built-in compressor)
