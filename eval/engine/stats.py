"""Confidence intervals of the frontier evaluation (numpy, float64).

- `mean_ci`: Student-t confidence interval of a mean over independent units (images / seeds).
- `bootstrap_mean_ci`: percentile bootstrap of a mean: stays inside the metric's range (closed loop).
- `ratio_ci`: the aggregate relative L2 error sqrt(sum d2 / sum e2) over units, with a delta-method
  (ratio estimator) t-interval: the interval of the same pooled quantity the frontier reports.
"""
from __future__ import annotations

import numpy as np
from scipy import stats


def t_quantile(level: float, dof: int) -> float:
  """Two-sided Student-t critical value: P(|T_dof| <= t) = level."""
  if not 0 < level < 1:
    raise ValueError(f'a confidence level must be in (0, 1), got {level}')
  return float(stats.t.ppf(0.5 + level / 2, dof))


def mean_ci(x, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): mean +- t_{n-1} * s / sqrt(n) of the samples `x` (n = 1: low = high = mean)."""
  x = np.asarray(x, np.float64).ravel()
  if x.size == 0:
    raise ValueError('mean_ci needs at least one sample')
  m = float(x.mean())
  if x.size == 1:
    return m, m, m
  half = t_quantile(level, x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
  return m, m - half, m + half


def bootstrap_mean_ci(x, level: float = 0.95, draws: int = 4000, seed: int = 0
                      ) -> tuple[float, float, float]:
  """(mean, low, high): percentile-bootstrap interval of the mean of the independent samples `x`
  (images). Every resampled mean lies between min(x) and max(x), so the interval stays inside the
  metric's range whatever it is (SSIM <= 1, PSNR >= 0)."""
  x = np.asarray(x, np.float64).ravel()
  if x.size == 0:
    raise ValueError('bootstrap_mean_ci needs at least one sample')
  if not 0 < level < 1:
    raise ValueError(f'a confidence level must be in (0, 1), got {level}')
  m = float(x.mean())
  if x.size == 1:
    return m, m, m
  means = x[np.random.default_rng(seed).integers(0, x.size, (draws, x.size))].mean(1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return m, float(lo), float(hi)


def ratio_ci(d2, e2, level: float = 0.95) -> tuple[float, float, float]:
  """(r, low, high) of r = sqrt(sum d2 / sum e2) over units (d2, e2 (n,): squared error and squared
  norm of each unit). The interval is the delta-method t-interval of the ratio R = sum d2 / sum e2,
  Var(R) ~ var(d2_i - R e2_i) / (n mean(e2)^2), mapped through sqrt (low clipped at 0)."""
  d2, e2 = np.asarray(d2, np.float64).ravel(), np.asarray(e2, np.float64).ravel()
  if d2.shape != e2.shape or d2.size == 0:
    raise ValueError(f'd2 and e2 must be equally long and non-empty, got {d2.shape} and {e2.shape}')
  if e2.sum() <= 0:
    raise ValueError('the exact outputs are all zero: a relative error is undefined')
  R = d2.sum() / e2.sum()
  if d2.size == 1:
    return float(np.sqrt(R)), float(np.sqrt(R)), float(np.sqrt(R))
  resid = d2 - R * e2
  half = t_quantile(level, d2.size - 1) * resid.std(ddof=1) / (np.sqrt(d2.size) * e2.mean())
  return float(np.sqrt(R)), float(np.sqrt(max(R - half, 0.0))), float(np.sqrt(R + half))
