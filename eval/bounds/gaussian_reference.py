"""An ideal-code reference on the held-out caches: the rate-distortion curve of a Gaussian source with
the caches' measured second-order statistics. A reference, NOT a lower bound.

Model (as the hard-instance bound, `compress.theory.bounds`): keys, queries and the attention pattern
are free side information; only the cached values cost bits. At scale s the queries' attention
probabilities on the cached prefix form P_s (S x T, exact keys); stacked over the scales they form M
(one per layer, sequence and head). The cached values are modelled as T i.i.d. Gaussian rows with the
covariance C measured per (layer, head) over the held-out sequences (the mean is free side information,
like a shared PCA mean). Then the outputs' cached part M V has independent components of variance
lambda_i(M^T M) * mu_j(C), and the fewest bits any code of such values needs for an aggregate relative
error eps (relative to the exact outputs' energy, own-scale part included, as the sweep's rel_error)
follow by reverse water-filling over all components of all heads at once (`water_filling_curve`).

It speaks to every cache, quantised and projected ones included, but only for Gaussian values: real
values are not Gaussian, so a method can land below it. Bits are per (sequence, layer, head), divided
by the geometry's coordinates like every frontier point.
"""
from __future__ import annotations

import numpy as np

from compress.core.budget import CacheGeometry
from compress.theory import bounds
from eval.engine.sweep import CacheSet

LABEL = 'Gaussian ideal code (reference, not a bound)'
# float64 bytes of one batch's attention temporaries (logits, probabilities, T x T Gram matrices): the
# batch is lowered to fit (at d16, 680 tokens, ~1.4 GB per sequence: one sequence at a time)
WORK_BYTES = 2 ** 30


def _softmax_prefix(q_XSD: np.ndarray, k_XLD: np.ndarray, start: int) -> np.ndarray:
  """(X, S, start) attention probabilities of the queries on the first `start` keys, the softmax taken
  over every key they see (prefix and their own scale)."""
  logits = np.einsum('xsd,xld->xsl', q_XSD, k_XLD)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  return (p / p.sum(-1, keepdims=True))[..., :start]


def components(data: CacheSet, batch: int = 16) -> tuple[np.ndarray, float, int]:
  """(component variances, total exact output energy, head instances = layers x sequences x heads).

  Reads `data` batch by batch (two passes: value covariances, then attention Gram spectra); keeps the
  T eigenvalues of M^T M per (layer, sequence, head) and forms the T x D products at the end."""
  g = CacheGeometry(data.patch_nums, data.head_dim)
  T, D = g.prefix_tokens, data.head_dim
  N, H = data.num_layers, data.num_heads
  per_sequence = 8 * N * H * (3 * max(g.scale_sizes) * g.num_tokens + T * T)
  batch = max(1, min(batch, WORK_BYTES // per_sequence))
  s1, s2, count = np.zeros((N, H, D)), np.zeros((N, H, D, D)), 0
  for a, b in data.batches(batch):
    v_pre = data.numpy(a, b)['v'][:, :, :, :T].astype(np.float64)            # (N, b, H, T, D)
    s1 += v_pre.sum(axis=(1, 3))
    s2 += np.einsum('nbhtd,nbhte->nhde', v_pre, v_pre)
    count += v_pre.shape[1] * T
  mean = s1 / count
  cov_NHDD = s2 / count - np.einsum('nhd,nhe->nhde', mean, mean)
  mu_NHD = np.clip(np.linalg.eigvalsh(cov_NHDD), 0.0, None)
  lams, total = [], 0.0
  for a, b in data.batches(batch):
    total += float((np.asarray(data.exact(a, b), np.float64) ** 2).sum())
    x = data.numpy(a, b)
    q, k = x['q'].astype(np.float64), x['k'].astype(np.float64)
    nb = q.shape[1]
    gram = np.zeros((N * nb * H, T, T))
    for si in range(1, len(g.patch_nums)):
      st, S = g.scale_starts[si], g.scale_sizes[si]
      qs = q[:, :, :, st:st + S].reshape(-1, S, D)
      ks = k[:, :, :, :st + S].reshape(-1, st + S, D)
      P = _softmax_prefix(qs, ks, st)                                    # (X, S, st)
      gram[:, :st, :st] += np.einsum('xsi,xsj->xij', P, P)
    lams.append(np.clip(np.linalg.eigvalsh(gram), 0.0, None).reshape(N, nb, H, T))
  lam = np.concatenate(lams, axis=1)                                       # (N, n, H, T)
  return (lam[..., :, None] * mu_NHD[:, None, :, None, :]).ravel(), total, N * data.num_sequences * H


def curve(data: CacheSet, geometry: CacheGeometry, batch: int = 16, points: int = 48) -> dict:
  """{'bits' (per head), 'bits_per_coordinate', 'rel_error'} of the reference, bits increasing, from 0
  up to the fp16 cache's bits (16 per coordinate)."""
  var, total, heads = components(data, batch)
  c = bounds.water_filling_curve(var, total, 8 * points, depth=1e-24)
  bits = c['bits'] / heads
  keep = np.flatnonzero(bits <= geometry.fp16_bits)
  keep = keep[np.unique(np.linspace(0, keep.size - 1, points).round().astype(int))]
  return {'bits': bits[keep], 'bits_per_coordinate': bits[keep] / geometry.coordinates,
          'rel_error': c['rel_error'][keep]}
