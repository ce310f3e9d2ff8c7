"""Lower bounds: closed forms, brute force, and every registered compressor against the RD curve."""
import itertools

import numpy as np
import pytest

import compress
from compress.theory import bounds, hard_instance, hard_sweep


# ---- rate-distortion ----------------------------------------------------------------------------
@pytest.mark.parametrize('N,d', [(1, 1), (10, 4), (64, 16)])
def test_rd_identity_is_n_d_log2_inv_eps(N, d):
  eps = np.array([1e-4, 0.01, 0.1, 0.3, 0.7, 0.999])
  np.testing.assert_allclose(bounds.rd_bits(eps, np.ones(N), d), N * d * np.log2(1 / eps), rtol=1e-9)
  lam = bounds.gram_eigenvalues(np.eye(N))
  np.testing.assert_allclose(bounds.rd_bits(0.1, lam, d), N * d * np.log2(10), rtol=1e-9)
  assert bounds.rd_bits(1.0, lam, d) == 0 and bounds.rd_bits(3.0, lam, d) == 0
  assert bounds.rd_bits(0.0, lam, d) == np.inf


def test_rd_two_eigenvalues_closed_form():
  # lam = (4, 1): theta < 1 while eps^2 < 0.4 (both components coded), else only the big one
  lam, d = np.array([4.0, 1.0]), 3
  for eps in (0.05, 0.3, 0.6):
    theta = eps ** 2 * 5 / 2
    want = d * 0.5 * (np.log2(4 / theta) + np.log2(1 / theta))
    assert bounds.rd_bits(eps, lam, d) == pytest.approx(want, rel=1e-9)
  for eps in (0.7, 0.9):
    theta = 5 * eps ** 2 - 1
    assert bounds.rd_bits(eps, lam, d) == pytest.approx(d * 0.5 * np.log2(4 / theta), rel=1e-9)


def test_rd_monotone_and_inverse():
  rng = np.random.default_rng(0)
  lam = bounds.gram_eigenvalues(rng.random((12, 20)))
  curve = bounds.rd_curve(lam, 8)
  assert np.all(np.diff(curve['bits']) < 0)               # strictly fewer bits for a larger error
  assert curve['bits'][-1] == 0 and curve['eps'][-1] == 1
  eps = np.array([1e-3, 0.02, 0.2, 0.5, 0.9])
  np.testing.assert_allclose(bounds.rd_min_error(bounds.rd_bits(eps, lam, 8), lam, 8), eps, rtol=1e-9)
  b = np.array([0.0, 1.0, 50.0, 1e3, 4e3])    # 4e3 bits: eps ~ 1e-13
  np.testing.assert_allclose(bounds.rd_bits(bounds.rd_min_error(b, lam, 8), lam, 8), b, rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize('bad', [np.zeros(3), np.array([1.0, -1.0]), np.array([])])
def test_rd_rejects_bad_eigenvalues(bad):
  with pytest.raises(ValueError, match='eigenvalues'):
    bounds.rd_bits(0.1, bad, 4)


def test_lloyd_max_matches_max_1960_table():
  # J. Max (1960), optimum quantiser for N(0,1): output levels and mean squared error
  _, l2 = bounds.lloyd_max_gaussian(2)
  np.testing.assert_allclose(l2[2:], [0.4528, 1.510], atol=1e-3)
  _, l3 = bounds.lloyd_max_gaussian(3)
  np.testing.assert_allclose(l3[4:], [0.2451, 0.7560, 1.344, 2.152], atol=1e-3)
  x = np.random.default_rng(1).standard_normal(2_000_000)
  for b, mse in [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)]:
    assert np.mean((bounds.quantize_gaussian(x, b) - x) ** 2) == pytest.approx(mse, rel=0.01)


@pytest.mark.parametrize('b', [1, 2, 3, 4])
def test_value_quantisation_sits_above_and_near_the_bound(b):
  """b-bit Lloyd-Max of the values (keys exact and free, as the bound assumes): <= 1.5 bits/coord above."""
  inst = hard_instance.make_instance(n=144, d=32, seed=3)
  z = inst.attn_PT @ bounds.quantize_gaussian(inst.values_TD, b)
  eps = np.sqrt(((z - inst.exact_PD) ** 2).sum() / (inst.exact_PD ** 2).sum())
  bits, coords = b * inst.T * inst.d, inst.T * inst.d
  bound = float(inst.lower_bound_bits(eps))
  assert bound < bits <= bound + 1.5 * coords, (b, eps, bits / coords, bound / coords)


