"""Distances between two sets of images in classifier features: FID and KID, with bootstrap intervals.

Both work on feature vectors (N, D), in float64 numpy. The closed loop (eval/quality/closed_loop.py)
feeds them the penultimate-layer features (D = 128) of the shipped built-in classifier
(eval/quality/classifier.py `features`, eval/quality/assets/classifier_32px.npz), a small CNN trained on
the built-in dataset's 32 px images of 12 classes. So FID here is a distance in the features of that
domain, not ImageNet (Inception) FID: its values are not comparable with published FIDs.

- `fid(a, b)`: the Frechet distance between the Gaussian fits (mean, covariance with ddof 1) of the two
  sets, |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). The trace of the square root is
  the nuclear norm (sum of singular values) of A B^T / sqrt((N-1)(M-1)) (A, B: the centred features;
  both matrices have the same nonzero spectrum), computed exactly from an (N, M) SVD when a set has at
  most D images, else with the (D, D) square root of A^T A in place of A; no sqrtm of a singular
  matrix (covariances of N <= D images are). Rounding can leave |fid| ~ 1e-12 where it is 0.
- `kid(a, b, paired)`: an unbiased estimate of the squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018), on the whole sets (their KID averages over subsets
  of 1000; ours are smaller). Unpaired (independent sets of N and M images): their estimator,
  sum_{i!=j} k(a_i, a_j) / (N(N-1)) + sum_{i!=j} k(b_i, b_j) / (M(M-1)) - 2 sum_{i,j} k(a_i, b_j) / (NM).
  Paired (N = M, a_i and b_i belong together: the same label, and for the full cache against a
  compressed one the same seed): the U-statistic over pairs (Gretton et al. 2012, MMD_u^2), the same
  with the cross sum over i != j only; it stays unbiased however a_i depends on b_i, where the
  unpaired form would count the dependent pairs (i, i). Either can be negative (its expectation is 0
  when the two distributions are equal). For one image per label (the closed loop) the paired form
  compares distinct labels only: it estimates (|sum_c d_c|^2 - sum_c |d_c|^2) / (n(n-1)), d_c the
  kernel-mean difference of label c, which is 0 when every label's distributions agree. A set against
  itself: paired, every term cancels (kid(a, a, True) = 0 up to rounding); unpaired, the pairs (i, i) make
  kid(a, a) = -2 (mean k(a_i, a_i) - mean_{i!=j} k(a_i, a_j)) / N <= 0; the biased V-statistic
  `mmd2_biased(a, a)` is 0 (tests/test_distribution_metrics.py checks all three).
- `fid_ci`, `kid_ci`: (estimate, low, high) with a bootstrap interval over images. `paired=True`
  resamples one set of indices for both sets, keeping the pairs (and the labels of both sets
  equal); `paired=False` resamples each set on its own. The interval is the estimate -+ z x the
  standard deviation of 1000 resampled statistics (the normal bootstrap interval; FID's low end
  clipped at 0, KID's may be negative, as the estimate can be): percentile intervals do not fit
  these statistics, because a resample repeats images and FID and the U-statistics grow when a set
  holds fewer distinct images (12 closed-loop images: the resampled FIDs sit mostly above the
  estimate, and a percentile interval of KID can miss it); the spread of the draws is what is used.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

CHUNK = 256          # bootstrap draws computed at once (bounds the (draws, N, D) temporaries)
DRAWS = 1000         # bootstrap draws of an interval


def _check(a_ND, b_MD, least: int, paired: bool = False) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a_ND, np.float64), np.asarray(b_MD, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f'FID / KID take two feature arrays (N, D) and (M, D), got {a.shape} and {b.shape}')
  if min(len(a), len(b)) < least:
    raise ValueError(f'FID / KID need at least {least} images per set, got {len(a)} and {len(b)}')
  if paired and len(a) != len(b):
    raise ValueError(f'paired sets must be equally long (the i-th images belong together), got '
                     f'{len(a)} and {len(b)} images')
  return a, b


# ---- FID -----------------------------------------------------------------------------------------
def _zeroed(lam_XD: np.ndarray) -> np.ndarray:
  """Eigenvalues of symmetric PSD matrices with those at the rounding level (D eps max) set to 0: a
  singular matrix has them, and their square roots would add ~sqrt(eps) of error each."""
  tol = lam_XD.shape[-1] * np.finfo(np.float64).eps * np.abs(lam_XD).max(-1, keepdims=True)
  return np.where(lam_XD > tol, lam_XD, 0.0)


def _trace_sqrt_product(A_xND: np.ndarray, B_xMD: np.ndarray) -> np.ndarray:
  """tr (Ga^1/2 Gb Ga^1/2)^1/2 with Ga = A^T A, Gb = B^T B (leading axes batched): the nuclear norm of
  A B^T, or of Ga^1/2 B^T (same singular values: both Gram matrices are B Ga B^T) when both sets
  have more images than features."""
  N, M, D = A_xND.shape[-2], B_xMD.shape[-2], A_xND.shape[-1]
  if min(N, M) > D:
    w, V = np.linalg.eigh(A_xND.swapaxes(-1, -2) @ A_xND)
    A_xND = (V * np.sqrt(_zeroed(w))[..., None, :]) @ V.swapaxes(-1, -2)     # Ga^1/2 (D, D)
  return np.linalg.svd(A_xND @ B_xMD.swapaxes(-1, -2), compute_uv=False).sum(-1)


def _fid(a_xND: np.ndarray, b_xMD: np.ndarray) -> np.ndarray:
  N, M = a_xND.shape[-2], b_xMD.shape[-2]
  mu_a, mu_b = a_xND.mean(-2), b_xMD.mean(-2)
  A, B = a_xND - mu_a[..., None, :], b_xMD - mu_b[..., None, :]
  tr_a, tr_b = (A * A).sum((-2, -1)) / (N - 1), (B * B).sum((-2, -1)) / (M - 1)
  cross = _trace_sqrt_product(A, B) / np.sqrt((N - 1) * (M - 1))
  return ((mu_a - mu_b) ** 2).sum(-1) + tr_a + tr_b - 2 * cross


def fid(a_ND, b_MD) -> float:
  """Frechet distance between the Gaussian fits of two feature sets (N, D) and (M, D), N, M >= 2; a
  squared distance, so a value below 0 (rounding, ~1e-16 for two sets that agree to float rounding) is
  reported as 0, as the interval's low end is."""
  a, b = _check(a_ND, b_MD, 2)
  return max(float(_fid(a, b)), 0.0)


