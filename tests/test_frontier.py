"""eval/frontier/job.py end to end: the hard-instance frontier, the model pipeline on the in-repo tiny
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
from eval.quality import closed_loop, compare
from eval.frontier import job as frontier
from eval.bounds import hard
from eval.engine import sweep
from eval.report import pareto, tb

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
      x = pareto.X                                 # the frontier's memory axis: amortised bits
      assert all(float(a[x]) < float(b[x]) and float(a['rel_error']) > float(b['rel_error'])
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
  for f in ('frontier.png', 'tb/.digest', 'tb/pareto', 'tb/reference/full', 'tb/bound/rate_distortion.keys_free',
            'tb_hparams/.digest'):
    assert os.path.exists(os.path.join(workdir, f)), f
  before = open(os.path.join(workdir, 'frontier.csv')).read()
  calls.clear()
  frontier.run(hard_config(), workdir)                             # resume: nothing recomputed
  assert calls == [] and open(os.path.join(workdir, 'frontier.csv')).read() == before
  extended = hard_config()                                         # a new budget: only its points run
  extended.hard.budgets = ('50%', '25%')
  frontier.run(extended, workdir)
  assert sorted((str(s), b) for s, b in calls) == [(m, '25%') for m in ('kivi', 'kivi', 'window', 'window')]
  after = open(os.path.join(workdir, 'frontier.csv')).read()
  assert after.startswith(before) and len(read_csv(os.path.join(workdir, 'frontier.csv'))) == 10
  changed = hard_config()                                          # another instance: refused
  changed.hard.n = 25
  with pytest.raises(ValueError, match='different config'):
    frontier.run(changed, workdir)
  assert open(os.path.join(workdir, 'frontier.csv')).read() == after


def test_workdir_guard_extends_and_guards_code(tmp_path):
  """Extendable keys may change; other keys and a change of package sources are refused, with the flag
  that forces each; nothing is deleted."""
  import ml_collections
  from train import workdir_guard
  cfg = lambda **kw: ml_collections.ConfigDict({'sweep': {'methods': ('a',), 'val_sequences': 4},
                                                'overwrite': False, 'allow_code_change': False, **kw})
  wd = str(tmp_path / 'run')
  assert workdir_guard.prepare_workdir(wd, cfg(), '{}', extendable=('sweep.methods',), code_sha256='c1') == []
  more = cfg(sweep={'methods': ('a', 'b'), 'val_sequences': 4})
  ext = workdir_guard.prepare_workdir(wd, more, '{}', extendable=('sweep.methods',), code_sha256='c1')
  assert len(ext) == 1 and ext[0].startswith('sweep.methods')
  with pytest.raises(ValueError, match='different config'):
    workdir_guard.prepare_workdir(wd, cfg(sweep={'methods': ('a', 'b'), 'val_sequences': 8}), '{}',
                                  extendable=('sweep.methods',), code_sha256='c1')
  with pytest.raises(ValueError, match='allow_code_change'):
    workdir_guard.prepare_workdir(wd, more, '{}', extendable=('sweep.methods',), code_sha256='c2')
  more.allow_code_change = True
  workdir_guard.prepare_workdir(wd, more, '{}', extendable=('sweep.methods',), code_sha256='c2')
  assert json.load(open(os.path.join(wd, 'config.json')))['code_sha256'] == 'c2'
  fp = workdir_guard.source_fingerprint()
  assert len(fp) == 64 and fp == workdir_guard.source_fingerprint()


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
  # Inception FID off: the fixture model's images are not worth a 2048-d Inception pass in every test
  c.closed_loop.update({'methods': ('window',), 'budgets': ('25%',), 'labels': (1, 2), 'seeds': (0,),
                        'inception': False})
  assert tuple(c.tuning.grids.pca) == ('key_fraction=0.25', 'key_fraction=0.75')   # the tiny variant's grid
  # shared parameters charged to 64 served sequences (the 8 held-out ones would leave lowrank_learned no
  # per-head bits at 25 % once its projections are amortised: sweep.fit_amortised)
  c.sweep.served_sequences = 64
  c.progress = False
  return c


class ValGuard:
  """Lets a frontier run open its `val` split only once every dev point of its tuning grid is in
  tuning.csv and every learned compressor has its last checkpoint (else opening val raises, and the
  run fails); records what it found at the first opening."""

  def __init__(self, workdir: str, dev_points: int, steps: int):
    self.workdir, self.dev_points, self.steps, self.seen = workdir, dev_points, steps, None

  def check(self) -> None:
    tuning_csv = os.path.join(self.workdir, 'tuning.csv')
    dev = read_csv(tuning_csv) if os.path.exists(tuning_csv) else []
    runs = {}
    for name in os.listdir(os.path.join(self.workdir, 'train')) if os.path.isdir(
        os.path.join(self.workdir, 'train')) else []:
      steps = [int(x) for x in os.listdir(os.path.join(self.workdir, 'train', name, 'checkpoints')) if x.isdigit()]
      runs[name] = max(steps, default=0)
    if self.seen is None:
      self.seen = {'dev_rows': len(dev), 'runs': runs}
    if len(dev) < self.dev_points or not runs or min(runs.values()) < self.steps:
      raise OSError(f'val opened before tuning and training finished: {len(dev)} dev rows, runs {runs}')

  def __enter__(self):
    from var_jax import capture, capture_data  # pylint: disable=g-import-not-at-top
    real, guard = capture_data.CaptureDataset, self

    class Guarded(real):
      def __init__(self, path, split='train', **kw):
        if split == 'val':
          guard.check()
        super().__init__(path, split, **kw)
    self._patch = pytest.MonkeyPatch()
    self._patch.setattr(capture, 'CaptureDataset', Guarded)
    self._patch.setattr(capture_data, 'CaptureDataset', Guarded)
    return self

  def __exit__(self, *exc):
    self._patch.undo()


def test_bad_configs_fail_before_any_work(tmp_path):
  for field, value, match in (('closed_loop.methods', ('oracle',), 'oracle'),
                              ('sweep.methods', ('window(size=2)',), 'no setting'),
                              ('learned.methods', ('window',), 'sweep.methods'),
                              ('sweep.batch', 0, r'sweep.batch must be an integer >= 1'),
                              ('sweep.compile_ahead', -1, r'sweep.compile_ahead must be an integer >= 0'),
                              ('sweep.batch_bytes', -5, r'sweep.batch_bytes must be an integer >= 0'),
                              ('sweep.budgets', ('lots',), 'budget')):        # (this one loads the model)
    c = tiny_model_config()
    section, name = field.split('.')
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
      frontier.run(c, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run')


def test_learned_train_budget_shares_budget_free_scorers(tmp_path):
  """learned.train_budget: scorers (budget_free_params) train once there and serve every budget;
  compressors whose parameters depend on the budget (low-rank bases) still train at their own."""
  import compress
  from eval.engine.params import Params
  c = frontier_config.get_config('default')
  g = CacheGeometry((1, 2, 3, 4), 64)
  params = Params(c, str(tmp_path), str(tmp_path), None, 2, 2)
  for name, shared in (('merge_learned', True), ('evict_learned', True), ('lowrank_learned', False)):
    spec = sweep.MethodSpec.parse(name)
    comp = spec.make(g, '25%')
    want = Budget.parse(c.learned.train_budget, g).bits if shared else comp.budget.bits
    assert params.trained_compressor(spec, comp).budget.bits == want == params.trained_bits(spec, comp)
  assert params.trained_bits(sweep.MethodSpec.parse('cam'), compress.make('cam', g, '25%')) == 0
  c.learned.train_budget = '100%'
  with pytest.raises(ValueError, match='whole cache'):
    Params(c, str(tmp_path), str(tmp_path), None, 2, 2).trained_compressor(
        sweep.MethodSpec.parse('merge_learned'), compress.make('merge_learned', g, '25%'))


def test_cache_set_streams_from_the_capture(model_run):
  """The sweep's held-out set reads the memory-mapped capture batch by batch: it holds no arrays."""
  from var_jax.capture import CaptureDataset
  ds = CaptureDataset(os.path.join(model_run, 'capture'), 'val')
  data = sweep.CacheSet.from_dataset(ds)
  assert data._arrays is None and data.num_sequences == ds.num_sequences == 8  # pylint: disable=protected-access
  got, want = data.numpy(2, 5), ds.get(np.arange(2, 5))
  for t in 'qkv':
    np.testing.assert_array_equal(got[t], want[t])
  assert data.dtype == 'float32' and sweep.CacheSet.from_dataset(ds, 3).num_sequences == 3