@pytest.fixture(scope='module')
def small_hard():
  inst = hard_instance.make_instance(n=64, d=32, seed=1)
  return inst, hard_instance.redraw(inst, 2)


@pytest.mark.slow
@pytest.mark.parametrize('budget', [0.1, 0.35])
def test_no_compressor_beats_the_rd_curve(small_hard, budget):
  inst, calib = small_hard
  names = compress.available(learned=False)
  assert 'full' in names
  for name in names:
    row = hard_sweep.evaluate_method(inst, name, budget, calib)
    assert 0 < row['rel_error'] < np.inf, row
    assert row['bits'] >= row['lower_bound_bits'], (
        f'{name} below the rate-distortion bound: {row["bits"]} bits at error {row["rel_error"]:.4g} '
        f'< {row["lower_bound_bits"]:.1f}: its bit accounting or error must be wrong')
    if row['respects_budget']:
      assert row['bits'] <= row['budget_bits'], row


# ---- rank (Eckart-Young) ------------------------------------------------------------------------
def _softmax_out(q, k, v):
  lg = q @ k.T
  p = np.exp(lg - lg.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize('seed', range(4))
def test_rank_bound_below_best_token_subset(seed):
  rng = np.random.default_rng(seed)
  H, P, n, d = 2, 7, 7, 5
  q, k, v = rng.normal(size=(H, P, d)) * 1.5, rng.normal(size=(H, n, d)), rng.normal(size=(H, n, d))
  exact = np.stack([_softmax_out(q[h], k[h], v[h]) for h in range(H)])
  total = (exact ** 2).sum()
  for m in range(1, 5):
    best = [min(((_softmax_out(q[h], k[h, list(c)], v[h, list(c)]) - exact[h]) ** 2).sum()
                for c in itertools.combinations(range(n), m)) for h in range(H)]
    bound = bounds.rank_bound(exact, m)
    assert 0 < bound <= np.sqrt(sum(best) / total) + 1e-12, (m, bound, np.sqrt(sum(best) / total))
    # values projected to rank r: also above the bound with value_rank=r
    for r in (1, 2):
      _, _, wt = np.linalg.svd(v[0])
      proj = wt[:r].T @ wt[:r]
      err = ((_softmax_out(q[0], k[0], v[0] @ proj) - exact[0]) ** 2).sum()
      assert bounds.rank_bound(exact[:1], value_rank=r) <= np.sqrt(err / (exact[0] ** 2).sum()) + 1e-12


def test_rank_bound_is_the_svd_tail_of_low_rank_matrices():
  rng = np.random.default_rng(5)
  P, d, r = 9, 6, 4
  u, _ = np.linalg.qr(rng.normal(size=(P, r)))
  w, _ = np.linalg.qr(rng.normal(size=(d, r)))
  s = np.array([5.0, 3.0, 2.0, 0.5])
  A = u @ np.diag(s) @ w.T
  for m in range(r + 2):
    tail = (s[m:] ** 2).sum()
    assert bounds.rank_bound(A, m) == pytest.approx(np.sqrt(tail / (s ** 2).sum()), abs=1e-12)
    assert bounds.rank_error(A, m) == pytest.approx(np.sqrt(tail), abs=1e-12)
  assert bounds.rank_bound(A, m=3, value_rank=1) == pytest.approx(bounds.rank_bound(A, 1))
  curve = bounds.rank_curve(np.stack([A, 2 * A]), [0, 1, 2, 3, 4])
  np.testing.assert_allclose(curve['rel_error'], [bounds.rank_bound(A, m) for m in range(5)], atol=1e-12)
  assert curve['rel_error'][0] == pytest.approx(1.0) and curve['rel_error'][-1] == pytest.approx(0, abs=1e-12)
  with pytest.raises(ValueError, match='m'):
    bounds.rank_bound(A)
