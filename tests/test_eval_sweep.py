"""Teacher-forced sweep points and the rank bound on synthetic caches (eval/engine/sweep.py, eval/bounds/rank_bound.py)."""
import jax
import numpy as np
import pytest

import compress
from compress.core.budget import CacheGeometry
from compress.core.synthetic import var_like_qkv
from eval.bounds import rank_bound
from eval.engine import sweep

PN = (1, 2, 3, 4)
D = 16


@pytest.fixture(scope='module')
def data():
  q, k, v = var_like_qkv(jax.random.key(0), PN, layers=2, batch=6, heads=2, head_dim=D)
  units = np.array([10, 10, 11, 11, 12, 12])          # two CFG halves per image
  return sweep.CacheSet({'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}, units, PN)


def no_params(spec, comp):
  return comp.init_params(jax.random.key(0), 2, 2)


def test_method_specs():
  s = sweep.MethodSpec.parse('kivi(bit_width=2, key_layout=token)')
  assert s.name == 'kivi' and s.setting == 'bit_width=2,key_layout=token'
  assert str(s) == 'kivi(bit_width=2,key_layout=token)'
  assert s.make(CacheGeometry(PN, D), '50%').bit_width == 2
  assert sweep.MethodSpec.parse('window').setting == 'default'
  with pytest.raises(ValueError, match='unknown compressor'):
    sweep.MethodSpec.parse('nope')
  with pytest.raises(ValueError, match='no setting'):
    sweep.MethodSpec.parse('window(size=3)')
  with pytest.raises(ValueError, match='twice'):
    sweep.parse_methods(['window', 'window'])


def test_errors_per_sequence_sum_to_the_library_aggregate(data):
  g = CacheGeometry(PN, D)
  comp = sweep.MethodSpec.parse('window').make(g, '30%')
  res = sweep.run_point(comp, None, data, batch=3)                 # two batches of 3 sequences
  assert res['d2'].shape == (6, 2, 4) and res['peak_bits'].shape == (2, 6, 2)
  q, k, v = data.slice(0, 6)
  whole = compress.run_teacher_forced(comp, None, q, k, v)
  ref = compress.errors(whole['out'], compress.exact_outputs(q, k, v, PN), PN)
  got = sweep.summarize(res['d2'], res['e2'], data.units, 0.95)
  assert got['rel_error'] == pytest.approx(ref['overall'], rel=1e-5)
  np.testing.assert_allclose(got['rel_error_per_layer'], ref['per_layer'], rtol=1e-5)
  np.testing.assert_allclose(got['rel_error_per_scale'], ref['per_scale'], rtol=1e-5)
  assert got['num_units'] == 3 and got['rel_error_ci_low'] <= got['rel_error'] <= got['rel_error_ci_high']


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_rows_hold_the_budget_and_full_budget_is_exact(data, dtype):
  g = CacheGeometry(PN, D, dtype)
  rows = [sweep.evaluate_spec(sweep.MethodSpec.parse(m), b, data, g, no_params, batch=6, level=0.95)
          for m, b in [('window', '25%'), ('kivi', '25%'), ('tome', '10%'), ('snapkv', f'{g.full_bits}bits'),
                       ('full', sweep.FULL_BUDGET)]]
  for r in rows:
    assert set(r) <= set(sweep.COLUMNS)
    assert r['bits'] <= r['budget_bits'] and r['bits_mean'] <= r['bits']
    assert r['bits_per_coordinate'] == r['bits'] / g.coordinates
    assert r['fraction_of_fp16'] == r['bits'] / (g.coordinates * 16)
    assert len(r['rel_error_per_layer']) == 2 and len(r['rel_error_per_scale']) == 4
  full_budget = rows[-2:]
  for r in full_budget:
    assert r['bits'] == g.full_bits
    if dtype == 'float32':                # exact up to the fp32 summation order of the two paths
      assert r['rel_error'] < 1e-6
    else:                                   # fp16 storage of the cache only
      assert 0 < r['rel_error'] < 2e-3
  assert rows[0]['rel_error'] > 1e-2       # and compressed points do lose something


def test_rank_bound_matches_brute_force_and_bounds_entry_caches(data):
  g = CacheGeometry(PN, D)
  bound = rank_bound.RankBound(data, batch=3)
  # brute force: per (layer, sequence, head, scale) project out the own values, SVD, tail beyond m
  exact = np.asarray(compress.exact_outputs(*data.slice(0, 6), PN), np.float64)
  def brute(m):
    tail = 0.0
    for st, S in zip(g.scale_starts, g.scale_sizes):
      for idx in np.ndindex(*exact.shape[:3]):
        A = exact[idx][st:st + S]
        V = data.numpy(0, 6)['v'][idx][st:st + S].astype(np.float64)
        P = np.eye(D) - np.linalg.pinv(V) @ V
        s = np.linalg.svd(A @ P, compute_uv=False)
        tail += (s[m:] ** 2).sum()
    return np.sqrt(tail / (exact ** 2).sum())
  for m in (0, 1, 2, 3):
    want = brute(m)
    want = want if want > rank_bound.RESOLUTION else 0.0       # below float32 resolution: no bound
    assert bound.rel_error(m) == pytest.approx(want, rel=1e-6, abs=1e-12)
  assert bound.rel_error(0) > bound.rel_error(1) > bound.rel_error(2) > 0
  assert bound.rel_error(g.prefix_tokens) == pytest.approx(0.0, abs=1e-7)   # everything fits
  # caches of fp16 key+value entries cannot beat the bound at their budget (the theorem)
  for m in ('window', 'snapkv', 'tome', 'h2o'):
    row = sweep.evaluate_spec(sweep.MethodSpec.parse(m), '20%', data, g, no_params, batch=6, level=0.95)
    entries = bound.vectors(row['budget_bits'], 'kv_entries', g.kv_bits)
    assert row['rel_error'] >= bound.rel_error(entries) * (1 - 1e-6), m
  rows = rank_bound.rows(bound, g, [('20%', int(0.2 * g.fp16_bits))])
  assert [r['setting'] for r in rows] == ['values', 'kv_entries']
  assert rows[0]['rel_error'] <= rows[1]['rel_error']       # values-only counts more vectors per bit


def test_a_budget_that_keeps_no_entry_is_flagged(data):
  g = CacheGeometry(PN, D)
  spec = sweep.MethodSpec.parse('window')
  empty = sweep.evaluate_spec(spec, '64bits', data, g, no_params, batch=6, level=0.95)
  assert empty['warning'] == sweep.ZERO_ENTRIES
  assert sweep.evaluate_spec(spec, '50%', data, g, no_params, batch=6, level=0.95)['warning'] == ''


def test_batches_are_capped_by_bytes_and_the_gaussian_reference_does_not_depend_on_them(data, monkeypatch):
  from eval.bounds import gaussian_reference
  per = data.sequence_bytes()
  assert per == 4 * 4 * 2 * 2 * sum(p * p for p in PN) * D              # q, k, v, reference in float32
  assert data.capped_batch(32, 0) == 32 and data.capped_batch(32, 10 * per) == 10
  assert data.capped_batch(32, 3 * per + per // 2) == 3 and data.capped_batch(32, 1) == 1   # >= 1 sequence
  with pytest.raises(ValueError, match='sweep.batch must be >= 1'):
    data.capped_batch(0, per)
  whole = gaussian_reference.components(data, batch=6)
  monkeypatch.setattr(gaussian_reference, 'WORK_BYTES', 1)            # one sequence per batch
  one = gaussian_reference.components(data, batch=6)
  np.testing.assert_allclose(one[0], whole[0], rtol=1e-9, atol=1e-12 * whole[0].max())
  # the total is the energy of float32 reference outputs, computed per batch: float32 rounding
  assert one[1] == pytest.approx(whole[1], rel=1e-6) and one[2] == whole[2]


def test_amortised_bits_over_the_budget_are_flagged_or_fitted(data):
  """pca's shared bases charged to few served sequences put its amortised bits over the budget: the row
  says so; with the fit (sweep.fit_amortised) its per-head budget is the budget less that share
  (floor), and the amortised bits then hold. A method without shared parameters is left as it is."""
  g = CacheGeometry(PN, D)
  q, k, v = data.slice(0, 6)
  calib = {'q': q, 'k': k, 'v': v}
  params = lambda spec, comp: comp.init_params(jax.random.key(0), 2, 2, calibration=calib)
  spec = sweep.MethodSpec.parse('pca')
  run = lambda served, **kw: sweep.evaluate_spec(spec, '25%', data, g, params, batch=6, level=0.95,
                                                 served_sequences=served, **kw)
  budget = compress.Budget.parse('25%', g).bits
  shared = run(1)['shared_bits']
  served = int(np.ceil(shared / (2 * 2 * 0.3 * budget)))       # a share of about 30 % of the budget
  share = shared / (2 * 2 * served)
  row = run(served)
  assert row['budget_bits'] == row['per_head_budget_bits'] == budget
  assert row['amortised_bits'] == pytest.approx(row['bits'] + share, rel=1e-12)
  assert row['amortised_bits'] > budget and 'exceed the budget' in row['warning']
  fit = lambda s, comp: comp.shared_bits(params(s, comp)) / (2 * 2 * served)
  fitted = run(served, share=fit)
  assert fitted['budget_bits'] == budget and fitted['per_head_budget_bits'] == int(np.floor(budget - share))
  assert fitted['bits'] <= fitted['per_head_budget_bits']
  assert fitted['amortised_bits'] <= budget and fitted['warning'] == ''
  with pytest.raises(ValueError, match=r'shared parameters alone .* exceed the budget.*served_sequences'):
    run(1, share=lambda s, comp: comp.shared_bits(params(s, comp)) / 4)    # bases > the whole budget
  w = sweep.evaluate_spec(sweep.MethodSpec.parse('window'), '25%', data, g, no_params, batch=6, level=0.95,
                          served_sequences=1, share=lambda s, comp: comp.shared_bits(None) / 4)
  assert w['per_head_budget_bits'] == budget and w['warning'] == '' and w['shared_bits'] == 0
