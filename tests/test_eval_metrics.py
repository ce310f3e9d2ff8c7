"""eval/engine/stats.py, eval/quality/metrics.py, eval/report/pareto.py, eval/engine/results.py against closed forms and brute force."""
import itertools
import os

import numpy as np
import pytest

from eval.engine import stats
from eval.quality import metrics
from eval.report import pareto
from eval.engine.results import ResultTable, fmt

T_975_4 = 2.7764451051977987       # Student t, 4 degrees of freedom, two-sided 95% (tables)


def test_mean_ci_is_the_t_interval():
  m, lo, hi = stats.mean_ci([1, 2, 3, 4, 5])
  half = T_975_4 * np.sqrt(2.5) / np.sqrt(5)           # s^2 = 2.5
  assert m == 3 and lo == pytest.approx(3 - half, rel=1e-9) and hi == pytest.approx(3 + half, rel=1e-9)
  assert stats.mean_ci([0.7]) == (0.7, 0.7, 0.7)
  with pytest.raises(ValueError, match='level'):
    stats.mean_ci([1, 2], level=1.5)


def test_ratio_ci_reduces_to_the_t_interval_for_equal_norms():
  rng = np.random.default_rng(0)
  d2 = rng.uniform(0.1, 2.0, 9)
  e2 = np.full(9, 4.0)
  r, lo, hi = stats.ratio_ci(d2, e2)
  m, mlo, mhi = stats.mean_ci(d2 / 4.0)
  assert r == pytest.approx(np.sqrt(m)) and lo == pytest.approx(np.sqrt(mlo)) and hi == pytest.approx(np.sqrt(mhi))
  # the pooled ratio, not the mean of per-unit ratios
  r, _, _ = stats.ratio_ci([1.0, 0.0], [1.0, 3.0])
  assert r == pytest.approx(0.5)
  assert stats.ratio_ci(np.zeros(4), np.ones(4)) == (0.0, 0.0, 0.0)


def test_psnr_and_kl_closed_forms():
  x = np.zeros((2, 4, 4, 3))
  np.testing.assert_allclose(metrics.psnr(x, x + 0.1), [20.0, 20.0])
  assert metrics.psnr(x, x)[0] == np.inf
  p, q = np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]])
  want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  np.testing.assert_allclose(metrics.kl_logits(p + 3.0, q - 1.0), [want])   # shift invariant
  np.testing.assert_allclose(metrics.kl_logits(q, q), [0.0], atol=1e-15)


def _ssim_brute(x, y, win=11, sigma=1.5, c1=1e-4, c2=9e-4):
  """Per-window, per-channel loop of the SSIM definition (Gaussian-weighted statistics)."""
  w1 = np.exp(-(np.arange(win) - (win - 1) / 2) ** 2 / (2 * sigma ** 2))
  w = np.outer(w1, w1) / w1.sum() ** 2
  vals = []
  for i, j, c in itertools.product(range(x.shape[0] - win + 1), range(x.shape[1] - win + 1),
                                   range(x.shape[2])):
    a, b = x[i:i + win, j:j + win, c], y[i:i + win, j:j + win, c]
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
    cov = (w * (a - ma) * (b - mb)).sum()
    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_closed_forms_and_brute_force():
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (2, 13, 14, 3))
  np.testing.assert_allclose(metrics.ssim(x, x), [1.0, 1.0], rtol=1e-12)
  # flat images a and b: only the luminance term is left
  a, b = 0.2, 0.7
  want = (2 * a * b + 1e-4) / (a * a + b * b + 1e-4)
  np.testing.assert_allclose(metrics.ssim(np.full((1, 12, 12, 3), a), np.full((1, 12, 12, 3), b)), [want])
  y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
  got = metrics.ssim(x, y)
  for n in range(2):
    assert got[n] == pytest.approx(_ssim_brute(x[n], y[n]), rel=1e-9)
  assert 0 < got.max() < 1


def _dominated(i, bits, err):
  return any(bits[j] <= bits[i] and err[j] <= err[i] and (bits[j], err[j]) != (bits[i], err[i])
             for j in range(len(bits)))


def test_lower_envelope_is_the_pareto_set():
  rng = np.random.default_rng(2)
  for _ in range(20):
    n = int(rng.integers(1, 30))
    bits = rng.integers(0, 10, n).astype(float)
    err = rng.integers(0, 10, n) / 10
    idx = pareto.lower_envelope(bits, err)
    # a subset, sorted by bits with strictly decreasing error (monotone)
    assert len(set(idx)) == len(idx) and all(0 <= i < n for i in idx)
    assert all(bits[a] < bits[b] and err[a] > err[b] for a, b in zip(idx, idx[1:]))
    # exactly the non-dominated points (one per duplicate (bits, error) pair)
    want = {(bits[i], err[i]) for i in range(n) if not _dominated(i, bits, err)}
    assert {(bits[i], err[i]) for i in idx} == want
  assert pareto.lower_envelope([1.0, np.nan], [0.5, 0.1]) == [0]


def test_frontier_rows_all_and_per_family():
  rows = [{'dataset': 'val', 'method': m, 'family': f, 'setting': 'default', 'budget': b, 'bits': bits,
           'bits_per_coordinate': bits / 10, 'fraction_of_fp16': bits / 160, 'rel_error': e,
           'deployable': str(dep)} for m, f, b, bits, e, dep in [
      ('a', 'x', '1', 10, 0.5, True), ('a', 'x', '2', 20, 0.3, True), ('b', 'y', '1', 10, 0.4, True),
      ('b', 'y', '2', 20, 0.35, True), ('o', 'x', '1', 5, 0.01, False)]]
  out = pareto.frontier_rows(rows)
  got = {(r['frontier'], r['method'], r['budget']) for r in out}
  assert got == {('all', 'b', '1'), ('all', 'a', '2'), ('family:x', 'a', '1'), ('family:x', 'a', '2'),
                 ('family:y', 'b', '1'), ('family:y', 'b', '2')}      # the oracle is never on a frontier


def test_result_table_resumes_and_refuses_other_headers(tmp_path):
  path = str(tmp_path / 'r.csv')
  t = ResultTable(path, ('k', 'x', 'y'), ('k',))
  t.append({'k': 'a', 'x': np.float64(0.1), 'y': [1, 2.5]})
  assert {'k': 'a'} in t and {'k': 'b'} not in t
  with pytest.raises(ValueError, match='already'):
    t.append({'k': 'a'})
  t2 = ResultTable(path, ('k', 'x', 'y'), ('k',))
  assert t2.rows == [{'k': 'a', 'x': '0.1', 'y': '1 2.5'}] and {'k': 'a'} in t2
  with pytest.raises(ValueError, match='columns'):
    ResultTable(path, ('k', 'z'), ('k',))
  assert fmt(None) == '' and fmt(True) == 'True' and fmt(float('nan')) == 'nan'
  assert os.path.exists(path)