@pytest.fixture(scope='module')
def model_run(tmp_path_factory):
  """The tiny model run; its val split is unreadable until tuning and training are done (ValGuard)."""
  workdir = str(tmp_path_factory.mktemp('frontier') / 'run')
  with ValGuard(workdir, dev_points=2, steps=4) as guard:
    result = frontier.run(tiny_model_config(), workdir)
  assert result['failed'] == []
  with open(os.path.join(workdir, 'val_guard.json'), 'w') as f:
    json.dump(guard.seen, f)
  return workdir


@pytest.mark.slow
def test_val_is_read_only_after_tuning_and_training(model_run):
  """#22: train calibrates and trains, dev chooses settings, val is read only by the final evaluation:
  when the run first opened val, tuning.csv held both dev points and lowrank_learned its last step."""
  with open(os.path.join(model_run, 'val_guard.json')) as f:
    seen = json.load(f)
  assert seen['dev_rows'] == 2 and list(seen['runs'].values()) == [4]
  with open(os.path.join(model_run, 'capture', 'manifest.json')) as f:
    m = json.load(f)
  assert len(m['splits']['dev']) == 1 and set(m['splits']) == {'train', 'val', 'dev'}
  dev_seeds = {m['shards'][s]['seed'] for s in m['splits']['dev']}
  val_seeds = {m['shards'][s]['seed'] for s in m['splits']['val']}
  train_seeds = {m['shards'][s]['seed'] for s in m['splits']['train']}
  assert not (dev_seeds & val_seeds) and not (dev_seeds & train_seeds)


