"""The hard instance: its construction, its attention pattern (against the model's exact attention)
and the CLI (CSV contents, refusal to overwrite, clear errors)."""
import csv
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.theory import hard_instance, hard_sweep
from compress.theory.hard_instance import flat_patch_nums, make_instance

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


def test_flat_schedule_caches_exactly_n_tokens():
  for n in range(1, 400):
    pn = flat_patch_nums(n)
    assert sum(p * p for p in pn[:-1]) == n
    assert pn[-1] == math.ceil(math.sqrt(n)) and pn[-1] ** 2 >= n
    assert list(pn[:-1]) == sorted(pn[:-1]) and len(pn) <= 5
  assert flat_patch_nums(256) == (16, 16)


@pytest.mark.parametrize('kw', [dict(n=50, d=16), dict(patch_nums=(1, 2, 3, 4, 3), d=32)])
def test_construction(kw):
  inst = make_instance(**kw, values='gaussian', seed=4)
  g, T, P, d = inst.geometry, inst.T, inst.num_probes, inst.d
  assert T == g.prefix_tokens and P == g.scale_sizes[-1]
  if 'n' in kw:
    assert T == kw['n']
  np.testing.assert_array_equal(np.abs(inst.keys_TD), 1 / np.float32(np.sqrt(d)))
  q, k, v = (np.asarray(x) for x in (inst.q, inst.k, inst.v))
  assert q.shape == k.shape == v.shape == (1, 1, 1, g.num_tokens, d)
  np.testing.assert_array_equal(q[0, 0, 0, :T], 0)                     # prefix queries carry nothing
  np.testing.assert_array_equal(k[0, 0, 0, T:], 0)                     # probes' own keys and values are 0
  np.testing.assert_array_equal(v[0, 0, 0, T:], 0)
  np.testing.assert_allclose(q[0, 0, 0, T:], inst.beta * inst.keys_TD[inst.target_P], rtol=1e-6)
  counts = np.bincount(inst.target_P, minlength=T)                      # each token probed (or distinct)
  assert counts.min() >= (1 if P >= T else 0) and counts.max() <= math.ceil(P / T)
  gram = inst.keys_TD.astype(np.float64) @ inst.keys_TD.T
  assert inst.mu == pytest.approx(max(gram[i, j] for i in range(T) for j in range(T) if i != j))
  assert len({tuple(r) for r in inst.keys_TD}) == T                     # distinct keys


@pytest.mark.parametrize('kw', [dict(n=36, d=16), dict(patch_nums=(1, 2, 3, 4), d=16, beta=3.0)])
def test_attention_matches_exact_model_attention(kw):
  inst = make_instance(**kw, seed=2)
  g = inst.geometry
  exact = compress.exact_outputs(inst.q, inst.k, inst.v, g.patch_nums)
  np.testing.assert_allclose(inst.probe_outputs(exact), inst.exact_PD, rtol=1e-4, atol=1e-5)
  # leak: the mass off each probe's target, from the attention matrix and independently from logits
  logits = inst.q[0, 0, 0, g.prefix_tokens:] @ inst.k[0, 0, 0].T
  p = np.asarray(jnp.exp(logits - logits.max(1, keepdims=True)), np.float64)
  p /= p.sum(1, keepdims=True)
  on_target = p[np.arange(inst.num_probes), inst.target_P]
  assert inst.leak == pytest.approx((1 - on_target).max(), rel=1e-3, abs=1e-7)
  s = np.exp(inst.beta * (inst.keys_TD.astype(np.float64) @ inst.keys_TD.T))
  assert inst.cond == pytest.approx(np.linalg.cond(s / s.sum(1, keepdims=True)), rel=1e-6)


def test_default_beta_keeps_the_leak_below_xi():
  for d, n, xi in [(64, 256, 0.01), (32, 100, 0.05), (16, 30, 0.1)]:
    inst = make_instance(n=n, d=d, xi=xi, seed=0)
    assert inst.beta == pytest.approx(math.log(n / xi) / (1 - inst.mu))
    # off-target mass <= (T-1) e^{-beta (1-mu)} + P e^{-beta} <= xi (1 + P / T)
    assert inst.leak <= xi * (1 + inst.num_probes / inst.T)
    assert inst.cond < 1 + 10 * xi


def test_values_and_bound_applicability():
  g = make_instance(n=16, d=8, seed=0)
  pm = make_instance(n=16, d=8, values='pm1', seed=0)
  assert set(np.unique(pm.values_TD)) == {-1.0, 1.0}
  assert abs(g.values_TD.mean()) < 0.3 and 0.7 < g.values_TD.std() < 1.3
  assert g.bound_applies and g.lower_bound_bits(0.1) > 0
  assert not pm.bound_applies and np.isnan(pm.lower_bound_bits(0.1))
  other = hard_instance.redraw(g, 1)
  assert other.beta == g.beta and not np.array_equal(other.values_TD, g.values_TD)


@pytest.mark.parametrize('kv_dtype,tol', [('float32', 1e-5), ('float16', 2e-3)])
def test_full_cache_is_exact_up_to_storage(kv_dtype, tol):
  inst = make_instance(n=36, d=16, seed=5, kv_dtype=kv_dtype)
  row = hard_sweep.evaluate_method(inst, 'full', 0.5)
  assert row['rel_error'] < tol and row['bits'] == inst.geometry.full_bits
  assert row['lower_bound_bits'] < row['bits']


@pytest.mark.parametrize('kw,match', [
    (dict(n=8, patch_nums=(1, 2)), 'exactly one'), (dict(n=8, d=0), 'd'), (dict(n=8, beta=-1.0), 'beta'),
    (dict(n=8, xi=1.5), 'xi'), (dict(n=8, values='uniform'), 'values'), (dict(n=1), '2 tokens'),
    (dict(n=40, d=1), 'raise d')])
def test_bad_parameters_are_clear_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    make_instance(**kw)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'compress.theory.hard_sweep', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_csv_and_never_overwrites(tmp_path):
  out = str(tmp_path / 'run')
  args = ['--out', out, '--n', '16', '--d', '8', '--methods', 'full,random', '--budgets', '0.1,50%']
  r = _cli(*args)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(out, 'hard_instance.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [(x['method'], x['budget']) for x in rows] == [
      ('full', '0.1'), ('full', '50%'), ('random', '0.1'), ('random', '50%')]
  inst = make_instance(n=16, d=8)
  for x in rows:
    assert float(x['lower_bound_bits']) == pytest.approx(float(inst.lower_bound_bits(float(x['rel_error']))))
    assert float(x['mu']) == pytest.approx(inst.mu) and int(x['T']) == 16 and x['oracle'] == 'False'
    assert float(x['bits']) >= float(x['lower_bound_bits'])
  assert os.path.exists(os.path.join(out, 'hard_instance_bound.csv'))
  before = open(os.path.join(out, 'hard_instance.csv')).read()
  r = _cli(*args)
  assert r.returncode != 0 and 'exists' in r.stderr and '--overwrite' in r.stderr
  assert open(os.path.join(out, 'hard_instance.csv')).read() == before
  r = _cli('--out', out, '--patch_nums', '1,2,3', '--d', '8')
  assert r.returncode != 0 and '--var' in r.stderr
  r = _cli('--out', out, '--n', '16', '--budgets', 'lots', '--overwrite')
  assert r.returncode != 0 and 'budget' in r.stderr
