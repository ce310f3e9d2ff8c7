"""train.compressor on configs/compressor.py:tiny (synthetic VAR-like caches).

One run trains to the end (the loss and the held-out hard-path error must fall, logs and checkpoints must
be there); a second is stopped midway and resumed and must end with the same parameters; an 8-device
CPU mesh (a subprocess) must give the single-device losses and parameters; NaN data must stop the run
with a clear error and a checkpoint of the last finite state; bad configs must fail before any work.
The loss is checked against a numpy brute force of the aggregate relative L2 error.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from compress.core.teacher_forced import errors, exact_outputs, run_teacher_forced
from configs import compressor as configs
from train import common
from train import compressor as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = 13


def tiny_config():
  return configs.get_config('tiny')                       # lowrank_learned on synthetic caches


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """tag -> {step: value} over every TensorBoard event file of `workdir/tb`."""
  files = glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  assert files, f'no TensorBoard event file in {workdir}/tb'
  out: dict[str, dict[int, float]] = {}
  for path in files:
    for event in LegacyEventFileLoader(path).Load():
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def leaves(params) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('compressor') / 'run')
  comp, params = tc.train(tiny_config(), workdir)
  return workdir, comp, params


# ----------------------------------------------------------------------------- training
def test_tiny_trains_logs_and_checkpoints(run):
  workdir, comp, params = run
  config = tiny_config()
  s = read_scalars(workdir)
  loss = s['train/loss']
  assert sorted(loss) == list(range(config.log_every, config.num_steps + 1, config.log_every))
  assert loss[config.num_steps] < 0.9 * loss[config.log_every], loss
  hard = s['eval/overall']
  assert sorted(hard) == [0, 15, 30]
  assert hard[30] < 0.95 * hard[0], hard                   # held-out hard-path error fell
  assert s['eval/soft'][30] < s['eval/soft'][0]
  for tag in ('train/lr', 'train/grad_norm', 'train/steps_per_s'):
    assert tag in s, sorted(s)
  # lowrank_learned starts as pca (its baseline) exactly: same hard-path errors at step 0
  assert sorted(s['eval/baseline/overall']) == [0]
  for tag in ('overall', 'per_layer/1', 'per_scale/3'):
    np.testing.assert_allclose(s[f'eval/{tag}'][0], s[f'eval/baseline/{tag}'][0], rtol=1e-5)
  N, K = config.data.layers, len(config.data.patch_nums)
  assert {f'eval/per_layer/{i}' for i in range(N)} | {f'eval/per_scale/{k}' for k in range(K)} <= set(s)
  assert max(s['eval/bits_over_budget'].values()) <= 1.0
  assert s['eval/per_scale/0'][30] < 1e-6                   # the first scale has no cache: exact
  assert sorted(common.checkpoint_manager(workdir).all_steps()) == [10, 20, 30]
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['compressor'] == comp.name and saved['data']['source'] == 'synthetic'
  info = json.load(open(os.path.join(workdir, tc.COMPRESSOR_FILE)))
  assert info['budget_bits'] == comp.budget.bits == int(0.25 * comp.geometry.fp16_bits)
  assert (info['num_layers'], info['num_heads'], info['geometry']['patch_nums']) == (2, 2, [1, 2, 3, 4])
  comp2, params2 = tc.load_trained(workdir)
  assert comp2 == comp
  for x, y in zip(leaves(params), leaves(params2), strict=True):
    np.testing.assert_array_equal(x, y)


def test_finished_run_loads_instead_of_training(run):
  workdir, comp, params = run
  mtime = os.path.getmtime(os.path.join(workdir, 'checkpoints', '30'))
  comp2, params2 = tc.train(tiny_config(), workdir)        # nothing left to do: restores step 30
  assert comp2 == comp and os.path.getmtime(os.path.join(workdir, 'checkpoints', '30')) == mtime
  for x, y in zip(leaves(params), leaves(params2), strict=True):
    np.testing.assert_array_equal(x, y)


def numpy_block_causal(q, k, v, patch_nums):
  """Exact VAR attention in float64 numpy, (..., L, D)."""
  scale = np.repeat(np.arange(len(patch_nums)), [p * p for p in patch_nums])
  logits = np.einsum('...ld,...md->...lm', q, k)
  logits = np.where(scale[:, None] >= scale[None, :], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('...lm,...md->...ld', p / p.sum(-1, keepdims=True), v)


def test_loss_is_aggregate_relative_error(run):
  """The step's loss = sqrt(sum over layers, sequences, heads, tokens, dims of |out - exact|^2 / sum
  |exact|^2), brute-forced per layer in numpy; the hard-path evaluation agrees with compress.core.teacher_forced."""
  _, comp, params = run
  train_split, val_split = tc.load_data(tiny_config().data)
  x = train_split.get(np.arange(4))
  got = float(jax.jit(tc.relaxed_error, static_argnums=0)(comp, params, x['q'], x['k'], x['v']))
  one_layer = jax.jit(comp.train_outputs)
  d2 = e2 = 0.0
  for layer in range(x['q'].shape[0]):
    p = jax.tree.map(lambda a: a[layer], params)
    out = np.asarray(one_layer(p, x['q'][layer], x['k'][layer], x['v'][layer]), np.float64)
    exact = numpy_block_causal(*(x[t][layer].astype(np.float64) for t in 'qkv'), comp.geometry.patch_nums)
    d2, e2 = d2 + np.sum((out - exact) ** 2), e2 + np.sum(exact ** 2)
  np.testing.assert_allclose(got, np.sqrt(d2 / e2), rtol=1e-4)

  val = val_split.get(np.arange(val_split.num_sequences))
  out = np.concatenate([run_teacher_forced(comp, params, *(val[t][:, i:i + 8] for t in 'qkv'))['out']
                        for i in (0, 8)], axis=1)
  ref = errors(out, exact_outputs(val['q'], val['k'], val['v'], comp.geometry.patch_nums),
               comp.geometry.patch_nums)
  mine = tc.evaluate(comp, params, val_split, 16, chunk=8)              # two chunks, summed
  np.testing.assert_allclose(mine['overall'], ref['overall'], rtol=1e-5)
  np.testing.assert_allclose([mine[f'per_layer/{i}'] for i in range(2)], ref['per_layer'], rtol=1e-5)
  np.testing.assert_allclose([mine[f'per_scale/{k}'] for k in range(4)], ref['per_scale'], rtol=1e-5,
                             atol=1e-7)


def test_resume_matches_uninterrupted(run, tmp_path):
  workdir = str(tmp_path / 'run')
  tc.train(tiny_config(), workdir, stop_at_step=STOP)                  # simulated kill after step 13
  assert common.checkpoint_manager(workdir).latest_step() == STOP
  _, params = tc.train(tiny_config(), workdir)
  for x, y in zip(leaves(run[2]), leaves(params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  a, b = read_scalars(run[0])['train/loss'], read_scalars(workdir)['train/loss']
  assert set(b) == set(a) | {STOP}                 # the kill logged step 13; step 15 averages 14-15 only
  same = sorted(set(a) - {15})
  np.testing.assert_allclose([a[i] for i in same], [b[i] for i in same], rtol=1e-6)


# ----------------------------------------------------------------------------- sharding
SHARDED = """
import sys
import jax, numpy as np
from jax.sharding import Mesh
from configs import compressor as configs
from train import common, compressor as tc
assert jax.device_count() == 8, jax.devices()
config = configs.get_config('tiny')
train_split, _ = tc.load_data(config.data)
g = train_split
comp = tc.build_compressor(config.compressor, tc.CacheGeometry(g.patch_nums, g.head_dim, config.kv_dtype),
                           config.budget, tc.settings_dict(config.settings))
