"""Bit allocation of a transform code: per (layer, head) component statistics on calibration caches,
and reverse water-filling over integer widths (greedy on convex distortion curves).

Each head's keys and values are rotated into their PCA bases; component j of tensor t has variance
lambda_tj and a weight a_tj: the expected squared attention-output error one unit of its coding noise
causes. Value components weigh 1; key component j weighs E[(q . u_j)^2] * tr(Cov v) (a key error e_j
moves the logit by (q . u_j) e_j, which moves the output by that times (v_i - out); both sum over tokens
with the same p_i^2). A component coded with w bits by the Gaussian compander
(compress.composed.compander) keeps lambda * GAUSS_MSE[w] of its variance; `allocate` spends E bits per
entry where they remove most weighted distortion (optimal for these convex curves: reverse water-filling restricted to integers).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from compress.composed import compander
from compress.composed.bitstream import MAX_WIDTH

# the quantiser's MSE per unit variance at each width (w = 0: the component is dropped and read back as
# its mean) and the spread that makes its scale (compress.composed.compander)
GAUSS_MSE, GAUSS_SPREAD = compander.MSE, compander.SPREAD


def head_statistics(calibration: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per (layer, head): means (N, H, D), PCA bases (N, H, D, D) (columns by decreasing variance),
  variances (N, H, D) of keys and values, and the key components' output weights (N, H, D).

  calibration: {'q', 'k', 'v'} (layers, B, H, L, D) (q pre-scaled by the softmax scale)."""
  out = {}
  for t in 'kv':
    x = np.asarray(calibration[t], np.float64)
    N, B, H, L, D = x.shape
    x = np.moveaxis(x, 2, 1).reshape(N, H, B * L, D)
    mean = x.mean(2)
    # E[x x^T] - mean mean^T in float64 (BLAS; no centred copy): the subtraction loses ~2 log10(|mean| / sd)
    # of float64's 16 digits
    cov = np.matmul(np.swapaxes(x, -1, -2), x) / (B * L) - mean[..., :, None] * mean[..., None, :]
    lam, vecs = np.linalg.eigh(cov)
    out[f'{t}_mean'], out[f'{t}_basis'] = mean, vecs[..., ::-1]
    out[f'{t}_var'] = np.clip(lam[..., ::-1], 0.0, None)
  q = np.moveaxis(np.asarray(calibration['q'], np.float64), 2, 1)
  q = q.reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
  q_proj2 = np.matmul(q, out['k_basis']) ** 2
  out['k_weight'] = q_proj2.mean(2) * out['v_var'].sum(-1, keepdims=True)
  out['v_weight'] = np.ones_like(out['v_var'])
  return out


def allocate(weighted_var_XR: np.ndarray, num_bits: int, max_width: int = MAX_WIDTH) -> np.ndarray:
  """Integer widths (X, R) in [0, max_width] with sum <= num_bits per row minimising
  sum_j weighted_var_j * GAUSS_MSE[w_j] (greedy: each bit goes where it removes most)."""
  return allocate_nested(weighted_var_XR, (num_bits,), max_width)[0]


def allocate_nested(weighted_var_XR: np.ndarray, num_bits: Sequence[int], max_width: int = MAX_WIDTH
                    ) -> np.ndarray:
  """`allocate` at every budget of `num_bits` from one greedy run: (len(num_bits), X, R). The greedy
  allocation at fewer bits is a prefix of the one at more, so the widths are nested."""
  wv = np.asarray(weighted_var_XR, np.float64)
  X, R = wv.shape
  width = np.zeros((X, R), np.int64)
  rows = np.arange(X)
  cap = [min(int(b), R * max_width) for b in num_bits]
  out = np.zeros((len(cap), X, R), np.int64)
  for i in range(max(cap, default=0) + 1):
    for c, b in enumerate(cap):
      if b == i:
        out[c] = width
    if i == max(cap):
      break
    gain = wv * (GAUSS_MSE[width] - GAUSS_MSE[np.minimum(width + 1, max_width)])
    gain = np.where(width < max_width, gain, -1.0)
    j = gain.argmax(1)
    width[rows, j] += gain[rows, j] > 0
  return out


def transform_code_params(stats: Mapping[str, np.ndarray], code_bits: Sequence[int], key_weight: float = 1.0,
                          step_scale: float = 1.0) -> dict[str, np.ndarray]:
  """Means and bases (N, H, D, r) per (layer, head), and per code c (one per entry width E_c of
  `code_bits`, widest first) steps (the compander's scales: spread x standard deviation) and widths
  (float, integral) (N, H, C, r); bases truncated after the last component any head codes (at least 1)
  per tensor. The greedy allocation is nested: a narrower
  E gives every component at most the width a wider one gives it."""
  N, H, D = stats['k_var'].shape
  wv = np.concatenate([key_weight * stats['k_weight'] * stats['k_var'], stats['v_weight'] * stats['v_var']], -1)
  width = np.moveaxis(allocate_nested(wv.reshape(N * H, 2 * D), tuple(code_bits) or (0,)), 0, 1)
  width = width.reshape(N, H, -1, 2 * D)                                                # (N, H, C, 2D)
  params = {}
  for i, t in enumerate('kv'):
    w = width[..., i * D:(i + 1) * D]
    coded = np.nonzero((w > 0).reshape(-1, D).any(0))[0]
    r = int(coded.max()) + 1 if coded.size else 1          # past the last component any head codes
    sd = np.sqrt(stats[f'{t}_var'][:, :, None, :r])
    params[f'{t}_mean'] = stats[f'{t}_mean']
    params[f'{t}_basis'] = stats[f'{t}_basis'][..., :r]
    params[f'{t}_step'] = np.maximum(step_scale * sd * GAUSS_SPREAD[w[..., :r]], 1e-6)
    params[f'{t}_width'] = w[..., :r].astype(np.float32)
  return params
