"""`composed`: every entry transform-coded (per-head PCA basis, per-component integer widths chosen by
water-filling on calibration caches), optionally on fewer slots than tokens (CaM-style merging).

One budget, three axes: the token axis (slots m = keep x the peak tokens; below 1 the candidates are
evicted by attention and each evicted one merged into its nearest kept one), the dimension axis (a
component coded with 0 bits is dropped: the rank follows from the widths) and the bit axis (widths 0..8
per component, per (layer, head)). State per (sequence, layer, head): `m` entries of E bits (one
packed stream of every code of the key and the value, compress.composed.bitstream), a uint16 size per
entry when merging (logit bias log(size)), and the 16-bit count. E = the largest multiple of 8 that
fits the budget. Shared parameters per (layer, head), counted apart: means, bases and steps (float16)
and widths (uint8).

A stored code c of width w reads back as the coefficient (c + 1/2 - 2^w / 2) * step (midrise; w = 0
reads 0, the mean); re-encoding a read-back coefficient gives c again, so kept entries never drift.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compress.composed import allocation
from compress.composed.bitstream import pack_stream, unpack_stream
from compress.core.accounting import COUNT_DTYPE, dtype_bits
from compress.core.attention import attend
from compress.core.interface import Compressor
from compress.core.registry import register
from compress.core.slots import empty_slots, Slots
from compress.core.topk import topk_indices
from compress.merging.base import SIZE_DTYPE, unit_rows

_TENSORS = ('k', 'v')
# merge weights: the attention mass plus this much per token the entry stands for (keeps every group's
# weight >= 1e-6, so that the learned relaxation's gradients stay finite when masses underflow)
_SIZE_FLOOR = 1e-6


def _weighted_means(target_N: jax.Array, weight_N: jax.Array, x_NF: jax.Array) -> jax.Array:
  """Row n: sum_{i: target_i = n} w_i x_i / sum w_i (0 for empty groups; target N = dropped)."""
  N = x_NF.shape[0]
  onehot_NN = (target_N[None, :] == jnp.arange(N)[:, None]).astype(jnp.float32)   # a matmul, not a scatter
  num = jnp.einsum('ni,i,if->nf', onehot_NN, weight_N, x_NF)
  den = onehot_NN @ weight_N
  return jnp.where(den[:, None] > 0, num / jnp.where(den > 0, den, 1.0)[:, None], 0.0)


def quantize(coef: jax.Array, step: jax.Array, width: jax.Array) -> jax.Array:
  """Codes in [0, 2^w - 1] of coefficients (..., R) (step, width broadcast on the last axis)."""
  levels = jnp.exp2(width)
  return jnp.clip(jnp.floor(coef / step + levels / 2), 0, levels - 1)


def dequantize(code: jax.Array, step: jax.Array, width: jax.Array) -> jax.Array:
  return (code + 0.5 - jnp.exp2(width) / 2) * step


@dataclasses.dataclass(frozen=True)
class TransformCodeBase(Compressor):
  """Planning, state layout, coding and the step shared by `composed` and `composed_learned`."""
  # slots per peak token (token axis; < 1 merges); 0: auto, min(1, sqrt(budget bits per coordinate /
  # AUTO_BPC)): fewer slots at more bits each as the budget shrinks (tuned on training caches)
  keep: float = 0.0
  key_weight: float = 1.0    # multiplies the key components' output weights in the allocation
  step_scale: float = 1.0    # multiplies the Gaussian-optimal quantiser steps
  threshold: float = 0.3     # key cosine at which an evicted entry merges into a kept one (keep < 1)

  family = 'composed'
  needs_calibration = True
  AUTO_BPC: ClassVar[float] = 8.0

  def __post_init__(self):
    if not 0.0 <= self.keep <= 1.0:
      raise ValueError(f'{self.name}: keep (slots per peak token) must be in (0, 1], or 0 for the '
                       f'automatic choice; got {self.keep!r}')
    if not (self.key_weight > 0 and self.step_scale > 0):
      raise ValueError(f'{self.name}: key_weight and step_scale must be > 0')

  # ---- planning -----------------------------------------------------------------------------
  @property
  def merging(self) -> bool:
    return self.plan()[0] < self.geometry.prefix_tokens

  @property
  def keep_share(self) -> float:
    """Slots per peak token: `keep`, or the automatic choice when it is 0."""
    if self.keep > 0:
      return self.keep
    return float(min(1.0, np.sqrt(self.budget.bits / self.geometry.coordinates / self.AUTO_BPC)))

  def plan(self) -> tuple[int, int]:
    """(slots m, stream bits E per entry; a multiple of 8, at most 8 bits per coordinate)."""
    T, D = self.geometry.prefix_tokens, self.geometry.head_dim
    keep = self.keep_share
    m = T if keep >= 1.0 else max(1, int(round(keep * T)))
    extra = dtype_bits(SIZE_DTYPE) if m < T else 0
    room = self.budget.bits - dtype_bits(COUNT_DTYPE) - m * extra
    E = max(0, room // m) // 8 * 8
    return m, int(min(E, 2 * D * 8))

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    m, E = self.plan()
    if E == 0:      # not one bit per entry: an empty cache, nothing stored
      D = self.geometry.head_dim
      return empty_slots(batch, num_heads, 0, (D,), self.geometry.kv_dtype).replace(count_implied=True)
    extra = {'size': ((), SIZE_DTYPE)} if m < self.geometry.prefix_tokens else {}
    return empty_slots(batch, num_heads, m, (E // 8,), jnp.uint8, (0,), jnp.uint8, extra=extra)

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
    return allocation.transform_code_params(stats, self.plan()[1], self.key_weight, self.step_scale)

  def _check_params(self, params) -> None:
    if params is None:
      raise ValueError(f'{self.name} needs the parameters from init_params(..., calibration=...)')

  def encoder(self, params, t: str) -> jax.Array:
    """(H, D, R) projection onto the coefficients."""
    raise NotImplementedError

  def decoder(self, params, t: str) -> jax.Array:
    """(H, R, D) reconstruction from the coefficients."""
    raise NotImplementedError

  def step_width(self, params, t: str) -> tuple[jax.Array, jax.Array]:
    """(H, R) quantiser steps and widths (float, integral) as stored."""
    return (params[f'{t}_step'].astype(self.geometry.kv_dtype).astype(jnp.float32),
            jax.lax.stop_gradient(jnp.round(params[f'{t}_width'].astype(jnp.float32))))

  # ---- coding ---------------------------------------------------------------------------------
  def project(self, params, t: str, x_BHSD: jax.Array) -> jax.Array:
    mean = params[f'{t}_mean'].astype(self.geometry.kv_dtype).astype(jnp.float32)
    return jnp.einsum('bhsd,hdr->bhsr', x_BHSD.astype(jnp.float32) - mean[None, :, None],
                      self.encoder(params, t))

  def reconstruct(self, params, t: str, coef_BHMR: jax.Array) -> jax.Array:
    mean = params[f'{t}_mean'].astype(self.geometry.kv_dtype).astype(jnp.float32)
    return jnp.einsum('bhmr,hrd->bhmd', coef_BHMR, self.decoder(params, t)) + mean[None, :, None]

  def widths(self, params) -> jax.Array:
    """(H, Rk + Rv) widths of one entry's stream."""
    return jnp.concatenate([self.step_width(params, t)[1] for t in _TENSORS], -1).astype(jnp.int32)

  def encode(self, params, coef: dict[str, jax.Array]) -> jax.Array:
    codes = [quantize(coef[t], *(a[None, :, None] for a in self.step_width(params, t))) for t in _TENSORS]
    return pack_stream(jnp.concatenate(codes, -1).astype(jnp.int32), self.widths(params), self.plan()[1])

  def decode(self, params, stream_BHMP: jax.Array) -> dict[str, jax.Array]:
    """Read-back coefficients {'k', 'v'} (B, H, M, R_t)."""
    codes = unpack_stream(stream_BHMP, self.widths(params)).astype(jnp.float32)
    rk = params['k_width'].shape[-1]
    parts = {'k': codes[..., :rk], 'v': codes[..., rk:]}
    return {t: dequantize(parts[t], *(a[None, :, None] for a in self.step_width(params, t))) for t in _TENSORS}

  # ---- the step (shared by the hard path and the learned relaxation) -------------------------
  def attend_cache(self, params, coef, size_BHM, valid_BHM, q_BHSD, k_BHSD, v_BHSD):
    """Attention over the entries rebuilt from read-back coefficients {'k', 'v'} (B, H, M, R) (bias
    log(size) when merging) plus the new scale: ((out, p_cache, p_new), rebuilt keys)."""
    ck, cv = (self.reconstruct(params, t, coef[t]) for t in _TENSORS)
    bias = None if size_BHM is None else jnp.log(jnp.maximum(size_BHM.astype(jnp.float32), 1.0))
    return attend(q_BHSD, ck, cv, valid_BHM, bias, k_BHSD, v_BHSD), ck

  def merge(self, coef, ck, size_BHM, valid_BHM, k_BHSD, new, p_cache, p_new, m: int):
    """Candidates (kept + new): keep the top-m by the scale's attention, merge each evicted one into
    the kept one of highest key cosine (>= threshold) with attention-mass weights. Returns the
    coefficients to store {'k', 'v'} (B, H, m, R) (before quantisation), sizes (B, H, m) and which
    slots hold an entry (kept ones first)."""
    cat = lambda a, b: jnp.concatenate([a, b], axis=2)
    B, H, S = k_BHSD.shape[:3]
    keys = cat(ck, k_BHSD.astype(jnp.float32))
    payload = cat(jnp.concatenate([coef['k'], coef['v']], -1), jnp.concatenate([new['k'], new['v']], -1))
    valid = cat(valid_BHM, jnp.ones((B, H, S), bool))
    size = cat(size_BHM.astype(jnp.float32), jnp.ones((B, H, S), jnp.float32))
    attn = jnp.concatenate([p_cache, p_new], axis=-1)
    score, mass = jax.lax.stop_gradient(attn.sum(2)), attn.mean(2)

    def one(k_ND, x_NF, size_N, score_N, mass_N, ok_N):
      N = k_ND.shape[0]
      idx, keep = topk_indices(score_N, ok_N, m)                     # kept ones first, best first
      kept = jnp.zeros((N,), bool).at[idx].set(keep)
      kn = unit_rows(jax.lax.stop_gradient(k_ND))
      sim = jnp.where(kept[None, :], kn @ kn.T, -jnp.inf)
      merged = ok_N & ~kept & (sim.max(1) >= self.threshold)
      target = jnp.where(kept, jnp.arange(N), jnp.where(merged, jnp.argmax(sim, 1), N))
      x = _weighted_means(target, mass_N + _SIZE_FLOOR * size_N, x_NF)
      group_size = (target[None, :] == jnp.arange(N)[:, None]).astype(jnp.float32) @ size_N
      return x[idx], jnp.where(keep, group_size[idx], 0.0), keep

    x, size, keep = jax.vmap(jax.vmap(one))(keys, payload, size, score, mass, valid)
    rk = coef['k'].shape[-1]
    return {'k': x[..., :rk], 'v': x[..., rk:]}, size, keep

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    del ctx
    self._check_params(params)
    if state.capacity == 0:              # an empty cache: (B, H, 0, D) keys and values
      out, _, _ = attend(q_BHSD, state.k.astype(jnp.float32), state.v.astype(jnp.float32), state.valid,
                         None, k_BHSD, v_BHSD)
      return out, state
    coef = self.decode(params, state.k)
    size = state.extra.get('size')
    (out, p_cache, p_new), ck = self.attend_cache(params, coef, size, state.valid, q_BHSD, k_BHSD, v_BHSD)
    if self.is_last(scale):
      return out, state
    new = {t: self.project(params, t, x) for t, x in (('k', k_BHSD), ('v', v_BHSD))}
    start, S = self.geometry.scale_starts[scale], self.geometry.scale_sizes[scale]
    if size is None:                     # every token has its slot: write the scale's codes in place
      stream = jax.lax.dynamic_update_slice_in_dim(state.k, self.encode(params, new), start, axis=2)
      return out, state.replace(k=stream, count=jnp.full_like(state.count, start + S))
    x, size, keep = self.merge(coef, ck, size, state.valid, k_BHSD, new, p_cache, p_new, state.capacity)
    return out, state.replace(k=self.encode(params, x), count=keep.sum(-1).astype(state.count.dtype),
                              extra={'size': jnp.minimum(size, 65535.0).astype(SIZE_DTYPE)})


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
