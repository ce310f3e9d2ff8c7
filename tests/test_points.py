"""Sweep points with their programs compiled a point ahead (eval/engine/points.py): same rows as the plain
loop, in job order, and the points' own evaluations compile none of their programs."""
import os
import threading
import time

import jax
import numpy as np

from compress.core.budget import CacheGeometry
from compress.core.synthetic import var_like_qkv
from eval.engine import exact_store, sweep
from eval.engine.points import run_points
from eval.engine.results import ResultTable

PN = (1, 2, 3, 4)
D = 16
_compiles = []          # (thread name, function name) of every XLA compile
_lock = threading.Lock()


def _on_event(event, duration, **kwargs):
  del duration
  if event.endswith('backend_compile_duration'):
    with _lock:
      _compiles.append((threading.current_thread().name, kwargs.get('fun_name', '')))


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _table(tmp_path, name):
  return ResultTable(os.path.join(tmp_path, name), sweep.COLUMNS, sweep.KEY)


def test_compile_ahead_gives_the_plain_loops_rows_and_moves_the_compiles(tmp_path):
  q, k, v = (np.asarray(x) for x in var_like_qkv(jax.random.key(0), PN, layers=2, batch=5, heads=2, head_dim=D))
  g = CacheGeometry(PN, D)
  jobs = [(sweep.MethodSpec.parse(m), b) for m, b in
          [('full', sweep.FULL_BUDGET), ('kivi', '25%'), ('pca', '25%')]]   # pca: calibrated
  calibration = {'q': q, 'k': k, 'v': v}
  params = lambda spec, comp: comp.init_params(jax.random.key(0), 2, 2, calibration=(
      calibration if comp.needs_calibration else None))
  rows, in_points = {}, {}
  for ahead in (False, True):
    jax.clear_caches()                                  # each pass compiles its own programs
    data = sweep.CacheSet({'q': q, 'k': k, 'v': v}, np.array([0, 0, 1, 1, 2]), PN)
    data.exact_store = exact_store.ExactStore(os.path.join(tmp_path, f'exact{ahead}'), {'ahead': ahead})

    def warm(spec, budget, data=data):
      comp, p = sweep.make_point(spec, budget, g, params)
      return lambda: sweep.warm_point(comp, p, data, batch=2)
    point_compiles = []

    def evaluate(spec, budget, data=data, point_compiles=point_compiles):
      before = len(_compiles)
      row = sweep.evaluate_spec(spec, budget, data, g, params, batch=2, level=0.95)   # batches 2, 2, 1
      point_compiles.append([f for _, f in _compiles[before:] if '_errors_body' in f])
      return row
    table = _table(tmp_path, f'ahead{ahead}.csv')
    assert run_points(table, jobs, evaluate, progress=False, dataset='val',
                      prepare=warm if ahead else None) == []
    rows[ahead], in_points[ahead] = table.rows, point_compiles
  assert [(r['method'], r['budget']) for r in rows[True]] == [(s.name, b) for s, b in jobs]   # job order
  for one, two in zip(rows[False], rows[True]):
    for key in ('rel_error', 'rel_error_ci_low', 'rel_error_ci_high', 'bits', 'bits_mean', 'rel_error_per_layer'):
      assert one[key] == two[key], (one['method'], key)                # bit for bit
  assert all(len(c) == 2 for c in in_points[False])     # the plain loop: batch sizes 2 and 1, per point
  assert in_points[True][0] and not any(in_points[True][1:])          # ahead: only the first compiles
  assert any(t.startswith('compile_ahead') and '_errors_body' in f for t, f in _compiles)


def test_points_keep_job_order_report_failures_and_resume(tmp_path):
  spec = sweep.MethodSpec.parse('window')
  jobs = [(spec, b) for b in ('10%', '20%', '30%', '40%')]
  warmed, order = [], []

  def prepare(s, b):
    if b == '40%':
      raise ValueError('bad settings')            # reported by the evaluation, not by prepare
    return lambda: (time.sleep(0.05), warmed.append(b))

  def evaluate(s, b):
    order.append(b)
    if b in ('30%', '40%'):
      raise FloatingPointError('non-finite outputs')
    return {'dataset': 'val', 'method': s.name, 'setting': s.setting, 'budget': b, 'rel_error': 0.5}

  table = _table(tmp_path, 'f.csv')
  failed = run_points(table, jobs, evaluate, progress=False, dataset='val', prepare=prepare)
  assert order == ['10%', '20%', '30%', '40%'] and warmed == ['20%', '30%']   # a point ahead, not the first
  assert failed == ['window@30%: FloatingPointError: non-finite outputs',
                    'window@40%: FloatingPointError: non-finite outputs']
  assert [r['budget'] for r in table.rows] == ['10%', '20%']       # the failures are left out
  order.clear()
  run_points(_table(tmp_path, 'f.csv'), jobs, lambda s, b: order.append(b) or {
      'dataset': 'val', 'method': s.name, 'setting': s.setting, 'budget': b}, progress=False, dataset='val')
  assert order == ['30%', '40%']                                   # a re-run computes only those