@pytest.mark.slow
def test_grid_setting_is_the_best_on_dev(model_run):
  """pca's key_fraction is chosen per budget by its dev error (tuning.csv): the val row carries the
  argmin candidate and says so in `selection`; the plot and TensorBoard draw it as one curve."""
  dev = [r for r in read_csv(os.path.join(model_run, 'tuning.csv')) if r['method'] == 'pca']
  assert {r['setting'] for r in dev} == {'key_fraction=0.25', 'key_fraction=0.75'}
  assert {r['dataset'] for r in dev} == {'dev'}
  best = min(dev, key=lambda r: float(r['rel_error']))['setting']
  (row,) = [r for r in read_csv(os.path.join(model_run, 'frontier.csv')) if r['method'] == 'pca']
  assert row['setting'] == best and row['dataset'] == 'val'
  assert row['selection'] == f'best on dev of pca(key_fraction=0.25|key_fraction=0.75): {best}'
  runs = {run for run, _ in tb.series(read_csv(os.path.join(model_run, 'frontier.csv')), [], [], [])}
  assert tb.run_name('lowrank', 'pca', 'best') in runs and tb.run_name('lowrank', 'pca', best) not in runs
  # dev's references came from their own store, as val's do (a dev program is then its val point's)
  with open(os.path.join(model_run, 'exact_dev', 'manifest.json')) as f:
    assert json.load(f)['split'] == 'dev'
  assert any(n.endswith('.npy') for n in os.listdir(os.path.join(model_run, 'exact_dev')))


@pytest.mark.slow
def test_model_frontier_outputs(model_run):
  rows = read_csv(os.path.join(model_run, 'frontier.csv'))
  assert set(REQUIRED) <= set(rows[0])
  g = CacheGeometry((1, 2, 3, 4), 64)
  by_bits = Budget.parse('25%', g).bits
  got = {(r['method'], r['budget']) for r in rows}
  assert got == {('full', 'full'), ('oracle', '25%'), ('window', '25%'), ('pca', '25%'), ('lowrank_learned', '25%'),
                 ('rank_bound', '25%')}
  learned = next(r for r in rows if r['method'] == 'lowrank_learned')
  fit_bits = int(learned['per_head_budget_bits'])        # sweep.fit_amortised: its shared share taken off
  share = float(learned['shared_bits']) / (2 * 2 * int(learned['served_sequences']))
  assert fit_bits + share <= by_bits and fit_bits < by_bits
  assert os.path.isdir(os.path.join(model_run, 'train', f'lowrank_learned-default-{fit_bits}bits', 'checkpoints'))
  for r in rows:                   # trained at its own (fitted) budget (tiny: learned.train_budget = '')
    assert int(r['trained_bits'] or 0) == (fit_bits if r['method'] == 'lowrank_learned' else 0), r['method']
    if r['family'] not in ('reference', 'bound') and r['deployable'] == 'True':
      assert float(r['amortised_bits']) <= int(r['budget_bits']) and 'exceed' not in r['warning']
    if r['family'] != 'bound':
      assert r['reference'] == 'float32 attention over the float32 captured q, k, v'
  for r in rows:
    assert float(r['bits_per_coordinate']) == pytest.approx(float(r['bits']) / g.coordinates)
    assert float(r['fraction_of_fp16']) == pytest.approx(float(r['bits']) / g.fp16_bits)
    if r['family'] != 'bound':
      assert float(r['rel_error_ci_low']) <= float(r['rel_error']) <= float(r['rel_error_ci_high'])
    if r['family'] not in ('reference', 'bound'):
      assert 0 < int(r['bits']) <= int(r['per_head_budget_bits']) <= int(r['budget_bits']) == by_bits
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
  # FID / KID and the noise-floor row: the built-in model's classifier, or Inception (off here)
  assert all(cl[0][c] == '' for c in closed_loop.DISTRIBUTION_COLUMNS)
  assert float(cl[0]['amortised_bits_per_coordinate']) == float(by['window', 'default']['amortised_bits_per_coordinate'])
  for f in ('frontier.png', 'samples_window.png', 'bounds.csv', 'capture/manifest.json', 'tb/.digest'):
    assert os.path.exists(os.path.join(model_run, f)), f


