"""Lower bounds on the bits or the error of any KV-cache compressor (RESEARCH.md section 2).

Rate-distortion bound (exact for Gaussian values). Queries whose attention probabilities on the cached
tokens form the matrix S (P x T) read A = S V. With V (T, d) i.i.d. N(0, 1), each of the d value columns
makes a Gaussian vector S v with covariance S S^T (eigenvalues lambda_k). Any code of the values that
lets the outputs be rebuilt with aggregate relative error eps = sqrt(sum |Z - A|^2 / sum |A|^2) needs

  bits(eps) = d * sum_k max(0, 0.5 log2(lambda_k / theta)),  sum_k min(theta, lambda_k) = eps^2 sum_k lambda_k

(reverse water-filling; keys, probes and the attention pattern are free side information, so the bound
is conservative). S = I gives T d log2(1/eps).

Rank (Eckart-Young) bound, data dependent. A cache with m entries per head (kept, merged or synthetic)
turns a block of queries that attend only to it into outputs of rank <= m; values projected to rank r
give rank <= r. So the error is at least the best rank-min(m, r) approximation error of the exact
output matrix. (Queries that also see S exact tokens of their own scale: pass m + S.)

Errors are aggregate relative L2 (as `compress.core.attention.rel_error`); bits are per head.
"""
from __future__ import annotations

import math

import numpy as np

_BISECT_STEPS = 200


# ---- rate-distortion --------------------------------------------------------------------------
def gram_eigenvalues(S_PT: np.ndarray) -> np.ndarray:
  """Eigenvalues of S S^T (float64, descending, zeros dropped): the squared singular values of S."""
  s = np.linalg.svd(np.asarray(S_PT, np.float64), compute_uv=False) ** 2
  return s[s > s.max(initial=0.0) * 1e-15] if s.size else s


def _check_lam(lam: np.ndarray) -> np.ndarray:
  lam = np.asarray(lam, np.float64).ravel()
  if lam.size == 0 or np.any(lam < 0) or not np.all(np.isfinite(lam)) or lam.max() <= 0:
    raise ValueError('eigenvalues must be finite, >= 0 and not all 0; pass gram_eigenvalues(S) of '
                     'the queries\' attention matrix S')
  return np.sort(lam[lam > 0])[::-1]


def water_level(eps, lam: np.ndarray) -> np.ndarray:
  """theta with sum_k min(theta, lambda_k) = eps^2 sum_k lambda_k (bisection; eps >= 1 -> max lambda)."""
  lam = _check_lam(lam)
  eps = np.asarray(eps, np.float64)
  if np.any(~(eps >= 0)):
    raise ValueError(f'a relative error must be >= 0, got {eps}')
  target = np.minimum(eps, 1.0) ** 2 * lam.sum()
  lo, hi = np.zeros_like(target), np.full_like(target, lam[0])
  for _ in range(_BISECT_STEPS):
    mid = 0.5 * (lo + hi)
    below = np.minimum(mid[..., None], lam).sum(-1) < target
    lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  return np.where(target > 0, hi, 0.0)


def _bits_at_level(log2_theta: np.ndarray, lam: np.ndarray, d: int) -> np.ndarray:
  per = 0.5 * (np.log2(lam) - np.asarray(log2_theta, np.float64)[..., None])
  return d * np.maximum(per, 0.0).sum(-1)


def rd_bits(eps, lam: np.ndarray, d: int) -> np.ndarray:
  """Fewest bits that reach aggregate relative error `eps` (scalar or array; inf at eps = 0).

  lam: eigenvalues of S S^T (see `gram_eigenvalues`); d: value dimensions per token.
  """
  if d < 1:
    raise ValueError(f'd (value dims) must be >= 1, got {d}')
  with np.errstate(divide='ignore'):  # eps = 0: theta = 0, infinitely many bits
    return _bits_at_level(np.log2(water_level(eps, lam)), _check_lam(lam), d)


def rd_min_error(bits, lam: np.ndarray, d: int) -> np.ndarray:
  """Inverse of `rd_bits`: the smallest aggregate relative error any `bits`-bit code can reach."""
  lam = _check_lam(lam)
  bits = np.asarray(bits, np.float64)
  if np.any(~(bits >= 0)):
    raise ValueError(f'bits must be >= 0, got {bits}')
  # bits(theta) decreases in theta; bits(lam_max) = 0 and bits(lo) >= bits (see docstring maths)
  log_lo = np.log2(lam[-1]) - 2.0 * bits / d
  lo, hi = log_lo, np.full_like(log_lo, np.log2(lam[0]))
  for _ in range(_BISECT_STEPS):
    mid = 0.5 * (lo + hi)
    above = _bits_at_level(mid, lam, d) > bits
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  theta = 2.0 ** hi
  return np.sqrt(np.minimum(theta[..., None], lam).sum(-1) / lam.sum())