def frechet_distance(mu_a_D, cov_a_DD, mu_b_D, cov_b_DD) -> float:
  """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two Gaussians given by their
  parameters (covariances symmetric positive semi-definite)."""
  mu_a, mu_b = np.asarray(mu_a_D, np.float64), np.asarray(mu_b_D, np.float64)
  sa, sb = np.asarray(cov_a_DD, np.float64), np.asarray(cov_b_DD, np.float64)
  root = lambda s: (lambda w, V: (V * np.sqrt(np.clip(w, 0, None))) @ V.T)(*np.linalg.eigh(s))
  cross = np.linalg.svd(root(sa) @ root(sb), compute_uv=False).sum()      # tr (Sa^1/2 Sb Sa^1/2)^1/2
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


# ---- KID -----------------------------------------------------------------------------------------
def polynomial_kernel(x_ND, y_MD) -> np.ndarray:
  """(N, M) k(x, y) = (x.y / D + 1)^3."""
  x, y = np.asarray(x_ND, np.float64), np.asarray(y_MD, np.float64)
  return (x @ y.T / x.shape[1] + 1) ** 3


def _kid(kaa_xNN: np.ndarray, kbb_xMM: np.ndarray, kab_xNM: np.ndarray, paired: bool) -> np.ndarray:
  """The unbiased MMD^2 from the three kernel matrices (leading axes batched); paired: the cross
  term without its diagonal (the pairs i = i, dependent, are left out)."""
  N, M = kaa_xNN.shape[-1], kbb_xMM.shape[-1]
  off = lambda k, n: (k.sum((-2, -1)) - np.trace(k, axis1=-2, axis2=-1)) / (n * (n - 1))
  cross = off(kab_xNM, N) if paired else kab_xNM.mean((-2, -1))
  return off(kaa_xNN, N) + off(kbb_xMM, M) - 2 * cross


