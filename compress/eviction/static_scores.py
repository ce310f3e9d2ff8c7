"""Eviction by static scores: random, sliding window, StreamingLLM sinks + window, key norm.

Every policy here keeps, after each scale, the `capacity` best candidates (kept entries + the new
scale) under a score that needs no attention probabilities. Kept keys/values are stored at the
geometry dtype; a policy that needs token positions stores them as an int16 'pos' field, counted in
the budget like everything else (16 bits per entry: 0.8% of an fp16 entry at head dim 64).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.core.registry import register
from compress.core.slot_compressor import Candidates
from compress.eviction.base import EvictionCompressor

POS_DTYPE = jnp.int16
_POS_LIMIT = int(jnp.iinfo(POS_DTYPE).max)


def pos_field(geometry) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The int16 'pos' extra field; raises if the pyramid has positions int16 cannot hold."""
  if geometry.num_tokens > _POS_LIMIT + 1:
    raise ValueError(f'positions are stored as int16 but patch_nums {geometry.patch_nums} have '
                     f'{geometry.num_tokens} tokens (> {_POS_LIMIT + 1}); use a shorter schedule')
  return {'pos': ((), POS_DTYPE)}


def rank_score(primary_BHN: jax.Array, secondary_BHN: jax.Array) -> jax.Array:
  """Float32 score ordering candidates by `primary`, ties broken by `secondary` (larger = better).

  The score is the candidate's rank (0 = worst) in that lexicographic order, exact for N < 2**24.
  """
  order = jnp.lexsort((secondary_BHN, primary_BHN), axis=-1)    # ascending; last key is primary
  return jnp.argsort(order, axis=-1).astype(jnp.float32)


@register
@dataclasses.dataclass(frozen=True)
class RandomEviction(EvictionCompressor):
  """Keeps a uniformly random subset of the candidates at every scale.

  The score of candidate slot n at scale s is uniform(fold_in(key(seed), s))[b, h, n]: deterministic in
  (seed, scale, candidate slot), so no generator state is stored (and none is counted). Settings:
  seed: the static seed.
  """
  seed: int = 0

  name = 'random'
  family = 'eviction'

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(self.seed), scale)
    return jax.random.uniform(key, cand.valid.shape)


@register
@dataclasses.dataclass(frozen=True)
class WindowEviction(EvictionCompressor):
  """Sliding window: keeps the `capacity` most recent tokens (largest positions; stores 'pos').

  In VAR this keeps the most recent scales whole and a raster-order tail of the oldest scale that fits.
  """
  name = 'window'
  family = 'eviction'

  def extra_fields(self):
    return pos_field(self.geometry)

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    return cand.pos.astype(jnp.float32)


@register
@dataclasses.dataclass(frozen=True)
class StreamingEviction(EvictionCompressor):
  """StreamingLLM (Xiao et al. 2023): the first `sinks` tokens plus the most recent ones.

  Settings: sinks: attention-sink tokens kept forever (4 as in the paper; in VAR the first token is the
  class/start token and the next 4 are scale 1). With capacity < sinks the earliest tokens are kept.
  """
  sinks: int = 4

  name = 'streaming'
  family = 'eviction'

  def __post_init__(self):
    if self.sinks < 0:
      raise ValueError(f'streaming: sinks must be >= 0, got {self.sinks}')

  def extra_fields(self):
    return pos_field(self.geometry)

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    pos = cand.pos.astype(jnp.float32)
    top = float(2 * self.geometry.num_tokens)       # any sink outranks any non-sink
    return jnp.where(cand.pos < self.sinks, top - pos, pos)


@register
@dataclasses.dataclass(frozen=True)
class KNormEviction(EvictionCompressor):
  """Keeps the tokens of lowest key L2 norm (Devoto et al. 2024: low-norm keys draw high attention).

  Norms are taken of the keys as they are stored (geometry dtype) and compared after rounding to
  multiples of `norm_tol`; ties are broken by recency (largest position kept; stores 'pos').
  Note: with VAR's attn_l2_norm every key has norm 1, so all norms tie and this policy degenerates to
  the sliding window. Settings: norm_tol: norms closer than this count as equal.
  """
  norm_tol: float = 1e-2

  name = 'knorm'
  family = 'eviction'

  def __post_init__(self):
    if not self.norm_tol > 0:
      raise ValueError(f'knorm: norm_tol must be > 0, got {self.norm_tol}')

  def extra_fields(self):
    return pos_field(self.geometry)

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    k = cand.k.astype(self.geometry.kv_dtype).astype(jnp.float32)
    norm_q = jnp.round(jnp.linalg.norm(k, axis=-1) / self.norm_tol)
    return rank_score(-norm_q, cand.pos)
