"""Plugs a compressor into the model's sampling loop as a `var_jax.kvcache.CachePolicy`.

    policy = CompressorPolicy(make('snapkv', geometry, '25%'))
    out = var_jax.sampling.generate(var, vae, labels, key=key, policy=policy)

The per-layer state is the compressor's state; every attention call of every layer at every scale goes
through `Compressor.step`, so generation holds exactly the compressed state between scales. The
geometry must be the model's (`CacheGeometry(model.patch_nums, head_dim)`): `init` refuses another
scale schedule or head dim.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from compress.core.interface import Compressor


@dataclasses.dataclass(frozen=True)
class CompressorPolicy:
  """`CachePolicy` running `compressor` with `params` (leading layer axis, or None) in closed loop.

  Policies compare and hash by their compressor (its settings and budget) only: the sampler passes
  `params` to its jitted steps as traced arguments (`var_jax.sampling.policy_arrays`), so generating
  with another policy of the same compressor, whatever its parameters, reuses the compiled steps.
  """
  compressor: Compressor
  params: Any = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if self.compressor.oracle:
      raise ValueError(f'{self.compressor.name} is an oracle: it scores with future queries, which '
                       'generation does not have; use it only in teacher-forced evaluation')
    if self.compressor.needs_calibration and self.params is None:
      raise ValueError(f'{self.compressor.name} needs calibrated parameters: pass '
                       'params=compressor.init_params(key, layers, heads, calibration=...)')

  def init(self, batch: int, num_heads: int, head_dim: int, num_layers: int, *,
           patch_nums: Sequence[int]) -> tuple[Any, ...]:
    """Per-layer compressor states for `batch` sequences; refuses a model whose scale schedule
    (`patch_nums`) or head dim differs from the compressor geometry (its budget would be relative to
    another cache)."""
    g = self.compressor.geometry
    model_patch_nums = tuple(int(p) for p in patch_nums)
    if model_patch_nums != tuple(int(p) for p in g.patch_nums):
      raise ValueError(f'the model has patch_nums {model_patch_nums} but the {self.compressor.name} '
                       f'geometry was built for patch_nums {tuple(g.patch_nums)}, so its budget is '
                       'relative to another cache; build the CacheGeometry from the model: '
                       'CacheGeometry(model.patch_nums, head_dim)')
    if head_dim != g.head_dim:
      raise ValueError(f'the model has head_dim {head_dim} but the compressor geometry says '
                       f'{g.head_dim}; build the CacheGeometry from the model: '
                       'CacheGeometry(model.patch_nums, head_dim)')
    return tuple(self.compressor.init_state(batch, num_heads) for _ in range(num_layers))

  def attend(self, state_layer: Any, layer: int, scale: int, q_BHSD: jax.Array, k_BHSD: jax.Array,
             v_BHSD: jax.Array) -> tuple[jax.Array, Any]:
    params = None if self.params is None else jax.tree.map(lambda p: p[layer], self.params)
    out, state = self.compressor.step(params, state_layer, q_BHSD, k_BHSD, v_BHSD, scale)
    return out.astype(q_BHSD.dtype), state

  def bits(self, state: tuple[Any, ...]) -> jax.Array:
    """(layers, B, H) bits held."""
    return jax.numpy.stack([self.compressor.bits(s) for s in state])