@pytest.mark.slow
def test_paired_compare_reproduces_the_sweep(model_run):
  """eval.quality.compare re-runs the learned method (its trained params) and a heuristic on the same images.
  Label-matched: the same errors and bits as frontier.csv, ratio = their quotient inside its paired
  interval. Equal memory: pca (calibrated, shared bases) runs at a's amortised bits less its own shared
  share (computed here from frontier.csv's shared_bits), so it holds at most a's amortised memory."""
  rows = {r['method']: r for r in read_csv(os.path.join(model_run, 'frontier.csv'))}
  (row,) = compare.compare(model_run, 'lowrank_learned', 'pca', ['25%'])
  a, b = rows['lowrank_learned'], rows['pca']
  assert row['rel_error_a'] == pytest.approx(float(a['rel_error']), rel=1e-6)
  assert row['bits_a'] == int(a['bits'])
  assert row['amortised_bits_a'] == pytest.approx(float(a['amortised_bits']), rel=1e-9)
  assert row['rel_error_b_label_matched'] == pytest.approx(float(b['rel_error']), rel=1e-6)
  assert row['amortised_bits_b_label_matched'] == pytest.approx(float(b['amortised_bits']), rel=1e-9)
  assert row['ratio_label_matched'] == pytest.approx(row['rel_error_a'] / row['rel_error_b_label_matched'], rel=1e-6)
  assert row['ratio_label_matched_ci_low'] <= row['ratio_label_matched'] <= row['ratio_label_matched_ci_high']
  assert row['setting_b'] == b['setting']                 # pca as the run tuned it: best on dev
  assert row['b_at_equal_memory'].startswith('evaluated at ') and 'best on dev' in row['b_at_equal_memory']
  assert 0.9 * row['amortised_bits_a'] <= row['amortised_bits_b'] <= row['amortised_bits_a'] + 1e-9
  assert row['ratio'] == pytest.approx(row['rel_error_a'] / row['rel_error_b'], rel=1e-6)
  assert row['ratio_ci_low'] <= row['ratio'] <= row['ratio_ci_high'] and row['num_images'] == 4
  assert 0 <= row['a_better_share'] <= 1
  with pytest.raises(FileNotFoundError, match='evict_learned'):
    compare.compare(model_run, 'evict_learned', 'pca', ['25%'])       # not trained by this run


def test_paired_ratio_closed_forms(tmp_path):
  d2 = np.array([1.0, 4.0, 0.5, 2.0])
  e2 = np.array([2.0, 3.0, 1.0, 5.0])
  assert compare.paired_ratio(d2, compare.rel_of(d2, e2), e2) == (1.0, 1.0, 1.0)
  ratio, lo, hi = compare.paired_ratio(0.25 * d2, compare.rel_of(d2, e2), e2)   # every image: error halved
  assert ratio == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
  with pytest.raises(FileNotFoundError, match='eval.frontier'):
    compare.load_run(str(tmp_path))


