"""`evict_learned`: eviction by a small trained scorer over per-entry features, per (layer, head).

Features of every candidate (kept entries + the new scale), F = 8 scalars then the key and value:
  log_mass    log of the attention the current scale's queries put on it (sum over queries; ScaleKV)
  log_pooled  log of that mass average-pooled over position neighbours (`pool_by_position`; SnapKV)
  log_acc     log of the attention accumulated over every query so far (H2O; stored per entry)
  recency     position / (L - 1)                      (the sliding window's score)
  age         (current scale - its scale) / (K - 1)
  row, col    its cell centre in its scale's grid, in [0, 1)
  is_new      1 for the current scale's tokens
  k, v        the key and value as stored (D each)
Scorer, per head (no sharing over heads or layers): score = x . w_lin + relu(x W1 + b1) . w2 (a
linear term plus a one-hidden-layer MLP residual, `hidden` units; hidden = 0: linear). Initialised
with w_lin one-hot on the feature of `init_rule`'s heuristic and w2 = 0, so at init it ranks exactly
as that heuristic does (log is monotone). W1 starts random, so w2 gets gradients from the first step
(W1 then gets them once w2 != 0).

Hard path (EvictionCompressor): keeps the top-`capacity` candidates by score. Per entry it stores the
key and value at the geometry dtype and, only when asked, an int16 'pos' (`store_pos`: log_pooled,
recency, age, row and col follow from it) and the accumulated attention 'acc' at `acc_dtype`
(`store_acc`: log_acc), all counted; features whose field is not stored are 0. By default neither is
stored, so an entry costs what a `scalekv` entry costs (the extra 32 bits cost one of 9 entries at
10 % of the fp16 cache on the default model, more than the features gained).

`train_outputs` relaxes the whole streaming eviction for one layer: every token stays in a full-length
buffer with a log-keep weight added to its logit for later queries. At each scale's compression the
scorer scores every token seen so far; a soft top-k (compress.core.relax.soft_topk_log_mask, temperature
`tau`, threshold midway between the k-th and (k+1)-th score of the entries the hard path would hold)
multiplies each token's survival. The set the hard path holds is tracked alongside (hard top-k on the
same scores) and sets the thresholds and the SnapKV pooling neighbours. As tau -> 0 the relaxation's
outputs equal the hard path's (absent ties).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.attention import attend
from compress.core.interface import check_param_shapes
from compress.core.registry import register
from compress.core.relax import NEG_BIG, pyramid_attention, soft_topk_log_mask, straight_through_cast
from compress.core.slot_compressor import Candidates
from compress.core.topk import topk_mask
from compress.eviction.attention_scores import pool_by_position
from compress.eviction.base import EvictionCompressor
from compress.eviction.static_scores import pos_field

FEATURES = ('log_mass', 'log_pooled', 'log_acc', 'recency', 'age', 'row', 'col', 'is_new')
INIT_RULES = {'scalekv': 'log_mass', 'snapkv': 'log_pooled', 'h2o': 'log_acc', 'window': 'recency'}
_EPS = 1e-12            # floor inside the logs of attention masses


def grid_tables(patch_nums: tuple[int, ...]) -> np.ndarray:
  """(L, 3) float32: every position's scale index, row and column cell centre in [0, 1)."""
  rows = []
  for si, pn in enumerate(patch_nums):
    r, c = np.meshgrid((np.arange(pn) + 0.5) / pn, (np.arange(pn) + 0.5) / pn, indexing='ij')
    rows.append(np.stack([np.full(pn * pn, si), r.ravel(), c.ravel()], 1))
  return np.concatenate(rows).astype(np.float32)


