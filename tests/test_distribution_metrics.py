"""FID and KID (eval/quality/distribution.py) against independent truth, and the classifier features.

- FID: a set against itself is 0; sets built to have an exact sample mean and diagonal covariance give
  the closed form |m_a - m_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 (both routes of the code: fewer images
  than features, more images than features), also after one random rotation of both sets (then the
  covariances are not diagonal); random correlated features match the classic scipy.linalg.sqrtm formula.
- KID: a brute-force double loop over the pairs (unpaired and paired); a set against itself (paired:
  0; unpaired: the closed form -2 (mean diagonal - mean off-diagonal kernel) / N < 0; biased V-statistic:
  0); unbiasedness checked exactly by averaging over every possible draw from small pools (the mean
  is the population MMD^2 of the pools, 0 for equal marginals, also for dependent pairs with the paired
  form, which the unpaired form fails).
- Intervals: the vectorised bootstrap draws equal a loop that recomputes each resample from scratch;
  the interval is the estimate -+ z x sd of the draws, brackets the estimate, FID's low end >= 0.
- Features: the classifier's logits are its head applied to `features`.
Faults caught (each checked by breaking distribution.py on purpose): the trace term dropped, the
covariance with ddof 0, the cross term's square root taken of S_a S_b's trace, the biased MMD in
place of the unbiased one, the cross term's diagonal kept in the paired form, the kernel without its
cube or 1 / D, the bootstrap indexing the cross kernel with a's indices twice, unpaired resampling
where paired was asked.
"""
import itertools

import numpy as np
import pytest
import scipy.linalg
from scipy import stats

from eval.quality import classifier, distribution as dist


def exact_set(rng, n, mean_D, var_D):
  """(n, D) features whose sample mean is mean_D and sample covariance (ddof 1) is diag(var_D) exactly
  (at most n - 1 nonzero variances)."""
  support = np.flatnonzero(var_D)
  z = rng.normal(size=(n, support.size))
  q, _ = np.linalg.qr(z - z.mean(0))                 # orthonormal columns, orthogonal to the ones vector
  x = np.tile(np.asarray(mean_D, np.float64), (n, 1))
  x[:, support] += q * np.sqrt((n - 1) * var_D[support])
  return x


def closed_form(m_a, v_a, m_b, v_b):
  return float(((m_a - m_b) ** 2).sum() + ((np.sqrt(v_a) - np.sqrt(v_b)) ** 2).sum())


@pytest.mark.parametrize('n, d', [(12, 128), (300, 16)])        # an (N, M) SVD; a (D, D) square root
def test_fid_of_a_set_against_itself_is_zero(n, d):
  a = np.random.default_rng(0).normal(size=(n, d)) * 3 + 1
  scale = np.var(a, 0, ddof=1).sum()
  assert abs(dist.fid(a, a)) < 1e-12 * scale
  assert abs(dist.frechet_distance(a.mean(0), np.cov(a.T), a.mean(0), np.cov(a.T))) < 1e-12 * scale


@pytest.mark.parametrize('n, d, support_a, support_b', [
    (12, 64, range(0, 8), range(4, 14)),              # fewer images than features: rank-deficient covariances
    (40, 8, range(8), range(8))])                     # more images than features
def test_fid_matches_the_closed_form_of_known_gaussians(n, d, support_a, support_b):
  rng = np.random.default_rng(1)
  m_a, m_b = rng.normal(size=d), rng.normal(size=d)
  v_a, v_b = np.zeros(d), np.zeros(d)
  v_a[list(support_a)] = rng.uniform(0.1, 4, len(support_a))
  v_b[list(support_b)] = rng.uniform(0.1, 4, len(support_b))
  a, b = exact_set(rng, n, m_a, v_a), exact_set(rng, n + 3, m_b, v_b)
  np.testing.assert_allclose(np.cov(a.T), np.diag(v_a), atol=1e-12)       # the construction holds
  want = closed_form(m_a, v_a, m_b, v_b)
  assert dist.fid(a, b) == pytest.approx(want, rel=1e-10)
  assert dist.frechet_distance(m_a, np.diag(v_a), m_b, np.diag(v_b)) == pytest.approx(want, rel=1e-10)
  rot = np.linalg.qr(rng.normal(size=(d, d)))[0]       # one rotation of both: covariances not diagonal
  assert dist.fid(a @ rot, b @ rot) == pytest.approx(want, rel=1e-9)


