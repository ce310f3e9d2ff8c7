"""Learned token merging: a differentiable assignment of the cache to the budget's M slots.

The cache is M slots (M = entries the budget holds). At every stored scale the candidates are the M
kept slots (each with its mass) and the scale's S new tokens (mass 1); every candidate is assigned to
one of the M output slots by logits

  logit_ic = P_s[i, c]  +  alpha * content_ic,

P_s (M, M + S) learned per (layer, head, scale), initialised to an area-pooling plan (each scale keeps a
share of the slots proportional to its size; tokens go to the nearest cell of a ~sqrt(m) x sqrt(m)
grid over their scale, kept slots to the nearest cell of their scale's coarser grid; exact storage while
everything fits). content_ic = -|k_c - ck_i|^2/2 - beta^2 |v_c - cv_i|^2/2 against the mass-weighted
centroids of the positional assignment (soft k-means steps; gains alpha, beta learned per layer/head).

A slot stores the mass-weighted means of its candidates' keys and values (geometry dtype) and a
log-mass (float16) used as attention bias: log(sum of masses) + gamma * spread, where spread is the
mass-weighted variance of the merged keys (tr Cov) and gamma (learned per layer/head; from calibration
queries E|q|^2 / 2D when given) is the second-order (Jensen) correction of log sum_j exp(q.k_j) ~
log m + q.mean(k) + q'Cov q / 2. So exp(q.k_i + logmass_i) stands for the attention mass of the tokens a
slot absorbed (exact when their keys are identical); re-merging weighs a kept slot by exp(logmass).
Bits: count (16) + M entries of 2 D kv-bits + 16, like any slot compressor.

Hard path (`compress_step`, evaluation): argmax assignments. Relaxation (`train_outputs`): the same steps
with softmax-over-slots assignments at `temperature` and stored dtypes rounded in the forward pass
(identity gradient), so it is `compress_step`'s structure exactly and equals it as temperature -> 0.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.attention import attend, block_causal_attention
from compress.base import Slots, dtype_bits, register
from compress.relax import straight_through_cast
from compress.slots import SlotCompressor

_EMPTY_LOGMASS = -60.0       # log-mass of an empty slot (no attention, no weight when re-merged)
_CENTROID_EPS = 1e-6         # regularises content centroids of (nearly) empty slots
_MASKED = -1e9               # logit of output slots not in use at a step


# ---- the static initial plan ----------------------------------------------------------------------
def allocate(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
  """Splits `total` slots over groups in proportion to `weights`, each group <= its cap.

  Every group with room first gets one slot (earliest groups first while slots last); the rest go one
  by one to the group furthest below its proportional target.
  """
  n = [0] * len(caps)
  total = min(total, sum(caps))
  for g, cap in enumerate(caps):
    if sum(n) < total and cap > 0:
      n[g] = 1
  w = np.asarray(weights, np.float64)
  target = total * w / w.sum()
  while sum(n) < total:
    g = max((g for g in range(len(n)) if n[g] < caps[g]), key=lambda g: (target[g] - n[g], -g))
    n[g] += 1
  return n


def grid_centres(pn: int) -> np.ndarray:
  """(pn^2, 2) (y, x) centres in the unit square of a pn x pn scale's tokens, raster order."""
  yy, xx = np.meshgrid((np.arange(pn) + 0.5) / pn, (np.arange(pn) + 0.5) / pn, indexing='ij')
  return np.stack([yy.ravel(), xx.ravel()], 1)


