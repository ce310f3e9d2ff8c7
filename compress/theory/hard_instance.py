"""The hard instance of the compression lower bounds (`hard_sweep` measures every compressor on it).

Instance (RESEARCH.md section 2): T cached tokens with keys of i.i.d. entries +-1/sqrt(d) (unit norm,
pairwise coherence mu) and values i.i.d. N(0, 1) or +-1; probe j is the query beta * k_{target_j}
(queries are pre-scaled: logits = q.k), so nearly all its attention falls on its target token; the
probe's own key and value are 0. Exactly one cache of T tokens has to answer every probe.

Both versions are a `CacheGeometry` and (layers=1, B=1, H=1, L, d) q, k, v tensors that
`compress.run_teacher_forced` consumes:
- VAR block version (`patch_nums`): the prefix (every scale but the last, T = sum pn^2 of those) is the
  cache and the last scale's pn_K^2 queries are the probes.
- flat version (`n`): the same with patch_nums = n as a sum of at most 4 squares (the stream arrives
  in a few chunks) followed by a probe scale of side ceil(sqrt(n)). Chunking can only help a compressor
  (the bound holds for any encoder), and the probes' own zero keys only add to the (reported) leak.
Probe j targets token perm[j mod T] for a seeded permutation: every token is probed when the probe scale
has >= T queries, a random subset otherwise. Prefix queries are 0 (they carry no information on the
probes; their outputs are not scored). Errors are measured on the probes only.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.budget import CacheGeometry
from compress.theory import bounds

VAR_256PX = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VALUE_KINDS = ('gaussian', 'pm1')


def _squares(n: int, k: int) -> tuple[int, ...] | None:
  """Sides of at most k squares summing to n, largest first (None if there are none)."""
  if n == 0:
    return ()
  if k == 0:
    return None
  for a in range(math.isqrt(n), 0, -1):
    if a * a * k < n:
      return None
    rest = _squares(n - a * a, k - 1)
    if rest is not None:
      return (a,) + rest
  return None


def flat_patch_nums(n: int) -> tuple[int, ...]:
  """A schedule whose prefix holds exactly n tokens (<= 4 squares, Lagrange) + a probe scale."""
  if n < 1:
    raise ValueError(f'the flat instance needs n >= 1 cached tokens, got {n}')
  sides = next(s for k in range(1, 5) if (s := _squares(n, k)) is not None)
  return tuple(sorted(sides)) + (math.isqrt(n - 1) + 1,)


@dataclasses.dataclass(frozen=True, eq=False)
class HardInstance:
  """One draw of the hard instance. Arrays are numpy; q, k, v are (1, 1, 1, L, d) jax float32.

  keys_TD / values_TD: the cached tokens; target_P: the token each probe targets; attn_PT (float64):
  the probes' attention probabilities on the cached tokens (the S of the rate-distortion bound: it
  includes the dilution by the probe scale's own zero-value tokens); exact_PD = attn_PT @ values_TD.
  mu: max_{i != j} k_i . k_j (signed); leak: max over probes of the attention mass off the target;
  cond: condition number of softmax(beta K K^T) (row-wise, T x T).
  """
  geometry: CacheGeometry
  flat: bool
  keys_TD: np.ndarray
  values_TD: np.ndarray
  target_P: np.ndarray
  beta: float
  xi: float | None
  values: str
  seed: int
  mu: float
  leak: float
  cond: float
  attn_PT: np.ndarray
  exact_PD: np.ndarray
  q: jax.Array
  k: jax.Array
  v: jax.Array

  @property
  def T(self) -> int:
    return self.keys_TD.shape[0]

  @property
  def d(self) -> int:
    return self.keys_TD.shape[1]

  @property
  def num_probes(self) -> int:
    return self.target_P.shape[0]

  @functools.cached_property
  def eigenvalues(self) -> np.ndarray:
    """Eigenvalues of S S^T for the rate-distortion bound."""
    return bounds.gram_eigenvalues(self.attn_PT)

  @property
  def bound_applies(self) -> bool:
    """The rate-distortion curve is a lower bound for Gaussian values only (+-1 values have 1 bit)."""
    return self.values == 'gaussian'

  def probe_outputs(self, out_NBHLD: jax.Array) -> np.ndarray:
    """(P, d) probe rows of `run_teacher_forced(...)['out']`."""
    return np.asarray(out_NBHLD[0, 0, 0, self.geometry.prefix_tokens:], np.float64)

  def rel_error(self, out_NBHLD: jax.Array) -> float:
    """Aggregate relative L2 error of the probe outputs against the exact ones."""
    z = self.probe_outputs(out_NBHLD)
    return float(np.sqrt(((z - self.exact_PD) ** 2).sum() / (self.exact_PD ** 2).sum()))

  def lower_bound_bits(self, eps) -> np.ndarray:
    """Rate-distortion bits needed for relative error eps (NaN where the bound does not apply)."""
    if not self.bound_applies:
      return np.full(np.shape(eps), np.nan)
    return bounds.rd_bits(eps, self.eigenvalues, self.d)

  def min_error(self, bits) -> np.ndarray:
    """Smallest relative error a `bits`-bit cache can reach (NaN where the bound does not apply)."""
    if not self.bound_applies:
      return np.full(np.shape(bits), np.nan)
    return bounds.rd_min_error(bits, self.eigenvalues, self.d)

  def calibration(self) -> dict[str, jax.Array]:
    """{'q', 'k', 'v'}: (layers=1, B=1, H=1, L, d) captures, the form calibrated compressors take."""
    return {'q': self.q, 'k': self.k, 'v': self.v}

  def params(self) -> dict[str, Any]:
    """Instance parameters for reports."""
    return {'instance': 'flat' if self.flat else 'var',
            'patch_nums': ' '.join(map(str, self.geometry.patch_nums)), 'T': self.T, 'probes': self.num_probes, 'd': self.d, 'beta': self.beta, 'xi': self.xi,
            'mu': self.mu, 'leak': self.leak, 'cond': self.cond, 'values': self.values, 'seed': self.seed,
            'kv_dtype': self.geometry.kv_dtype}


def default_beta(T: int, mu: float, xi: float) -> float:
  """beta = ln(T / xi) / (1 - mu): the T - 1 other tokens then carry at most ~xi of a probe's mass."""
  if not 0 < xi < 1:
    raise ValueError(f'xi (tolerated off-target mass) must be in (0, 1), got {xi}')
  if mu >= 1 - 1e-9:
    raise ValueError(f'two keys coincide (mu = {mu:.3f}): no beta isolates them; raise d '
                     f'(d >= 8 ln T = {8 * math.log(max(T, 2)):.0f} keeps mu <~ 0.5) or give beta')
  return math.log(T / xi) / (1 - mu)


