"""Every `python -m` entry point reports a user error as one `error:` line, exit status 2, no traceback
(var_jax/cli.py); --debug / VAR_DEBUG=1 show the traceback; a bug keeps its traceback. A truncated
trained checkpoint is one line naming its folder and the fix, without orbax's "Event loop is closed"
noise, and the frontier's learned.retrain_corrupt moves it aside and trains that compressor again.

Each bad input fails before any heavy work (a subprocess costs its imports: 2-6 s on 2 cores).
Faults caught (each checked by breaking the code): an entry point run by plain app.run / argparse (a
usage screen or traceback, exit 1); a user error shown with its traceback; a library ValueError (a
bug) reduced to one line; orbax's stderr noise let through; a corrupt run retrained without the flag,
or deleted instead of moved aside.
"""
import glob
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from var_jax import cli

REPO = pathlib.Path(__file__).parent.parent
MISSING = '/nonexistent/var-kv-missing'
# entry point -> (bad arguments, text the error line must hold)
BAD = {
    'eval.quality.inception': ([MISSING, MISSING], 'does not exist'),
    'eval.quality.inception.check_torch': (['--python', MISSING], 'is not an executable'),
    'eval.frontier': (['--config=configs/frontier.py:tiny', '--workdir={tmp}/run', '--config.sweep.batch=0'],
                      'sweep.batch must be an integer >= 1'),
    'eval.frontier.launch': (['--processes', '0', '--', '--workdir={tmp}/run'], '--processes must be >= 1'),
    'eval.quality.compare': (['--workdir', MISSING, '--a', 'pca', '--b', 'window'],
                             'run python -m eval.frontier'),
    'eval.quality.samples': (['--converted', MISSING], 'python -m var_jax.convert'),
    'eval.quality.classifier': (['--out', MISSING + '/c.npz'], 'does not exist'),
    'eval.report.tb': ([MISSING], 'not a finished eval.frontier run'),
    'eval.report.tb_screenshot': ([MISSING, '{tmp}/shot.png'], 'python -m eval.report.tb'),
    'eval.bench.conv': (['--size=d99'], '--size must be one of'),
    'eval.bench.composed_step': (['--size=d99'], '--size must be one of'),
    'eval.bench.frontier': (['--workdir={tmp}'], 'needs a new workdir'),
    'eval.bench.sampling': (['--size=d99'], '--size must be one of'),
    'eval.bench.vs_official': (['--official_repo', MISSING], 'git clone'),
    'train.compressor': (['--config=configs/compressor.py:tiny', '--workdir={tmp}/run',
                          '--config.data.source=capture', f'--config.data.path={MISSING}'], 'python -m var_jax.capture'),
    'train.var': (['--config=configs/var.py:tiny', '--workdir={tmp}/run', '--config.model.depthh=1'],
                  '--config.model.depthh names no field of the config (no \'depthh\'; Did you mean "depth"'),
    'train.vqvae': (['--config=configs/vqvae.py:tiny', '--workdir={tmp}/run', 'extra'], 'unexpected arguments'),
    'train.export_default': (['--var_workdir', MISSING, '--out={tmp}/assets'], 'training run'),
    'var_jax.capture': (['--out={tmp}/cap', '--converted', MISSING], 'python -m var_jax.convert'),
    'var_jax.convert': (['--var', MISSING + '.pth', '--vae', MISSING + '.pth', '--out={tmp}/conv'], 'does not exist'),
    'compress.theory.hard_sweep': (['--out={tmp}/hs', '--budgets', 'lots'], "cannot read budget 'lots'"),
}


def run(module, args, tmp_path, env=None):
  (tmp_path / 'full').mkdir(exist_ok=True)
  (tmp_path / 'full' / 'f').write_text('x')       # a non-empty folder
  args = [a.replace('{tmp}', str(tmp_path / 'full') if module == 'eval.bench.frontier' else str(tmp_path))
          for a in args]
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **(env or {})})


def check_one_line(proc, match):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  lines = [line for line in proc.stderr.splitlines() if 'error:' in line]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  assert match in lines[0], lines[0]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return lines[0]


