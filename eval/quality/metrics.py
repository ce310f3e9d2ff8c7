"""Image and token metrics of closed-loop generation (numpy, float64).

`psnr`, `ssim` (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid windows,
mean over channels), `kl_logits` and `token_agreement`. Confidence intervals: eval/engine/stats.py.
"""
from __future__ import annotations

import numpy as np


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


def log_softmax(logits) -> np.ndarray:
  """float64 log-probabilities over the last axis."""
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_logprobs(lp, lq) -> np.ndarray:
  """KL(p || q) in nats over the last axis of log-probabilities (leading axes kept)."""
  return (np.exp(lp) * (lp - lq)).sum(-1)


def kl_logits(p_logits, q_logits) -> np.ndarray:
  """KL(softmax(p) || softmax(q)) in nats over the last axis (leading axes kept)."""
  return kl_logprobs(log_softmax(p_logits), log_softmax(q_logits))
