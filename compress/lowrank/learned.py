"""`lowrank_learned`: low-rank key/value caches with trained encoders and decoders, initialised from PCA.

Memory layout and ranks are those of `pca` (compress.lowrank): every token kept, its key and value
stored as rk- and rv-dim coefficients at the geometry dtype, R = floor((budget - 16) / (prefix_tokens *
dtype bits)) coefficient dims per token split by `key_fraction`, plus the 16-bit count (counted).

Per (layer, head) and for t in {k, v}: encoder E_t (D, r_t), decoder U_t (r_t, D), mean mu_t (D):

  coefficients  c = round((x - mu) @ E)          (stored, geometry dtype)
  read back     x_hat = c @ U + mu

Parameters are trained in float32 and used (and counted by `shared_bits`) rounded to the geometry dtype,
so the hard path is what a deployment holding fp16 parameters computes. Initialised at E = P, U = P^T,
mu = mean from PCA on calibration caches (rounded like pca's), the compressor equals `pca` exactly.

`train_outputs` is the hard computation itself (the projections are differentiable): the parameter
and coefficient roundings are straight-through casts, earlier scales are read back from their
coefficients and each scale's own tokens are exact, as in `pca`'s step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from compress.core.interface import check_param_shapes
from compress.core.registry import register
from compress.core.relax import pyramid_attention, straight_through_cast
from compress.lowrank.pca import PCA

_TENSORS = ('k', 'v')


@register
@dataclasses.dataclass(frozen=True)
class LearnedLowRank(PCA):
  """Rank-r coefficients of keys and values under trained encoder/decoder pairs (PCA at init).

  Params: {'k_enc': (layers, heads, D, rk), 'k_dec': (layers, heads, rk, D), 'k_mean': (layers, heads,
  D), and 'v_enc', 'v_dec', 'v_mean'} float32. Settings: key_fraction (as pca).
  """
  name = 'lowrank_learned'
  learned = True

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> dict[str, jax.Array] | None:
    """PCA fit on calibration={'k', 'v'} (N_layers, B, H, L, D) (a 'q' entry is ignored)."""
    pca = super().init_params(key, num_layers, num_heads, calibration)
    if pca is None:                  # passthrough: the plain full cache needs no parameters
      return None
    f32 = jnp.float32
    params = {}
    for t in _TENSORS:
      basis = pca[f'{t}_basis'].astype(f32)                     # (N, H, D, r), pca's stored values
      params[f'{t}_enc'] = basis
      params[f'{t}_dec'] = jnp.swapaxes(basis, -1, -2)
      params[f'{t}_mean'] = pca[f'{t}_mean'].astype(f32)
    return params

  def shared_params(self, params):
    """Every parameter at the geometry dtype (the precision the hard path uses them at)."""
    return None if params is None else {n: a.astype(self.geometry.kv_dtype) for n, a in params.items()}

  def stored_params(self, params) -> dict[str, jax.Array]:
    """Parameters rounded to the geometry dtype (straight-through), float32."""
    return {n: straight_through_cast(a, self.geometry.kv_dtype) for n, a in params.items()}

  def _check_params(self, params) -> None:
    _, rk, rv = self.plan()
    D = self.geometry.head_dim
    want = {f'{t}_{n}': shape for t, r in (('k', rk), ('v', rv))
            for n, shape in (('enc', (D, r)), ('dec', (r, D)), ('mean', (D,)))}
    check_param_shapes(self.name, params, want, 'init_params(..., calibration=...)',
                       f'for this budget: rk={rk}, rv={rv}, D={D}',
                       'rebuild params with init_params for this geometry and budget')

  # ---- projection (used by pca's compress_step, so the hard path is pca's with these maps) ------
  def project(self, params, t: str, x_BHSD: jax.Array) -> jax.Array:
    """Coefficients (B, H, S, r) float32 of (x - mu) @ E (params of one layer: leaves (H, ...))."""
    p = self.stored_params({n: params[n] for n in (f'{t}_enc', f'{t}_mean')})
    xc_BHSD = x_BHSD.astype(jnp.float32) - p[f'{t}_mean'][None, :, None, :]
    return jnp.einsum('bhsd,hdr->bhsr', xc_BHSD, p[f'{t}_enc'])

  def reconstruct(self, params, t: str, coef_BHMR: jax.Array) -> jax.Array:
    """c @ U + mu, float32 (B, H, M, D)."""
    p = self.stored_params({n: params[n] for n in (f'{t}_dec', f'{t}_mean')})
    x_BHMD = jnp.einsum('bhmr,hrd->bhmd', coef_BHMR.astype(jnp.float32), p[f'{t}_dec'])
    return x_BHMD + p[f'{t}_mean'][None, :, None, :]

  # ---- training -------------------------------------------------------------------------------
  def train_outputs(self, params, q_BHLD: jax.Array, k_BHLD: jax.Array, v_BHLD: jax.Array
                    ) -> jax.Array:
    """Attention outputs (B, H, L, D) float32 of one layer over the pyramid, differentiable in params.

    Equal (up to float summation order) to running the hard steps: earlier scales are read back from
    their stored coefficients, each scale's own tokens exact. With a passthrough budget (params None)
    the cache is the full one at the geometry dtype.
    """
    dt, pn = self.geometry.kv_dtype, self.geometry.patch_nums
    if self.passthrough:
      ck, cv = (straight_through_cast(x, dt) for x in (k_BHLD, v_BHLD))
      return pyramid_attention(q_BHLD, ck, cv, k_BHLD, v_BHLD, pn)
    self._check_params(params)
    read = lambda t, x: self.reconstruct(params, t, straight_through_cast(self.project(params, t, x), dt))
    return pyramid_attention(q_BHLD, read('k', k_BHLD), read('v', v_BHLD), k_BHLD, v_BHLD, pn)