def test_fid_matches_the_sqrtm_formula_on_correlated_features():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(60, 6)) @ rng.normal(size=(6, 6))
  b = rng.normal(size=(45, 6)) @ rng.normal(size=(6, 6)) + 0.5
  s_a, s_b = np.cov(a.T), np.cov(b.T)
  ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
  assert dist.fid(a, b) == pytest.approx(ref, rel=1e-9)
  assert dist.fid(b, a) == pytest.approx(ref, rel=1e-9)


def kernel_loop(x, y):
  return (sum(float(p) * float(q) for p, q in zip(x, y)) / len(x) + 1) ** 3


def kid_loop(a, b, paired):
  n, m = len(a), len(b)
  saa = sum(kernel_loop(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sbb = sum(kernel_loop(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  pairs = [(i, j) for i in range(n) for j in range(m) if not (paired and i == j)]
  return saa + sbb - 2 * sum(kernel_loop(a[i], b[j]) for i, j in pairs) / len(pairs)


def test_kid_matches_a_double_loop():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.7
  assert dist.kid(a, b) == pytest.approx(kid_loop(a, b, False), rel=1e-12)
  c = a + 0.3 * rng.normal(size=a.shape)                # paired with a
  assert dist.kid(a, c, paired=True) == pytest.approx(kid_loop(a, c, True), rel=1e-12)
  with pytest.raises(ValueError, match='equally long'):
    dist.kid(a, b, paired=True)


def test_kid_of_a_set_against_itself():
  a = np.random.default_rng(4).normal(size=(10, 4))
  k = np.array([[kernel_loop(x, y) for y in a] for x in a])
  diag, off = np.diag(k).mean(), (k.sum() - np.trace(k)) / (10 * 9)
  assert abs(dist.kid(a, a.copy(), paired=True)) < 1e-14 * k.mean()      # every pair's terms cancel
  assert dist.kid(a, a) == pytest.approx(-2 * (diag - off) / 10, rel=1e-12) and dist.kid(a, a) < 0
  assert abs(dist.mmd2_biased(a, a)) < 1e-12 * k.mean()


def mean_over_all_draws(fn, pool_a, pool_b, n, m):
  """The exact expectation of fn(X, Y), X: n draws from pool_a, Y: m draws from pool_b (uniform, iid)."""
  vals = [fn(pool_a[list(i)], pool_b[list(j)]) for i in itertools.product(range(len(pool_a)), repeat=n)
          for j in itertools.product(range(len(pool_b)), repeat=m)]
  return float(np.mean(vals))


def test_kid_is_unbiased_over_every_draw():
  rng = np.random.default_rng(5)
  pool_a, pool_b = rng.normal(size=(3, 2)), rng.normal(size=(3, 2)) + 0.5
  K = dist.polynomial_kernel
  population = K(pool_a, pool_a).mean() + K(pool_b, pool_b).mean() - 2 * K(pool_a, pool_b).mean()
  assert population > 0.01
  assert mean_over_all_draws(dist.kid, pool_a, pool_b, 2, 3) == pytest.approx(population, rel=1e-10)
  assert abs(mean_over_all_draws(dist.kid, pool_a, pool_a, 3, 2)) < 1e-10 * K(pool_a, pool_a).mean()
  assert mean_over_all_draws(dist.mmd2_biased, pool_a, pool_a, 3, 2) > 0.01        # the V-statistic is not
  # pairs (u_p, u_sigma(p)): dependent, equal marginals. Draw n pairs of the pool (every draw enumerated)
  u = rng.normal(size=(4, 2))
  pairs_a, pairs_b = u, u[[1, 2, 3, 0]]
  draws = list(itertools.product(range(4), repeat=3))
  paired = np.mean([dist.kid(pairs_a[list(i)], pairs_b[list(i)], paired=True) for i in draws])
  unpaired = np.mean([dist.kid(pairs_a[list(i)], pairs_b[list(i)]) for i in draws])
  assert abs(paired) < 1e-10 * K(u, u).mean() and abs(unpaired) > 0.01
  # unequal marginals: pairs (u_p, v_p); the paired form's mean is the marginals' MMD^2
  v = u[[1, 2, 3, 0]] * 1.5 + 0.2
  population = K(u, u).mean() + K(v, v).mean() - 2 * K(u, v).mean()
  paired = np.mean([dist.kid(u[list(i)], v[list(i)], paired=True) for i in draws])
  assert paired == pytest.approx(population, rel=1e-10)


@pytest.mark.parametrize('paired', [True, False])
def test_bootstrap_draws_equal_a_loop_over_resamples(paired):
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(9, 5)), rng.normal(size=(9, 5)) + 0.3
  ia, ib = dist.resample(9, 9, paired, 20, seed=3)
  assert (ia == ib).all() == paired
  np.testing.assert_allclose(dist.fid_draws(a, b, paired, 20, seed=3),
                             [dist.fid(a[i], b[j]) for i, j in zip(ia, ib)], rtol=1e-9)
  np.testing.assert_allclose(dist.kid_draws(a, b, paired, 20, seed=3),
                             [kid_loop(a[i], b[j], paired) for i, j in zip(ia, ib)], rtol=1e-9)


def test_intervals_bracket_the_estimate():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(12, 16)), rng.normal(size=(12, 16)) * 1.2 + 0.2
  z = stats.norm.ppf(0.975)
  for fn, draws_fn, lowest in ((dist.fid_ci, dist.fid_draws, 0.0), (dist.kid_ci, dist.kid_draws, -np.inf)):
    for paired in (True, False):
      est, lo, hi = fn(a, b, 0.95, paired=paired)
      sd = np.std(draws_fn(a, b, paired), ddof=1)
      assert lowest <= lo < est < hi and hi == pytest.approx(est + z * sd, rel=1e-12)
      assert lo == pytest.approx(max(est - z * sd, lowest), rel=1e-12)
  est, lo, hi = dist.kid_ci(a, a + 0.01 * rng.normal(size=a.shape), paired=True)
  assert lo < 0 < hi                                   # an honest KID interval reaches below 0
  assert max(np.abs(dist.kid_ci(a, a.copy(), paired=True))) < 1e-12
  est, lo, hi = dist.fid_ci(a, a.copy(), paired=True)
  assert 0 <= lo <= max(est, 0) <= hi < 1e-10 and abs(est) < 1e-12 * 16     # 0 up to rounding
  with pytest.raises(ValueError, match='at least 2 images'):
    dist.fid(a[:1], b)


def test_features_are_the_classifiers_penultimate_layer():
  model, _ = classifier.shipped()
  x = np.random.default_rng(8).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
  f = classifier.features(x)
  assert f.shape == (5, 128) and f.dtype == np.float64
  np.testing.assert_allclose(np.asarray(model.head(f.astype(np.float32))), np.asarray(model(x)),
                             rtol=1e-5, atol=1e-5)


def fid_brute(a, b):
  """FID with the cross term from the (N, M) SVD of the centred sets (exact for any rank)."""
  A, B = a - a.mean(0), b - b.mean(0)
  n, m = len(a), len(b)
  cross = np.linalg.svd(A @ B.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
  return ((a.mean(0) - b.mean(0)) ** 2).sum() + (A * A).sum() / (n - 1) + (B * B).sum() / (m - 1) - 2 * cross


@pytest.mark.parametrize('dead', [False, True])
def test_weighted_bootstrap_draws_equal_the_exact_fid_of_each_resample(dead):
  """More images than features (the closed loop: 240 images, 128 features): the resamples are weights
  on the sets (Cholesky path); a feature that never varies makes every scatter singular (eigh path)."""
  rng = np.random.default_rng(8)
  a = rng.normal(size=(80, 12)) + 2
  b = a * 0.8 + 0.4 * rng.normal(size=a.shape)
  if dead:
    a[:, 3] = b[:, 3] = 1.5
  for paired in (True, False):
    ia, ib = dist.resample(80, 80, paired, 40, seed=2)
    np.testing.assert_allclose(dist.fid_draws(a, b, paired, 40, seed=2),
                               [fid_brute(a[i], b[j]) for i, j in zip(ia, ib)], rtol=1e-9)
    np.testing.assert_allclose(dist.kid_draws(a, b, paired, 40, seed=2),
                               [kid_loop(a[i], b[j], paired) for i, j in zip(ia, ib)], rtol=1e-9)
