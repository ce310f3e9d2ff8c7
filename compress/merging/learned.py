"""`merge_learned`: evict-then-merge (CaM / D2O structure) with trained scores, assignment and log-masses.

Every step (per head) the candidates are the kept slots and the new scale's S tokens. Parameters, per
(layer, head), all float32 (`PARAMS`):
  score   (F,)  anchor score  s_c = score . f_c  over F = 5 features (`FEATURES`): log of the current
                scale's attention column sum (CaM's score), log |v_c|, log |k_c|, the stored log-mass
                b_c and is_new. The M = capacity best candidates are the anchors (the slots).
  value_sim     assignment similarity  sim_ca = cos(k_c, k_a) + value_sim * cos(v_c, v_a)
  threshold     an evicted candidate merges into its most similar anchor if sim >= threshold, else
                it is dropped
  weight_pow    merge weights w_c = (m_c / max m) ** weight_pow (floored at 1e-12), m_c the candidate's
                mean attention probability over the scale's queries (CaM: 1)
  calib         log-mass mix: slot a stores  b_a = ls_a + CALIB_GAIN * calib * (cal_a - ls_a), where
                ls_a = log sum_{c in a} e^{b_c}  (sizes add: ToMe's proportional attention) and
                cal_a = log sum_{s, c in a} e^{q_s.k_c + b_c} - log sum_s e^{q_s.k_a}  sets the merged
                entry's total attention over the current scale's queries to its members' (exact for the
                scale just seen; it corrects for the spread of merged keys)
A slot stores the w-weighted means of its members' keys and values (geometry dtype) and b_a (float16,
`logmass_dtype`); the attention bias is b_a. Bits: the 16-bit count + M entries of 2 D kv-bits + 16,
exactly ToMe's and CaM's layout. Shared parameters: 9 floats per (layer, head).

Initialisation (`init_params`): score one-hot on the column sum, value_sim 0, threshold `threshold`,
weight_pow 1, calib 0: the hard path is then CaM (`compress.merging.CaM`) with its sizes kept as a
float16 log instead of a uint16 count.

Hard path (`compress_step`, evaluation): hard top-M, argmax assignment, threshold test. Relaxation
(`train_outputs`, one layer over the whole pyramid): a buffer holds every token seen so far as a
potential slot; a candidate c stays a slot with weight sig_c = sigmoid((s_c - t) / tau) (t midway
between the M-th and (M+1)-th score of what the hard path would hold, `compress.core.relax`) and sends the
rest (1 - sig_c) * gate_c to the hard path's anchors a != c by pi_ca = softmax_a(sim_ca / temperature
+ log sig_a), gate_c = sigmoid((sum_a pi_ca sim_ca - threshold) / temperature). Keys, values and
log-masses are the same formulas over these soft member weights, rounded as stored (straight-through).
As tau, temperature -> 0 the member weights become the hard path's and so do the outputs.

On the default model's caches (100 AdamW steps, lr 3e-3) it ended 12-13 % below CaM and 33-39 % below
ToMe at 10 / 25 / 50 % of the fp16 cache (label-matched budgets, where the three hold the same entries;
the main job's figures at equal memory: docs/frontier.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.attention import attend, attend_output
from compress.core.interface import check_param_shapes
from compress.core.registry import register
from compress.core.relax import NEG_BIG, pyramid_attention, soft_topk_log_mask, straight_through_cast
from compress.core.slot_compressor import SlotCompressor
from compress.core.slots import gather_entries, pack
from compress.core.topk import first_max_index, topk_indices, topk_mask

FEATURES = ('log_colsum', 'log_vnorm', 'log_knorm', 'logmass', 'is_new')
PARAMS = {'score': (len(FEATURES),), 'value_sim': (), 'threshold': (), 'weight_pow': (), 'calib': ()}
EMPTY_LOGMASS = -60.0     # log-mass of an empty slot: no attention (exp underflows), no weight
_EPS = 1e-12              # floor inside the logs of the features
_TINY_MASS = 1e-30        # CaM's tie-breaker: merge weights stay > 0 when attention underflows
_LOG_MIN_WEIGHT = -27.6   # merge weights floor at e^-27.6 ~ 1e-12 of the head's largest
CALIB_GAIN = 10.0         # calib enters as CALIB_GAIN * param: its scale matches the others' steps
_FLOOR = 1e-30            # member weight sums below it count as empty (keeps 1/x finite in gradients)


def norm(x_BHND: jax.Array) -> jax.Array:
  """Row norms with a finite gradient at 0 (empty slots hold zero vectors)."""
  return jnp.sqrt(jnp.sum(x_BHND * x_BHND, axis=-1) + _EPS * _EPS)


def features(colsum_BHN, k_BHND, v_BHND, b_BHN, is_new_BHN) -> jax.Array:
  """(B, H, N, F) float32 anchor-score features, in the order of FEATURES."""
  log = lambda x: jnp.log(jnp.maximum(x, 0.0) + _EPS)
  return jnp.stack([log(colsum_BHN), log(norm(v_BHND)),
                    log(norm(k_BHND)), b_BHN, is_new_BHN.astype(jnp.float32)], -1)


def unit(x_BHND: jax.Array) -> jax.Array:
  return x_BHND / norm(x_BHND)[..., None]


def similarity(params, k_BHND, v_BHND) -> jax.Array:
  """(B, H, N_c, N_a) sim_ca = cos(k_c, k_a) + value_sim cos(v_c, v_a)."""
  kn, vn = unit(k_BHND), unit(v_BHND)
  return (jnp.einsum('bhcd,bhad->bhca', kn, kn)
          + params['value_sim'][None, :, None, None] * jnp.einsum('bhcd,bhad->bhca', vn, vn))


def hard_members(params, sim_BHCA, anchor_BHN, valid_BHN) -> jax.Array:
  """(B, H, N_a, N_c) 0/1 member weights: anchors hold themselves, evicted ones join their argmax."""
  N = anchor_BHN.shape[-1]
  s = jnp.where(anchor_BHN[:, :, None, :], sim_BHCA, -jnp.inf)
  merged_BHN = valid_BHN & ~anchor_BHN & (s.max(-1) >= params['threshold'][None, :, None])
  target_BHN = first_max_index(s)
  eye = jnp.eye(N, dtype=bool)[None, None]
  joins = merged_BHN[:, :, None, :] & (target_BHN[:, :, None, :] == jnp.arange(N)[:, None])
  return ((eye & anchor_BHN[:, :, :, None]) | joins).astype(jnp.float32)


def soft_members(params, sim_BHCA, logsig_BHN, anchor_BHN, temperature: float) -> jax.Array:
  """(B, H, N_a, N_c) relaxed member weights sig_a [a = c] + (1 - sig_c) gate_c pi_ca (module doc).

  pi_ca spreads over the hard anchors a != c (`anchor`), so that the weights tend to `hard_members`
  as the temperatures go to 0 whatever their ratio.
  """
  N = logsig_BHN.shape[-1]
  eye = jnp.eye(N, dtype=bool)[None, None]
  ok = anchor_BHN[:, :, None, :] & ~eye
  logits = jnp.where(ok, sim_BHCA / temperature + logsig_BHN[:, :, None, :], NEG_BIG)
  pi_BHCA = jax.nn.softmax(logits, axis=-1)
  mean_sim = jnp.sum(pi_BHCA * sim_BHCA, -1)
  gate_BHN = jax.nn.sigmoid((mean_sim - params['threshold'][None, :, None]) / temperature)
  sig_BHN = jnp.exp(logsig_BHN)
  own = eye.astype(jnp.float32) * sig_BHN[:, :, :, None]
  moved = jnp.swapaxes(pi_BHCA * ((1.0 - sig_BHN) * gate_BHN)[..., None], -1, -2)
  return own + moved


def merge_slots(params, W_BHAC, q_BHSD, k_BHCD, v_BHCD, b_BHC, mass_BHC, kv_dtype, lm_dtype):
  """Merged keys, values (rounded to kv_dtype, straight-through) and log-masses of every slot a.

  W: member weights (B, H, N_a, N_c); b: candidates' log-masses; mass: their mean attention probability
  over the scale's queries q (B, H, S, D). Empty slots (no member weight) get EMPTY_LOGMASS.
  """
  f32 = jnp.float32
  log_m = jnp.log(mass_BHC + _TINY_MASS)            # weights relative to the largest (same means)
  log_m = log_m - jax.lax.stop_gradient(log_m.max(-1, keepdims=True))
  w_BHC = jnp.exp(jnp.maximum(params['weight_pow'][None, :, None] * log_m, _LOG_MIN_WEIGHT))
  Ww_BHAC = W_BHAC * w_BHC[:, :, None, :]
  # means over each slot's members, scaled by its largest member weight (no 1/x^2 underflow)
  top_w = jax.lax.stop_gradient(Ww_BHAC.max(-1, keepdims=True))
  has = top_w > _FLOOR
  Wn_BHAC = Ww_BHAC / jnp.where(has, top_w, 1.0)
  den = jnp.where(has, Wn_BHAC.sum(-1, keepdims=True), 1.0)        # >= 1 for a slot with members
  key = straight_through_cast(jnp.einsum('bhac,bhcd->bhad', Wn_BHAC, k_BHCD) / den, kv_dtype)
  val = straight_through_cast(jnp.einsum('bhac,bhcd->bhad', Wn_BHAC, v_BHCD) / den, kv_dtype)
  b_BHC = jnp.maximum(b_BHC, EMPTY_LOGMASS)
  top = jax.lax.stop_gradient(b_BHC.max(-1, keepdims=True))
  size = jnp.einsum('bhac,bhc->bha', W_BHAC, jnp.exp(b_BHC - top))
  # attention of the scale's queries on every member, and on the merged key
  a_BHC = jax.nn.logsumexp(jnp.einsum('bhsd,bhcd->bhsc', q_BHSD.astype(f32), k_BHCD) + b_BHC[:, :, None],
                           axis=2)
  a_top = jax.lax.stop_gradient(a_BHC.max(-1, keepdims=True))
  exact = jnp.einsum('bhac,bhc->bha', W_BHAC, jnp.exp(a_BHC - a_top))
  merged = jax.nn.logsumexp(jnp.einsum('bhsd,bhad->bhsa', q_BHSD.astype(f32), key), axis=2)
  nonempty = (size > _FLOOR) & (exact > _FLOOR)
  ls = jnp.log(jnp.where(nonempty, size, 1.0)) + top
  cal = jnp.log(jnp.where(nonempty, exact, 1.0)) + a_top - merged
  mix = CALIB_GAIN * params['calib'][None, :, None]
  lm = jnp.where(nonempty, ls + mix * (cal - ls), EMPTY_LOGMASS)
  lm = jnp.clip(lm, EMPTY_LOGMASS, 30.0)
  return key, val, straight_through_cast(lm, lm_dtype)


@register
@dataclasses.dataclass(frozen=True)
class LearnedMerge(SlotCompressor):
  """Learned evict-then-merge into the budget's M slots with a log-mass bias (see the module doc).

  Settings: threshold (initial merge threshold, cosine units; CaM's 0.3), tau (soft top-k temperature,
  score units) and temperature (assignment softmax and gate, similarity units) of `train_outputs`,
  logmass_dtype (stored and counted at its width).
  """
  threshold: float = 0.3
  tau: float = 0.1
  temperature: float = 0.05
  logmass_dtype: str = 'float16'

  name = 'merge_learned'
  family = 'merging'
  learned = True
  budget_free_params = True     # per-head scorer weights and thresholds: the same at every budget

  def __post_init__(self):
    if not (self.tau > 0 and self.temperature > 0):
      raise ValueError(f'{self.name}: tau and temperature must be > 0, got {self.tau}, {self.temperature}')
    if not jnp.issubdtype(jnp.dtype(self.logmass_dtype), jnp.floating):
      raise ValueError(f'{self.name}: logmass_dtype must be a float dtype, got {self.logmass_dtype!r}')

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {'logmass': ((), self.logmass_dtype)}

  def bias(self, state) -> jax.Array | None:
    return state.extra['logmass'].astype(jnp.float32) if 'logmass' in state.extra else None

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> dict[str, jax.Array] | None:
    """CaM's rule (module doc); needs no key or calibration (any given is ignored)."""
    del key, calibration
    if self.passthrough:
      return None
    N, H = num_layers, num_heads
    score = np.zeros((N, H, len(FEATURES)), np.float32)
    score[..., FEATURES.index('log_colsum')] = 1.0
    full = lambda x: jnp.full((N, H), x, jnp.float32)
    return {'score': jnp.asarray(score), 'value_sim': full(0.0), 'threshold': full(self.threshold),
            'weight_pow': full(1.0), 'calib': full(0.0)}

  def _check_params(self, params) -> None:
    check_param_shapes(self.name, params, PARAMS, 'init_params(key, layers, heads)', 'per layer and head',
                       'rebuild params with init_params (an older merge_learned checkpoint does not fit '
                       'this version: retrain it)')

  # ---- hard path --------------------------------------------------------------------------------
  def compress_step(self, params, state, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    bias = self.bias(state)
    ck, cv = state.k.astype(jnp.float32), state.v.astype(jnp.float32)
    if self.is_last(scale) or state.capacity == 0:
      return attend_output(q_BHSD, ck, cv, state.valid, bias, k_BHSD, v_BHSD), state
    out, p_cache, p_new = attend(q_BHSD, ck, cv, state.valid, bias, k_BHSD, v_BHSD)
    self._check_params(params)
    m, S = state.capacity, k_BHSD.shape[2]
    cat = lambda a, b: jnp.concatenate([a, b], axis=2)
    ones = jnp.ones(k_BHSD.shape[:3], bool)
    valid = cat(state.valid, ones)
    is_new = cat(jnp.zeros(state.valid.shape, bool), ones)
    k, v = cat(ck, k_BHSD.astype(jnp.float32)), cat(cv, v_BHSD.astype(jnp.float32))
    b = jnp.where(valid, cat(jnp.where(state.valid, bias, EMPTY_LOGMASS), jnp.zeros(ones.shape)), 0.0)
    attn = jnp.concatenate([p_cache, p_new], -1)
    score = jnp.einsum('bhnf,hf->bhn', features(attn.sum(2), k, v, b, is_new), params['score'])
    anchor = topk_mask(score, valid, m)
    W = hard_members(params, similarity(params, k, v), anchor, valid)
    key, val, lm = merge_slots(params, W, q_BHSD, k, v, b, attn.mean(2), self.geometry.kv_dtype,
                               self.logmass_dtype)
    idx, keep = topk_indices(score, anchor, m)
    return out, pack(gather_entries(key, idx), gather_entries(val, idx), keep,
                     {'logmass': gather_entries(lm, idx)}, state)

  # ---- relaxation -------------------------------------------------------------------------------
  def train_outputs(self, params, q_BHLD: jax.Array, k_BHLD: jax.Array, v_BHLD: jax.Array
                    ) -> jax.Array:
    """Relaxed streaming merge of one layer (module doc): (B, H, L, D) float32, differentiable."""
    g = self.geometry
    dt = g.kv_dtype
    if self.passthrough or self.capacity == 0:
      ck, cv = (straight_through_cast(x, dt) for x in (k_BHLD, v_BHLD))
      bias = None if self.passthrough else jnp.full(q_BHLD.shape[:2] + (len(g.patch_nums), g.num_tokens),
                                                    NEG_BIG)
      return pyramid_attention(q_BHLD, ck, cv, k_BHLD, v_BHLD, g.patch_nums, bias)
    self._check_params(params)
    B, H, L, D = q_BHLD.shape
    m = self.capacity
    f32 = jnp.float32
    bk = jnp.zeros((B, H, 0, D), f32)            # the buffer: every token so far as a potential slot
    bv, bb = bk, jnp.zeros((B, H, 0), f32)
    alive = jnp.zeros((B, H, 0), bool)           # what the hard path would hold
    outs = []
    for si, (start, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      own = slice(start, start + S)
      q, k, v = q_BHLD[:, :, own], k_BHLD[:, :, own].astype(f32), v_BHLD[:, :, own].astype(f32)
      out, p_cache, p_new = attend(q, bk, bv, jnp.ones(bb.shape, bool), bb, k, v)
      outs.append(out)
      if self.is_last(si):
        break
      cat = lambda a, b_: jnp.concatenate([a, b_], axis=2)
      ones = jnp.ones((B, H, S), bool)
      ck, cv, cb = cat(bk, k), cat(bv, v), cat(bb, jnp.zeros((B, H, S), f32))
      is_new = cat(jnp.zeros(alive.shape, bool), ones)
      held = cat(alive, ones)
      attn = jnp.concatenate([p_cache, p_new], -1)
      score = jnp.einsum('bhnf,hf->bhn', features(attn.sum(2), ck, cv, cb, is_new), params['score'])
      logsig = soft_topk_log_mask(score, held, m, self.tau)
      alive = topk_mask(jax.lax.stop_gradient(score), held, m)
      W = soft_members(params, similarity(params, ck, cv), logsig, alive, self.temperature)
      bk, bv, bb = merge_slots(params, W, q, ck, cv, cb, attn.mean(2), dt, self.logmass_dtype)
    return jnp.concatenate(outs, axis=2)
