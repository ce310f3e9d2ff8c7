"""eval/frontier.py end to end: the hard-instance frontier, the model pipeline on the in-repo tiny
official fixture (capture, sweep, bounds, Pareto, closed loop, TensorBoard), resume, refusal, and the
TensorBoard HTTP API serving what the CSVs hold."""
import csv
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from compress.core.budget import Budget, CacheGeometry
from configs import frontier as frontier_config
from eval import closed_loop, compare, frontier, hard, sweep, tb

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
REQUIRED = ('method', 'setting', 'budget', 'bits', 'bits_per_coordinate', 'fraction_of_fp16', 'rel_error')


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def check_pareto(rows, front):
  keys = {(r['dataset'], r['method'], r['setting'], r['budget']) for r in rows
          if r['deployable'] == 'True'}
  for name in {p['frontier'] for p in front}:
    for dataset in {p['dataset'] for p in front}:
      pts = [p for p in front if p['frontier'] == name and p['dataset'] == dataset]
      assert all((p['dataset'], p['method'], p['setting'], p['budget']) in keys for p in pts)  # a subset
      assert all(float(a['bits']) < float(b['bits']) and float(a['rel_error']) > float(b['rel_error'])
                 for a, b in zip(pts, pts[1:]))                                              # monotone
      if name.startswith('family:'):
        assert {p['family'] for p in pts} <= {name[len('family:'):]}


# ---------------------------------------------------------------------------- hard instance
def hard_config():
  c = frontier_config.get_config('hard')
  c.hard.update({'n': 16, 'd': 8, 'patch_nums': (1, 2, 3), 'seeds': (0, 1),
                 'methods': ('full', 'window', 'kivi'), 'budgets': ('50%',)})
  c.progress = False
  return c


@pytest.mark.slow
def test_hard_frontier_respects_the_rate_distortion_bound_and_resumes(tmp_path, monkeypatch):
  calls = []
  real = hard.evaluate_spec
  monkeypatch.setattr(hard, 'evaluate_spec', lambda *a: calls.append(a[2:4]) or real(*a))
  workdir = str(tmp_path / 'hard')
  assert frontier.run(hard_config(), workdir)['failed'] == []
  rows = read_csv(os.path.join(workdir, 'frontier.csv'))
  assert len(calls) == len(rows) == 6                              # 3 methods x (flat, var)
  assert {r['dataset'] for r in rows} == {'flat', 'var'}
  for r in rows:
    assert all(r[c] != '' for c in REQUIRED + ('lower_bound_bits', 'min_error_at_bits'))
    # the theorem: no compressor beats the rate-distortion curve (per draw, hence on average)
    assert r['seeds_below_bound'] == '0'
    assert float(r['rel_error']) >= float(r['min_error_at_bits']) * (1 - 1e-6)
    assert float(r['bits']) >= float(r['lower_bound_bits']) * (1 - 1e-6)
    g = CacheGeometry(tuple(int(x) for x in r['patch_nums'].split()), 8)
    assert float(r['bits_per_coordinate']) == pytest.approx(float(r['bits']) / g.coordinates)
    if r['method'] != 'full':
      assert int(r['bits']) <= int(r['budget_bits']) == Budget.parse('50%', g).bits
  check_pareto(rows, read_csv(os.path.join(workdir, 'pareto.csv')))
  bounds = read_csv(os.path.join(workdir, 'bounds.csv'))
  assert {b['dataset'] for b in bounds} == {'flat', 'var'} and {b['bound'] for b in bounds} == {'rate_distortion'}
  for f in ('frontier.png', 'tb/flat', 'tb/var', 'tb/hparams'):
    assert os.path.exists(os.path.join(workdir, f)), f
  before = open(os.path.join(workdir, 'frontier.csv')).read()
  calls.clear()
  frontier.run(hard_config(), workdir)                             # resume: nothing recomputed
  assert calls == [] and open(os.path.join(workdir, 'frontier.csv')).read() == before
  changed = hard_config()
  changed.hard.budgets = ('25%',)
  with pytest.raises(ValueError, match='different config'):
    frontier.run(changed, workdir)


def test_configs_are_valid():
  for v in frontier_config.VARIANTS:
    c = frontier_config.get_config(v)
    for names, learned in ((c.sweep.methods, False), (c.learned.methods, True), (c.hard.methods, False)):
      frontier.specs_of(names, learned)
  from configs import default
  assert default.get_config().to_dict() == frontier_config.get_config('default').to_dict()
  with pytest.raises(ValueError, match='variant'):
    frontier_config.get_config('huge')
  c = frontier_config.get_config('tiny')
  c.sweep.methods = ('lowrank_learned',)
  with pytest.raises(ValueError, match='learned.methods'):
    frontier.sweep_jobs(c, CacheGeometry((1, 2, 3, 4), 64))