def kid(a_ND, b_MD, paired: bool = False) -> float:
  """Unbiased squared MMD (cubic polynomial kernel) between two feature sets, N, M >= 2; `paired`
  (N = M, the i-th rows belong together): the U-statistic over pairs (see the module doc)."""
  a, b = _check(a_ND, b_MD, 2, paired)
  return float(_kid(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b), paired))


def mmd2_biased(a_ND, b_MD) -> float:
  """The biased (V-statistic) squared MMD, diagonals included: 0 for a set against itself."""
  a, b = _check(a_ND, b_MD, 1)
  return float(polynomial_kernel(a, a).mean() + polynomial_kernel(b, b).mean()
               - 2 * polynomial_kernel(a, b).mean())


# ---- bootstrap intervals -------------------------------------------------------------------------
def resample(N: int, M: int, paired: bool, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(draws, N) and (draws, M) image indices drawn with replacement: one set of indices for both
  sets if paired (then N = M)."""
  rng = np.random.default_rng(seed)
  ia = rng.integers(0, N, (draws, N))
  return ia, (ia if paired else rng.integers(0, M, (draws, M)))


def counts(idx_XN: np.ndarray, n: int) -> np.ndarray:
  """(draws, n) float64: how often each image is in each resample (rows of `resample`)."""
  w = np.zeros((idx_XN.shape[0], n))
  np.add.at(w, (np.arange(idx_XN.shape[0])[:, None], idx_XN), 1.0)
  return w


def _weighted_scatter(x_ND: np.ndarray, w_XN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Means (X, D) and scatter matrices (X, D, D) sum_i w_i (x_i - mu)(x_i - mu)^T of the resampled
  sets given by counts `w` (features centred on their own mean first: no cancellation)."""
  x = x_ND - x_ND.mean(0)
  n = w_XN.sum(-1, keepdims=True)
  mu = w_XN @ x / n
  scatter = (w_XN[:, :, None] * x).swapaxes(-1, -2) @ x - n[:, :, None] * mu[:, :, None] * mu[:, None, :]
  return mu, scatter


def _cholesky_if_regular(s_XDD: np.ndarray) -> np.ndarray | None:
  """Cholesky factors of the batch (10x cheaper than eigh) when every matrix is well inside full rank
  (smallest pivot^2 above 1e-8 of the largest diagonal entry), else None (eigh then handles the
  singular ones exactly)."""
  try:
    chol = np.linalg.cholesky(s_XDD)
  except np.linalg.LinAlgError:
    return None
  pivots = np.diagonal(chol, axis1=-2, axis2=-1) ** 2
  regular = pivots.min(-1) > 1e-8 * np.diagonal(s_XDD, axis1=-2, axis2=-1).max(-1)
  return chol if bool(regular.all()) else None


def _trace_sqrt_scatter(sa_XDD: np.ndarray, sb_XDD: np.ndarray) -> np.ndarray:
  """tr (Sa^1/2 Sb Sa^1/2)^1/2 (batched, Sa and Sb symmetric PSD): Sa^1/2 from eigh (exact for
  singular Sa, which a resample with few distinct images or a feature that never varies gives), then
  the square roots of the eigenvalues of the symmetric PSD Sa^1/2 Sb Sa^1/2."""
  root = _cholesky_if_regular(sa_XDD)          # Sa = L L^T: L^T Sb L has the eigenvalues of Sa Sb
  if root is None:
    w, V = np.linalg.eigh(sa_XDD)
    root = (V * np.sqrt(_zeroed(w))[..., None, :]) @ V.swapaxes(-1, -2)
  inner = root.swapaxes(-1, -2) @ sb_XDD @ root
  return np.sqrt(_zeroed(np.linalg.eigvalsh((inner + inner.swapaxes(-1, -2)) / 2))).sum(-1)


def _one_blas_thread(fn):
  """Runs `fn` with one BLAS thread: batches of small factorisations are 10-50x slower with OpenBLAS's
  threads (each call wakes them; under load they oversubscribe the cores)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with threadpool_limits(1, user_api='blas'):
      return fn(*args, **kwargs)
  return wrapped


@_one_blas_thread
def fid_draws(a_ND, b_MD, paired: bool, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
  """(draws,) FID of the resampled sets (`resample`). With more images than features in both sets
  the resamples are weightings of the sets (`counts`): means and (D, D) scatters per draw, no (N, D)
  copies; else each resample is gathered and goes through `_fid`."""
  a, b = _check(a_ND, b_MD, 2, paired)
  N, M, D = len(a), len(b), a.shape[1]
  ia, ib = resample(N, M, paired, draws, seed)
  if min(N, M) <= D:
    return np.concatenate([_fid(a[ia[i:i + CHUNK]], b[ib[i:i + CHUNK]]) for i in range(0, draws, CHUNK)])
  out = []
  for i in range(0, draws, CHUNK):
    mu_a, sa = _weighted_scatter(a, counts(ia[i:i + CHUNK], N))
    mu_b, sb = _weighted_scatter(b, counts(ib[i:i + CHUNK], M))
    mu_b = mu_b + b.mean(0) - a.mean(0)                       # both in a's centring
    tr = np.trace(sa, axis1=-2, axis2=-1) / (N - 1) + np.trace(sb, axis1=-2, axis2=-1) / (M - 1)
    cross = _trace_sqrt_scatter(sa, sb) / np.sqrt((N - 1) * (M - 1))
    out.append(((mu_a - mu_b) ** 2).sum(-1) + tr - 2 * cross)
  return np.concatenate(out)


@_one_blas_thread
def kid_draws(a_ND, b_MD, paired: bool, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
  """(draws,) KID of the resampled sets (`resample`), from the kernel matrices of the whole sets: a
  resample's kernel sums are quadratic forms in its counts w, sum_{p != q} k(x_p, x_q) =
  w^T K w - w . diag K (positions p, q of the resample; a repeated image is two positions)."""
  a, b = _check(a_ND, b_MD, 2, paired)
  N, M = len(a), len(b)
  kaa, kbb, kab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
  ia, ib = resample(N, M, paired, draws, seed)
  wa, wb = counts(ia, N), counts(ib, M)
  quad = lambda wx, k, wy: ((wx @ k) * wy).sum(-1)
  off = lambda w, k, n: (quad(w, k, w) - w @ np.diag(k)) / (n * (n - 1))
  cross = off(wa, kab, N) if paired else quad(wa, kab, wb) / (N * M)
  return off(wa, kaa, N) + off(wb, kbb, M) - 2 * cross


def normal_interval(estimate: float, draws_X: np.ndarray, level: float) -> tuple[float, float]:
  """estimate -+ z_level x the standard deviation of the bootstrap draws."""
  if not 0 < level < 1:
    raise ValueError(f'a confidence level must be in (0, 1), got {level}')
  half = float(stats.norm.ppf(0.5 + level / 2)) * float(np.std(draws_X, ddof=1))
  return estimate - half, estimate + half


@_one_blas_thread
def fid_ci(a_ND, b_MD, level: float = 0.95, paired: bool = False, draws: int = DRAWS, seed: int = 0
           ) -> tuple[float, float, float]:
  """(fid, low, high): FID and its bootstrap interval over images, low clipped at 0 (module doc)."""
  est = fid(a_ND, b_MD)
  lo, hi = normal_interval(est, fid_draws(a_ND, b_MD, paired, draws, seed), level)
  return est, max(lo, 0.0), hi


@_one_blas_thread
def kid_ci(a_ND, b_MD, level: float = 0.95, paired: bool = False, draws: int = DRAWS, seed: int = 0
           ) -> tuple[float, float, float]:
  """(kid, low, high): unbiased KID and its bootstrap interval over images (may reach below 0)."""
  est = kid(a_ND, b_MD, paired)
  return (est, *normal_interval(est, kid_draws(a_ND, b_MD, paired, draws, seed), level))