def test_compiled_programs_are_freed_before_mappings_run_out(tmp_path, monkeypatch):
  """Above the mapping budget the points' caches are cleared (before a point, no compile in flight):
  the rows are those of a run that never clears, and with a budget no process reaches nothing is freed."""
  from eval.engine import points
  with open('/proc/self/maps') as f:
    assert abs(points.mappings() - sum(1 for _ in f)) < 50      # the same count /proc shows
  with open('/proc/sys/vm/max_map_count') as f:
    assert points.map_budget() == int(f.read()) // 2
  q, k, v = (np.asarray(x) for x in var_like_qkv(jax.random.key(1), PN, layers=2, batch=4, heads=2, head_dim=D))
  g = CacheGeometry(PN, D)
  jobs = [(sweep.MethodSpec.parse(m), '25%') for m in ('window', 'kivi', 'snapkv')]
  data = sweep.CacheSet({'q': q, 'k': k, 'v': v}, np.array([0, 0, 1, 1]), PN)
  evaluate = lambda spec, b: sweep.evaluate_spec(spec, b, data, g, lambda s, c: None, batch=4, level=0.95)
  warm = lambda spec, b: (lambda: None)
  cleared, real = [], jax.clear_caches
  monkeypatch.setattr(jax, 'clear_caches', lambda: cleared.append(1) or real())
  rows = {}
  for budget in (0, 10 ** 9):                       # every point over budget / never
    monkeypatch.setattr(points, 'map_budget', lambda budget=budget: budget)
    cleared.clear()
    table = _table(tmp_path, f'b{budget}.csv')
    assert run_points(table, jobs, evaluate, progress=False, dataset='val', prepare=warm) == []
    rows[budget] = [(r['method'], r['rel_error'], r['bits']) for r in table.rows]
    assert len(cleared) == (len(jobs) if budget == 0 else 0)
  assert rows[0] == rows[10 ** 9]


def test_test_workers_free_compiled_programs_past_the_mapping_budget(monkeypatch):
  """tests/conftest.py's teardown hook (one xdist worker running half the suite reached vm.max_map_count
  and died in LLVM's compile): past the budget it clears jax's caches and the executables' mappings go
  back to the OS; under it the programs stay."""
  import conftest  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from eval.engine import points

  def teardown():                                   # the hook as pytest calls it, around the test's own
    hook = conftest.pytest_runtest_teardown(None, None)
    next(hook)
    next(hook, None)

  jnp.ones(3).block_until_ready()
  before = points.mappings()
  programs = [jax.jit(lambda x, i=i: jnp.sin(x) * i + i) for i in range(100)]
  for f in programs:
    f(jnp.ones(3)).block_until_ready()
  held = points.mappings()
  assert held - before > 200                        # measured ~3 mappings a program
  monkeypatch.setattr(points, 'map_budget', lambda: 10 ** 9)
  teardown()
  assert points.mappings() > held - 50
  monkeypatch.setattr(points, 'map_budget', lambda: held - 1)
  teardown()
  assert points.mappings() < before + 50


def test_a_dev_point_with_stored_references_compiles_its_val_point(tmp_path):
  """Tuning reads dev references from a store as the val sweep does (eval/frontier/job.py), so a
  setting's val point runs the program its dev point compiled: none compiles again. Without the dev
  store (references computed in the program) the val point compiles its own."""
  q, k, v = (np.asarray(x) for x in var_like_qkv(jax.random.key(1), PN, layers=2, batch=6, heads=2, head_dim=D))
  g = CacheGeometry(PN, D)
  spec = sweep.MethodSpec.parse('kivi(bit_width=2)')
  split = lambda a, b: sweep.CacheSet({'q': q[:, a:b], 'k': k[:, a:b], 'v': v[:, a:b]}, np.arange(b - a), PN)
  compiled_by_val = {}
  for stored in (True, False):
    jax.clear_caches()
    dev, val = split(0, 2), split(2, 6)                       # dev: one batch of 2; val: two of 2
    val.exact_store = exact_store.ExactStore(os.path.join(tmp_path, f'val{stored}'), {'split': 'val'})
    if stored:
      dev.exact_store = exact_store.ExactStore(os.path.join(tmp_path, 'dev'), {'split': 'dev'})
    sweep.evaluate_spec(spec, '25%', dev, g, lambda s, c: None, batch=2, level=0.95)
    before = len(_compiles)
    sweep.evaluate_spec(spec, '25%', val, g, lambda s, c: None, batch=2, level=0.95)
    compiled_by_val[stored] = [f for _, f in _compiles[before:] if '_errors_body' in f]
  assert compiled_by_val == {True: [], False: [compiled_by_val[False][0]]}, compiled_by_val
