"""Eviction by observed attention: H2O (accumulated), TOVA (last query), SnapKV (pooled window).

Scores come from `Candidates.attn` (B, H, S, N): the probabilities the current scale's S queries put on
every candidate (kept entries + the scale's own tokens) in the step's own attention, so they cost no
extra attention pass. All policies keep the `capacity` best candidates per head (TOVA: per layer).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from compress.core.registry import register
from compress.core.slot_compressor import Candidates
from compress.core.topk import topk_mask
from compress.eviction.base import EvictionCompressor
from compress.eviction.static_scores import pos_field

_KEEP = float(jnp.finfo(jnp.float32).max)


def pool_by_position(score_BHN: jax.Array, pos_BHN: jax.Array, valid_BHN: jax.Array, kernel: int,
                     mode: str = 'avg') -> jax.Array:
  """1-D max/avg pooling of per-candidate scores along the candidates sorted by token position.

  Neighbours are the adjacent *valid* candidates in position order (raster order inside a scale,
  scales one after the other; evicted tokens leave no gap). The window is centred, `kernel` wide, and
  truncated at the ends (avg divides by the valid entries it covers). Invalid candidates are ignored.
  """
  if kernel <= 1:
    return score_BHN
  if mode not in ('max', 'avg'):
    raise ValueError(f"pool must be 'max' or 'avg', got {mode!r}")
  big = jnp.iinfo(jnp.int32).max
  order = jnp.argsort(jnp.where(valid_BHN, pos_BHN, big), axis=-1)   # valid by position, then invalid
  s = jnp.take_along_axis(score_BHN.astype(jnp.float32), order, axis=-1)
  v = jnp.take_along_axis(valid_BHN, order, axis=-1)
  lo, hi = (kernel - 1) // 2, kernel // 2
  N = s.shape[-1]
  pad = lambda x, fill: jnp.pad(x, [(0, 0), (0, 0), (lo, hi)], constant_values=fill)
  sp, vp = pad(s, 0.0), pad(v, False)
  win_s = jnp.stack([sp[..., i:i + N] for i in range(kernel)], axis=-1)   # (B, H, N, kernel)
  win_v = jnp.stack([vp[..., i:i + N] for i in range(kernel)], axis=-1)
  if mode == 'max':
    pooled = jnp.where(win_v, win_s, -jnp.inf).max(-1)
  else:
    pooled = jnp.where(win_v, win_s, 0.0).sum(-1) / jnp.maximum(win_v.sum(-1), 1)
  pooled = jnp.where(v, pooled, s)
  return jnp.take_along_axis(pooled, jnp.argsort(order, axis=-1), axis=-1)


@register
@dataclasses.dataclass(frozen=True)
class H2OEviction(EvictionCompressor):
  """Heavy-Hitter Oracle (Zhang et al. 2023) / observed attention, accumulated over the scales.

  Every kept entry stores its accumulated attention 'score' (counted, at `score_dtype`): the sum over
  every query that has seen it of the probability it received. At each scale kept entries add the
  current queries' probabilities; the scale's own tokens start with what they got from their own
  scale. Settings: recent_share: fraction of the capacity reserved for the most recent tokens (H2O's
  recent window; > 0 also stores an int16 'pos'); score_dtype: dtype of the stored scores.
  """
  recent_share: float = 0.0
  score_dtype: str = 'float16'

  name = 'h2o'
  family = 'eviction'

  def __post_init__(self):
    if not 0.0 <= self.recent_share <= 1.0:
      raise ValueError(f'h2o: recent_share must be in [0, 1], got {self.recent_share}')
    if not jnp.issubdtype(jnp.dtype(self.score_dtype), jnp.floating):
      raise ValueError(f'h2o: score_dtype must be a float dtype, got {self.score_dtype!r}')

  def extra_fields(self):
    fields = {'score': ((), self.score_dtype)}
    if self.recent_share > 0:
      fields.update(pos_field(self.geometry))
    return fields

  def accumulated(self, cand: Candidates) -> jax.Array:
    """(B, H, N) stored score + this scale's probabilities, summed over the S queries."""
    return cand.extra['score'] + cand.attn.sum(axis=2)

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    acc = self.accumulated(cand)
    r = int(self.recent_share * state.capacity)
    if r == 0:
      return acc
    return jnp.where(topk_mask(cand.pos, cand.valid, r), _KEEP, acc)

  def updated_extra(self, cand: Candidates, scale: int):
    extra = {'score': self.accumulated(cand)}
    if 'pos' in self.extra_fields():
      extra['pos'] = cand.pos
    return extra


@register
@dataclasses.dataclass(frozen=True)
class TOVAEviction(EvictionCompressor):
  """TOVA (Oren et al. 2024): keep the tokens the last query attends to most.

  Score = the current scale's last query's (raster order: bottom-right token) probabilities, averaged
  over heads, so there is one decision per layer broadcast to every head, as in the paper. Kept sets
  therefore stay aligned across heads (candidate n is the same token in every head). Nothing extra is
  stored; scores are not accumulated over scales.
  """
  name = 'tova'
  family = 'eviction'

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    last_BHN = cand.attn[:, :, -1, :]
    return jnp.broadcast_to(last_BHN.mean(axis=1, keepdims=True), last_BHN.shape)


@register
@dataclasses.dataclass(frozen=True)
class SnapKVEviction(EvictionCompressor):
  """SnapKV (Li et al. 2024) adapted to VAR as in ScaleKV: the observation window is the current scale.

  Score of a candidate = sum over the current scale's queries of its probability, then pooled
  (`pool` = 'avg' | 'max', width `kernel`) along the candidates sorted by token position (see
  `pool_by_position`), so neighbours of attended tokens are kept as clusters. Unlike LLM SnapKV the
  observation tokens (the new scale) are not force-kept: they compete with the cache on the same score.
  Per head; stores an int16 'pos' (the sort key). Settings: kernel (1 = no pooling), pool.
  """
  kernel: int = 5
  pool: str = 'avg'

  name = 'snapkv'
  family = 'eviction'

  def __post_init__(self):
    if self.kernel < 1 or self.pool not in ('avg', 'max'):
      raise ValueError(f"snapkv: need kernel >= 1 and pool in ('avg', 'max'), got {self.kernel}, "
                       f'{self.pool!r}')

  def extra_fields(self):
    return pos_field(self.geometry)

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    return pool_by_position(cand.attn.sum(axis=2), cand.pos, cand.valid, self.kernel, self.pool)