def rd_curve(lam: np.ndarray, d: int, eps: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The bound as a curve for plots: {'eps': grid (default 1e-3..1, log spaced), 'bits': rd_bits}."""
  eps = np.geomspace(1e-3, 1.0, 91) if eps is None else np.asarray(eps, np.float64)
  return {'eps': eps, 'bits': rd_bits(eps, lam, d)}


def water_filling_curve(variances: np.ndarray, total: float, points: int = 48, depth: float = 1e-7
                        ) -> dict[str, np.ndarray]:
  """Reverse water-filling over independent Gaussian components of the given `variances` (any shape):
  at each water level theta, bits = sum max(0, 0.5 log2(v / theta)) and the relative error is
  sqrt(sum min(theta, v) / total). `total`: the energy errors are relative to (>= sum of variances
  when part of the signal is exact). Returns {'bits', 'rel_error'} for `points` levels from the largest
  variance down to `depth` times it, bits increasing."""
  v = np.asarray(variances, np.float64).ravel()
  v = np.sort(v[v > 0])
  if v.size == 0 or not total > 0:
    raise ValueError('need positive component variances and total energy')
  levels = v[-1] * np.geomspace(1.0, depth, points)
  csum = np.concatenate([[0.0], np.cumsum(v)])
  logs = np.concatenate([[0.0], np.cumsum(np.log2(v))])
  n_below = np.searchsorted(v, levels)                       # components with v < theta
  err = csum[n_below] + levels * (v.size - n_below)
  n_above = v.size - n_below
  bits = 0.5 * ((logs[-1] - logs[n_below]) - n_above * np.log2(levels))
  return {'bits': bits, 'rel_error': np.sqrt(np.minimum(err / total, 1.0))}


# ---- rank (Eckart-Young) ----------------------------------------------------------------------
def _tails(A_XPD: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Per matrix (leading axes X): sum of squared singular values beyond `rank`, and the total."""
  A = np.asarray(A_XPD, np.float64)
  if A.ndim < 2:
    raise ValueError(f'need output matrices (..., queries, dims), got shape {A.shape}')
  s2 = np.linalg.svd(A, compute_uv=False) ** 2
  return s2[..., max(int(rank), 0):].sum(-1), s2.sum(-1)


def effective_rank(m: int | None = None, value_rank: int | None = None) -> int:
  """Largest output rank a cache of m entries and/or rank-`value_rank` values can produce."""
  ranks = [int(r) for r in (m, value_rank) if r is not None]
  if not ranks or min(ranks) < 0:
    raise ValueError(f'give m (cache entries) and/or value_rank, each >= 0; got {m}, {value_rank}')
  return min(ranks)


def rank_error(A_XPD: np.ndarray, m: int | None = None, value_rank: int | None = None) -> np.ndarray:
  """Per-matrix absolute Frobenius error of the best approximation of rank min(m, value_rank)."""
  tail, _ = _tails(A_XPD, effective_rank(m, value_rank))
  return np.sqrt(tail)


def rank_bound(A_XPD: np.ndarray, m: int | None = None, value_rank: int | None = None) -> float:
  """Smallest aggregate relative error of outputs of rank <= min(m, value_rank) for every head.

  A_XPD: exact outputs, leading axes = heads (any number), then (queries, dims).
  """
  tail, total = _tails(A_XPD, effective_rank(m, value_rank))
  return float(np.sqrt(tail.sum() / max(total.sum(), 1e-300)))


def rank_curve(A_XPD: np.ndarray, ms, value_rank: int | None = None) -> dict[str, np.ndarray]:
  """{'m': ms, 'rel_error': rank_bound at each m} for plots (one SVD for the whole curve)."""
  ms = np.asarray(ms, np.int64)
  A = np.asarray(A_XPD, np.float64)
  s2 = np.linalg.svd(A, compute_uv=False) ** 2
  total = max(s2.sum(), 1e-300)
  ranks = [effective_rank(int(m), value_rank) for m in ms]
  return {'m': ms, 'rel_error': np.array([np.sqrt(s2[..., r:].sum() / total) for r in ranks])}


# ---- reference scalar quantiser (Gaussian-optimal, Lloyd-Max) ----------------------------------
def _phi(x: np.ndarray) -> np.ndarray:
  return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, np.float64) / math.sqrt(2)))


def lloyd_max_gaussian(bits: int, iters: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(thresholds (2^b - 1,), levels (2^b,)) of the MSE-optimal b-bit scalar quantiser of N(0, 1)."""
  if bits < 1:
    raise ValueError(f'a scalar quantiser needs >= 1 bit, got {bits}')
  n = 2 ** bits
  levels = np.linspace(-2.0, 2.0, n) * (1 + 0.3 * bits) / 2
  for _ in range(iters):
    t = 0.5 * (levels[1:] + levels[:-1])
    a, b = np.concatenate([[-np.inf], t]), np.concatenate([t, [np.inf]])
    levels = (_phi(a) - _phi(b)) / np.maximum(_Phi(b) - _Phi(a), 1e-300)
  return 0.5 * (levels[1:] + levels[:-1]), levels


def quantize_gaussian(x: np.ndarray, bits: int, sigma: float = 1.0) -> np.ndarray:
  """x rounded to the b-bit Lloyd-Max levels of N(0, sigma^2): b bits per coordinate."""
  t, levels = lloyd_max_gaussian(bits)
  return sigma * levels[np.searchsorted(t, np.asarray(x, np.float64) / sigma)]
