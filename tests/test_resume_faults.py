"""Resume that survives real faults (eval/engine/results.py, points.py, sweep.py, the frontier job):

- a results row cut off mid-write (the process killed inside the write) is not a finished point: it is
  set aside (`<table>.cut`), computed again, and the table ends whole;
- a NaN in a held-out cache goes through the real sweep (`sweep.evaluate_spec` in `run_points`) to its
  non-finite guard: the point is reported as failed and not recorded;
- a real frontier process (`python -m eval.frontier`) SIGKILLed during the sweep and during training,
  then re-run, finishes with the rows of an uninterrupted run (tests/tiny_frontier.py).
Faults caught (checked by breaking the code in a scratch copy): a cut row taken as a finished point
(the check in ResultTable removed); the NaN guard of evaluate_spec removed.
"""
import csv
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from compress.core.budget import CacheGeometry
from compress.core.synthetic import var_like_qkv
from eval.engine import sweep
from eval.engine.points import run_points
from eval.engine.results import ResultTable
import tiny_frontier

PN, D = (1, 2, 3, 4), 8


@pytest.fixture(scope='module')
def data():
  q, k, v = (np.asarray(x) for x in var_like_qkv(jax.random.key(0), PN, layers=1, batch=4, heads=2, head_dim=D))
  return {'q': q, 'k': k, 'v': v}


def evaluate_with(data_set, calibration=None):
  """The frontier's evaluation of a point on `data_set` (calibration: the held-out set's own, or the
  given training split)."""
  g = CacheGeometry(PN, D)
  calibration = calibration or data_set.numpy(0, 4)
  calls = []

  def evaluate(spec, budget):
    calls.append((spec.name, budget))
    return sweep.evaluate_spec(spec, budget, data_set, g, lambda s, c: c.init_params(
        jax.random.key(0), 1, 2, calibration=calibration if c.needs_calibration else None),
        batch=4, level=0.95)
  return evaluate, calls