def cell_centres(m: int) -> np.ndarray:
  """(m, 2) centres of m cells tiling the unit square: round(sqrt m) rows of (nearly) equal cells.

  m = pn^2 gives exactly the pn x pn token centres (so a scale that fits is kept one token per slot).
  """
  rows = max(1, int(round(np.sqrt(m))))
  per_row = [m // rows + (r < m % rows) for r in range(rows)]
  return np.array([((r + 0.5) / rows, (c + 0.5) / n) for r, n in enumerate(per_row) for c in range(n)],
                  np.float64).reshape(m, 2)


@functools.lru_cache(maxsize=64)
def merge_plan(patch_nums: tuple[int, ...], M: int, power: float, sharpness: float, cross: float
               ) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
  """Initial assignment logits: per stored scale s, slots in use after it and logits (M, M + S_s).

  Slots in use grow to min(M, tokens so far); groups (scales) are packed in scale order, a group's
  share ~ size**power and never grows once set. logit = -sharpness * m_g * |pos_i - pos_c|^2 (m_g: the
  output group's cells, so neighbouring cells differ by ~sharpness) - cross [other scale] - a tiny
  tie-break by slot index. Rows of unused slots are 0 (masked by `used` at run time).
  """
  group, pos, prev = np.full(M, -1), np.zeros((M, 2)), []
  used, logits = [], []
  for s, pn in enumerate(patch_nums[:-1]):
    sizes = [p * p for p in patch_nums[:s + 1]]
    alloc = allocate(M, [z ** power for z in sizes], prev + [sizes[-1]])
    n = sum(alloc)
    out_group = np.repeat(np.arange(s + 1), alloc)
    out_pos = np.concatenate([cell_centres(a) for a in alloc if a] or [np.zeros((0, 2))])
    cand_group = np.concatenate([group, np.full(pn * pn, s)])
    cand_pos = np.concatenate([pos, grid_centres(pn)])
    d2 = ((out_pos[:, None] - cand_pos[None]) ** 2).sum(-1)
    lg = (-sharpness * np.asarray(alloc)[out_group][:, None] * d2
          - cross * (out_group[:, None] != cand_group[None]) - 1e-2 * np.arange(n)[:, None] / M)
    logits.append(np.pad(lg, ((0, M - n), (0, 0))).astype(np.float32))
    used.append(n)
    group = np.pad(out_group, (0, M - n), constant_values=-1)
    pos, prev = np.pad(out_pos, ((0, M - n), (0, 0))), alloc
  return tuple(used), tuple(logits)


# ---- one merge step (shared by the hard path and the relaxation) ---------------------------------
def _sq_dist(x_BHCD: jax.Array, c_BHMD: jax.Array) -> jax.Array:
  """(B, H, M, C) squared distances |x_c - c_i|^2."""
  return (jnp.sum(x_BHCD ** 2, -1)[:, :, None, :] - 2 * jnp.einsum('bhmd,bhcd->bhmc', c_BHMD, x_BHCD)
          + jnp.sum(c_BHMD ** 2, -1)[..., None])


@dataclasses.dataclass(frozen=True)
class Relaxation:
  """How an assignment is picked from logits: hard argmax, or softmax over slots at `temperature`."""
  hard: bool = True
  temperature: float = 1.0

  def pick(self, logits_BHMC: jax.Array, used: int) -> jax.Array:
    """(B, H, M, C) weights of each candidate c over the first `used` output slots (sum 1 over M)."""
    M = logits_BHMC.shape[2]
    lg = jnp.where((jnp.arange(M) < used)[:, None], logits_BHMC, _MASKED)
    if self.hard:
      return jax.nn.one_hot(jnp.argmax(lg, axis=2), M, axis=2, dtype=jnp.float32)
    return jax.nn.softmax(lg / self.temperature, axis=2)


def merge_candidates(pos_HMC, gain_H, value_weight_H, spread_gain_H, ck_BHMD, cv_BHMD, cmass_BHM,
                     k_BHSD, v_BHSD, used: int, iters: int, relax: Relaxation):
  """Merges M kept slots (masses `cmass`, 0 = empty) and S new tokens (mass 1) into M slots.

  Returns float32 keys, values (B, H, M, D), masses (B, H, M) and log-mass corrections gamma * spread
  (B, H, M) (spread: mass-weighted variance of the candidates' keys; a kept slot counts as its key).
  """
  B, H, S, _ = k_BHSD.shape
  f32 = jnp.float32
  k_BHCD = jnp.concatenate([ck_BHMD.astype(f32), k_BHSD.astype(f32)], 2)
  v_BHCD = jnp.concatenate([cv_BHMD.astype(f32), v_BHSD.astype(f32)], 2)
  m_BHC = jnp.concatenate([cmass_BHM.astype(f32), jnp.ones((B, H, S), f32)], 2)
  pos_BHMC = pos_HMC.astype(f32)[None]
  w_BHMC = relax.pick(jnp.broadcast_to(pos_BHMC, (B,) + pos_HMC.shape), used)
  beta2 = (value_weight_H.astype(f32) ** 2)[None, :, None, None]
  for _ in range(iters):                      # soft k-means from the positional assignment
    wm_BHMC = w_BHMC * m_BHC[:, :, None, :]
    den_BHM1 = wm_BHMC.sum(-1, keepdims=True) + _CENTROID_EPS
    cen_k = jnp.einsum('bhmc,bhcd->bhmd', wm_BHMC, k_BHCD) / den_BHM1
    cen_v = jnp.einsum('bhmc,bhcd->bhmd', wm_BHMC, v_BHCD) / den_BHM1
    dist_BHMC = _sq_dist(k_BHCD, cen_k) + beta2 * _sq_dist(v_BHCD, cen_v)
    w_BHMC = relax.pick(pos_BHMC - 0.5 * gain_H.astype(f32)[None, :, None, None] * dist_BHMC, used)
  wm_BHMC = w_BHMC * m_BHC[:, :, None, :]
  mass_BHM = wm_BHMC.sum(-1)
  den_BHM1 = jnp.where(mass_BHM > 0, mass_BHM, 1.0)[..., None]     # (double where: NaN-free grads)
  key_BHMD = jnp.einsum('bhmc,bhcd->bhmd', wm_BHMC, k_BHCD) / den_BHM1
  val_BHMD = jnp.einsum('bhmc,bhcd->bhmd', wm_BHMC, v_BHCD) / den_BHM1
  sq_BHM = jnp.einsum('bhmc,bhc->bhm', wm_BHMC, jnp.sum(k_BHCD ** 2, -1)) / den_BHM1[..., 0]
  spread_BHM = jnp.maximum(sq_BHM - jnp.sum(key_BHMD ** 2, -1), 0.0)
  return key_BHMD, val_BHMD, mass_BHM, spread_gain_H.astype(f32)[None, :, None] * spread_BHM


def log_mass(mass_BHM: jax.Array, correction_BHM: jax.Array) -> jax.Array:
  """log(mass) + correction, and _EMPTY_LOGMASS for empty slots (finite, NaN-free gradients)."""
  nonempty = mass_BHM > 0
  return jnp.where(nonempty, jnp.log(jnp.where(nonempty, mass_BHM, 1.0)) + correction_BHM,
                   _EMPTY_LOGMASS)


@register
@dataclasses.dataclass(frozen=True)
class LearnedMerge(SlotCompressor):
  """Learned token merging into the budget's M slots with log-mass attention bias (see module doc).

  Settings: temperature (of the relaxation in `train_outputs`), content_iters (soft k-means steps;
  0 = positional only, the default: on VAR-like synthetic caches the content term made the trained hard
  path worse), content_init / value_weight_init / spread_init (initial alpha, beta, gamma), alloc_power
  (a scale's initial share ~ size**power), pos_sharpness and cross_scale (the initial plan's logits),
  logmass_dtype (stored and counted at its width).
  """
  name = 'merge_learned'
  family = 'merging'
  learned = True
  temperature: float = 0.3
  content_iters: int = 0
  content_init: float = 4.0
  value_weight_init: float = 0.5
  spread_init: float = 0.0
  alloc_power: float = 1.0
  pos_sharpness: float = 4.0
  cross_scale: float = 2.0
  logmass_dtype: str = 'float16'

  def __post_init__(self):
    jnp.dtype(self.logmass_dtype)  # raises on an unknown dtype name
    if not self.temperature > 0:
      raise ValueError(f'{self.name}: temperature must be > 0, got {self.temperature}')
    if self.content_iters < 0:
      raise ValueError(f'{self.name}: content_iters must be >= 0, got {self.content_iters}')

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {'logmass': ((), jnp.dtype(self.logmass_dtype))}

  def plan(self) -> tuple[tuple[int, ...], tuple[np.ndarray, ...]]:
    """(slots in use after each stored scale, initial logits (M, M + S_s) per stored scale)."""
    return merge_plan(tuple(self.geometry.patch_nums), self.capacity, float(self.alloc_power),
                      float(self.pos_sharpness), float(self.cross_scale))

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> dict[str, jax.Array] | None:
    """{'pos<s>': (layers, heads, M, M + S_s) float32 per stored scale s, 'content_gain',
    'value_weight', 'spread_gain': (layers, heads)}; None when nothing is learned (budget
    passthrough, or no slot fits).

    Deterministic (the initial plan; `key` is unused). Optional calibration {'q': (layers, B, heads,
    L, D), ...} sets spread_gain = E|q|^2 / (2 D) per layer/head (other entries are ignored).
    """
    del key
    if self.passthrough or self.capacity == 0:
      return None
    one = self.default_params(num_heads)
    params = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_layers,) + x.shape), one)
    if calibration is not None and 'q' in calibration:
      q = np.asarray(calibration['q'], np.float32)
      want = (num_layers, num_heads, self.geometry.head_dim)
      if q.ndim != 5 or (q.shape[0], q.shape[2], q.shape[4]) != want:
        raise ValueError(f"{self.name}: calibration['q'] must be (layers={want[0]}, B, heads={want[1]}, "
                         f'L, D={want[2]}), got {q.shape}')
      params['spread_gain'] = jnp.asarray((q ** 2).sum(-1).mean(axis=(1, 3)) / (2 * q.shape[-1]))
    return params

  def default_params(self, num_heads: int) -> dict[str, jax.Array]:
    """One layer's initial parameters (leaves (heads, ...))."""
    H = num_heads
    params = {f'pos{s}': jnp.broadcast_to(jnp.asarray(lg), (H,) + lg.shape)
              for s, lg in enumerate(self.plan()[1])}
    params['content_gain'] = jnp.full((H,), self.content_init, jnp.float32)
    params['value_weight'] = jnp.full((H,), self.value_weight_init, jnp.float32)
    params['spread_gain'] = jnp.full((H,), self.spread_init, jnp.float32)
    return params

  def shared_bits(self, params) -> int:
    if params is None:
      return 0
    return sum(int(a.size) * dtype_bits(a.dtype) for a in jax.tree_util.tree_leaves(params))

  # ---- one scale ------------------------------------------------------------------------------
  def merge(self, params, k_BHMD, v_BHMD, logmass_BHM, count: int, k_BHSD, v_BHSD, scale: int,
            relax: Relaxation) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """The kept slots (first `count` valid) absorb scale `scale`: float32 (keys, values, log-masses)
    and the new count."""
    if params is None:
      params = self.default_params(k_BHSD.shape[1])
    used = self.plan()[0][scale]
    valid_M = jnp.arange(k_BHMD.shape[2]) < count
    cmass_BHM = jnp.where(valid_M, jnp.exp(logmass_BHM.astype(jnp.float32)), 0.0)
    key, val, mass, corr = merge_candidates(
        params[f'pos{scale}'], params['content_gain'], params['value_weight'], params['spread_gain'],
        k_BHMD, v_BHMD, cmass_BHM, k_BHSD, v_BHSD, used, self.content_iters, relax)
    return key, val, log_mass(mass, corr), used

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    bias = state.extra.get('logmass')
    out, _, _ = attend(q_BHSD, state.k, state.v, state.valid, bias, k_BHSD, v_BHSD)
    if self.is_last(scale) or state.capacity == 0:
      return out, state
    count = self.plan()[0][scale - 1] if scale else 0
    key, val, lm, used = self.merge(params, state.k, state.v, bias, count, k_BHSD, v_BHSD, scale,
                                    Relaxation(hard=True))
    return out, state.replace(
        k=key.astype(state.k.dtype), v=val.astype(state.v.dtype), count=jnp.full_like(state.count, used),
        extra={'logmass': lm.astype(state.extra['logmass'].dtype)})

  # ---- the differentiable relaxation ----------------------------------------------------------
  def train_outputs(self, params, q_BHLD: jax.Array, k_BHLD: jax.Array, v_BHLD: jax.Array
                    ) -> jax.Array:
    """(B, H, L, D) float32 outputs of the whole pyramid for one layer (params leaves (H, ...)),
    with soft assignments: differentiable in the parameters."""
    g = self.geometry
    if self.passthrough:
      return block_causal_attention(q_BHLD, k_BHLD, v_BHLD, g.patch_nums)
    B, H, _, D = q_BHLD.shape
    M, dt = self.capacity, jnp.dtype(g.kv_dtype)
    relax = Relaxation(hard=False, temperature=self.temperature)
    ck, cv, clm = (jnp.zeros((B, H, M, D)), jnp.zeros((B, H, M, D)), jnp.zeros((B, H, M)))
    count, outs = 0, []
    for s, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      q, k, v = (x[:, :, st:st + S] for x in (q_BHLD, k_BHLD, v_BHLD))
      valid = jnp.broadcast_to(jnp.arange(M) < count, (B, H, M))
      outs.append(attend(q, ck, cv, valid, clm, k, v)[0])
      if self.is_last(s) or M == 0:
        continue
      ck, cv, clm, count = self.merge(params, ck, cv, clm, count, k, v, s, relax)
      ck, cv = straight_through_cast(ck, dt), straight_through_cast(cv, dt)
      clm = straight_through_cast(clm, self.logmass_dtype)
    return jnp.concatenate(outs, 2)