def test_equal_memory_by_log_log_interpolation():
  """A method trained per budget is read off its measured curve: on a power law err = c * bits^-p
  (per image) the log-log interpolation is exact, and a memory outside the measured budgets gives no
  figure rather than an extrapolation."""
  c, p = np.array([0.5, 1.0, 2.0]), 0.7
  e2 = np.ones(3)
  bits = {'5%': 100.0, '10%': 400.0}
  run = object.__new__(compare.Runner)
  run.config = None
  run.free_budget = lambda spec: False
  run.best = lambda spec, budget: spec
  run.point = lambda spec, label: {'d2': (c * bits[label] ** -p) ** 2, 'e2': e2, 'amortised_bits': bits[label]}
  spec = sweep.MethodSpec.parse('composed_learned')
  how, at, b_of = run.at_memory(spec, 200.0, ('5%', '10%'))
  assert 'interpolated between 5% and 10%' in how and at == 200.0
  idx = np.arange(3)[None]
  want = np.sqrt(((c * 200.0 ** -p) ** 2).sum() / 3)
  assert b_of(idx)[0] == pytest.approx(want, rel=1e-12)
  assert b_of(np.arange(3)[:, None]) == pytest.approx(c * 200.0 ** -p, rel=1e-12)   # per image
  assert compare.loglog(200.0, 100.0, 400.0, 1.0, 0.25) == pytest.approx(0.5)
  for outside in (50.0, 800.0):
    how, _, b_of = run.at_memory(spec, outside, ('5%', '10%'))
    assert b_of is None and 'outside its measured budgets' in how


@pytest.mark.slow
def test_model_frontier_resumes_and_refuses_another_config(model_run, monkeypatch):
  before = {f: open(os.path.join(model_run, f)).read() for f in ('frontier.csv', 'closed_loop.csv')}
  boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError('a finished point was recomputed'))
  monkeypatch.setattr(sweep, 'evaluate_spec', boom)
  monkeypatch.setattr(closed_loop, 'evaluate_policy', boom)
  assert frontier.run(tiny_model_config(), model_run)['failed'] == []
  assert {f: open(os.path.join(model_run, f)).read() for f in before} == before
  changed = tiny_model_config()
  changed.sweep.val_sequences += 1
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


def _read_tb(logdir):
  """{run: {tag: {step: value}}} of the scalars and {run: set of image tags} under `logdir`."""
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.util import tensor_util
  mux = plugin_event_multiplexer.EventMultiplexer()
  mux.AddRunsFromDirectory(logdir)
  mux.Reload()
  scalars = {run: {t: {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in mux.Tensors(run, t)}
                   for t in tags}
             for run, tags in mux.PluginRunToTagToContent('scalars').items()}
  images = {run: set(tags) for run, tags in mux.PluginRunToTagToContent('images').items()}
  return scalars, images, mux


def _tb_tables():
  """Small frontier tables: 2 datasets' worth of kinds of rows (methods, oracle, bound rows), bounds
  restricted to some families and a reference, one closed-loop point."""
  from eval.report import pareto
  def row(method, family, budget, bpc, err, deployable=True, setting='default', amortised=None):
    bits = int(bpc * 100)
    return {'dataset': 'val', 'method': method, 'family': family, 'setting': setting, 'budget': budget,
            'oracle': str(not deployable), 'deployable': str(deployable), 'bits': str(bits),
            'bits_per_coordinate': str(bpc), 'fraction_of_fp16': str(bpc / 16), 'rel_error': str(err),
            'amortised_bits': str(bits if amortised is None else int(amortised * 100)),
            'amortised_bits_per_coordinate': str(bpc if amortised is None else amortised)}
  rows = [row('full', 'reference', 'full', 16.0, 1e-4), row('window', 'window', '10%', 1.6, 0.3),
          row('window', 'window', '25%', 4.0, 0.2), row('kivi', 'quantization', '10%', 1.5, 0.1),
          row('kivi', 'quantization', '25%', 3.9, 0.05, setting='bits=2', amortised=4.1),
          row('oracle', 'eviction', '10%', 1.6, 0.25, deployable=False),
          row('rank_bound', 'bound', '10%', 1.6, 0.01, deployable=False, setting='values')]
  front = pareto.frontier_rows(rows)
  curve = lambda name, setting, applies_to, pts: [
      {'dataset': 'val', 'bound': name, 'setting': setting, 'applies_to': applies_to,
       'bits_per_coordinate': str(x), 'rel_error': str(e)} for x, e in pts]
  bounds = (curve('rank_bound', 'values', 'reference window', ((0.0, 0.5), (1.0, 0.02), (2.0, 0.0)))
            + curve('gaussian_ideal_code', 'keys_free', 'reference', ((0.5, 0.2), (3.0, 0.04))))
  closed = [{'method': 'window', 'family': 'window', 'setting': 'default', 'budget': '25%',
             'token_agreement': '0.7', 'kl': '0.5', 'psnr': '30.0', 'ssim': '0.9',
             'cache_bytes_counted': '1.0', 'fp16_cache_bytes': '8.0'}]
  return rows, front, bounds, closed