def read_rows(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


def jobs_of(*names):
  return [(sweep.MethodSpec.parse(n), '25%') for n in names]


@pytest.mark.parametrize('cut', ['mid_field', 'before_line_end', 'header'])
def test_a_row_cut_mid_write_is_computed_again(tmp_path, data, cut):
  path = str(tmp_path / 'frontier.csv')
  cache = sweep.CacheSet(data, np.array([0, 0, 1, 1]), PN)
  evaluate, calls = evaluate_with(cache)
  jobs = jobs_of('window', 'kivi', 'pca')
  assert run_points(ResultTable(path, sweep.COLUMNS, sweep.KEY), jobs, evaluate, False, 'val') == []
  whole = open(path, 'rb').read()
  lines = whole.split(b'\r\n')
  assert lines[-1] == b'' and len(lines) == 5                   # header, 3 rows, the final line end
  if cut == 'header':                                           # killed while the file was created
    kept, piece = b'', lines[0][:37]
  else:                                                         # killed while pca's row was written
    kept = b'\r\n'.join(lines[:3]) + b'\r\n'
    piece = lines[3][:len(lines[3]) // 2] if cut == 'mid_field' else lines[3] + b'\r'
  with open(path, 'wb') as f:
    f.write(kept + piece)
  calls.clear()
  table = ResultTable(path, sweep.COLUMNS, sweep.KEY)
  assert [(r['method']) for r in table.rows] == ([] if cut == 'header' else ['window', 'kivi'])
  assert run_points(table, jobs, evaluate, False, 'val') == []
  assert calls == ([('window', '25%'), ('kivi', '25%'), ('pca', '25%')] if cut == 'header' else [('pca', '25%')])
  rows = read_rows(path)
  assert rows[0] == list(sweep.COLUMNS) and len(rows) == 4 and all(len(r) == len(sweep.COLUMNS) for r in rows)
  again = ResultTable(path, sweep.COLUMNS, sweep.KEY).rows
  assert [r['method'] for r in again] == ['window', 'kivi', 'pca']
  assert all(np.isfinite(float(r['rel_error'])) for r in again)
  assert open(path + '.cut', 'rb').read().rstrip(b'\n') == piece            # the cut text is kept aside
  if cut != 'header':                                            # the recomputed row is the same point
    first = {r['method']: r for r in csv.DictReader(whole.decode().splitlines())}
    assert again[-1]['rel_error'] == first['pca']['rel_error'] and again[-1]['bits'] == first['pca']['bits']


def test_rows_with_missing_fields_are_not_finished_points(tmp_path):
  """A table an older version left with a cut row inside (another row appended after it)."""
  path = str(tmp_path / 't.csv')
  t = ResultTable(path, ('k', 'x', 'y'), ('k',))
  for k in 'abc':
    t.append({'k': k, 'x': 1.5, 'y': 2})
  text = open(path).read().splitlines()
  with open(path, 'w') as f:
    f.write('\n'.join([text[0], text[1], 'b,1.5', text[3]]) + '\n')     # b's row lost its last field
  t = ResultTable(path, ('k', 'x', 'y'), ('k',))
  assert [r['k'] for r in t.rows] == ['a', 'c'] and {'k': 'b'} not in t
  assert ResultTable(path, ('k', 'x', 'y'), ('k',)).rows == t.rows                 # the file was rewritten
  assert 'b,1.5' in open(path + '.cut').read()


def test_a_nan_in_a_held_out_cache_is_reported_not_recorded(tmp_path, data):
  bad = {t: a.copy() for t, a in data.items()}
  bad['v'][0, 2, 1, 3, 5] = np.nan                          # one coordinate of one held-out sequence
  cache = sweep.CacheSet(bad, np.array([0, 0, 1, 1]), PN)
  evaluate, calls = evaluate_with(cache, calibration=data)        # calibrated on a clean training split
  path = str(tmp_path / 'frontier.csv')
  failed = run_points(ResultTable(path, sweep.COLUMNS, sweep.KEY), jobs_of('window', 'pca'), evaluate, False, 'val')
  assert calls == [('window', '25%'), ('pca', '25%')]
  assert len(failed) == 2 and all('FloatingPointError' in f and 'non-finite' in f for f in failed), failed
  assert ResultTable(path, sweep.COLUMNS, sweep.KEY).rows == []
  evaluate, calls = evaluate_with(sweep.CacheSet(data, np.array([0, 0, 1, 1]), PN))
  assert run_points(ResultTable(path, sweep.COLUMNS, sweep.KEY), jobs_of('window', 'pca'), evaluate, False,
                    'val') == []                          # the clean cache: both points recorded now
  assert len(ResultTable(path, sweep.COLUMNS, sweep.KEY).rows) == 2


# ---------------------------------------------------------------------------- a real kill
def _start(workdir, log):
  return subprocess.Popen([sys.executable, '-m', 'eval.frontier', *tiny_frontier.flags(workdir)],
                          cwd=tiny_frontier.REPO, stdout=log, stderr=subprocess.STDOUT)


def _kill_when(proc, ready, what, timeout=300):
  """SIGKILLs `proc` as soon as `ready()` holds (polled); fails if it ended or never got there."""
  t0 = time.time()
  while not ready():
    assert proc.poll() is None, f'the run ended (rc {proc.returncode}) before {what}'
    assert time.time() - t0 < timeout, f'no {what} after {timeout} s'
    time.sleep(0.02)
  assert proc.poll() is None, f'the run ended before it could be killed {what}'
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait(60) == -signal.SIGKILL


@pytest.mark.slow
def test_a_frontier_killed_during_the_sweep_and_training_resumes_to_the_same_rows(tiny_frontier_run, tmp_path):
  workdir = str(tmp_path / 'run')
  table = os.path.join(workdir, 'frontier.csv')
  steps = os.path.join(workdir, 'train', tiny_frontier.TRAIN_RUN, 'checkpoints')
  rows_in = lambda: len(read_rows(table)) - 1 if os.path.exists(table) else 0
  saved = lambda: sorted(int(s) for s in os.listdir(steps) if s.isdigit()) if os.path.isdir(steps) else []
  with open(tmp_path / 'log.txt', 'wb') as log:
    _kill_when(_start(workdir, log), lambda: saved(), 'a training checkpoint')         # during training
    assert max(saved()) < tiny_frontier.STEPS and rows_in() < tiny_frontier.POINTS
    before = rows_in()
    _kill_when(_start(workdir, log), lambda: rows_in() > before, 'a new sweep row')    # during the sweep
    assert rows_in() < tiny_frontier.POINTS
    done = _start(workdir, log)
    assert done.wait(600) == 0, open(tmp_path / 'log.txt').read()[-3000:]
  want = {tiny_frontier.key(r): r for r in tiny_frontier.rows(tiny_frontier_run)}
  got = {tiny_frontier.key(r): r for r in tiny_frontier.rows(workdir)}
  assert set(got) == set(want) and len(got) == tiny_frontier.POINTS
  for k, r in got.items():          # bit for bit, lowrank_learned too: its training resumed from a checkpoint
    assert (r['bits'], r['rel_error'], r['shared_bits']) == (want[k]['bits'], want[k]['rel_error'],
                                                             want[k]['shared_bits']), k