def test_every_entry_point_is_listed():
  """BAD covers every module of the project with a `__main__` block (a new entry point needs a case)."""
  found = set()
  for pkg in cli.PACKAGES:
    for path in (REPO / pkg).rglob('*.py'):
      if "if __name__ == '__main__':" in path.read_text():
        mod = '.'.join(path.relative_to(REPO).with_suffix('').parts)
        found.add(mod.removesuffix('.__main__'))
  assert found == set(BAD)


@pytest.mark.parametrize('module', sorted(BAD))
def test_bad_input_is_one_error_line(module, tmp_path):
  args, match = BAD[module]
  check_one_line(run(module, args, tmp_path), match)
  assert not (tmp_path / 'run').exists()                   # nothing created


def test_flag_errors_and_debug(tmp_path):
  """absl's own flag errors and argparse's are one line too; --debug and VAR_DEBUG=1 show tracebacks."""
  line = check_one_line(run('eval.frontier', ['--config=configs/frontier.py:tiny', '--nosuchflag'], tmp_path),
                        'nosuchflag')
  assert '--helpshort' in line
  check_one_line(run('eval.report.tb', [], tmp_path), 'usage: python -m eval.report.tb')
  args, _ = BAD['eval.report.tb']
  for extra, env in ((['--debug'], None), ([], {cli.DEBUG_ENV: '1'})):
    proc = run('eval.report.tb', args + extra, tmp_path, env)
    assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'FileNotFoundError' in proc.stderr


@pytest.mark.parametrize('args, match', [
    (['--config=configs/frontier.py:huge'], "ValueError: unknown variant 'huge' of configs/frontier.py"),
    (['--config=configs/nope.py'], "cannot load the config file (Failed loading config file")])
def test_config_flag_errors(args, match, capsys, monkeypatch):
  """A config file that fails to load (at once, or deferred by ml_collections) is one line (in
  process: the parser `cli.run` gives absl; a bad override value or field: BAD's subprocesses)."""
  from absl import flags
  from ml_collections import config_flags
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  monkeypatch.setattr(sys, 'argv', ['prog'])
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'a config', flag_values=fv)
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(['prog', *args], fv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ') and match in err, err


def test_only_user_errors_are_one_line(monkeypatch):
  """A ValueError raised by the project's own code is a user error; one from inside a library (numpy)
  is a bug and keeps its traceback; so do other exceptions."""
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  monkeypatch.setattr(sys, 'argv', ['prog'])
  from compress.core.budget import Budget, CacheGeometry
  with pytest.raises(SystemExit) as e:
    cli.guard(lambda: Budget.parse('lots', CacheGeometry((1, 2), 8)))()
  assert e.value.code == 2
  for bug in (lambda: np.reshape(np.arange(3), (2, 2)), lambda: {}['key'], lambda: 1 / 0):
    with pytest.raises((ValueError, KeyError, ZeroDivisionError)):
      cli.guard(bug)()
  assert cli.one_line('flag --c: Error:\n\nTraceback (most recent call last):\n  File "x"\nValueError: no\n') == \
      'flag --c: Error: ValueError: no'


# ---------------------------------------------------------------------------- corrupt checkpoints
def tiny_config():
  from configs import compressor as configs
  c = configs.get_config('tiny')
  c.update({'num_steps': 4, 'ckpt_every': 2, 'eval_at_start': False, 'eval_at_end': False, 'eval_every': 0})
  return c


@pytest.fixture(scope='module')
def corrupt_run(tmp_path_factory):
  """A trained tiny compressor run (steps 2 and 4) whose last checkpoint is cut in half (its array
  files and manifests: what a disk full or a copy cut short leaves)."""
  from train import compressor as tc
  workdir = str(tmp_path_factory.mktemp('corrupt') / 'lowrank_learned-default-bits')
  tc.train(tiny_config(), workdir)
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '4', '**', '*'), recursive=True):
    if os.path.isfile(path) and not path.endswith(('METADATA', 'commit_success.txt')):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  return workdir