def make_instance(*, n: int | None = None, patch_nums: Sequence[int] | None = None, d: int = 64,
                  beta: float | None = None, xi: float = 0.01, values: str = 'gaussian', seed: int = 0,
                  kv_dtype: str = 'float16') -> HardInstance:
  """Draws the flat (`n` cached tokens) or VAR block (`patch_nums`) hard instance; see the module doc.

  beta: max logit (None: `default_beta(T, mu, xi)`); values: 'gaussian' | 'pm1'.
  """
  if (n is None) == (patch_nums is None):
    raise ValueError('give exactly one of n (flat instance: n cached tokens) or patch_nums (VAR block '
                     'instance: the prefix scales are cached, the last scale probes)')
  if values not in VALUE_KINDS:
    raise ValueError(f'values must be one of {VALUE_KINDS}, got {values!r}')
  if d < 1:
    raise ValueError(f'd (head dim) must be >= 1, got {d}')
  flat = n is not None
  pn = flat_patch_nums(int(n)) if flat else tuple(int(p) for p in patch_nums)
  geometry = CacheGeometry(pn, head_dim=d, kv_dtype=kv_dtype)
  T, P = geometry.prefix_tokens, geometry.scale_sizes[-1]
  if T < 2:
    raise ValueError(f'the cache must hold >= 2 tokens, patch_nums {pn} cache {T}')
  if d < 60 and 2 ** d < T:
    raise ValueError(f'{T} cached tokens need distinct +-1 keys but d = {d} has only {2 ** d}: raise d '
                     f'(d >= 8 ln T = {8 * math.log(T):.0f} keeps mu <~ 0.5)')
  rng = np.random.default_rng(seed)
  signs = rng.integers(0, 2, (T, d)) * 2 - 1
  while True:  # redraw exact duplicates (no beta could tell them apart)
    _, first = np.unique(signs, axis=0, return_index=True)
    dup = np.setdiff1d(np.arange(T), first)
    if not dup.size:
      break
    signs[dup] = rng.integers(0, 2, (dup.size, d)) * 2 - 1
  keys = signs.astype(np.float32) / np.float32(math.sqrt(d))
  vals = (rng.standard_normal((T, d)) if values == 'gaussian'
          else rng.integers(0, 2, (T, d)) * 2.0 - 1).astype(np.float32)
  target = rng.permutation(T)[np.arange(P) % T]
  gram = keys.astype(np.float64) @ keys.T.astype(np.float64)
  mu = float((gram - 2 * np.eye(T)).max())  # signed: only keys pointing the same way take mass
  if beta is None:
    beta = default_beta(T, mu, xi)
  elif not beta > 0:
    raise ValueError(f'beta (the max logit) must be > 0, got {beta}')
  else:
    xi = None
  probes = (np.float32(beta) * keys[target]).astype(np.float32)

  # attention of each probe over [T cached tokens, its scale's P zero keys] (as evaluated, float64)
  logits = np.concatenate([probes.astype(np.float64) @ keys.T.astype(np.float64), np.zeros((P, P))], 1)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  attn = p[:, :T]
  leak = float((1 - attn[np.arange(P), target]).max())
  s = np.exp(beta * (gram - gram.max(1, keepdims=True)))
  cond = float(np.linalg.cond(s / s.sum(1, keepdims=True)))

  L = geometry.num_tokens
  q = np.zeros((L, d), np.float32)
  q[T:] = probes
  k, v = np.zeros((L, d), np.float32), np.zeros((L, d), np.float32)
  k[:T], v[:T] = keys, vals
  as_nbhld = lambda x: jnp.asarray(x)[None, None, None]
  return HardInstance(geometry=geometry, flat=flat, keys_TD=keys, values_TD=vals, target_P=target,
                      beta=float(beta), xi=xi, values=values, seed=seed, mu=mu, leak=leak, cond=cond,
                      attn_PT=attn, exact_PD=attn @ vals.astype(np.float64),
                      q=as_nbhld(q), k=as_nbhld(k), v=as_nbhld(v))


def redraw(inst: HardInstance, seed: int) -> HardInstance:
  """An independent draw with the same schedule, d, beta and value law (e.g. for calibration)."""
  size = {'n': inst.T} if inst.flat else {'patch_nums': inst.geometry.patch_nums}
  return make_instance(**size, d=inst.d, beta=inst.beta, values=inst.values, seed=seed,
                       kv_dtype=inst.geometry.kv_dtype)
