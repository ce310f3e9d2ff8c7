"""Low-rank KV caches: per (layer, head) PCA bases fitted on calibration caches.

`pca` keeps every token and stores the r-dim coefficients of its centred key and value,
c = (x - mean) @ P (P: (D, r) top principal directions), at the geometry dtype; it reads keys back as
c @ P^T + mean. The ranks follow from the budget: R = floor((budget - 16) / (prefix_tokens * dtype
bits)) coefficient dims per token (at most 2D), split between keys and values by `key_fraction`. The
16 bits are the per-head count of stored tokens (uint16): the state holds it and attention reads it (the
valid mask), so it is counted, as in every other compressor. Only a rank-0 cache (entries of 0 bits)
stores no count. P and the means are parameters shared by every sequence, reported by `shared_bits` at
their dtype (the geometry dtype).

`pca_evict` keeps `keep_fraction` of the tokens (eviction as in `compress.core.stable_slots`) and spends the
budget on a higher rank for those.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.accounting import COUNT_DTYPE, dtype_bits
from compress.core.attention import attend, attend_output
from compress.core.interface import Compressor
from compress.core.registry import register
from compress.core.slots import empty_slots, gather_entries, Slots
from compress.core.stable_slots import EVICTION_RULES, kept_scores, plan_slots


def fit_pca(x_NBHLD: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Per (layer, head) mean (N, H, D) and top-`rank` principal directions (N, H, D, rank), float64.

  Columns are orthonormal, ordered by decreasing variance over every (sequence, token) sample.
  """
  x = np.asarray(x_NBHLD, np.float64)
  N, B, H, L, D = x.shape
  x_NHTD = np.moveaxis(x, 2, 1).reshape(N, H, B * L, D)
  mean_NHD = x_NHTD.mean(2)
  xc = x_NHTD - mean_NHD[:, :, None]
  cov_NHDD = np.matmul(np.swapaxes(xc, -1, -2), xc) / max(B * L, 1)      # BLAS, not einsum's loops
  _, vecs = np.linalg.eigh(cov_NHDD)                       # ascending eigenvalues
  return mean_NHD, vecs[..., ::-1][..., :rank]


@dataclasses.dataclass(frozen=True)
class LowRankBase(Compressor):
  """Shared by `pca` and `pca_evict`: planning (capacity, ranks), fitting, projection."""
  key_fraction: float = 0.5       # share of the coefficient dims given to keys

  family = 'lowrank'
  needs_calibration = True

  def __post_init__(self):
    if not 0.0 <= self.key_fraction <= 1.0:
      raise ValueError(f'{self.name}: key_fraction must be in [0, 1], got {self.key_fraction!r}')

  # ---- planning -----------------------------------------------------------------------------
  def plan(self) -> tuple[int, int, int]:
    """(capacity m, key rank, value rank) of the state within the budget."""
    raise NotImplementedError

  def split_rank(self, total: int) -> tuple[int, int]:
    """Coefficient dims per token -> (key rank, value rank), each at most head_dim."""
    D = self.geometry.head_dim
    total = min(total, 2 * D)
    rk = min(D, math.floor(total * self.key_fraction + 0.5))
    rv = min(D, total - rk)
    return min(D, total - rv), rv

  @property
  def coef_bits(self) -> int:
    return self.geometry.kv_bits

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, key: jax.Array, num_layers: int, num_heads: int,
                  calibration: Mapping[str, Any] | None = None) -> dict[str, jax.Array] | None:
    """{'k_basis': (layers, heads, D, rk), 'k_mean': (layers, heads, D), 'v_basis', 'v_mean'}."""
    del key
    if self.passthrough:
      return None
    if calibration is None or 'k' not in calibration or 'v' not in calibration:
      raise ValueError(f'{self.name} fits its projections on calibration caches: pass '
                       "calibration={'k': (layers, B, H, L, D), 'v': (layers, B, H, L, D)}")
    _, rk, rv = self.plan()
    dt = self.geometry.kv_dtype
    params = {}
    for t, r in (('k', rk), ('v', rv)):
      x = np.asarray(calibration[t])
      want = (num_layers, num_heads, self.geometry.head_dim)
      if x.ndim != 5 or (x.shape[0], x.shape[2], x.shape[4]) != want:
        raise ValueError(f"{self.name}: calibration['{t}'] must be (layers={want[0]}, B, heads={want[1]}, "
                         f'L, head_dim={want[2]}), got {x.shape}')
      mean, basis = fit_pca(x, r)
      params[f'{t}_mean'] = jnp.asarray(mean, dt)
      params[f'{t}_basis'] = jnp.asarray(basis, dt)
    return params

  # ---- projection -----------------------------------------------------------------------------
  @staticmethod
  def project(params, t: str, x_BHSD: jax.Array) -> jax.Array:
    """Coefficients (B, H, S, r) float32 of centred x on the basis."""
    f32 = jnp.float32
    xc = x_BHSD.astype(f32) - params[f'{t}_mean'].astype(f32)[None, :, None, :]
    return jnp.einsum('bhsd,hdr->bhsr', xc, params[f'{t}_basis'].astype(f32))

  @staticmethod
  def reconstruct(params, t: str, coef_BHMR: jax.Array) -> jax.Array:
    """coef @ P^T + mean, float32 (B, H, M, D)."""
    f32 = jnp.float32
    x = jnp.einsum('bhmr,hdr->bhmd', coef_BHMR.astype(f32), params[f'{t}_basis'].astype(f32))
    return x + params[f'{t}_mean'].astype(f32)[None, :, None, :]

  def attend_stored(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, *, probabilities: bool = True):
    """`attend` over the keys/values rebuilt from the stored coefficients plus the new scale:
    (out, p_cache, p_new); without `probabilities`, (out, None, None) by `attend_output`."""
    self._check_params(params)
    ck = self.reconstruct(params, 'k', state.k)
    cv = self.reconstruct(params, 'v', state.v)
    if not probabilities:
      return attend_output(q_BHSD, ck, cv, state.valid, None, k_BHSD, v_BHSD), None, None
    return attend(q_BHSD, ck, cv, state.valid, None, k_BHSD, v_BHSD)

  def _check_params(self, params) -> None:
    if params is None:
      raise ValueError(f'{self.name} needs the parameters from init_params(..., calibration=...)')


