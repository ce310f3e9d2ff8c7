"""`composed_learned`: the transform code with its bases, means and quantiser steps trained on the
attention-output error.

Initialised from `composed`'s calibration (PCA bases, water-filling widths, Gaussian-optimal steps);
trained with optax (train.compressor) through the hard path's own schedule (`train_outputs`): every
scale attends to the entries read back from the state, then the state absorbs the scale (written in
place, or merged into the kept slots exactly as the hard path does: the selection and the merge
targets carry no gradient, the merged coefficients do); codes are rounded with a straight-through
estimator (LSQ: the step gets the gradient of the rounding residual) and the stored parameters with a
straight-through float16 cast. The forward pass equals the hard path. Widths stay the allocation's;
one basis per tensor, stored once (decoder = encoder transposed), as `composed`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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

  def step_width(self, params, t):
    step = straight_through_cast(jnp.exp(params[f'{t}_logstep']), self.geometry.kv_dtype)
    return step, jax.lax.stop_gradient(jnp.round(params[f'{t}_width'].astype(jnp.float32)))

  def read_back(self, params, coef):
    """Quantise-dequantise {'k', 'v'} coefficients: the hard path's values, straight-through gradients."""
    out = {}
    for t in _TENSORS:
      step, width = (a[None, :, None] for a in self.step_width(params, t))
      levels = jnp.exp2(width)
      z = coef[t] / step + levels / 2 - 0.5
      code = jnp.clip(jnp.floor(coef[t] / step + levels / 2), 0, levels - 1)
      out[t] = (z + jax.lax.stop_gradient(code - z) + 0.5 - levels / 2) * step
    return out

  def train_outputs(self, params, q_BHLD, k_BHLD, v_BHLD) -> jax.Array:
    """Attention outputs (B, H, L, D) of one layer through the hard path's schedule, differentiable in
    params (straight-through rounding); equal to the hard path's outputs."""
    g = self.geometry
    if self.passthrough:
      ck, cv = (straight_through_cast(x, g.kv_dtype) for x in (k_BHLD, v_BHLD))
      return pyramid_attention(q_BHLD, ck, cv, k_BHLD, v_BHLD, g.patch_nums)
    self._check_params(params)
    B, H = q_BHLD.shape[:2]
    m, E = self.plan()
    if E == 0:                                  # an empty cache: each scale sees only itself
      empty = jnp.zeros_like(k_BHLD)
      return pyramid_attention(q_BHLD, empty, empty, k_BHLD, v_BHLD, g.patch_nums,
                               jnp.full((B, H, len(g.patch_nums), k_BHLD.shape[2]), -1e9))
    coef = {t: jnp.zeros((B, H, m, params[f'{t}_width'].shape[-1]), jnp.float32) for t in _TENSORS}
    valid = jnp.zeros((B, H, m), bool)
    size = jnp.zeros((B, H, m), jnp.float32) if self.merging else None
    outs = []
    for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      q, k, v = (x[:, :, st:st + S] for x in (q_BHLD, k_BHLD, v_BHLD))
      (out, p_cache, p_new), ck = self.attend_cache(params, coef, size, valid, q, k, v)
      outs.append(out)
      if self.is_last(si):
        break
      new = {t: self.project(params, t, x) for t, x in (('k', k), ('v', v))}
      if size is None:
        coef = {t: jax.lax.dynamic_update_slice_in_dim(coef[t], self.read_back(params, new)[t], st, axis=2)
                for t in _TENSORS}
        valid = jnp.broadcast_to(jnp.arange(m) < st + S, (B, H, m))
      else:
        x, size, valid = self.merge(coef, ck, size, valid, k, new, p_cache, p_new, m)
        coef = self.read_back(params, x)
    return jnp.concatenate(outs, axis=2)
