"""The composed family's quantiser in float64 numpy, written from compress/composed/compander.py's
docstring (not its code or tables): 2^w cells with edges Phi^-1(i / 2^w) in units of the scale s, a
code is the cell holding x / s (at float32 edges, as the docstring says), and reads back as the cell's
centroid under N(0, (s / a_w)^2) (a_w: the spread); width 0 reads 0."""
from __future__ import annotations

import functools

import numpy as np
from scipy import special


@functools.lru_cache(maxsize=None)
def edges(w: int) -> np.ndarray:
  """The 2^w - 1 inner cell edges of width w, float32 (the docstring's), as float64."""
  return special.ndtri(np.arange(1, 2 ** w) / 2 ** w).astype(np.float32).astype(np.float64)


def code(z, w: int) -> np.ndarray:
  """Cell index of z = x / s (float32 quotient, as the JAX path computes it) at width w."""
  return np.zeros(np.shape(z), np.int64) if w == 0 else np.searchsorted(edges(w), z, side='right')


def centroid(c, w: int, spread: float) -> np.ndarray:
  """E[z | cell c] for z ~ N(0, 1 / spread^2), in units of s: (phi(a lo) - phi(a hi)) / (a (Phi(a hi) -
  Phi(a lo))), from the exact edges; width 0: 0."""
  c = np.asarray(c)
  if w == 0:
    return np.zeros(c.shape)
  e = np.concatenate([[-np.inf], special.ndtri(np.arange(1, 2 ** w) / 2 ** w), [np.inf]])
  lo, hi = spread * e[c], spread * e[c + 1]
  pdf = lambda x: np.exp(-0.5 * np.square(x)) / np.sqrt(2 * np.pi)
  # Phi(hi) - Phi(lo) without cancellation in the upper tail
  mass = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))
  return (pdf(lo) - pdf(hi)) / mass / spread


def quantise_read_back(coef, scale, width, spread) -> np.ndarray:
  """Coefficients (..., R) coded and read back; scale, width, spread (R,) per component (float32
  quotient coef / scale, as the JAX path)."""
  coef = np.asarray(coef)
  out = np.zeros(coef.shape)
  for j in range(coef.shape[-1]):
    w = int(round(float(width[j])))
    z = (np.asarray(coef[..., j], np.float32) / np.float32(scale[j])).astype(np.float64)
    out[..., j] = centroid(code(z, w), w, float(spread[j])) * float(scale[j])
  return out
