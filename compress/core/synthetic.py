"""Synthetic caches with the VAR scale structure, for tests and quick experiments (no model needed).

Tokens of every scale sit on a pn x pn grid; keys and values are smooth functions of the position in
the image plus noise, so that neighbouring and cross-scale tokens correlate (as in real VAR caches),
with a few heavy "sink" directions. Queries are pre-scaled.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_coords(patch_nums: tuple[int, ...]) -> np.ndarray:
  """(L, 3): (y, x) cell centres in [0, 1) and the scale fraction of every token."""
  rows = []
  K = len(patch_nums)
  for si, pn in enumerate(patch_nums):
    yy, xx = np.meshgrid((np.arange(pn) + 0.5) / pn, (np.arange(pn) + 0.5) / pn, indexing='ij')
    rows.append(np.stack([yy.ravel(), xx.ravel(), np.full(pn * pn, si / max(K - 1, 1))], 1))
  return np.concatenate(rows).astype(np.float32)


def var_like_qkv(key: jax.Array, patch_nums: tuple[int, ...], *, layers: int = 2, batch: int = 2,
                 heads: int = 2, head_dim: int = 16, logit_scale: float = 4.0, noise: float = 0.3
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(q, k, v), each (layers, batch, heads, L, head_dim) float32; k L2-normalised as with attn_l2_norm."""
  coords = jnp.asarray(token_coords(patch_nums))                              # (L, 3)
  L = coords.shape[0]
  kf, kq, kk, kv, kn = jax.random.split(key, 5)
  freqs = jax.random.normal(kf, (layers, heads, 3, head_dim)) * 3.0
  phase = coords @ freqs                                                     # (N, H, L, D)
  base = jnp.sin(phase)[:, None]                                             # (N, 1, H, L, D)
  shp = (layers, batch, heads, L, head_dim)
  k = base + noise * jax.random.normal(kk, shp)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jnp.cos(phase)[:, None] + noise * jax.random.normal(kv, shp)
  q = base + noise * jax.random.normal(kq, shp)
  q = logit_scale * q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  return q, k, v
