"""One run per workdir (train/workdir_lock.py): WORKDIR/.lock, an OS file lock held for a run's life.

A helper process takes the lock through the same module, as a run does (`holding`); real runs
(`python -m eval.frontier` on the in-repo official tiny model) and the tools are started against it.
Faults caught (each checked by breaking the code): no lock in eval.frontier.job.run (the second run
works on and appends duplicates); a lock that outlives its process (a pid file instead of flock: the
run after a SIGKILL is refused); the holder not named; a tool (tb rebuild, compare, launch) that
does not take or probe the lock; `hold` not re-entrant (a run calling a tool deadlocks on itself);
a workdir moved aside by config.overwrite leaving the new one unlocked.
"""
import collections
import contextlib
import csv
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from train import workdir_guard, workdir_lock

REPO = pathlib.Path(__file__).parent.parent
FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
HOLD = ('import sys, time\nfrom train import workdir_lock\nwith workdir_lock.hold(sys.argv[1]):\n'
        '  print("held", flush=True)\n  time.sleep(float(sys.argv[2]))\n')     # workdir, seconds


@contextlib.contextmanager
def holding(workdir):
  """A process that holds the lock of `workdir` (through train.workdir_lock) until the block ends or
  it is killed; yields its Popen."""
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir), '600'], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held', proc.stderr.read()
    yield proc
  finally:
    proc.kill()
    proc.wait()


def frontier_flags(workdir):
  """The cheapest real frontier run: 2 heuristic points at 25 %, no training, bounds or closed loop."""
  return ['--config=configs/frontier.py:tiny', f'--workdir={workdir}', '--config.model.source=official',
          f'--config.model.var_ckpt={FIX / "var.pth"}', f'--config.model.vae_ckpt={FIX / "vae.pth"}',
          '--config.model.patch_nums=(1,2,3,4)', '--config.capture.train_shards=1',
          '--config.capture.val_shards=1', '--config.capture.shard_size=2',
          "--config.sweep.methods=('full','window')", "--config.sweep.budgets=('25%',)",
          '--config.sweep.batch=4', '--config.learned.methods=()', '--config.closed_loop.methods=()',
          '--config.rank_bound.settings=()', '--config.gaussian_reference=False', '--config.progress=False']


def cli(*args, module='eval.frontier', timeout=300):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def check_refused(proc, holder_pid):
  """One `error:` line, exit 2, naming the holder's pid and host and what to do."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  (line,) = error_lines(proc.stderr)
  assert f'pid {holder_pid} on host {socket.gethostname()}' in line and 'started 20' in line, line
  assert f'kill {holder_pid}' in line and 'another --workdir' in line, line
  assert 'Traceback' not in proc.stderr


def test_lock_in_one_process(tmp_path):
  """Re-entrant; writes the holder; a workdir it created and nothing else wrote is removed again; a
  workdir moved aside (config.overwrite) hands the lock to the fresh one."""
  wd = tmp_path / 'run'
  with workdir_lock.hold(str(wd)):
    info = workdir_lock.holder(str(wd))
    assert info['pid'] == os.getpid() and info['host'] == socket.gethostname()
    with workdir_lock.hold(str(wd)):                        # a tool called by the run: no self-deadlock
      pass
    workdir_lock.probe(str(wd))                             # its own lock is not "busy"
  assert not wd.exists()                                    # created, nothing written: removed
  config = lambda n: ml_collections.ConfigDict({'n': n, 'overwrite': True})
  with workdir_lock.hold(str(wd)):
    workdir_guard.prepare_workdir(str(wd), config(1), '{}')
    workdir_guard.prepare_workdir(str(wd), config(2), '{}')  # another config: moved aside, then afresh
    (aside,) = tmp_path.glob('run.old-*')
    with holding(aside):                                    # the old one is free, the new one held
      pass
    proc = subprocess.run([sys.executable, '-c', HOLD, str(wd), '0'], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and 'WorkdirBusy' in proc.stderr and f'pid {os.getpid()}' in proc.stderr


def test_busy_workdir_refuses_runs_and_tools_and_sigkill_frees_it(tmp_path):
  """While another process holds the lock, the frontier, its launcher, tb rebuild and compare stop at
  once with one line naming it, writing nothing; once it is SIGKILLed the lock is free."""
  from eval.report import tb
  wd = tmp_path / 'run'
  with holding(wd) as holder:
    (wd / 'frontier.csv').write_text('dataset,method\n')
    before = sorted(os.listdir(wd))
    t0 = time.time()
    check_refused(cli(*frontier_flags(wd)), holder.pid)
    assert time.time() - t0 < 60                            # refused before the model loads
    check_refused(cli('--processes', '2', '--', *frontier_flags(wd), module='eval.frontier.launch'), holder.pid)
    check_refused(cli('--workdir', str(wd), '--a', 'pca', '--b', 'window', module='eval.quality.compare'),
                  holder.pid)
    with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {holder.pid}'):
      tb.rebuild(str(wd), force=True)
    assert sorted(os.listdir(wd)) == before                  # no config.json, parts/, tb/, compare csv
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(str(wd)):                          # not stale after kill -9
    assert workdir_lock.holder(str(wd))['pid'] == os.getpid()


@pytest.mark.slow
def test_two_concurrent_runs_on_one_workdir(tmp_path):
  """A real run holds the workdir; a second one started on it meanwhile exits at once naming the
  first, which finishes; frontier.csv has each (method, setting, budget) once."""
  wd = tmp_path / 'run'
  first = subprocess.Popen([sys.executable, '-m', 'eval.frontier', *frontier_flags(wd)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while (workdir_lock.holder(str(wd)) or {}).get('pid') != first.pid:
      assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
      time.sleep(0.2)
    second = cli(*frontier_flags(wd))
    assert first.poll() is None                             # the second was refused while the first ran
    check_refused(second, first.pid)
    _, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err[-3000:]
  with open(wd / 'frontier.csv', newline='') as f:
    keys = [(r['method'], r['setting'], r['budget']) for r in csv.DictReader(f)]
  assert sorted(keys) == [('full', 'default', 'full'), ('window', 'default', '25%')]
  assert not [k for k, n in collections.Counter(keys).items() if n > 1]
