"""`composed_learned`: the transform code with its bases and quantiser steps trained on attention error.

Initialised from `composed`'s calibration (PCA bases, water-filling widths, Gaussian-optimal steps);
the encoder, decoder, means and log-steps are trained with optax (train.compressor) through the hard
path's own arithmetic: codes are rounded with a straight-through estimator (LSQ: the step gets the
gradient of the rounding residual), stored parameters with a straight-through float16 cast. Widths stay
those of the allocation. The relaxation codes every token at the entry's bit rate (E bits, as if every
token kept its slot): with keep = 1 it equals the hard path; with fewer slots the hard path also merges
(as `composed`), which the relaxation leaves out: the code is learned, the split between the axes is
the allocation's.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from compress.composed.transform_code import TransformCodeBase
from compress.core.registry import register
from compress.core.relax import pyramid_attention, straight_through_cast


@register
@dataclasses.dataclass(frozen=True)
class TransformCodeLearned(TransformCodeBase):
  """Transform coding with trained bases and steps (widths from the calibration's allocation)."""
  name = 'composed_learned'
  learned = True

  def init_params(self, key, num_layers, num_heads, calibration=None):
    del key
    if self.passthrough:
      return None
    p = self.calibrated(num_layers, num_heads, calibration)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    out = {}
    for t in 'kv':
      out[f'{t}_enc'] = f32(p[f'{t}_basis'])
      out[f'{t}_dec'] = jnp.swapaxes(f32(p[f'{t}_basis']), -1, -2)
      out[f'{t}_mean'] = f32(p[f'{t}_mean'])
      out[f'{t}_logstep'] = jnp.log(f32(p[f'{t}_step']))
      out[f'{t}_width'] = f32(p[f'{t}_width'])
    return out

  def shared_params(self, params):
    if params is None:
      return None
    dt = self.geometry.kv_dtype
    out = {}
    for n, a in params.items():
      if n.endswith('_logstep'):
        out[n.replace('_logstep', '_step')] = jnp.exp(a).astype(dt)
      else:
        out[n] = a.astype(jnp.uint8 if n.endswith('_width') else dt)
    return out

  def encoder(self, params, t):
    return straight_through_cast(params[f'{t}_enc'], self.geometry.kv_dtype)

  def decoder(self, params, t):
    return straight_through_cast(params[f'{t}_dec'], self.geometry.kv_dtype)

  def step_width(self, params, t):
    step = straight_through_cast(jnp.exp(params[f'{t}_logstep']), self.geometry.kv_dtype)
    return step, jax.lax.stop_gradient(jnp.round(params[f'{t}_width'].astype(jnp.float32)))

  def train_outputs(self, params, q_BHLD, k_BHLD, v_BHLD) -> jax.Array:
    """Attention outputs (B, H, L, D) of one layer, differentiable in params: earlier scales read back
    from their codes (straight-through rounding), each scale's own tokens exact; equal to the hard path
    when every token has a slot (no merging)."""
    pn = self.geometry.patch_nums
    if self.passthrough:
      dt = self.geometry.kv_dtype
      ck, cv = (straight_through_cast(x, dt) for x in (k_BHLD, v_BHLD))
      return pyramid_attention(q_BHLD, ck, cv, k_BHLD, v_BHLD, pn)
    self._check_params(params)
    if self.plan()[1] == 0:
      empty = jnp.zeros_like(k_BHLD)
      return pyramid_attention(q_BHLD, empty, empty, k_BHLD, v_BHLD, pn,
                               jnp.full(k_BHLD.shape[:2] + (len(pn), k_BHLD.shape[2]), -1e9))

    def read(t, x):
      coef = self.project(params, t, x)
      step, width = (a[None, :, None] for a in self.step_width(params, t))
      levels = jnp.exp2(width)
      z = coef / step + levels / 2 - 0.5
      code = jnp.clip(jnp.floor(coef / step + levels / 2), 0, levels - 1)
      return self.reconstruct(params, t, (z + jax.lax.stop_gradient(code - z) + 0.5 - levels / 2) * step)
    return pyramid_attention(q_BHLD, read('k', k_BHLD), read('v', v_BHLD), k_BHLD, v_BHLD, pn)
