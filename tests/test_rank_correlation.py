"""Rank correlation of teacher-forced error with image metrics (eval/quality/rank_correlation.py).

Spearman and Kendall (tau-b) match scipy on data with ties, per bootstrap draw too; the closed-loop
points join frontier.csv by (method, setting, budget) on val, without the noise-floor row `full`;
fewer than 3 points print 'n/a (needs >= 3 points)'. Faults caught (checked by breaking the module):
Pearson on values instead of ranks, tau-a instead of tau-b, ordinal ranks for ties, the noise-floor
row counted as a point.
"""
import numpy as np
import pytest
from scipy import stats

from eval.quality import rank_correlation as rc


def test_spearman_and_kendall_match_scipy_with_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, (30, 7)).astype(float)          # many ties
  y = x ** 3 + rng.integers(0, 3, (30, 7))
  for i in range(30):
    want_s, want_k = stats.spearmanr(x[i], y[i])[0], stats.kendalltau(x[i], y[i])[0]
    if np.isnan(want_s):
      assert np.isnan(rc.spearman(x[i], y[i])) and np.isnan(rc.kendall(x[i], y[i]))
      continue
    assert rc.spearman(x[i], y[i]) == pytest.approx(want_s, rel=1e-12)
    assert rc.kendall(x[i], y[i]) == pytest.approx(want_k, rel=1e-12)
  batched = rc.kendall(x, y)                               # the bootstrap's batched form: row by row
  np.testing.assert_allclose(batched, [rc.kendall(a, b) for a, b in zip(x, y)], rtol=1e-12)


def rows(errors, agreements):
  frontier = [{'dataset': 'val', 'method': f'm{i}', 'setting': 'default', 'budget': '10%', 'rel_error': e}
              for i, e in enumerate(errors)]
  frontier.append({'dataset': 'val', 'method': 'full', 'setting': 'default', 'budget': 'full',
                   'rel_error': '0.001'})
  frontier.append({'dataset': 'dev', 'method': 'm0', 'setting': 'default', 'budget': '5%', 'rel_error': '0.9'})
  closed = [{'method': f'm{i}', 'setting': 'default', 'budget': '10%', 'token_agreement': a, 'fid_vs_full': ''}
            for i, a in enumerate(agreements)]
  closed += [{'method': 'full', 'setting': 'default', 'budget': 'full', 'token_agreement': '0.1'},
             {'method': 'm0', 'setting': 'default', 'budget': '5%', 'token_agreement': '0.5'}]   # no val row
  return frontier, closed


def test_table_joins_points_and_needs_three():
  frontier, closed = rows(['0.1', '0.2', '0.3', '0.5'], ['0.9', '0.7', '0.8', '0.2'])
  (agree, fid) = rc.table(frontier, closed, metrics=('token_agreement', 'fid_vs_full'), draws=200)
  assert agree['points'] == 4 and fid['points'] == 0       # full, dev-only and empty values left out
  x, y = [0.1, 0.2, 0.3, 0.5], [0.9, 0.7, 0.8, 0.2]
  assert agree['spearman'] == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-12)
  assert agree['kendall'] == pytest.approx(stats.kendalltau(x, y)[0], rel=1e-12)
  for k in ('spearman', 'kendall'):
    assert -1 <= agree[f'{k}_ci_low'] <= agree[f'{k}_ci_high'] <= 1
  text = rc.text([agree, fid])
  assert 'fid_vs_full' in text and 'n/a (needs >= 3 points)' in text
  frontier, closed = rows(['0.1', '0.2'], ['0.9', '0.7'])
  (two,) = rc.table(frontier, closed, metrics=('token_agreement',))
  assert two['points'] == 2 and 'spearman' not in two and 'n/a (needs >= 3 points)' in rc.text([two])


def test_a_monotone_relation_has_correlation_minus_one():
  frontier, closed = rows([str(e) for e in (0.1, 0.2, 0.3, 0.4, 0.6)], [str(a) for a in (0.9, 0.8, 0.5, 0.4, 0.1)])
  (r,) = rc.table(frontier, closed, metrics=('token_agreement',), draws=300)
  assert r['spearman'] == pytest.approx(-1) and r['kendall'] == pytest.approx(-1)
  assert r['spearman_ci_low'] == pytest.approx(-1) and r['kendall_ci_high'] == pytest.approx(-1)
