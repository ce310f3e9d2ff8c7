"""Differentiable relaxations shared by the learned compressors.

- `straight_through_cast`: rounds to a storage dtype in the forward pass, identity gradient.
- `topk_threshold` / `soft_topk_log_mask`: a temperature-tau sigmoid top-k whose threshold sits midway
  between the k-th and (k+1)-th largest scores (no gradient through the threshold); as tau -> 0 the
  mask is the hard top-k (ties aside).
- `entropic_topk`: the entropic optimal-transport top-k (Xie et al., NeurIPS 2020): a soft mask that
  sums to k at every temperature, differentiable in every score (bisection + implicit gradient).
- `pyramid_attention`: VAR's block-causal attention scale by scale, where the earlier scales are read
  from a (compressed, reconstructed, or soft-masked) copy of the cache and each scale's own tokens are
  exact, as in every compressor's step. Optional per-(query scale, entry) logit biases carry log-keep
  weights or log-masses.
All functions are pure, jittable and batched over leading axes.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compress.core.attention import attend

NEG_BIG = -1e9          # a finite "minus infinity" for log-weights (exp underflows to exactly 0)


def straight_through_cast(x: jax.Array, dtype: Any) -> jax.Array:
  """float32 x rounded to `dtype` and back in the forward pass; the gradient passes unchanged."""
  x = x.astype(jnp.float32)
  rounded = x.astype(dtype).astype(jnp.float32)
  return x + jax.lax.stop_gradient(rounded - x)


def topk_threshold(score_BN: jax.Array, valid_BN: jax.Array, k: int) -> jax.Array:
  """(..., 1) threshold between the k-th and (k+1)-th largest valid scores (no gradient).

  +inf when k == 0 (keep nothing), -inf when k >= the number of valid scores (keep every valid one).
  Scores must be finite.
  """
  N = score_BN.shape[-1]
  s = jax.lax.stop_gradient(jnp.where(valid_BN, score_BN.astype(jnp.float32), -jnp.inf))
  if k <= 0:
    return jnp.full(s.shape[:-1] + (1,), jnp.inf)
  if k >= N:
    return jnp.full(s.shape[:-1] + (1,), -jnp.inf)
  top = jax.lax.top_k(s, k + 1)[0]                       # (..., k + 1) descending
  kth, next_ = top[..., k - 1:k], top[..., k:k + 1]
  return jnp.where(jnp.isneginf(next_), -jnp.inf, 0.5 * (kth + next_))


def soft_topk_log_mask(score_BN: jax.Array, valid_BN: jax.Array, k: int, tau: float) -> jax.Array:
  """log sigmoid((s - t) / tau) for every entry, t = `topk_threshold` of the valid entries.

  float32 (..., N) in [NEG_BIG, 0]. The threshold is set by the valid entries only, but every entry
  gets its weight (mask invalid ones as needed). exp of it -> the hard top-k mask of the valid entries
  as tau -> 0 (no ties at the threshold). k = 0 gives NEG_BIG everywhere, k >= valid count gives 0.
  """
  if not tau > 0:
    raise ValueError(f'soft top-k temperature tau must be > 0, got {tau}')
  t = topk_threshold(score_BN, valid_BN, k)
  z = (score_BN.astype(jnp.float32) - jnp.where(jnp.isfinite(t), t, 0.0)) / tau
  logm = jnp.where(jnp.isposinf(t), NEG_BIG, jnp.where(jnp.isneginf(t), 0.0, jax.nn.log_sigmoid(z)))
  return jnp.maximum(logm, NEG_BIG)


def entropic_topk(score_BN: jax.Array, valid_BN: jax.Array, k: int, eps: float, iters: int = 60
                  ) -> jax.Array:
  """Soft top-k mask (..., N) in [0, 1] summing to min(k, #valid) over the valid entries (0 elsewhere).

  The entropic optimal-transport top-k (Xie et al., NeurIPS 2020: the valid scores sent to two anchors
  with masses k and n - k, squared cost) has the closed form mask_j = sigmoid((s_j - t) / eps) with t
  set so that the masks sum to k; t is found by bisection (`iters` halvings, no gradient) and one
  Newton step carries the implicit gradient dt/ds_j = sigmoid'_j / sum sigmoid'. eps: temperature in
  score units (eps -> 0: the hard top-k). Unlike Sinkhorn iterations this converges at any eps.
  """
  f32 = jnp.float32
  s = score_BN.astype(f32)
  n = valid_BN.sum(-1, keepdims=True).astype(f32)
  kk = jnp.minimum(f32(k), n)
  mass = lambda t: jnp.where(valid_BN, jax.nn.sigmoid((s - t) / eps), 0.0).sum(-1, keepdims=True)
  sg = jax.lax.stop_gradient(s)
  lo = jnp.where(valid_BN, sg, jnp.inf).min(-1, keepdims=True) - 50 * eps     # mass(lo) ~ n >= k
  hi = jnp.where(valid_BN, sg, -jnp.inf).max(-1, keepdims=True) + 50 * eps    # mass(hi) ~ 0 <= k
  lo, hi = jnp.where(n > 0, lo, 0.0), jnp.where(n > 0, hi, 0.0)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = jax.lax.stop_gradient(mass(mid)) > kk
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, halve, (lo, hi))
  t0 = jax.lax.stop_gradient(0.5 * (lo + hi))
  p = jnp.where(valid_BN, jax.nn.sigmoid((s - t0) / eps), 0.0)
  slope = jnp.maximum((p * (1 - p)).sum(-1, keepdims=True) / eps, 1e-30)
  t = t0 + (p.sum(-1, keepdims=True) - kk) / slope                    # Newton step: implicit gradient
  mask = jnp.where(valid_BN, jax.nn.sigmoid((s - t) / eps), 0.0)
  return jnp.where(kk >= n, valid_BN.astype(f32), jnp.where(kk <= 0, 0.0, mask))


def scale_rows(patch_nums: tuple[int, ...], bias_BHKL: jax.Array, scale: int) -> jax.Array:
  """The cached prefix's biases as seen by scale `scale`: (B, H, start_scale)."""
  start = sum(p * p for p in patch_nums[:scale])
  return bias_BHKL[:, :, scale, :start]


def pyramid_attention(q_BHLD: jax.Array, ck_BHLD: jax.Array, cv_BHLD: jax.Array, k_BHLD: jax.Array,
                      v_BHLD: jax.Array, patch_nums: tuple[int, ...],
                      cbias_BHKL: jax.Array | None = None) -> jax.Array:
  """Block-causal attention where scale s reads earlier scales from (ck, cv) and its own from (k, v).

  q pre-scaled; cbias_BHKL (optional): the logit bias scale s's queries add to every cached entry
  (row s, entries of earlier scales; e.g. log-keep weights, NEG_BIG = evicted). Every scale is one
  `compress.core.attention.attend` call, the computation each compressor's step performs. Returns the
  float32 output (B, H, L, D).
  """
  outs, start = [], 0
  for si, pn in enumerate(patch_nums):
    S = pn * pn
    own = slice(start, start + S)
    valid = jnp.ones(ck_BHLD.shape[:2] + (start,), bool)
    bias = None if cbias_BHKL is None else scale_rows(patch_nums, cbias_BHKL, si)
    out, _, _ = attend(q_BHLD[:, :, own], ck_BHLD[:, :, :start], cv_BHLD[:, :, :start], valid, bias,
                       k_BHLD[:, :, own], v_BHLD[:, :, own])
    outs.append(out)
    start += S
  return jnp.concatenate(outs, axis=2)