@register
@dataclasses.dataclass(frozen=True)
class PCA(LowRankBase):
  """Every token kept as rank-r PCA coefficients of its key and value (r set by the budget)."""
  name = 'pca'

  def plan(self) -> tuple[int, int, int]:
    T = self.geometry.prefix_tokens
    room = self.budget.bits - dtype_bits(COUNT_DTYPE)          # the stored count comes first
    return (T, *self.split_rank(max(0, room) // (T * self.coef_bits)))

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    T, rk, rv = self.plan()
    dt = self.geometry.kv_dtype
    # the count is stored and counted; a rank-0 cache (entries of 0 bits) holds nothing to count
    return empty_slots(batch, num_heads, T, (rk,), dt, (rv,), dt).replace(count_implied=rk + rv == 0)

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    del ctx
    out, _, _ = self.attend_stored(params, state, q_BHSD, k_BHSD, v_BHSD, probabilities=False)
    if self.is_last(scale):
      return out, state
    start, S = self.geometry.scale_starts[scale], self.geometry.scale_sizes[scale]
    write = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, axis=2)
    return out, state.replace(k=write(state.k, self.project(params, 'k', k_BHSD)),
                              v=write(state.v, self.project(params, 'v', v_BHSD)),
                              count=jnp.full_like(state.count, start + S))


@register
@dataclasses.dataclass(frozen=True)
class PCAEvict(LowRankBase):
  """Keeps `keep_fraction` of the tokens (by `evict`) as PCA coefficients at the rank that then fits."""
  keep_fraction: float = 0.5
  evict: str = 'snapkv'

  name = 'pca_evict'

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f'pca_evict: keep_fraction must be in (0, 1], got {self.keep_fraction!r}')
    if self.evict not in EVICTION_RULES:
      raise ValueError(f'pca_evict: evict must be one of {EVICTION_RULES}, got {self.evict!r}')

  def plan(self) -> tuple[int, int, int]:
    return _plan_evict(self)

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    m, rk, rv = self.plan()
    dt = self.geometry.kv_dtype
    if m == 0:
      return empty_slots(batch, num_heads, 0, (rk,), dt, (rv,), dt).replace(count_implied=True)
    extra = {'score': ((), jnp.float16)} if self.evict == 'h2o' else {}
    return empty_slots(batch, num_heads, m, (rk,), dt, (rv,), dt, extra=extra)

  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    del ctx
    m = state.capacity
    out, p_cache, p_new = self.attend_stored(params, state, q_BHSD, k_BHSD, v_BHSD,
                                             probabilities=not (self.is_last(scale) or m == 0))
    if self.is_last(scale) or m == 0:
      return out, state
    take_new, src, valid, score = plan_slots(self.evict, self.geometry, state, p_cache, p_new, scale)
    pick = lambda new, old: jnp.where(take_new.reshape(take_new.shape + (1,) * (old.ndim - 3)),
                                      gather_entries(new, src).astype(old.dtype), old)
    extra = {}
    if 'score' in state.extra:
      extra['score'] = kept_scores(score, take_new, src, valid)
    return out, state.replace(k=pick(self.project(params, 'k', k_BHSD), state.k),
                              v=pick(self.project(params, 'v', v_BHSD), state.v),
                              count=valid.sum(-1).astype(COUNT_DTYPE), extra=extra)


@functools.lru_cache(maxsize=None)
def _plan_evict(comp: PCAEvict) -> tuple[int, int, int]:
  """Capacity ~ keep_fraction * prefix tokens at the rank that fits; fewer tokens if not even rank 1
  fits; more tokens when full rank already fits."""
  g, cb = comp.geometry, comp.coef_bits
  T, D = g.prefix_tokens, g.head_dim
  per_entry = 16 if comp.evict == 'h2o' else 0
  room = comp.budget.bits - dtype_bits(COUNT_DTYPE)
  m = max(1, math.floor(comp.keep_fraction * T))
  rank = (room // m - per_entry) // cb if room > 0 else 0
  if rank < 1:                                   # not even rank 1 for m tokens: keep fewer
    m = max(0, min(T, room // (cb + per_entry)))
    return (m, *comp.split_rank(1)) if m else (0, 0, 0)
  if rank >= 2 * D:                              # full rank fits: keep more tokens
    m = min(T, room // (2 * D * cb + per_entry))
  return (m, *comp.split_rank(rank))
