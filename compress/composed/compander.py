"""The composed family's scalar quantiser: a Gaussian compander with 2^w levels (w = 0..16 bits).

A coefficient x of a component with scale s (per head, component and code) is coded as

    c = clip(floor(2^w Phi(x / s)), 0, 2^w - 1)          Phi: the standard normal CDF

with s = a_w sd for a component of standard deviation sd (a_w: the spread below). The cell edges are
s Phi^-1(i / 2^w): dense where a Gaussian component's values are, wide in its tails, never clipping
(the outer cells reach +-inf). A code reads back as s r_w[c], the centroid of its cell under the
component's Gaussian N(0, (s / a_w)^2) (the MSE-optimal read-back of a cell); w = 0 reads 0 (the
component's mean).

With a_w the MSE-optimal spread for a unit Gaussian, this is within 1 % of the Lloyd-Max quantiser
where Max (1960) tabulates it (2-5 bits) and, from 4 bits on, well below the MSE-optimal uniform
quantiser (0.83x its MSE at 4 bits, 0.48x at 8, 0.22x at 16): the uniform quantiser's step must grow
with its range, the compander's cells follow the density (Panter and Dite 1951: MSE -> (sqrt(3) pi / 2)
4^-w, spread -> sqrt(3)).

Tables (computed here once in float64, checked against numerical integration in
tests/test_composed_codes.py): SPREAD[w] = a_w and MSE[w] per unit variance (allocation's distortion
curve; from 12 bits on, where the spread is sqrt(3) to 1e-3 and the float64 sum 1 - sum P_c mean_c^2
cancels, the 11-bit MSE x 4^-(w - 11), its high-rate law), and per width w = 1..16, concatenated: the
cell edges EDGES (float32, 2^w - 1 per width, from offset 2^w - w - 1) and the centroids CENTROIDS
(float32, 2^w per width, from offset 2^w - 2), both in units of s. A code is the cell whose float32
edges hold x / s: 2^w Phi(x / s) (Phi in float32 from erf, within ~1e-7 of the exact one) is within a
hair of the truth, so only its nearest edge can be on the wrong side; one comparison with that edge
gives the exact cell (and numpy reproduces it). The tables are the quantiser's definition, the same
for every model and budget, like a uniform quantiser's formula: no state or parameter holds them (1 MB
of constants; computed at import in ~20 ms).

Re-encoding a read-back value with the same width and scale gives its code again (a centroid lies
inside its cell, >= 4e-6 from its edges in probability at 16 bits, far beyond float32's error; test:
every code of every width), so kept entries never drift.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize, special

from compress.composed.bitstream import MAX_WIDTH


def _cells(w: int, spread: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Edges (2^w + 1) of the unit Gaussian's cells at spread `spread`, their probabilities and the
  numerators phi(lo) - phi(hi) of their centroids."""
  n = 2 ** w
  edges = spread * special.ndtri(np.arange(n + 1) / n)
  pdf = np.exp(-0.5 * np.square(edges)) / np.sqrt(2 * np.pi)
  lo, hi = edges[:-1], edges[1:]
  # the upper cells' mass from the upper tail: Phi(hi) - Phi(lo) would cancel there
  mass = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))
  return edges, mass, pdf[:-1] - pdf[1:]


def centroid_mse(w: int, spread: float) -> float:
  """MSE per unit variance of the w-bit compander at `spread` with centroid read-back:
  1 - sum_c P_c mean_c^2 (the read-back removes each cell's mean)."""
  if w == 0:
    return 1.0
  _, p, num = _cells(w, spread)
  return float(1.0 - np.sum(np.square(num) / p))


def _spread(w: int) -> float:
  """The MSE-optimal spread of width w (1 bit: any spread gives the sign; sqrt(3) is used)."""
  if w <= 1:
    return float(np.sqrt(3.0))
  if w > 11:               # the optimum is sqrt(3) to 1e-3, and the MSE's float64 sum loses digits
    return float(np.sqrt(3.0))
  res = optimize.minimize_scalar(lambda a: centroid_mse(w, a), bounds=(1.0, 2.5), method='bounded',
                                 options={'xatol': 1e-7})
  return float(res.x)


def _mse(w: int, spread: float) -> float:
  """MSE per unit variance at width w: the centroid sum to 11 bits, then the high-rate law 4^-w."""
  if w <= 11:
    return centroid_mse(w, spread)
  return float(centroid_mse(11, _spread(11)) * 4.0 ** (11 - w))


SPREAD = np.array([1.0] + [_spread(w) for w in range(1, MAX_WIDTH + 1)])
MSE = np.array([1.0] + [_mse(w, SPREAD[w]) for w in range(1, MAX_WIDTH + 1)])


def _tables() -> tuple[np.ndarray, np.ndarray]:
  edges, centroids = [], []
  for w in range(1, MAX_WIDTH + 1):
    edges.append(special.ndtri(np.arange(1, 2 ** w) / 2 ** w))
    _, p, num = _cells(w, SPREAD[w])
    centroids.append(num / p / SPREAD[w])            # the cell's mean, in units of the scale s
  return np.concatenate(edges).astype(np.float32), np.concatenate(centroids).astype(np.float32)


EDGES, CENTROIDS = _tables()


def _levels(width: jax.Array) -> jax.Array:
  """2^w as int32 (exactly: a float exp2 may land below the integer)."""
  return jnp.left_shift(1, jnp.round(width).astype(jnp.int32))


def quantize(coef: jax.Array, scale: jax.Array, width: jax.Array) -> jax.Array:
  """Codes in [0, 2^w - 1] (float) of coefficients (..., R) (scale, width broadcast on the last axis):
  the cell of EDGES that holds coef / scale."""
  z = coef / scale
  w = jnp.round(width).astype(jnp.int32)
  n = jnp.left_shift(1, w)
  # Phi from erf alone (jax's ndtr also evaluates erfc: 2.5x the time), within ~1e-7 of Phi: n Phi(z)
  # is within a hair of the truth, so the nearest edge to it is the only one z may be on the wrong
  # side of; one comparison with that edge gives the exact cell
  u = (0.5 + 0.5 * jax.lax.erf(z * np.float32(1 / np.sqrt(2)))) * n.astype(jnp.float32)
  k = jnp.clip(jnp.round(u).astype(jnp.int32), 0, n)                  # nearest edge: k / n
  inner = (k >= 1) & (k <= n - 1)
  edge = jnp.take(jnp.asarray(EDGES), jnp.clip(n - w - 2 + k, 0, EDGES.size - 1))   # width w's from n - w - 1
  return jnp.where(inner, k - (z < edge), jnp.minimum(k, n - 1)).astype(jnp.float32)


def read_back(code: jax.Array, width: jax.Array) -> jax.Array:
  """The read-back value of codes in units of their scale (width 0: 0)."""
  idx = _levels(width) - 2 + code.astype(jnp.int32)
  back = jnp.take(jnp.asarray(CENTROIDS), jnp.clip(idx, 0, CENTROIDS.size - 1))
  return jnp.where(jnp.round(width) == 0, 0.0, back)


def dequantize(code: jax.Array, scale: jax.Array, width: jax.Array) -> jax.Array:
  return read_back(code, width) * scale