# ---------------------------------------------------------------------------- model pipeline
def tiny_model_config():
  c = frontier_config.get_config('tiny')
  c.model.update({'source': 'official', 'var_ckpt': str(FIX / 'var.pth'), 'vae_ckpt': str(FIX / 'vae.pth'),
                  'patch_nums': (1, 2, 3, 4)})
  c.capture.update({'train_shards': 1, 'val_shards': 2, 'shard_size': 2})
  c.sweep.update({'methods': ('full', 'oracle', 'window', 'pca'), 'budgets': ('25%',),
                  'calibration_sequences': 4, 'batch': 4})
  c.learned.update({'methods': ('lowrank_learned',), 'budgets': ('25%',)})
  c.learned.train.update({'num_steps': 4, 'batch_size': 4, 'eval_sequences': 4, 'calibration_sequences': 4})
  c.closed_loop.update({'methods': ('window',), 'budgets': ('25%',), 'labels': (1, 2), 'seeds': (0,)})
  c.progress = False
  return c


def test_bad_configs_fail_before_any_work(tmp_path):
  for field, value, match in (('closed_loop.methods', ('oracle',), 'oracle'),
                              ('sweep.methods', ('window(size=2)',), 'no setting'),
                              ('learned.methods', ('window',), 'sweep.methods'),
                              ('sweep.budgets', ('lots',), 'budget')):        # (this one loads the model)
    c = tiny_model_config()
    section, name = field.split('.')
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
      frontier.run(c, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run')


@pytest.fixture(scope='module')
def model_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('frontier') / 'run')
  result = frontier.run(tiny_model_config(), workdir)
  assert result['failed'] == []
  return workdir


@pytest.mark.slow
def test_model_frontier_outputs(model_run):
  rows = read_csv(os.path.join(model_run, 'frontier.csv'))
  assert set(REQUIRED) <= set(rows[0])
  g = CacheGeometry((1, 2, 3, 4), 64)
  by_bits = Budget.parse('25%', g).bits
  got = {(r['method'], r['setting'], r['budget']) for r in rows}
  assert got == {('full', 'default', 'full'), ('oracle', 'default', '25%'), ('window', 'default', '25%'),
                 ('pca', 'default', '25%'), ('lowrank_learned', 'default', '25%'),
                 ('rank_bound', 'values', '25%'), ('rank_bound', 'kv_entries', '25%')}
  assert os.path.isdir(os.path.join(model_run, 'train', f'lowrank_learned-default-{by_bits}bits', 'checkpoints'))
  for r in rows:
    assert float(r['bits_per_coordinate']) == pytest.approx(float(r['bits']) / g.coordinates)
    assert float(r['fraction_of_fp16']) == pytest.approx(float(r['bits']) / g.fp16_bits)
    if r['family'] != 'bound':
      assert float(r['rel_error_ci_low']) <= float(r['rel_error']) <= float(r['rel_error_ci_high'])
    if r['family'] not in ('reference', 'bound'):
      assert 0 < int(r['bits']) <= int(r['budget_bits']) == Budget.parse('25%', g).bits
      assert len(r['rel_error_per_layer'].split()) == 2 and len(r['rel_error_per_scale'].split()) == 4
      assert int(r['num_sequences']) == 8 and int(r['num_units']) == 4    # 4 val images, 2 halves each
  by = {(r['method'], r['setting']): r for r in rows}
  assert int(by['full', 'default']['bits']) == g.fp16_bits and float(by['full', 'default']['rel_error']) < 2e-3
  assert by['oracle', 'default']['deployable'] == 'False'
  # eviction of fp16 entries cannot beat the rank bound of key+value entries at its budget
  assert float(by['window', 'default']['rel_error']) >= float(by['rank_bound', 'kv_entries']['rel_error'])
  front = read_csv(os.path.join(model_run, 'pareto.csv'))
  check_pareto(rows, front)
  assert 'oracle' not in {p['method'] for p in front}
  cl = read_csv(os.path.join(model_run, 'closed_loop.csv'))
  assert len(cl) == 1 and cl[0]['method'] == 'window' and int(cl[0]['images']) == 2
  assert len(cl[0]['token_agreement_per_scale'].split()) == 4
  assert cl[0]['token_agreement_per_scale'].split()[0] == '1.0'        # scale 0 sees no cache
  assert 0 <= float(cl[0]['token_agreement']) <= 1 and -1 <= float(cl[0]['ssim']) <= 1
  assert float(cl[0]['kl']) >= 0 and np.isfinite(float(cl[0]['psnr']))
  assert float(cl[0]['cache_bytes_counted']) <= float(cl[0]['fp16_cache_bytes']) * 0.25 + 1
  for f in ('frontier.png', 'samples_window.png', 'bounds.csv', 'capture/manifest.json', 'tb/.digest'):
    assert os.path.exists(os.path.join(model_run, f)), f