def test_tensorboard_layout_from_tables(tmp_path, monkeypatch):
  """tb.write: one shared frontier tag holding a run per method, pareto (a staircase) and the curves
  that hold for every method; restricted bounds on their own chart and their families' charts; closed
  loop at the teacher-forced x; images; hparams in a separate logdir; a digest that covers the layout."""
  rows, front, bounds, closed = _tb_tables()
  tb_dir = str(tmp_path / 'tb')
  img = np.zeros((8, 8, 3), np.uint8)
  key = tb.digest([])
  tb.write(tb_dir, key, rows, front, bounds, closed, {'val': img}, {'val/window': img})
  assert tb.up_to_date(tb_dir, key) and sorted(os.listdir(tmp_path)) == ['tb', 'tb_hparams']   # no leftovers
  monkeypatch.setattr(tb, 'LAYOUT', tb.LAYOUT + 1)
  assert tb.digest([]) != key                                # a new layout rebuilds old runs' tb/
  scalars, images, mux = _read_tb(tb_dir)
  methods = {'reference/full', 'window/window', 'quantization/kivi', 'quantization/kivi.bits_2',
             'eviction/oracle'}
  curves = {'bound/rank_bound.values', 'reference/gaussian_ideal_code.keys_free'}
  assert set(scalars) == methods | curves | {'pareto'} and set(mux.Runs()) == set(scalars) | {'figures'}
  holds = lambda t: {run for run, tags in scalars.items() if t in tags}
  assert holds('frontier/val') == methods | {'pareto', 'reference/gaussian_ideal_code.keys_free'}
  assert holds('frontier/val/rank_bound') == {'reference/full', 'window/window', 'pareto',
                                              'bound/rank_bound.values'}
  assert holds('per_family/val/quantization') == {'quantization/kivi', 'quantization/kivi.bits_2', 'pareto',
                                                  'reference/gaussian_ideal_code.keys_free'}
  assert 'bound/rank_bound.values' in holds('per_family/val/window')
  for r in rows[:-1]:
    got = scalars[tb.run_name(r['family'], r['method'], pareto.curve_setting(r))]['frontier/val']
    assert got[tb.step_of(tb.x_of(r))] == pytest.approx(float(r['rel_error']), rel=1e-6)
  assert 4100 in scalars['quantization/kivi.bits_2']['frontier/val']          # x: amortised bits
  # pareto.csv's points, each held until 1 step (0.001 bit) before the next: a staircase
  assert scalars['pareto']['frontier/val'] == pytest.approx(
      {1500: 0.1, 4099: 0.1, 4100: 0.05, 15999: 0.05, 16000: 1e-4}, rel=1e-6)
  assert scalars['bound/rank_bound.values']['frontier/val/rank_bound'] == pytest.approx(
      {0: 0.5, 1000: 0.02, 1600: 0.01, 2000: 0.0}, rel=1e-6)                  # bounds.csv + the bound row
  assert scalars['window/window']['generation/psnr'] == pytest.approx({4000: 30.0})
  tags = sorted({t for run in scalars.values() for t in run})
  assert tags[0] == 'frontier/val'
  groups = {t.split('/')[0] for t in tags}
  assert not [(a, b) for a in groups for b in groups if a != b and b.startswith(a)]   # Scalars tab order
  assert 'step / 1000' in mux.SummaryMetadata('pareto', 'frontier/val').summary_description
  assert images == {'figures': {'plots/frontier/val'}, 'window/window': {'samples/val'}}
  hp = sorted(os.listdir(tmp_path / 'tb_hparams'))
  assert len([d for d in hp if os.path.isdir(tmp_path / 'tb_hparams' / d)]) == len(rows)