calibration = train_split.get(np.arange(config.calibration_sequences))
params = jax.device_get(comp.init_params(jax.random.PRNGKey(0), g.num_layers, g.num_heads,
                                         calibration=calibration))   # host copy: each run donates its own
hp = common.OptimHParams.from_config(config)
out = {}
for n in (8, 1):
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('data',))
  state = common.replicate(tc.init_train_state(comp, params, hp), mesh)
  step = common.jit_step(tc.train_step, mesh, num_consts=1, num_static=1)
  losses = []
  for i in range(3):
    batch = tc.batch_at(train_split, i, config.batch_size, config.seed, mesh)
    assert len(batch['q'].sharding.device_set) == n and batch['q'].shape[0] == config.batch_size
    assert batch['q'].addressable_shards[0].data.shape[0] == config.batch_size // n
    state, metrics = step(state, batch, hp, comp)
    losses.append(float(metrics['loss']))
  out[f'loss{n}'] = np.asarray(losses)
  for j, x in enumerate(jax.tree.leaves(jax.device_get(state['params']))):
    out[f'param{n}_{j}'] = x
np.savez(sys.argv[1], **out)
config.batch_size = 12
try:
  tc.train(config, sys.argv[2], mesh=Mesh(np.asarray(jax.devices()), ('data',)))
except ValueError as e:
  print('REFUSED', e)