@pytest.mark.slow
def test_paired_compare_reproduces_the_sweep(model_run):
  """eval.compare re-runs the learned method (its trained params) and a heuristic on the same images:
  the same errors and bits as frontier.csv, ratio = their quotient inside its paired interval."""
  rows = {r['method']: r for r in read_csv(os.path.join(model_run, 'frontier.csv'))}
  (row,) = compare.compare(model_run, 'lowrank_learned', 'pca', ['25%'])
  for tag, name in (('a', 'lowrank_learned'), ('b', 'pca')):
    assert row[f'rel_error_{tag}'] == pytest.approx(float(rows[name]['rel_error']), rel=1e-6)
    assert row[f'bits_{tag}'] == int(rows[name]['bits'])
  assert row['ratio'] == pytest.approx(row['rel_error_a'] / row['rel_error_b'], rel=1e-6)
  assert row['ratio_ci_low'] <= row['ratio'] <= row['ratio_ci_high'] and row['num_images'] == 4
  with pytest.raises(FileNotFoundError, match='evict_learned'):
    compare.compare(model_run, 'evict_learned', 'pca', ['25%'])       # not trained by this run


def test_paired_ratio_closed_forms(tmp_path):
  d2 = np.array([1.0, 4.0, 0.5, 2.0])
  assert compare.paired_ratio(d2, d2, d2) == (1.0, 1.0, 1.0)
  ratio, lo, hi = compare.paired_ratio(0.25 * d2, d2, d2)            # every image: error halved
  assert ratio == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
  with pytest.raises(FileNotFoundError, match='eval.frontier'):
    compare.load_run(str(tmp_path))


@pytest.mark.slow
def test_model_frontier_resumes_and_refuses_another_config(model_run, monkeypatch):
  before = {f: open(os.path.join(model_run, f)).read() for f in ('frontier.csv', 'closed_loop.csv')}
  boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError('a finished point was recomputed'))
  monkeypatch.setattr(sweep, 'evaluate_spec', boom)
  monkeypatch.setattr(closed_loop, 'evaluate_policy', boom)
  assert frontier.run(tiny_model_config(), model_run)['failed'] == []
  assert {f: open(os.path.join(model_run, f)).read() for f in before} == before
  changed = tiny_model_config()
  changed.sweep.budgets = ('10%',)
  with pytest.raises(ValueError, match='different config'):
    frontier.run(changed, model_run)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _get(port, path, **params):
  url = f'http://127.0.0.1:{port}{path}' + ('?' + urllib.parse.urlencode(params) if params else '')
  with urllib.request.urlopen(url, timeout=30) as r:
    body = r.read()
  return body if path.endswith('individualImage') else json.loads(body)


@pytest.mark.slow
def test_tensorboard_serves_the_frontier(model_run):
  logdir = os.path.join(model_run, 'tb')
  port = _free_port()
  proc = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', logdir, '--host',
                           '127.0.0.1', '--port', str(port), '--load_fast=false', '--reload_interval=1'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline, tags = time.time() + 120, {}
    while time.time() < deadline:
      try:
        tags = _get(port, '/data/plugin/scalars/tags')
        if 'val' in tags and 'closed_loop' in tags:
          break
      except OSError:
        pass
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      time.sleep(1)
    rows = read_csv(os.path.join(model_run, 'frontier.csv'))
    coords = CacheGeometry((1, 2, 3, 4), 64).coordinates
    for r in rows:
      name = tb.tag('frontier', r['method'], r['setting'])
      assert name in tags['val'], (name, sorted(tags['val']))
      series = _get(port, '/data/plugin/scalars/scalars', run='val', tag=name)
      values = {step: value for _, step, value in series}
      assert values[tb.budget_step(float(r['budget_bits']), coords)] == pytest.approx(float(r['rel_error']),
                                                                                       rel=1e-6, abs=1e-12)
    runs = _get(port, '/data/runs')       # the hparams dashboard: one session (run) per point
    assert len([r for r in runs if r.startswith('hparams/')]) == len(rows)
    images = _get(port, '/data/plugin/images/tags')
    assert {'frontier', 'samples/window'} <= set(images['val'])
    for t in ('frontier', 'samples/window'):
      (entry,) = _get(port, '/data/plugin/images/images', run='val', tag=t, sample=0)
      png = _get(port, '/data/plugin/images/individualImage', **dict(urllib.parse.parse_qsl(entry['query'])))
      assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 1000
  finally:
    proc.kill()
    proc.wait(timeout=30)
