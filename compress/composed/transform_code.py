"""`composed`: every entry transform-coded (per-head PCA basis, per-component integer widths chosen by
water-filling on calibration caches), optionally on fewer slots than tokens (CaM-style merging), at a
precision that falls as the cache grows.

One budget, three axes: the token axis (slots m = keep x the peak tokens; once a scale brings more
candidates than m, they are evicted by attention and each evicted one merged into its nearest kept one),
the dimension axis (a component coded with 0 bits is dropped: the rank follows from the widths) and the
bit axis (widths 0..16 per component, per (layer, head)). The layout follows the scale
(compress.composed.schedule): the tokens exact at fp16 while they fit the budget, then (beside the
start token, kept exact where it costs at most 1/16 of the budget: the sink) m_s entries of
E_s bits each (one packed stream of every code of the key and the value, compress.composed.bitstream),
E_s the widest that fits and never wider than before: as scales arrive, stored entries are re-coded to
narrower widths (nested allocations: never up), plus a uint16 size per entry once tokens merged (logit
bias log(size)), and the 16-bit count. Shared parameters per (layer, head), counted apart: means and
bases (float16), per code (distinct E_s) steps (float16) and widths (uint8).

Each coefficient is coded by a Gaussian compander (compress.composed.compander: 2^w cells equally likely
under the component's Gaussian, read back at their centroids; near Lloyd-Max, 0.48x the uniform
quantiser's MSE at 8 bits), its scale the parameters' `step`; w = 0 reads 0, the mean. Re-encoding a
read-back coefficient at the same width and scale gives its code again, so kept entries never drift;
at a narrower width it is quantised again from its read-back value.

Coefficients are held heads first, (H, R, B, M), as the bitstream packs and unpacks them: coding and
reading back never transpose them (docs/composed.md, "Heads first, in words").
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compress.composed import allocation, schedule
from compress.composed.compander import dequantize, quantize
from compress.composed.bitstream import held, pack_heads_first, unpack_heads_first
from compress.composed.groups import group_means
from compress.core.accounting import COUNT_DTYPE
from compress.core.attention import attend, attend_output
from compress.core.interface import Compressor
from compress.core.registry import register
from compress.core.slots import empty_slots, Slots
from compress.merging.base import nearest_kept, SIZE_DTYPE

_TENSORS = ('k', 'v')
# merge weights: the attention mass plus this much per token the entry stands for (keeps every group's
# weight >= 1e-6, so that the learned relaxation's gradients stay finite when masses underflow)
_SIZE_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class TransformCodeBase(Compressor):
  """Planning, state layout, coding and the step shared by `composed` and `composed_learned`."""
  # slots per peak token (token axis; < 1 merges); 0: auto, min(1, (budget bits per coordinate /
  # AUTO_BPC) ** AUTO_POWER): fewer slots as the budget shrinks (fitted on training caches: `keep_share`)
  keep: float = 0.0
  key_weight: float = 1.0    # multiplies the key components' output weights in the allocation
  step_scale: float = 1.0    # multiplies the Gaussian-optimal quantiser steps
  threshold: float = 0.3     # key cosine at which an evicted entry merges into a kept one (keep < 1)

  family = 'composed'
  needs_calibration = True
  AUTO_BPC: ClassVar[float] = 2.7
  AUTO_POWER: ClassVar[float] = 0.8

  def __post_init__(self):
    if not 0.0 <= self.keep <= 1.0:
      raise ValueError(f'{self.name}: keep (slots per peak token) must be in (0, 1], or 0 for the '
                       f'automatic choice; got {self.keep!r}')
    if not (self.key_weight > 0 and self.step_scale > 0):
      raise ValueError(f'{self.name}: key_weight and step_scale must be > 0')

  # ---- planning -----------------------------------------------------------------------------
  @property
  def merging(self) -> bool:
    """Tokens merge at some scale (a coded stage has fewer slots than coded tokens)."""
    return any(s.sizes for s in self.stages())

  @property
  def keep_share(self) -> float:
    """Slots per peak token: `keep`, or the automatic choice when it is 0: min(1, (b / AUTO_BPC) **
    AUTO_POWER), b the budget's bits per cached coordinate at the peak.

    Fitted on the default model's training split (main job's capture, per-head budgets less the shared
    bases: b = 0.31 / 0.61 / 1.41 / 3.81 at 3.125 / 5 / 10 / 25 %): the best keep of a grid there was
    ~0.17 / ~0.35 / 0.6 / 1.0 (errors 0.095 / 0.063 / 0.026 / 0.0047); the rule gives 0.18 / 0.30 / 0.59
    / 1.0 (docs/composed.md, "Slots per token"). The sqrt rule it replaces (AUTO_BPC = 8, from before the
    exact stages and the sink) gave 0.20 / 0.28 / 0.42 / 0.69."""
    if self.keep > 0:
      return self.keep
    bpc = self.budget.bits / self.geometry.coordinates
    return float(min(1.0, (bpc / self.AUTO_BPC) ** self.AUTO_POWER))

  @property
  def peak_slots(self) -> int:
    """m: the slots at the peak, `keep_share` x its tokens (all of them at a share of 1)."""
    T, keep = self.geometry.prefix_tokens, self.keep_share
    return T if keep >= 1.0 else max(1, int(round(keep * T)))

  def stages(self) -> tuple[schedule.Stage, ...]:
    """What the state holds after each scale but the last (compress.composed.schedule)."""
    return schedule.stages(self.geometry, self.budget.bits, self.peak_slots)

  def plan(self) -> tuple[int, int]:
    """(slots m, stream bits E per entry) at the peak: its coded entries (beside the sink), or the
    peak's slots with E = 0 when nothing is coded there."""
    last = self.stages()[-1]
    if last.mode == 'coded':
      return last.slots, last.entry_bits
    return self.peak_slots, 0

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    """Before the first scale: nothing held."""
    D = self.geometry.head_dim
    return empty_slots(batch, num_heads, 0, (D,), self.geometry.kv_dtype).replace(count_implied=True)

  # ---- parameters -----------------------------------------------------------------------------
  def calibrated(self, num_layers: int, num_heads: int, calibration: Mapping[str, Any] | None
                 ) -> dict[str, np.ndarray]:
    if calibration is None or any(t not in calibration for t in 'qkv'):
      raise ValueError(f'{self.name} allocates its bits on calibration caches: pass calibration='
                       "{'q', 'k', 'v'}: (layers, B, heads, L, head_dim) each")
    want = (num_layers, num_heads, self.geometry.head_dim)
    for t in 'qkv':
      x = np.asarray(calibration[t])
      if x.ndim != 5 or (x.shape[0], x.shape[2], x.shape[4]) != want:
        raise ValueError(f"{self.name}: calibration['{t}'] must be (layers={want[0]}, B, heads={want[1]}, "
                         f'L, head_dim={want[2]}), got {x.shape}')
    stats = allocation.head_statistics(calibration)
    return allocation.transform_code_params(stats, schedule.code_bits(self.stages()), self.key_weight,
                                            self.step_scale)

  def _check_params(self, params) -> None:
    if params is None:
      raise ValueError(f'{self.name} needs the parameters from init_params(..., calibration=...)')
    codes = max(1, len(schedule.code_bits(self.stages())))
    got = tuple(params['k_width'].shape)
    if len(got) != 3 or got[1] != codes:
      raise ValueError(f'{self.name} at {self.budget.bits} bits codes its entries at {codes} widths per '
                       f'scale (widths (heads, {codes}, components) per layer), but its parameters have '
                       f'k_width {got}: they come from another budget or from before progressive '
                       'precision (issue 27); rebuild them with init_params, or retrain composed_learned '
                       '(move its old trained run aside, e.g. WORKDIR/train/composed_learned-*, and '
                       'the frontier trains it again)')

  def check_loaded(self, params) -> None:
    """Loaded parameters (layers, heads, ...): the code count as `_check_params`, and every code's widths
    (keys' and values' together) within its entry bits E_c of this version's schedule: parameters
    allocated for another schedule (e.g. trained before the slots-per-token rule changed) would pack
    more bits than an entry holds."""
    self._check_params(jax.tree.map(lambda a: a[0], params))
    E = np.asarray(schedule.code_bits(self.stages()) or (0,))      # no coded stage: one all-zero code
    used = sum(np.rint(np.asarray(params[f'{t}_width'], np.float64)).sum(-1) for t in _TENSORS)
    over = np.argwhere(used > E)                                   # (layer, head, code) over its bits
    if over.size:
      n, h, c = over[0]
      raise ValueError(f'{self.name} at {self.budget.bits} bits: the loaded widths of code {c} (layer {n}, '
                       f'head {h}) use {int(used[n, h, c])} bits, but this version codes an entry there in '
                       f'{int(E[c])} bits: the parameters were allocated for another schedule (an older '
                       'version or another keep). Retrain composed_learned (move the old trained run '
                       'aside) or recalibrate composed')

  def encoder(self, params, t: str) -> jax.Array:
    """(H, D, R) projection onto the coefficients."""
    raise NotImplementedError

  def decoder(self, params, t: str) -> jax.Array:
    """(H, R, D) reconstruction from the coefficients."""
    raise NotImplementedError

  def step_width(self, params, t: str, code: int) -> tuple[jax.Array, jax.Array]:
    """(H, R) quantiser steps and widths (float, integral) of code `code`, as stored."""
    return (params[f'{t}_step'][:, code].astype(self.geometry.kv_dtype).astype(jnp.float32),
            jax.lax.stop_gradient(jnp.round(params[f'{t}_width'][:, code].astype(jnp.float32))))

  # ---- coding ---------------------------------------------------------------------------------
  def project(self, params, t: str, x_BHSD: jax.Array) -> jax.Array:
    """Coefficients (H, R, B, S) of keys or values (B, H, S, D)."""
    mean = params[f'{t}_mean'].astype(self.geometry.kv_dtype).astype(jnp.float32)
    return jnp.einsum('bhsd,hdr->hrbs', x_BHSD.astype(jnp.float32) - mean[None, :, None],
                      self.encoder(params, t))

  def reconstruct(self, params, t: str, coef_HRBM: jax.Array) -> jax.Array:
    """Keys or values (B, H, M, D) rebuilt from coefficients (H, R, B, M)."""
    mean = params[f'{t}_mean'].astype(self.geometry.kv_dtype).astype(jnp.float32)
    return jnp.einsum('hrbm,hrd->bhmd', coef_HRBM, self.decoder(params, t)) + mean[None, :, None]

  def scales_widths(self, params, code: int) -> tuple[jax.Array, jax.Array]:
    """(H, Rk + Rv) quantiser scales and widths (float) of one entry's stream in code `code`: the keys'
    components, then the values'."""
    sw = [self.step_width(params, t, code) for t in _TENSORS]
    return jnp.concatenate([a[0] for a in sw], -1), jnp.concatenate([a[1] for a in sw], -1)

  def widths(self, params, code: int) -> jax.Array:
    """(H, Rk + Rv) widths of one entry's stream in code `code`."""
    return self.scales_widths(params, code)[1].astype(jnp.int32)

  def encode(self, params, coef: dict[str, jax.Array], code: int, num_bits: int) -> jax.Array:
    """Coefficients {'k', 'v'} (H, R_t, B, M) -> streams (B, H, M, ceil(num_bits / 8)) uint8."""
    scale, width = self.scales_widths(params, code)          # keys and values coded in one pass
    x = jnp.concatenate([coef[t] for t in _TENSORS], 1)
    codes = quantize(x, scale[..., None, None], width[..., None, None])
    return pack_heads_first(codes.astype(jnp.int32), width.astype(jnp.int32), num_bits)

  def decode(self, params, stream_BHMP: jax.Array, code: int) -> dict[str, jax.Array]:
    """Read-back coefficients {'k', 'v'} (H, R_t, B, M), held in memory (rebuild and re-coding read them)."""
    scale, width = self.scales_widths(params, code)
    codes = unpack_heads_first(stream_BHMP, width.astype(jnp.int32))
    rk, ok = params['k_width'].shape[-1], jnp.all(width >= 0)
    part = {'k': slice(0, rk), 'v': slice(rk, None)}     # each read back into its own array (no copy)
    return {t: held(dequantize(codes[:, p], scale[:, p, None, None], width[:, p, None, None]), ok)
            for t, p in part.items()}

  # ---- the step (shared by the hard path and the learned relaxation) -------------------------
  def coded_view(self, params, coef, size_BHM, valid_BHM, sink=None) -> dict[str, Any]:
    """What attention and merging see of coded entries: read-back coefficients {'k', 'v'} (H, R, B, M),
    the keys and values rebuilt from them (B, H, M, D), sizes (float, or None), validity, and the exact
    sink {'k', 'v'} (B, H, n_0, D) held beside them (or None)."""
    return {'coef': coef, 'k': self.reconstruct(params, 'k', coef['k']),
            'v': self.reconstruct(params, 'v', coef['v']), 'size': size_BHM, 'valid': valid_BHM,
            'sink': sink}

  def attend_view(self, view, q_BHSD, k_BHSD, v_BHSD):
    """Attention over the held entries (bias log(size) once tokens merged; None: nothing held) plus the
    new scale: (out, p_cache, p_new)."""
    if view is None:
      B, H, _, D = k_BHSD.shape
      none = jnp.zeros((B, H, 0, D), jnp.float32)
      return attend(q_BHSD, none, none, jnp.zeros((B, H, 0), bool), None, k_BHSD, v_BHSD)
    return attend(q_BHSD, *self.held_entries(view), k_BHSD, v_BHSD)

  def held_entries(self, view) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """What a scale attends to of a (non-empty) view: keys, values (B, H, n, D), validity (B, H, n) and
    logit bias (log size, or None): the exact sink first (its columns lead p_cache), then the entries."""
    bias = None if view['size'] is None else jnp.log(jnp.maximum(view['size'].astype(jnp.float32), 1.0))
    ck, cv, valid, sink = view['k'], view['v'], view['valid'], view.get('sink')
    if sink is not None:
      B, H, n0, _ = sink['k'].shape
      cat = lambda a, b: jnp.concatenate([a, b], axis=2)
      ck, cv, valid = cat(sink['k'], ck), cat(sink['v'], cv), cat(jnp.ones((B, H, n0), bool), valid)
      bias = None if bias is None else cat(jnp.zeros((B, H, n0), bias.dtype), bias)
    return ck, cv, valid, bias

  def absorb(self, params, stage: schedule.Stage, view, k_BHSD, v_BHSD, p_cache, p_new):
    """The entries stage `stage` holds, before their codes: {'k', 'v'} the keys and values (exact) or
    their coefficients (coded), 'size' (float (B, H, m), or None), 'valid' (B, H, m), and (coded) the
    exact sink {'k', 'v'} (B, H, n_0, D) or None; None: empty."""
    if stage.mode == 'empty':
      return None
    sink = None
    if stage.sink:                           # the sink stays exact; the rest are the candidates
      n0 = stage.sink
      assert view is not None, stage         # a plan with a sink starts exact (schedule.stages)
      if view['coef'] is None:               # exact -> coded: the first n_0 tokens become the sink
        sink = {t: view[t][:, :, :n0] for t in _TENSORS}
        view = {**view, **{t: view[t][:, :, n0:] for t in _TENSORS}, 'valid': view['valid'][..., n0:]}
      else:
        sink = view['sink']
      p_cache = None if p_cache is None else p_cache[..., n0:]
    x = self._absorb_entries(params, stage, view, k_BHSD, v_BHSD, p_cache, p_new)
    return x if stage.mode == 'exact' else {**x, 'sink': sink}

  def _absorb_entries(self, params, stage, view, k_BHSD, v_BHSD, p_cache, p_new):
    cat = lambda a, b: jnp.concatenate([a, b], axis=2)
    cat_coef = lambda a, b: jnp.concatenate([a, b], axis=3)       # (H, R, B, M): along the entries
    B, H, S = k_BHSD.shape[:3]
    if stage.mode == 'exact':
      new = {'k': k_BHSD.astype(jnp.float32), 'v': v_BHSD.astype(jnp.float32)}
      x = new if view is None else {t: cat(view[t], new[t]) for t in _TENSORS}
      return {**x, 'size': None, 'valid': jnp.ones((B, H, stage.slots), bool)}
    new = {t: self.project(params, t, x) for t, x in (('k', k_BHSD), ('v', v_BHSD))}
    if view is None and S <= stage.slots:        # the first coded scale fits its slots: every token kept
      return {**new, 'size': jnp.ones((B, H, S), jnp.float32) if stage.sizes else None,
              'valid': jnp.ones((B, H, S), bool)}
    if view is None:                               # more tokens than slots from the first scale: merge them
      view = {'coef': {t: jnp.zeros((H, new[t].shape[1], B, 0), jnp.float32) for t in _TENSORS},
              'k': jnp.zeros((B, H, 0, k_BHSD.shape[-1]), jnp.float32), 'size': None,
              'valid': jnp.zeros((B, H, 0), bool)}
    coef = view['coef'] or {t: self.project(params, t, view[t]) for t in _TENSORS}   # exact -> coded
    n_held = view['valid'].shape[-1]
    size = jnp.ones((B, H, n_held), jnp.float32) if view['size'] is None else view['size'].astype(jnp.float32)
    if n_held + S <= stage.slots:        # every candidate keeps its slot: the scale is appended
      assert n_held + S == stage.slots, (stage, n_held, S)
      return {**{t: cat_coef(coef[t], new[t]) for t in _TENSORS},
              'valid': jnp.ones((B, H, stage.slots), bool),
              'size': cat(size, jnp.ones((B, H, S), jnp.float32)) if stage.sizes else None}
    x, size, keep = self.merge(coef, view['k'], size, view['valid'], k_BHSD, new, p_cache, p_new, stage.slots)
    return {**x, 'size': size, 'valid': keep}

  def merge(self, coef, ck, size_BHM, valid_BHM, k_BHSD, new, p_cache, p_new, m: int):
    """Candidates (kept + new): keep the top-m by the scale's attention, merge each evicted one into
    the kept one of highest key cosine (>= threshold) with attention-mass weights. Returns the
    coefficients to store {'k', 'v'} (H, R, B, m) (before quantisation), sizes (B, H, m) and which
    slots hold an entry (kept ones first)."""
    cat = lambda a, b: jnp.concatenate([a, b], axis=2)
    entries_last = lambda c: jnp.concatenate([jnp.transpose(c[t], (2, 0, 3, 1)) for t in _TENSORS], -1)
    B, H, S = k_BHSD.shape[:3]
    keys = cat(ck, k_BHSD.astype(jnp.float32))
    payload = cat(entries_last(coef), entries_last(new))                          # (B, H, N, Rk + Rv)
    valid = cat(valid_BHM, jnp.ones((B, H, S), bool))
    size = cat(size_BHM.astype(jnp.float32), jnp.ones((B, H, S), jnp.float32))
    attn = jnp.concatenate([p_cache, p_new], axis=-1)
    score, mass = jax.lax.stop_gradient(attn.sum(2)), attn.mean(2)

    def one(k_ND, x_NF, size_N, score_N, mass_N, ok_N):
      idx, keep, target = nearest_kept(k_ND, score_N, ok_N, m, self.threshold)   # kept ones first
      x, group_size = group_means(idx, target, mass_N + _SIZE_FLOOR * size_N, x_NF, size_N)
      return x, jnp.where(keep, group_size, 0.0), keep

    x, size, keep = jax.vmap(jax.vmap(one))(keys, payload, size, score, mass, valid)
    x = jnp.transpose(x, (1, 3, 0, 2))                                             # (H, Rk + Rv, B, m)
    rk = coef['k'].shape[1]
    return {'k': x[:, :rk], 'v': x[:, rk:]}, size, keep

  def _view(self, params, state: Slots, prev: schedule.Stage | None):
    """What the state after stage `prev` holds, decoded (None: nothing)."""
    if prev is None or prev.mode == 'empty':
      return None
    size = state.extra.get('size')
    size = None if size is None else size.astype(jnp.float32)
    if prev.mode == 'exact':
      return {'coef': None, 'k': state.k.astype(jnp.float32), 'v': state.v.astype(jnp.float32),
              'size': None, 'valid': state.valid}
    sink = ({t: state.header[f'sink_{t}'].astype(jnp.float32) for t in _TENSORS} if prev.sink else None)
    return self.coded_view(params, self.decode(params, state.k, prev.code), size, state.valid, sink)

  def _store(self, params, stage: schedule.Stage, x, batch: int, num_heads: int) -> Slots:
    """The state of stage `stage` holding `x` (absorb's entries), coded and packed."""
    if x is None:
      return self.init_compressed(batch, num_heads)
    count = x['valid'].sum(-1).astype(COUNT_DTYPE)
    if stage.mode == 'exact':
      dt = self.geometry.kv_dtype
      return Slots(k=x['k'].astype(dt), v=x['v'].astype(dt), count=count)
    stream = self.encode(params, x, stage.code, stage.entry_bits)
    extra = {} if x['size'] is None else {'size': jnp.minimum(x['size'], 65535.0).astype(SIZE_DTYPE)}
    header = {} if x['sink'] is None else {f'sink_{t}': x['sink'][t].astype(self.geometry.kv_dtype)
                                           for t in _TENSORS}
    return Slots(k=stream, v=jnp.zeros(stream.shape[:3] + (0,), jnp.uint8), count=count, extra=extra,
                 header=header)

  def merges_at(self, stage: schedule.Stage, view, num_new: int) -> bool:
    """Whether absorbing a scale of `num_new` tokens into `stage` merges entries (the one use of the
    scale's attention probabilities): more candidates (held, less a sink split off now, plus new) than
    slots, as `_absorb_entries` decides."""
    if stage.mode != 'coded':
      return False
    held_now = 0 if view is None else view['valid'].shape[-1]
    if stage.sink and view is not None and view['coef'] is None:     # exact -> coded: the sink leaves
      held_now -= stage.sink
    return held_now + num_new > stage.slots

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    del ctx
    self._check_params(params)
    plan = self.stages()
    view = self._view(params, state, plan[scale - 1] if scale > 0 else None)
    last = self.is_last(scale)
    if view is not None and (last or not self.merges_at(plan[scale], view, k_BHSD.shape[2])):
      # no probabilities needed: one softmax over held and new entries (as the full cache attends)
      out = attend_output(q_BHSD, *self.held_entries(view), k_BHSD, v_BHSD)
      p_cache = p_new = None
    else:
      out, p_cache, p_new = self.attend_view(view, q_BHSD, k_BHSD, v_BHSD)
    if last:
      return out, state
    x = self.absorb(params, plan[scale], view, k_BHSD, v_BHSD, p_cache, p_new)
    return out, self._store(params, plan[scale], x, *k_BHSD.shape[:2])


@register
@dataclasses.dataclass(frozen=True)
class TransformCode(TransformCodeBase):
  """Transform coding with a water-filling allocation on calibration caches (not learned)."""
  name = 'composed'

  def init_params(self, key, num_layers, num_heads, calibration=None):
    del key
    if self.passthrough:
      return None
    p = self.calibrated(num_layers, num_heads, calibration)
    return {n: jnp.asarray(a, jnp.float32) for n, a in p.items()}

  def shared_params(self, params):
    if params is None:
      return None
    dt = self.geometry.kv_dtype
    return {n: a.astype(jnp.uint8 if n.endswith('_width') else dt) for n, a in params.items()}

  def encoder(self, params, t):
    return params[f'{t}_basis'].astype(self.geometry.kv_dtype).astype(jnp.float32)

  def decoder(self, params, t):
    return jnp.swapaxes(self.encoder(params, t), -1, -2)
