"""Statistics and image / distribution metrics of the frontier evaluation (numpy, float64).

- `mean_ci`: Student-t confidence interval of a mean over independent units (images / seeds).
- `bootstrap_mean_ci`: percentile bootstrap of a mean: stays inside the metric's range (closed loop).
- `ratio_ci`: the aggregate relative L2 error sqrt(sum d2 / sum e2) over units, with a delta-method
  (ratio estimator) t-interval: the interval of the same pooled quantity the frontier reports.
- `psnr`, `ssim` (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
  windows, mean over channels), `kl_logits` and `token_agreement` for closed-loop generation.
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


# ---- images --------------------------------------------------------------------------------------
def psnr(x_NHWC, y_NHWC, peak: float = 1.0) -> np.ndarray:
  """(N,) PSNR in dB of images in [0, peak] (inf where identical)."""
  x, y = np.asarray(x_NHWC, np.float64), np.asarray(y_NHWC, np.float64)
  mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(1)
  with np.errstate(divide='ignore'):
    return 10 * np.log10(peak ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """(size,) normalised 1-D Gaussian (the 2-D window is its outer product)."""
  r = np.arange(size) - (size - 1) / 2
  w = np.exp(-r ** 2 / (2 * sigma ** 2))
  return w / w.sum()


def _filter(x_NHWC: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable 'valid' correlation of every channel with the window w x w."""
  n = w.size
  H, W = x_NHWC.shape[1] - n + 1, x_NHWC.shape[2] - n + 1
  rows = sum(w[i] * x_NHWC[:, i:i + H] for i in range(n))
  return sum(w[j] * rows[:, :, j:j + W] for j in range(n))


def ssim(x_NHWC, y_NHWC, peak: float = 1.0, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> np.ndarray:
  """(N,) mean SSIM over valid windows and channels of images in [0, peak] (Wang et al. 2004).

  Images smaller than the window use one window as large as the image (same Gaussian sigma).
  """
  x, y = np.asarray(x_NHWC, np.float64), np.asarray(y_NHWC, np.float64)
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f'ssim takes two NHWC batches of one shape, got {x.shape} and {y.shape}')
  window = min(window, x.shape[1], x.shape[2])
  w = gaussian_window(window, sigma)
  c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
  mx, my = _filter(x, w), _filter(y, w)
  sxx = _filter(x * x, w) - mx * mx
  syy = _filter(y * y, w) - my * my
  sxy = _filter(x * y, w) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return s.reshape(s.shape[0], -1).mean(1)


# ---- tokens and logits ---------------------------------------------------------------------------
def token_agreement(a_BL, b_BL) -> float:
  """Fraction of equal tokens."""
  return float(np.mean(np.asarray(a_BL) == np.asarray(b_BL)))


def kl_logits(p_logits, q_logits) -> np.ndarray:
  """KL(softmax(p) || softmax(q)) in nats over the last axis (leading axes kept)."""
  p, q = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
  lp = p - p.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  lq = q - q.max(-1, keepdims=True)
  lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
  return (np.exp(lp) * (lp - lq)).sum(-1)