"""


def test_sharded_step_matches_single_device(tmp_path):
  """Three steps on an 8-device CPU mesh (batch split 8 ways) = the same steps on one device."""
  result, bad = str(tmp_path / 'result.npz'), str(tmp_path / 'bad')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', SHARDED, result, bad], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'REFUSED batch_size 12 is not divisible by the 8 devices' in proc.stdout, proc.stdout
  assert not os.path.exists(bad)
  r = np.load(result)
  assert r['loss1'][2] < r['loss1'][0]                    # it trains
  np.testing.assert_allclose(r['loss8'], r['loss1'], rtol=1e-6)
  names = sorted(k[len('param1_'):] for k in r if k.startswith('param1_'))
  assert names
  for j in names:
    np.testing.assert_allclose(r[f'param8_{j}'], r[f'param1_{j}'], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- failures
def test_nan_in_data_stops_with_last_finite_checkpoint(tmp_path, monkeypatch):
  config = tiny_config()
  n = config.data.num_train
  step2 = common.batch_indices(2, config.batch_size, n, config.seed)
  bad = int(step2[step2 >= config.calibration_sequences][0])     # not in the calibration, first in step 2
  assert all(bad not in common.batch_indices(s, config.batch_size, n, config.seed) for s in (0, 1))
  load = tc.load_data

  def poisoned(data):
    train, val = load(data)
    train.qkv['q'][:, bad, 0, 5, 0] = np.nan
    return train, val
  monkeypatch.setattr(tc, 'load_data', poisoned)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match=r'non-finite training signal at step 2.*Lower config.lr'):
    tc.train(config, workdir)
  assert common.checkpoint_manager(workdir).all_steps() == [2]
  _, params = tc.load_trained(workdir)
  assert all(np.isfinite(x).all() for x in leaves(params))


@pytest.mark.parametrize('field, value, error, match', [
    ('compressor', 'nope', ValueError, 'not a registered compressor'),
    ('compressor', 'pca', ValueError, 'has no trained parameters'),
    ('budget', 'lots', ValueError, 'cannot read budget'),
    ('budget', '100%', ValueError, 'nothing to learn; lower config.budget'),
    ('data.source', 'capture', ValueError, 'data.path is empty'),
    ('data.path', '/nonexistent/capture', FileNotFoundError, 'not a capture directory'),
    ('data.source', 'imagenet', ValueError, 'unknown data.source'),
    ('batch_size', 128, ValueError, 'has 64 sequences, fewer than batch_size 128'),
])
def test_bad_config_fails_before_work(tmp_path, field, value, error, match):
  config = tiny_config()
  if field == 'data.path':
    config.data.source = 'capture'
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  workdir = str(tmp_path / 'run')
  with pytest.raises(error, match=match):
    tc.train(config, workdir)
  assert not os.path.exists(workdir)


def test_changed_config_is_refused(run):
  config = tiny_config()
  config.lr = 0.5
  with pytest.raises(ValueError, match=r'different config:\n  lr: saved 0.01, now 0.5'):
    tc.train(config, run[0])


def test_load_trained_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='compressor.json'):
    tc.load_trained(str(tmp_path))
  with pytest.raises(ValueError, match=r'no checkpoint for step 7 .* available steps: \[10, 20, 30\]'):
    tc.load_trained(run[0], step=7)
  copy = str(tmp_path / 'copy')
  shutil.copytree(run[0], copy)
  for path in glob.glob(os.path.join(copy, 'checkpoints', '30', 'model', '**', '*'), recursive=True):
    if os.path.isfile(path) and 'commit_success' not in path:
      open(path, 'wb').close()                                       # truncate: a corrupt save
  with pytest.raises(ValueError, match=r"checkpoints/30' cannot be read .* earlier one \(\[10, 20\]\)"):
    tc.load_trained(copy)
  shutil.rmtree(os.path.join(copy, 'checkpoints'))
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*train first'):
    tc.load_trained(copy)



def test_provenance_is_recorded_and_checked(run):
  """A trained run records what it was trained on; loading it for another model or capture is refused."""
  workdir = run[0]
  prov = json.load(open(os.path.join(workdir, tc.PROVENANCE_FILE)))
  assert prov == tc.data_provenance(tiny_config().data) and prov['model'] == 'synthetic'
  assert tc.load_trained(workdir, expect=prov)[0].name
  with pytest.raises(ValueError, match='another model'):
    tc.load_trained(workdir, expect={**prov, 'model': 'f' * 64})
  with pytest.raises(ValueError, match='another capture'):
    tc.load_trained(workdir, expect={**prov, 'capture': 'f' * 64})


def test_cli_overrides_reach_the_trainer(tmp_path):
  workdir = str(tmp_path / 'cli')
  proc = subprocess.run([sys.executable, '-m', 'train.compressor', '--config', 'configs/compressor.py:tiny',
                         '--workdir', workdir, '--config.budget=100%', '--config.settings.key_fraction=0.25'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert 'has nothing to learn; lower config.budget' in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(workdir)


def test_config_variants():
  assert 'python -m train.compressor --config configs/compressor.py:tiny' in configs.__doc__
  c = configs.get_config('default,merge_learned')
  assert c.compressor == 'merge_learned' and c.data.source == 'capture' and c.baseline.merge_learned == 'cam'
  assert configs.get_config('tiny').settings.to_dict() == {'key_fraction': 0.5}    # lowrank_learned's
  with pytest.raises(ValueError, match='unknown variant'):
    configs.get_config('huge')


def test_load_trained_asks_the_compressor_to_check_what_it_loaded(run, monkeypatch):
  """load_trained hands the loaded parameters to Compressor.check_loaded (composed: widths that fit this
  version's entries, tests/test_composed_codes.py), whose error reaches the caller."""
  seen = []
  def refuse(self, params):
    seen.append(params)
    raise ValueError('allocated for another schedule')
  monkeypatch.setattr(type(run[1]), 'check_loaded', refuse)
  with pytest.raises(ValueError, match='another schedule'):
    tc.load_trained(run[0])
  assert seen and all(a.shape[:2] == b.shape[:2] for a, b in zip(jax.tree.leaves(seen[0]), leaves(run[2])))
