"""`composed_learned`: the transform code with its bases, means and quantiser steps trained on the
attention-output error.

Initialised from `composed`'s calibration (PCA bases, water-filling widths, Gaussian-optimal steps);
trained with optax (train.compressor) through the hard path's own schedule (`train_outputs`, the stages
of compress.composed.schedule): every scale attends to the entries read back from the state, then the
state absorbs the scale (kept exact while it fits, appended, or merged into the kept slots exactly as
the hard path does: the selection and the merge targets carry no gradient, the merged coefficients do)
and is re-coded at the stage's widths; codes are read back with a straight-through estimator (LSQ:
the compander's scale gets the gradient of the read-back residual) and the stored parameters with a
straight-through float16 cast. The forward pass equals the hard path. Widths stay the allocation's;
the steps (scales) of every code are trained; one basis per tensor, stored once (decoder = encoder transposed), as `composed`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from compress.composed import compander
from compress.composed.transform_code import TransformCodeBase, _TENSORS
from compress.core.registry import register
from compress.core.relax import pyramid_attention, straight_through_cast


@register
@dataclasses.dataclass(frozen=True)
class TransformCodeLearned(TransformCodeBase):
  """Transform coding with trained bases and steps (widths and token split from the allocation)."""
  name = 'composed_learned'
  learned = True

  def init_params(self, key, num_layers, num_heads, calibration=None):
    del key
    if self.passthrough:
      return None
    p = self.calibrated(num_layers, num_heads, calibration)
    out = {}
    for t in _TENSORS:
      out[f'{t}_basis'] = jnp.asarray(p[f'{t}_basis'], jnp.float32)
      out[f'{t}_mean'] = jnp.asarray(p[f'{t}_mean'], jnp.float32)
      out[f'{t}_logstep'] = jnp.log(jnp.asarray(p[f'{t}_step'], jnp.float32))
      out[f'{t}_width'] = jnp.asarray(p[f'{t}_width'], jnp.float32)
    return out

  def shared_params(self, params):
    if params is None:
      return None
    dt, out = self.geometry.kv_dtype, {}
    for n, a in params.items():
      if n.endswith('_logstep'):
        out[n.replace('_logstep', '_step')] = jnp.exp(a).astype(dt)
      else:
        out[n] = a.astype(jnp.uint8 if n.endswith('_width') else dt)
    return out

  def encoder(self, params, t):
    return straight_through_cast(params[f'{t}_basis'], self.geometry.kv_dtype)

  def decoder(self, params, t):
    return jnp.swapaxes(self.encoder(params, t), -1, -2)

  def step_width(self, params, t, code):
    step = straight_through_cast(jnp.exp(params[f'{t}_logstep'][:, code]), self.geometry.kv_dtype)
    return step, jax.lax.stop_gradient(jnp.round(params[f'{t}_width'][:, code].astype(jnp.float32)))

  def read_back(self, params, coef, code):
    """Quantise-dequantise {'k', 'v'} coefficients at code `code`: the hard path's values, straight-through
    gradients."""
    scale, width = (a[..., None, None] for a in self.scales_widths(params, code))   # keys and values at once
    x = jnp.concatenate([coef[t] for t in _TENSORS], 1)                              # (H, R, B, M)
    z = x / scale
    r = jax.lax.stop_gradient(compander.read_back(compander.quantize(x, scale, width), width))
    out = (z + jax.lax.stop_gradient(r - z)) * scale
    rk = coef['k'].shape[1]
    return {'k': out[:, :rk], 'v': out[:, rk:]}

  def train_outputs(self, params, q_BHLD, k_BHLD, v_BHLD) -> jax.Array:
    """Attention outputs (B, H, L, D) of one layer through the hard path's schedule, differentiable in
    params (straight-through rounding); equal to the hard path's outputs."""
    g = self.geometry
    if self.passthrough:
      ck, cv = (straight_through_cast(x, g.kv_dtype) for x in (k_BHLD, v_BHLD))
      return pyramid_attention(q_BHLD, ck, cv, k_BHLD, v_BHLD, g.patch_nums)
    self._check_params(params)
    plan = self.stages()
    view, outs = None, []
    for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      q, k, v = (x[:, :, st:st + S] for x in (q_BHLD, k_BHLD, v_BHLD))
      out, p_cache, p_new = self.attend_view(view, q, k, v)
      outs.append(out)
      if self.is_last(si):
        break
      stage = plan[si]
      x = self.absorb(params, stage, view, k, v, p_cache, p_new)
      if x is None:
        view = None
      elif stage.mode == 'exact':
        view = {'coef': None, 'size': None, 'valid': x['valid'],
                **{t: straight_through_cast(x[t], g.kv_dtype) for t in _TENSORS}}
      else:
        sink = None if x['sink'] is None else {t: straight_through_cast(a, g.kv_dtype)
                                                for t, a in x['sink'].items()}
        view = self.coded_view(params, self.read_back(params, x, stage.code), x['size'], x['valid'], sink)
    return jnp.concatenate(outs, axis=2)
