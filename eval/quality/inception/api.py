"""Inception (FID) features of images: `inception_features(images)` -> (N, 2048) float64.

The features are the FID InceptionV3's pool3 activations (network.py) with the detector's own
preprocessing, on images (N, H, W, 3) given as uint8 (0..255) or floats in [0, 1], any size (resized
to 299 as the reference does). Published-style FID / KID follow from eval/quality/distribution.py's
`fid` / `kid` on two such feature sets. The weights come from weights.py (`load_inception`); nothing is
downloaded.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.quality.inception.network import FEATURES, InceptionV3, preprocess
from eval.quality.inception.weights import cached_inception

BATCH = 32          # images per jitted call (the last batch is padded: one compile per image size)


@nnx.jit
def _forward(model: InceptionV3, x_BHWC: jax.Array) -> jax.Array:
  return model(preprocess(x_BHWC))


def as_unit_images(images_NHWC: np.ndarray) -> np.ndarray:
  """float32 images in [0, 1] from uint8 or float (N, H, W, 3); anything else raises ValueError."""
  x = np.asarray(images_NHWC)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'Inception features take RGB images (N, H, W, 3), got shape {x.shape}')
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'images must be uint8 or floats in [0, 1], got dtype {x.dtype}')
  lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
  if lo < -1e-3 or hi > 1 + 1e-3 or not np.isfinite(lo + hi):
    raise ValueError(f'float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]'
                     + ('; for images in [-1, 1] pass (x + 1) / 2' if lo < 0 else ''))
  return x.astype(np.float32)


def inception_features(images_NHWC: np.ndarray, model: InceptionV3 | None = None, *,
                       weights: str | os.PathLike | None = None, batch: int = BATCH) -> np.ndarray:
  """(N, 2048) float64 pool3 features of images (N, H, W, 3), uint8 or floats in [0, 1], under `model`
  (default: `load_inception(weights)`, loaded once per process)."""
  if model is None:
    model = cached_inception(None if weights is None else os.fspath(weights))[0]
  x = as_unit_images(images_NHWC)
  N = len(x)
  if N == 0:
    return np.zeros((0, FEATURES))
  b = min(int(batch), N)
  out = []
  for i in range(0, N, b):
    chunk = x[i:i + b]
    pad = b - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(_forward(model, jnp.asarray(chunk)), np.float64)[:b - pad])
  return np.concatenate(out)
