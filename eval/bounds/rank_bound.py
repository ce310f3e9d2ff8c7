"""The rank (Eckart-Young) lower bound on the held-out caches the sweep measures (RESEARCH.md section 2).

At scale s a compressed cache's outputs are combinations of the vectors it stores plus the scale's own
S exact values. Let P_s project onto the orthogonal complement of the row space of the own values
V_s (S x D). Then (Z - A) P_s = Z P_s - A P_s with rank(Z P_s) <= m when the cache holds m value
vectors, and P_s is a contraction, so |Z - A|_F >= |A P_s - best rank-m|_F: the tail of the singular
values of A P_s beyond m (`compress.theory.bounds.rank_error`). Summed over layers, sequences, heads and
scales and divided by sum |A|^2 it bounds the aggregate relative error the sweep reports.

m at a budget of b bits: 'values' counts fp16 value vectors only (keys free, as the rate-distortion
bound): m = b // (D * 16); 'kv_entries' counts kept key+value entries: m = b // (2 D * 16). The bound
holds for caches of full-precision entries (`ENTRY_FAMILIES`: eviction, merging, matching, window);
quantised or projected caches hold more vectors per bit and may go below it, so it is drawn only
against those families. When S >= D (large scales) P_s = 0
and the scale contributes no bound.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from compress.core.budget import CacheGeometry
from eval.engine.sweep import bits_columns, CacheSet

ENTRY_FAMILIES = ('reference', 'eviction', 'merging', 'matching', 'window')   # what it bounds
SETTINGS = {'values': 1, 'kv_entries': 2}     # vectors per entry: m = bits // (k * D * kv_bits)
RESOLUTION = 1e-6       # relative errors below this are float32 rounding of the captured caches


def own_value_complement(v_XSD: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
  """(X, D, D) projectors onto the orthogonal complement of the row space of each v (X, S, D)."""
  v = np.asarray(v_XSD, np.float64)
  _, s, vh = np.linalg.svd(v, full_matrices=False)           # vh (X, r, D)
  keep = s > rtol * np.maximum(s.max(-1, keepdims=True), 1e-300)
  basis = vh * keep[..., None]
  eye = np.eye(v.shape[-1])
  return eye - np.einsum('xrd,xre->xde', basis, basis)


class RankBound:
  """Singular values of the projected exact outputs A_s P_s of every (layer, sequence, head, scale) of
  `data`, read batch by batch: only min(S, D) squared singular values per block are kept."""

  def __init__(self, data: CacheSet, batch: int = 16):
    g = CacheGeometry(data.patch_nums, data.head_dim)
    self.head_dim = data.head_dim
    self.s2: list[list[np.ndarray]] = [[] for _ in g.scale_sizes]   # per scale, per batch: (X, r) desc.
    self.total = 0.0
    for a, b in data.batches(batch):
      exact = np.asarray(data.exact(a, b), np.float64)                    # (N, b, H, L, D)
      self.total += float((exact ** 2).sum())
      v = data.numpy(a, b)['v'].astype(np.float64)
      for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
        A = exact[:, :, :, st:st + S].reshape(-1, S, self.head_dim)
        P = own_value_complement(v[:, :, :, st:st + S].reshape(-1, S, self.head_dim))
        self.s2[si].append(np.linalg.svd(np.einsum('xsd,xde->xse', A, P), compute_uv=False) ** 2)

  def rel_error(self, m: int) -> float:
    """Smallest aggregate relative error of any cache whose outputs use <= m stored vectors (0 below
    `RESOLUTION`: the captured caches are float32, the SVD's rounding tail is no bound)."""
    m = max(int(m), 0)
    tail = sum(float(s2[:, m:].sum()) for per in self.s2 for s2 in per)
    rel = float(np.sqrt(tail / max(self.total, 1e-300)))
    return rel if rel > RESOLUTION else 0.0

  def vectors(self, bits: int, setting: str, kv_bits: int = 16) -> int:
    if setting not in SETTINGS:
      raise ValueError(f'rank bound setting must be one of {sorted(SETTINGS)}, got {setting!r}')
    return int(bits) // (SETTINGS[setting] * self.head_dim * kv_bits)

  def curve(self, geometry: CacheGeometry, setting: str, points: int = 24) -> dict[str, np.ndarray]:
    """{'bits', 'rel_error'} at ~`points` vector counts from 0 to the peak cache (for plots)."""
    per = SETTINGS[setting] * self.head_dim * geometry.kv_bits
    top = geometry.full_bits // per                        # vectors the whole cache's bits pay for
    ms = np.unique(np.round(np.geomspace(1, top, points)).astype(int))
    ms = np.concatenate([[0], ms])
    return {'bits': ms * per, 'rel_error': np.array([self.rel_error(int(m)) for m in ms])}


def rows(bound: RankBound, geometry: CacheGeometry, budgets: Sequence[tuple[str, int]],
         settings: Sequence[str] = tuple(SETTINGS), dataset: str = 'val') -> list[dict]:
  """frontier.csv rows (method 'rank_bound', family 'bound') at every (budget label, budget bits)."""
  out = []
  for setting in settings:
    for label, bits in budgets:
      m = bound.vectors(bits, setting, geometry.kv_bits)
      out.append({'dataset': dataset, 'method': 'rank_bound', 'family': 'bound', 'setting': setting,
                  'budget': label, 'oracle': False, 'learned': False, 'deployable': False,
                  'budget_bits': bits, 'bits': bits, 'bits_mean': float(bits),
                  **bits_columns(bits, geometry), 'rel_error': bound.rel_error(m)})
  return out
