"""ScaleKV-style scale-aware eviction (Li et al. 2025) and the layer-wise driver it needs.

ScaleKV has two parts:
1. Selection (the registered `scalekv` compressor, one layer at one budget): SnapKV-style scores from
   the current scale's queries (sum of probabilities, no pooling). By default every query observes;
   obs_side > 0 cuts the pn x pn query map into obs_side x obs_side patches and lets the query nearest
   each patch centre observe (our reading of ScaleKV's patch-partitioned observation: cheaper, and
   slightly worse on compress.core.synthetic caches).
2. Allocation: drafter layers (attention spread over earlier scales) get a larger cache than refiner
   layers (attention on their own scale). Per-layer budgets mean per-layer capacities, i.e. different
   static shapes, so the vmapped `run_teacher_forced` cannot hold them: a `LayerwiseCompressor` keeps
   one compressor per layer and `run_layerwise` runs each group of equal layers through
   `run_teacher_forced`. The allocation (compress.eviction.allocation.layer_budgets) keeps the bits over all
   layers and heads <= layers x heads x budget at every scale; an individual layer may exceed `budget`.
Drafter scores come from calibration caches: compress.eviction.allocation.attention_spread(q, k, patch_nums).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.budget import Budget, CacheGeometry
from compress.core.interface import Compressor
from compress.core.registry import make, register
from compress.core.slot_compressor import Candidates, SlotCompressor
from compress.core.teacher_forced import run_teacher_forced
from compress.eviction import allocation
from compress.eviction.base import EvictionCompressor


def observation_queries(pn: int, obs_side: int) -> np.ndarray:
  """Indices (raster order) of the queries observing a pn x pn scale: one per patch centre."""
  if obs_side <= 0 or pn <= obs_side:
    return np.arange(pn * pn)
  centre = np.floor((np.arange(obs_side) + 0.5) * pn / obs_side).astype(np.int64)
  return (centre[:, None] * pn + centre[None, :]).ravel()


@register
@dataclasses.dataclass(frozen=True)
class ScaleKVEviction(EvictionCompressor):
  """ScaleKV token selection for one layer: sum of the observation queries' probabilities, per head.

  Observation queries: every query of the current scale (obs_side = 0), or the obs_side x obs_side
  patch centres (`observation_queries`). Alone (one budget for every layer) this is ScaleKV without its
  allocation (= snapkv with kernel 1); use `build_scalekv` for drafter/refiner budgets.
  Settings: obs_side (0 = every query observes).
  """
  obs_side: int = 0

  name = 'scalekv'
  family = 'eviction'

  def __post_init__(self):
    if self.obs_side < 0:
      raise ValueError(f'scalekv: obs_side must be >= 0, got {self.obs_side}')

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    idx = observation_queries(self.geometry.patch_nums[scale], self.obs_side)
    return cand.attn[:, :, idx, :].sum(axis=2)


@dataclasses.dataclass(frozen=True)
class LayerwiseCompressor:
  """One compressor per layer, sharing a geometry; `budget` is the mean per (layer, head).

  Invariant (checked): the members' budgets sum to <= layers x budget.bits, so the bits held over all
  layers and heads never exceed layers x heads x budget.bits.
  """
  geometry: CacheGeometry
  budget: Budget
  members: tuple[Compressor, ...]

  def __post_init__(self):
    if not self.members:
      raise ValueError('a LayerwiseCompressor needs at least one member compressor')
    if any(m.geometry != self.geometry for m in self.members):
      raise ValueError('every member of a LayerwiseCompressor must share its geometry')
    spent = sum(m.budget.bits for m in self.members)
    if spent > len(self.members) * self.budget.bits:
      raise ValueError(f'member budgets sum to {spent} bits > {len(self.members)} layers x '
                       f'{self.budget.bits}: allocate them with compress.eviction.allocation.layer_budgets')

  @property
  def num_layers(self) -> int:
    return len(self.members)

  @property
  def oracle(self) -> bool:
    return any(m.oracle for m in self.members)

  def layer_bits(self) -> np.ndarray:
    """(layers,) each member's budget in bits."""
    return np.array([m.budget.bits for m in self.members], np.int64)

  def groups(self) -> list[tuple[Compressor, list[int]]]:
    """Layers that share an identical member (run together, one compilation per group)."""
    out: dict[Compressor, list[int]] = {}
    for i, m in enumerate(self.members):
      out.setdefault(m, []).append(i)
    return list(out.items())


def build_layerwise(name: str, geometry: CacheGeometry, budget: Budget | str | float,
                    weights: Sequence[float], **settings: Any) -> LayerwiseCompressor:
  """Registered slot compressor `name` at per-layer budgets split by `weights` (one per layer)."""
  probe = make(name, geometry, budget, **settings)
  if not isinstance(probe, SlotCompressor):
    raise TypeError(f'{name} is not a slot compressor: per-layer budgets need an entry size')
  layout = probe.layout()
  budgets = allocation.layer_budgets(geometry, probe.budget, weights, layout.entry_bits(),
                                     layout.header_bits())
  return LayerwiseCompressor(geometry, probe.budget,
                             tuple(make(name, geometry, b, **settings) for b in budgets))


def build_scalekv(geometry: CacheGeometry, budget: Budget | str | float,
                  drafter_score: Sequence[float], *, drafter_fraction: float = 0.25,
                  drafter_ratio: float = 4.0, **settings: Any) -> LayerwiseCompressor:
  """ScaleKV: drafter/refiner budgets from calibration `drafter_score` (layers,), `scalekv` selection.

  drafter_score: compress.eviction.allocation.attention_spread(q, k, patch_nums)['drafter_score'].
  """
  w = allocation.scalekv_weights(drafter_score, drafter_fraction, drafter_ratio)
  return build_layerwise('scalekv', geometry, budget, w, **settings)


def run_layerwise(lw: LayerwiseCompressor, params: Sequence[Any] | None, q_NBHLD: jax.Array,
                  k_NBHLD: jax.Array, v_NBHLD: jax.Array) -> dict[str, Any]:
  """`run_teacher_forced` for a LayerwiseCompressor. params: None or one pytree per layer.

  Returns out (N, B, H, L, D), bits (N, B, H, K), peak_bits (N, B, H) as run_teacher_forced, plus
  total_bits (B, K): bits over all layers and heads after each scale (<= N * H * lw.budget.bits).
  """
  N = q_NBHLD.shape[0]
  if N != lw.num_layers:
    raise ValueError(f'captured tensors have {N} layers but the LayerwiseCompressor has '
                     f'{lw.num_layers} members')
  if params is not None and len(params) != N:
    raise ValueError(f'params must be None or one pytree per layer ({N}), got {len(params)}')
  out = bits = None
  for comp, idx in lw.groups():
    ia = jnp.asarray(idx)
    p = None if params is None else jax.tree.map(lambda *xs: jnp.stack(xs), *[params[i] for i in idx])
    res = run_teacher_forced(comp, p, q_NBHLD[ia], k_NBHLD[ia], v_NBHLD[ia])
    if out is None:
      out = jnp.zeros((N,) + res['out'].shape[1:], res['out'].dtype)
      bits = jnp.zeros((N,) + res['bits'].shape[1:], res['bits'].dtype)
    out, bits = out.at[ia].set(res['out']), bits.at[ia].set(res['bits'])
  total = np.asarray(bits, np.int64).sum(axis=(0, 2))
  return {'out': out, 'bits': bits, 'peak_bits': bits.max(-1), 'total_bits': total}