@pytest.mark.slow
@pytest.mark.parametrize('load_fast', ['false', 'true'])
def test_tensorboard_serves_the_frontier(model_run, load_fast):
  """A real TensorBoard (both data loaders): the frontier is one tag, first in order, holding a run per
  method, pareto and the reference; the rank bound on its chart; no hparams runs; images."""
  logdir = os.path.join(model_run, 'tb')
  rows = read_csv(os.path.join(model_run, 'frontier.csv'))
  methods = {tb.run_name(r['family'], r['method'], pareto.curve_setting(r)) for r in rows if r['family'] != 'bound'}
  bounds = read_csv(os.path.join(model_run, 'bounds.csv'))
  curves = {tb.curve_run(b['bound'], b['setting'], b['applies_to']): b['applies_to'] for b in bounds}
  port = _free_port()
  proc = subprocess.Popen([sys.executable, '-m', 'tensorboard.main', '--logdir', logdir, '--host',
                           '127.0.0.1', '--port', str(port), f'--load_fast={load_fast}', '--reload_interval=1'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline, tags = time.time() + 120, {}
    while time.time() < deadline:
      try:
        tags = _get(port, '/data/plugin/scalars/tags')
        if set(tags) >= methods | {'pareto'} | set(curves):
          break
      except OSError:
        pass
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      time.sleep(1)
    runs = _get(port, '/data/runs')
    assert not [r for r in runs if 'hparams' in r]                    # hparams: WORKDIR/tb_hparams
    assert set(runs) == methods | {'pareto', 'figures'} | set(curves)
    assert min(t for run in tags.values() for t in run) == 'frontier/val'
    shared = {run for run, t in tags.items() if 'frontier/val' in t}   # one chart: a run per method
    assert shared == methods | {'pareto'} | {c for c, a in curves.items() if a in tb.EVERY_METHOD}
    assert 'step / 1000' in tags['pareto']['frontier/val']['description']
    series = lambda run, t: {step: v for _, step, v in _get(port, '/data/plugin/scalars/scalars', run=run, tag=t)}
    for r in rows:
      if r['family'] != 'bound':
        got = series(tb.run_name(r['family'], r['method'], pareto.curve_setting(r)), 'frontier/val')
        assert got[tb.step_of(tb.x_of(r))] == pytest.approx(float(r['rel_error']), rel=1e-6, abs=1e-12)
    got = series('pareto', 'frontier/val')
    for p in read_csv(os.path.join(model_run, 'pareto.csv')):
      if p['frontier'] == 'all':
        assert got[tb.step_of(tb.x_of(p))] == pytest.approx(float(p['rel_error']), rel=1e-6, abs=1e-12)
    assert 'rank_bound' in {c.split('/')[1].split('.')[0] for c in curves}
    lowest = {}                # bounds.csv and frontier.csv's bound rows; one point per step: the lowest
    for run, b in ([(tb.curve_run(b['bound'], b['setting'], b['applies_to']), b) for b in bounds]
                   + [(tb.curve_run(r['method'], r['setting']), r) for r in rows if r['family'] == 'bound']):
      k = (run, tb.step_of(float(b['bits_per_coordinate'])))
      lowest[k] = min(float(b['rel_error']), lowest.get(k, np.inf))
    for (run, step), err in lowest.items():
      t = 'frontier/val/rank_bound' if run.startswith('bound/rank_bound') else 'frontier/val'
      assert series(run, t)[step] == pytest.approx(err, rel=1e-6, abs=1e-7)
    assert 'frontier/val' not in tags['bound/rank_bound.values']       # drawn only where it holds
    images = _get(port, '/data/plugin/images/tags')
    (cl,) = read_csv(os.path.join(model_run, 'closed_loop.csv'))      # window
    window = tb.run_name(cl['family'], cl['method'], cl['setting'])
    assert set(images['figures']) == {'plots/frontier/val', 'plots/frontier/quality'}   # + quality_frontier.png
    assert set(images[window]) == {'samples/val'}
    for run, t in (('figures', 'plots/frontier/val'), (window, 'samples/val')):
      (entry,) = _get(port, '/data/plugin/images/images', run=run, tag=t, sample=0)
      png = _get(port, '/data/plugin/images/individualImage', **dict(urllib.parse.parse_qsl(entry['query'])))
      assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 1000
  finally:
    proc.kill()
    proc.wait(timeout=30)
  sessions = [d for d in os.listdir(os.path.join(model_run, 'tb_hparams')) if not d.startswith(('.', 'events'))]
  assert len(sessions) == len(rows)


# ---------------------------------------------------------------------------- several processes
def test_assign_gives_every_point_to_one_process_and_learned_methods_whole(tmp_path):
  from eval.frontier import distributed
  from eval.engine.results import ResultTable
  jobs = [(sweep.MethodSpec.parse(m), b) for m in ('window', 'kivi', 'merge_learned', 'composed_learned')
          for b in ('5%', '10%', '25%')]
  for count in (1, 2, 3):
    parts = [distributed.assign(distributed.Cluster(i, count), jobs) for i in range(count)]
    assert sorted(map(str, sum(parts, []))) == sorted(map(str, jobs))          # each exactly once
    for part in parts:
      for spec in {s for s, _ in part if s.cls.learned}:                       # a learned method whole
        assert sum(s == spec for s, _ in part) == 3
  parts = [distributed.assign(distributed.Cluster(i, 2), jobs) for i in range(2)]
  assert [sum(not s.cls.learned for s, _ in p) for p in parts] == [3, 3]
  table = ResultTable(str(tmp_path / 'frontier.csv'), sweep.COLUMNS, sweep.KEY)
  row = lambda m, b: {'dataset': 'val', 'method': m, 'setting': 'default', 'budget': b, 'rel_error': 0.5}
  table.append(row('window', '5%'))
  for i, rows in enumerate(([row('window', '5%'), row('kivi', '5%')], [row('kivi', '10%')])):
    part = ResultTable(distributed.part_path(str(tmp_path), i), sweep.COLUMNS, sweep.KEY)
    for r in rows:
      part.append(r)
  assert distributed.merge_parts(table, str(tmp_path)) == 2                   # the duplicate is skipped
  assert {(r['method'], r['budget']) for r in ResultTable(table.path, sweep.COLUMNS, sweep.KEY).rows} == {
      ('window', '5%'), ('kivi', '5%'), ('kivi', '10%')}
  assert not os.listdir(tmp_path / 'parts')


@pytest.mark.slow
def test_two_processes_reproduce_the_one_process_run(model_run, tmp_path):
  """python -m eval.frontier.launch --processes 2 (jax.distributed on localhost, one shared workdir) on the
  same config as `model_run`: the capture, split between the processes, is byte-identical to the
  one-process capture, and the merged frontier.csv and closed_loop.csv hold the same points and errors."""
  workdir = str(tmp_path / 'run')
  flags = ['--config=configs/frontier.py:tiny', f'--workdir={workdir}', '--config.model.source=official',
           f'--config.model.var_ckpt={FIX / "var.pth"}', f'--config.model.vae_ckpt={FIX / "vae.pth"}',
           '--config.model.patch_nums=(1,2,3,4)', '--config.capture.train_shards=1',
           '--config.capture.val_shards=2', '--config.capture.shard_size=2',
           "--config.sweep.methods=('full','oracle','window','pca')", "--config.sweep.budgets=('25%',)",
           '--config.sweep.calibration_sequences=4', '--config.sweep.batch=4',
           "--config.learned.methods=('lowrank_learned',)", "--config.learned.budgets=('25%',)",
           '--config.learned.train.num_steps=4', '--config.learned.train.batch_size=4',
           '--config.learned.train.eval_sequences=4', '--config.learned.train.calibration_sequences=4',
           "--config.closed_loop.methods=('window',)", "--config.closed_loop.budgets=('25%',)",
           '--config.closed_loop.labels=(1,2)', '--config.closed_loop.seeds=(0,)',
           '--config.closed_loop.inception=False', '--config.progress=False',
           '--config.sweep.served_sequences=64']
  repo = pathlib.Path(__file__).parent.parent
  r = subprocess.run([sys.executable, '-m', 'eval.frontier.launch', '--processes', '2', '--', *flags], cwd=repo,
                     capture_output=True, text=True, timeout=900)
  log1 = (tmp_path / 'run' / 'parts' / 'process1.log')
  assert r.returncode == 0, r.stderr[-3000:] + (log1.read_text()[-3000:] if log1.exists() else '')
  shards = lambda d: {n: e['sha256'] for n, e in
                      json.load(open(os.path.join(d, 'capture', 'manifest.json')))['shards'].items()}
  assert shards(workdir) == shards(model_run) and len(shards(workdir)) == 4     # train 1, val 2, dev 1
  assert not [f for f in os.listdir(os.path.join(workdir, 'parts')) if f.endswith('.csv')]   # merged
  for table in ('frontier.csv', 'closed_loop.csv'):
    key = lambda row: (row['method'], row['setting'], row['budget'])
    want = {key(row): row for row in read_csv(os.path.join(model_run, table))}
    got = {key(row): row for row in read_csv(os.path.join(workdir, table))}
    assert set(got) == set(want), table
    for k, row in got.items():
      metric = 'rel_error' if table == 'frontier.csv' else 'token_agreement'
      assert float(row[metric]) == pytest.approx(float(want[k][metric]), rel=1e-5, abs=1e-7), (table, k)
      if table == 'frontier.csv':
        assert row['bits'] == want[k]['bits'], k
