"""What a sceptical reviewer checks: shared bits on the axis, bounds drawn only where they hold, the
Gaussian ideal-code reference, intervals inside their metric's range."""
import jax
import numpy as np
import pytest

from compress.core.budget import CacheGeometry
from compress.core.synthetic import var_like_qkv
from compress.theory import bounds
from eval.bounds import gaussian_reference, rank_bound
from eval.engine import stats
from eval.report import pareto, plots
from eval.engine import sweep

PN = (1, 2, 3, 4)
D = 8


@pytest.fixture(scope='module')
def data():
  q, k, v = var_like_qkv(jax.random.key(1), PN, layers=2, batch=4, heads=2, head_dim=D)
  return sweep.CacheSet({'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)},
                        np.array([0, 0, 1, 1]), PN)


def test_amortised_bits_spread_shared_parameters():
  g = CacheGeometry(PN, D)
  c = sweep.bits_columns(1000, g, shared_bits=6400, heads=4, served_sequences=8)
  assert c['amortised_bits'] == 1000 + 6400 / 32 == 1200
  assert c['amortised_bits_per_coordinate'] == pytest.approx(1200 / g.coordinates)
  assert sweep.bits_columns(1000, g)['amortised_bits'] == 1000          # nothing shared
  with pytest.raises(ValueError, match='served_sequences'):
    sweep.bits_columns(1000, g, 10, 4, 0)


def test_pareto_frontier_uses_amortised_bits():
  row = lambda m, bits, amort, err: {'dataset': 'val', 'method': m, 'family': 'f', 'setting': 'default',
                                     'budget': '1', 'deployable': True, 'bits': bits,
                                     'amortised_bits': amort, 'rel_error': err}
  rows = [row('cheap_per_head', 100, 400, 0.1), row('plain', 300, 300, 0.2)]
  # by per-head bits both are on the frontier; charged their shared parameters, 'plain' is cheaper
  front = [r['method'] for r in pareto.frontier_rows(rows) if r['frontier'] == 'all']
  assert front == ['plain', 'cheap_per_head']
  assert [r['method'] for r in pareto.frontier_rows(rows, x='bits') if r['frontier'] == 'all'] == ['cheap_per_head']


def test_water_filling_curve_matches_the_rd_bound():
  lam = np.array([4.0, 1.0, 0.25, 0.01])
  d = 3
  c = bounds.water_filling_curve(np.repeat(lam, d), total=d * lam.sum(), points=30)
  np.testing.assert_allclose(c['bits'], bounds.rd_bits(c['rel_error'], lam, d), rtol=1e-6, atol=1e-6)
  assert np.all(np.diff(c['bits']) >= 0) and np.all(np.diff(c['rel_error']) <= 1e-12)
  # identity: T d log2(1 / eps) in the water-filling regime below every variance
  c = bounds.water_filling_curve(np.ones(10), total=10.0, points=10)
  low = c['rel_error'] < 1
  np.testing.assert_allclose(c['bits'][low], 10 * np.log2(1 / c['rel_error'][low]), rtol=1e-9)


def test_gaussian_reference_components_brute_force(data):
  """Sum of component variances = sum over heads of tr(M^T M) tr(C), with M and C built directly."""
  var, total, heads = gaussian_reference.components(data, batch=3)
  g = CacheGeometry(PN, D)
  T = g.prefix_tokens
  want = 0.0
  x = data.numpy(0, data.num_sequences)
  for n in range(data.num_layers):
    for h in range(data.num_heads):
      vals = x['v'][n, :, h, :T].astype(np.float64).reshape(-1, D)
      cov = np.cov(vals.T, bias=True)
      for b in range(data.num_sequences):
        q, k = x['q'][n, b, h].astype(np.float64), x['k'][n, b, h].astype(np.float64)
        tr = 0.0
        for si in range(1, len(PN)):
          st, S = g.scale_starts[si], g.scale_sizes[si]
          logits = q[st:st + S] @ k[:st + S].T
          p = np.exp(logits - logits.max(1, keepdims=True))
          p /= p.sum(1, keepdims=True)
          tr += float((p[:, :st] ** 2).sum())
        want += tr * np.trace(cov)
  assert var.sum() == pytest.approx(want, rel=1e-9)
  assert heads == data.num_layers * data.num_sequences * data.num_heads
  assert total == pytest.approx(float((np.asarray(data.exact(0, 4), np.float64) ** 2).sum()), rel=1e-6)
  c = gaussian_reference.curve(data, g, batch=3)
  assert c['rel_error'].max() <= 1 and c['rel_error'].min() < 1e-2 and c['bits'][0] == pytest.approx(0, abs=1e-9)


def test_rank_bound_drawn_only_against_entry_caches():
  rows = [{'dataset': 'val', 'method': m, 'family': f, 'setting': 'default', 'oracle': False,
           'deployable': True, 'bits': 10, 'amortised_bits': 10, 'bits_per_coordinate': 0.1,
           'amortised_bits_per_coordinate': 0.1, 'rel_error': 0.1}
          for m, f in (('snapkv', 'eviction'), ('kivi', 'quantization'), ('pca', 'low rank'))]
  curve = lambda **kw: {'dataset': 'val', 'label': 'x', 'bits_per_coordinate': np.array([0.1]),
                        'rel_error': np.array([0.01]), **kw}
  panels = plots.panels_of(rows, [curve(families=rank_bound.ENTRY_FAMILIES), curve()])
  assert [p['families'] for p in panels] == [None, rank_bound.ENTRY_FAMILIES]
  assert [len(p['curves']) for p in panels] == [1, 1]
  assert 'families' not in panels[0]['curves'][0]        # the panel of every method: no rank bound
  assert 'quantization' not in panels[1]['families'] and 'low rank' not in panels[1]['families']
  plots.frontier_figure(rows, pareto.frontier_rows(rows), [curve(families=rank_bound.ENTRY_FAMILIES)])
  plots.plt.close('all')


def test_bootstrap_interval_stays_in_range():
  ssim = np.array([0.999, 1.0, 0.95, 1.0])                # the t-interval of these exceeds 1
  assert stats.mean_ci(ssim)[2] > 1
  m, lo, hi = stats.bootstrap_mean_ci(ssim)
  assert lo <= m <= hi <= 1.0 and lo >= 0.95
  psnr = np.array([20.0, 49.0, 21.0, 22.0])
  m, lo, hi = stats.bootstrap_mean_ci(psnr)
  assert 20.0 <= lo <= m <= hi <= 49.0
  assert stats.bootstrap_mean_ci([3.0]) == (3.0, 3.0, 3.0)