def test_truncated_checkpoint_is_one_clear_line(corrupt_run, monkeypatch):
  """load_trained: one line; the storage layer's "Event loop is closed" errors (sent to
  sys.unraisablehook by its leftover reads) are dropped, anything else still reaches the hook."""
  import time
  from train import common
  from train import compressor as tc
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(repr(u.exc_value)))
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  for _ in range(8):                        # the noise comes from a race: give it several chances
    with pytest.raises(common.CorruptCheckpoint) as e:
      tc.load_trained(corrupt_run)
    msg = str(e.value)
    assert '\n' not in msg and e.value.run == corrupt_run
    assert f"checkpoint '{corrupt_run}/checkpoints/4' cannot be read" in msg
    assert 'Delete that step folder to fall back on an earlier one ([2])' in msg and f"delete '{corrupt_run}'" in msg
  time.sleep(1)
  assert not seen, seen
  sys.unraisablehook(type('U', (), {'exc_value': RuntimeError('other')})())
  assert seen == ["RuntimeError('other')"]


def test_truncated_checkpoint_from_the_command_line(corrupt_run):
  """train.compressor resuming the run: one line naming the step folder, no orbax noise."""
  c = tiny_config()
  proc = subprocess.run([sys.executable, '-m', 'train.compressor', '--config=configs/compressor.py:tiny',
                         f'--workdir={corrupt_run}', f'--config.num_steps={c.num_steps}',
                         f'--config.ckpt_every={c.ckpt_every}', '--config.eval_at_start=False',
                         '--config.eval_at_end=False', '--config.eval_every=0'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  line = check_one_line(proc, f"checkpoint '{corrupt_run}/checkpoints/4' cannot be read")
  assert 'Event loop is closed' not in proc.stderr and 'Delete that step folder' in line


def test_frontier_retrains_a_corrupt_run_only_when_asked(corrupt_run, tmp_path, monkeypatch):
  """eval.engine.params: a corrupt trained run stops the frontier with the flag named (nothing moved);
  with learned.retrain_corrupt it is moved aside (kept) and that compressor trained again; the flag
  may change between runs of one workdir."""
  from compress.core.budget import CacheGeometry
  from configs import frontier as frontier_config
  from eval.engine import params as params_lib
  from eval.engine.sweep import MethodSpec
  from eval.frontier import job
  from train import common, workdir_guard
  from train import compressor as tc
  folder = str(tmp_path / 'train' / 'run')
  shutil.copytree(corrupt_run, folder)
  before = sorted(os.listdir(os.path.join(folder, 'checkpoints')))
  monkeypatch.setattr(params_lib, 'train_config', lambda *a: tiny_config())
  config = frontier_config.get_config('tiny')
  spec = MethodSpec.parse('lowrank_learned')
  comp = spec.make(CacheGeometry((1, 2, 3, 4), 16), '25%')
  params = params_lib.Params(config, str(tmp_path), str(tmp_path), None, 2, 2)
  with pytest.raises(common.CorruptCheckpoint, match='--config.learned.retrain_corrupt=True') as e:
    params._train(spec, comp, folder)  # pylint: disable=protected-access
  assert f"'{folder}/checkpoints/4' cannot be read" in str(e.value)
  assert sorted(os.listdir(os.path.join(folder, 'checkpoints'))) == before and not glob.glob(folder + '.corrupt-*')
  config.learned.retrain_corrupt = True
  trained, p = params._train(spec, comp, folder)  # pylint: disable=protected-access
  (aside,) = glob.glob(folder + '.corrupt-*')
  assert sorted(os.listdir(os.path.join(aside, 'checkpoints'))) == before      # kept, not deleted
  again, p2 = tc.load_trained(folder)                                           # a readable run
  assert again == trained
  for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  off = frontier_config.get_config('tiny')
  workdir_guard.prepare_workdir(str(tmp_path / 'fr'), off, '{}', extendable=job.EXTENDABLE)
  workdir_guard.prepare_workdir(str(tmp_path / 'fr'), config, '{}', extendable=job.EXTENDABLE)
