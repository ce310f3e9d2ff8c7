"""Budget allocation: split a total budget across layers (or heads, or scales) without exceeding it.

`allocate` is the one primitive: integers proportional to weights, each capped, summing to at most
the total (exactly min(total, sum of caps)). Weight policies:
  uniform  every unit the same;
  pyramid  PyramidKV (Cai et al. 2024): linear in depth, most at the lowest layer; the top layer gets
           1/beta of the mean and the bottom 2 - 1/beta, so the mean is kept;
  scalekv  ScaleKV (Li et al. 2025): layers whose attention is spread over earlier scales are
           "drafters" and get `drafter_ratio` times what a "refiner" gets; drafter scores come from
           calibration caches (`attention_spread`).
`layer_budgets` turns weights into per-layer `Budget`s in whole cache entries, so that the bits held
over all layers never exceed layers x (per-layer budget), with every head of a layer alike.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.attention import NEG_INF
from compress.core.budget import Budget, CacheGeometry

POLICIES = ('uniform', 'pyramid', 'scalekv')


def allocate(total: int, weights: Sequence[float] | np.ndarray,
             caps: Sequence[int] | np.ndarray | int | None = None) -> np.ndarray:
  """Water-filling: int64 amounts of `weights`' shape, proportional to weights where below the caps.

  Units that would exceed their cap get the cap and the rest is re-split among the others; fractions
  go to the largest remainders. Sum = min(total, sum(caps)). Zero-weight units get 0 unless every
  uncapped unit has weight 0 (then they share equally).
  """
  w = np.asarray(weights, np.float64)
  shape, w = w.shape, w.ravel()
  if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f'allocate needs a non-empty array of finite weights >= 0, got {weights}')
  if int(total) < 0:
    raise ValueError(f'allocate needs a total >= 0, got {total}')
  cap = np.full(w.shape, np.inf) if caps is None else np.broadcast_to(
      np.asarray(caps, np.float64), shape).ravel().copy()
  if np.any(cap < 0):
    raise ValueError(f'caps must be >= 0, got {caps}')
  total = int(min(int(total), cap.sum()))
  share = np.zeros_like(w)
  free, remaining = cap > 0, float(total)
  while free.any() and remaining > 0:
    wf = np.where(free, w, 0.0)
    if wf.sum() == 0:
      wf = free.astype(np.float64)
    want = remaining * wf / wf.sum()
    over = free & (want > cap)
    if not over.any():
      share = np.where(free, want, share)
      break
    share[over] = cap[over]
    remaining -= cap[over].sum()
    free &= ~over
  base = np.minimum(np.floor(share + 1e-9), cap).astype(np.int64)
  left = total - int(base.sum())
  room = base < cap
  order = sorted(np.flatnonzero(room), key=lambda i: (-(share[i] - base[i]), i))
  for i in order[:max(left, 0)]:
    base[i] += 1
  return base.reshape(shape)


def uniform_weights(num_units: int) -> np.ndarray:
  return np.ones(num_units)


def pyramid_weights(num_layers: int, beta: float = 20.0) -> np.ndarray:
  """(num_layers,) PyramidKV linear schedule with mean 1: layer 0 gets 2 - 1/beta, the top 1/beta."""
  if beta < 1:
    raise ValueError(f'pyramid: beta must be >= 1 (top layer gets 1/beta of the mean), got {beta}')
  if num_layers == 1:
    return np.ones(1)
  top = 1.0 / beta
  return np.linspace(2.0 - top, top, num_layers)


def scalekv_weights(drafter_score: Sequence[float] | np.ndarray, drafter_fraction: float = 0.25,
                    drafter_ratio: float = 4.0) -> np.ndarray:
  """(N,) weights, mean 1: the round(drafter_fraction * N) layers of highest drafter score are
  drafters and weigh `drafter_ratio`; the other layers (refiners) weigh 1."""
  s = np.asarray(drafter_score, np.float64)
  if s.ndim != 1 or not np.all(np.isfinite(s)):
    raise ValueError(f'drafter scores must be a finite (layers,) vector, got shape {s.shape}')
  if not 0.0 <= drafter_fraction <= 1.0 or drafter_ratio < 1.0:
    raise ValueError(f'need 0 <= drafter_fraction <= 1 and drafter_ratio >= 1, got '
                     f'{drafter_fraction}, {drafter_ratio}')
  n_d = int(round(drafter_fraction * s.size))
  w = np.ones_like(s)
  w[np.argsort(-s, kind='stable')[:n_d]] = drafter_ratio
  return w / w.mean()


def layer_weights(policy: str, num_layers: int, drafter_score=None, **settings) -> np.ndarray:
  """Weights of a named policy (see module doc)."""
  if policy == 'uniform':
    return uniform_weights(num_layers)
  if policy == 'pyramid':
    return pyramid_weights(num_layers, **settings)
  if policy == 'scalekv':
    if drafter_score is None:
      raise ValueError('scalekv allocation needs drafter_score (layers,): compute it with '
                       'attention_spread(q, k, patch_nums)["drafter_score"] on calibration caches')
    if len(drafter_score) != num_layers:
      raise ValueError(f'drafter_score has {len(drafter_score)} layers, expected {num_layers}')
    return scalekv_weights(drafter_score, **settings)
  raise ValueError(f'unknown allocation policy {policy!r}; choose one of {POLICIES}')


def layer_budgets(geometry: CacheGeometry, budget: Budget, weights: Sequence[float], entry_bits: int,
                  header_bits: int = 16) -> tuple[Budget, ...]:
  """Per-layer budgets (one per weight) holding whole entries of `entry_bits` plus `header_bits`.

  The pool is every layer's budget minus its header, in whole entries (leftover bits of the layers are
  pooled too); it is split by `allocate` with a cap of the peak cache per layer. So the sum of the
  per-layer budgets is <= len(weights) * budget.bits. A budget that holds the whole cache is kept as is.
  """
  n = len(weights)
  if budget.bits >= geometry.full_bits:
    return (budget,) * n
  pool = n * max(budget.bits - header_bits, 0) // entry_bits
  m = allocate(pool, weights, caps=geometry.prefix_tokens)
  return tuple(Budget(int(header_bits + mi * entry_bits) if mi > 0 else 0) for mi in m)


@functools.partial(jax.jit, static_argnames=('patch_nums',))
def _spread_one_layer(q_BHLD, k_BHLD, patch_nums):
  sizes = [p * p for p in patch_nums]
  scale_L = jnp.repeat(jnp.arange(len(sizes)), jnp.array(sizes), total_repeat_length=sum(sizes))
  seen_LL = scale_L[:, None] >= scale_L[None, :]
  hist_LL = scale_L[:, None] > scale_L[None, :]
  logits = jnp.einsum('bhld,bhmd->bhlm', q_BHLD.astype(jnp.float32), k_BHLD.astype(jnp.float32))
  p = jax.nn.softmax(jnp.where(seen_LL, logits, NEG_INF), axis=-1)
  ph = jnp.where(hist_LL, p, 0.0)
  mass_BHL = ph.sum(-1)
  r = ph / jnp.maximum(mass_BHL[..., None], 1e-30)
  ent_BHL = -jnp.sum(jnp.where(r > 0, r * jnp.log(jnp.where(r > 0, r, 1.0)), 0.0), axis=-1)
  spread_BHL = jnp.exp(ent_BHL) / jnp.maximum(hist_LL.sum(-1), 1)
  onehot_LK = jax.nn.one_hot(scale_L, len(sizes)) / jnp.array(sizes, jnp.float32)
  per_scale = lambda x: jnp.einsum('bhl,lk->k', x, onehot_LK) / (x.shape[0] * x.shape[1])
  return per_scale(mass_BHL), per_scale(spread_BHL)


def attention_spread(q_NBHLD: jax.Array, k_NBHLD: jax.Array, patch_nums: Sequence[int]
                     ) -> dict[str, np.ndarray]:
  """Per-layer statistics of how attention spreads over earlier scales, from calibration q, k.

  Inputs (layers, B, H, L, D), q pre-scaled. For every query of scale s >= 1 (scale 0 has no history):
  history_mass (N, K): mean probability on earlier scales (scale 0 column = 0);
  history_spread (N, K): mean normalised effective number of attended history tokens,
      exp(entropy of the history-renormalised attention) / tokens in the history, in (0, 1];
  drafter_score (N,): mean over scales s >= 1 of history_mass * history_spread (high = a drafter:
      much attention, spread widely, on earlier scales; low = a refiner, focused on its own scale).
  """
  patch_nums = tuple(int(p) for p in patch_nums)
  L = sum(p * p for p in patch_nums)
  if q_NBHLD.ndim != 5 or q_NBHLD.shape != k_NBHLD.shape or q_NBHLD.shape[3] != L:
    raise ValueError(f'attention_spread needs q, k of the same shape (layers, B, H, L={L}, D), got '
                     f'{q_NBHLD.shape} and {k_NBHLD.shape}')
  stats = [_spread_one_layer(q_NBHLD[n], k_NBHLD[n], patch_nums) for n in range(q_NBHLD.shape[0])]
  mass = np.stack([np.asarray(m) for m, _ in stats])
  spread = np.stack([np.asarray(s) for _, s in stats])
  mass[:, 0], spread[:, 0] = 0.0, 0.0
  return {'history_mass': mass, 'history_spread': spread,
          'drafter_score': (mass * spread)[:, 1:].mean(axis=1)}