@register
@dataclasses.dataclass(frozen=True)
class LearnedEviction(EvictionCompressor):
  """Top-`capacity` candidates by a trained per-head scorer (see the module docstring).

  Params (leading axes (layers, heads)): 'w_lin' (F + 2D,), 'w1' (F + 2D, hidden), 'b1' (hidden,),
  'w2' (hidden,), float32. Settings: hidden (MLP width, 0 = linear), init_rule (heuristic reproduced
  at init: scalekv | snapkv | h2o | window), kernel/pool (SnapKV pooling of 'log_pooled'), acc_dtype
  (stored accumulated attention), tau (soft top-k temperature of train_outputs, in score units),
  store_pos / store_acc (store the fields the position and accumulated-attention features need).
  """
  hidden: int = 16
  init_rule: str = 'scalekv'
  kernel: int = 5
  pool: str = 'avg'
  acc_dtype: str = 'float16'
  tau: float = 0.1
  store_pos: bool = False
  store_acc: bool = False

  name = 'evict_learned'
  family = 'eviction'
  learned = True
  budget_free_params = True     # a per-head scorer of entry features: the same at every budget

  def __post_init__(self):
    if self.hidden < 0:
      raise ValueError(f'{self.name}: hidden must be >= 0 (0 = linear scorer), got {self.hidden}')
    if self.init_rule not in INIT_RULES:
      raise ValueError(f'{self.name}: init_rule must be one of {sorted(INIT_RULES)}, got '
                       f'{self.init_rule!r}')
    if self.kernel < 1 or self.pool not in ('avg', 'max'):
      raise ValueError(f"{self.name}: need kernel >= 1 and pool in ('avg', 'max'), got "
                       f'{self.kernel}, {self.pool!r}')
    if not jnp.issubdtype(jnp.dtype(self.acc_dtype), jnp.floating):
      raise ValueError(f'{self.name}: acc_dtype must be a float dtype, got {self.acc_dtype!r}')
    if not self.tau > 0:
      raise ValueError(f'{self.name}: tau must be > 0, got {self.tau}')
    if not self.available[FEATURES.index(INIT_RULES[self.init_rule])]:
      raise ValueError(f'{self.name}: init_rule {self.init_rule!r} scores by '
                       f'{INIT_RULES[self.init_rule]!r}, which needs a stored field: set '
                       "store_pos=True (snapkv, window) or store_acc=True (h2o)")

  def extra_fields(self):
    fields = pos_field(self.geometry) if self.store_pos else {}
    return {**fields, 'acc': ((), self.acc_dtype)} if self.store_acc else fields

  @property
  def available(self) -> np.ndarray:
    """(F,) 1 for the features the stored fields allow, 0 for those set to 0 (see the module doc)."""
    off = (() if self.store_pos else ('log_pooled', 'recency', 'age', 'row', 'col')) + (
        () if self.store_acc else ('log_acc',))
    return np.array([f not in off for f in FEATURES], np.float32)

  @property
  def in_dim(self) -> int:
    return len(FEATURES) + 2 * self.geometry.head_dim

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> dict[str, jax.Array] | None:
    """The scorer reproducing `init_rule` (no calibration needed; any given is ignored)."""
    del calibration
    if self.passthrough:
      return None
    N, H, X, J = num_layers, num_heads, self.in_dim, self.hidden
    w_lin = np.zeros((N, H, X), np.float32)
    w_lin[..., FEATURES.index(INIT_RULES[self.init_rule])] = 1.0
    return {'w_lin': jnp.asarray(w_lin),
            'w1': jax.random.normal(key, (N, H, X, J), jnp.float32) / np.sqrt(X),
            'b1': jnp.zeros((N, H, J), jnp.float32), 'w2': jnp.zeros((N, H, J), jnp.float32)}

  # ---- scoring ----------------------------------------------------------------------------------
  def features(self, mass_BHN, pooled_BHN, acc_BHN, pos_BHN, is_new_BHN, scale: int) -> jax.Array:
    """(B, H, N, F) float32 scalar features (order FEATURES); pos -1 (empty slot) reads position 0."""
    g = self.geometry
    K, L = len(g.patch_nums), g.num_tokens
    grid = jnp.asarray(grid_tables(g.patch_nums))[jnp.maximum(pos_BHN, 0)]     # (B, H, N, 3)
    log = lambda x: jnp.log(jnp.maximum(x, 0.0) + _EPS)
    cols = [log(mass_BHN), log(pooled_BHN), log(acc_BHN),
            jnp.maximum(pos_BHN, 0).astype(jnp.float32) / max(L - 1, 1),
            (scale - grid[..., 0]) / (K - 1), grid[..., 1], grid[..., 2], is_new_BHN.astype(jnp.float32)]
    feats = jnp.stack(cols, axis=-1)
    return jnp.where(jnp.asarray(self.available) > 0, feats, 0.0)

  def scores(self, params, feats_BHNF, k_BHND, v_BHND) -> jax.Array:
    """(B, H, N) float32 scores; params of one layer (leaves (H, ...))."""
    x_BHNX = jnp.concatenate([feats_BHNF, k_BHND.astype(jnp.float32), v_BHND.astype(jnp.float32)], -1)
    s = jnp.einsum('bhnx,hx->bhn', x_BHNX, params['w_lin'])
    if self.hidden:
      h_BHNJ = jax.nn.relu(jnp.einsum('bhnx,hxj->bhnj', x_BHNX, params['w1'])
                           + params['b1'][None, :, None, :])
      s = s + jnp.einsum('bhnj,hj->bhn', h_BHNJ, params['w2'])
    return s

  def _check_params(self, params) -> None:
    want = {'w_lin': (self.in_dim,), 'w1': (self.in_dim, self.hidden), 'b1': (self.hidden,),
            'w2': (self.hidden,)}
    check_param_shapes(self.name, params, want, 'init_params(key, layers, heads)',
                       f'head_dim {self.geometry.head_dim}, hidden {self.hidden}',
                       'rebuild params with init_params for this geometry and settings')

  def _masses(self, attn_BHSN, pos_BHN, valid_BHN, acc_prev_BHN):
    mass = attn_BHSN.sum(axis=2)
    pooled = pool_by_position(mass, pos_BHN, valid_BHN, self.kernel, self.pool)
    return mass, pooled, acc_prev_BHN + mass

  # ---- hard path --------------------------------------------------------------------------------
  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    self._check_params(params)
    acc_prev = cand.extra['acc'] if self.store_acc else jnp.zeros(cand.valid.shape, jnp.float32)
    mass, pooled, acc = self._masses(cand.attn, cand.pos, cand.valid, acc_prev)
    feats = self.features(mass, pooled, acc, cand.pos, cand.is_new, scale)
    return self.scores(params, feats, cand.k, cand.v)

  def updated_extra(self, cand: Candidates, scale: int) -> dict[str, jax.Array]:
    extra = {'pos': cand.pos} if self.store_pos else {}
    if self.store_acc:
      extra['acc'] = cand.extra['acc'] + cand.attn.sum(axis=2)
    return extra

  # ---- relaxation -------------------------------------------------------------------------------
  def train_outputs(self, params, q_BHLD: jax.Array, k_BHLD: jax.Array, v_BHLD: jax.Array
                    ) -> jax.Array:
    """Soft streaming eviction of one layer: outputs (B, H, L, D) float32, differentiable in params.

    Every token keeps a log-survival weight (the sum of its soft top-k log-masks so far) that later
    queries add to its logit; the hard path's kept set is tracked to place the thresholds. Cached
    keys/values and the stored accumulated attention are rounded as stored (straight-through).
    """
    g = self.geometry
    dt, pn = g.kv_dtype, g.patch_nums
    ck_BHLD, cv_BHLD = (straight_through_cast(x, dt) for x in (k_BHLD, v_BHLD))
    if self.passthrough or self.capacity == 0:
      bias = None if self.passthrough else jnp.full(q_BHLD.shape[:2] + (len(pn), g.num_tokens), NEG_BIG)
      return pyramid_attention(q_BHLD, ck_BHLD, cv_BHLD, k_BHLD, v_BHLD, pn, bias)
    self._check_params(params)
    B, H, L, _ = q_BHLD.shape
    m = self.capacity
    logkeep_BHL = jnp.zeros((B, H, L), jnp.float32)     # log-survival (positions seen so far)
    alive_BHL = jnp.zeros((B, H, L), bool)              # what the hard path holds
    acc_BHL = jnp.zeros((B, H, L), jnp.float32)         # accumulated attention as stored
    outs = []
    for si, (start, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      N, own = start + S, slice(start, start + S)
      out, p_cache, p_new = attend(q_BHLD[:, :, own], ck_BHLD[:, :, :start], cv_BHLD[:, :, :start],
                                   jnp.ones((B, H, start), bool), logkeep_BHL[:, :, :start],
                                   k_BHLD[:, :, own], v_BHLD[:, :, own])
      outs.append(out)
      if self.is_last(si):
        break
      cat = lambda old, new: jnp.concatenate([old[:, :, :start], new], axis=2)
      valid_BHN = cat(alive_BHL, jnp.ones((B, H, S), bool))
      pos_BHN = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, H, N))
      mass, pooled, acc = self._masses(jnp.concatenate([p_cache, p_new], -1), pos_BHN, valid_BHN,
                                       cat(acc_BHL, jnp.zeros((B, H, S))))
      feats = self.features(mass, pooled, acc, pos_BHN, pos_BHN >= start, si)
      score_BHN = self.scores(params, feats, cat(ck_BHLD, k_BHLD[:, :, own]),
                              cat(cv_BHLD, v_BHLD[:, :, own]))
      pad = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, L - N)), constant_values=fill)
      logkeep_BHL = logkeep_BHL + pad(soft_topk_log_mask(score_BHN, valid_BHN, m, self.tau), 0.0)
      logkeep_BHL = jnp.maximum(logkeep_BHL, NEG_BIG)
      alive_BHL = pad(topk_mask(jax.lax.stop_gradient(score_BHN), valid_BHN, m), False)
      acc_BHL = pad(straight_through_cast(acc, self.acc_dtype), 0.0)
    return jnp.concatenate(outs, axis=2)
