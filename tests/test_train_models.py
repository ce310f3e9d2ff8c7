"""Training scripts (train.vqvae, train.var) on their `tiny` configs.

Each trainer runs a fixed batch (num_images == batch_size) so that the loss must fall; a second run is
stopped after 5 steps and resumed, and must end bit-identical to the uninterrupted one; a run with
lr = nan must stop with a clear error and leave the last finite state in a checkpoint.
"""
import glob
import json
import os
import struct
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from configs import var as var_configs
from configs import vqvae as vqvae_configs
from train import common, workdir_guard
from train import var as train_var
from train import vqvae as train_vqvae

STOP = 5


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """Parses every TensorBoard event file (TFRecord framing) of `workdir/tb`: tag -> {step: value}
  for scalars, tag -> {step: (height, width)} for images."""
  out: dict[str, dict[int, Any]] = {}
  files = sorted(glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*')))
  assert files, f'no TensorBoard event file in {workdir}/tb'
  for path in files:
    with open(path, 'rb') as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      (n,) = struct.unpack('<Q', buf[pos:pos + 8])
      event = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
        elif v.HasField('image'):
          out.setdefault(v.tag, {})[event.step] = (v.image.height, v.image.width)
  return out


def states_of(model: nnx.Module) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def vq_config():
  c = vqvae_configs.get_config('tiny')
  c.data.num_images = c.batch_size
  return c


def var_config(vq_workdir: str):
  c = var_configs.get_config('tiny')
  c.data.num_images = c.batch_size
  c.vqvae_workdir = vq_workdir
  return c


@pytest.fixture(scope='module')
def vq_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('vq') / 'run')
  return workdir, train_vqvae.train(vq_config(), workdir)


@pytest.fixture(scope='module')
def var_run(tmp_path_factory, vq_run):
  workdir = str(tmp_path_factory.mktemp('var') / 'run')
  return workdir, train_var.train(var_config(vq_run[0]), workdir)


# ----------------------------------------------------------------------------- VQ-VAE
def test_vqvae_trains_and_logs(vq_run):
  workdir, last = vq_run
  loss = read_scalars(workdir)['train/loss']
  assert sorted(loss) == [2, 4, 6, 8, 10, 12]
  assert loss[12] < 0.8 * loss[2], loss
  scalars = read_scalars(workdir)
  for tag in ('train/l1', 'train/vq_loss', 'train/usage_mean', 'train/grad_norm', 'eval/psnr'):
    assert tag in scalars, sorted(scalars)
  assert scalars['eval/original_over_reconstruction'][12] == (2 * 8, 8 * 8)   # 8 pairs of 8 px images
  assert 0 < last['usage_mean'] <= 100
  assert sorted(common.checkpoint_manager(workdir).all_steps()) == [6, 12]
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['num_steps'] == 12 and saved['model']['patch_nums'] == [1, 2, 3, 4]


def test_vqvae_resume_matches_uninterrupted(vq_run, tmp_path):
  workdir = str(tmp_path / 'run')
  train_vqvae.train(vq_config(), workdir, stop_at_step=STOP)
  assert common.checkpoint_manager(workdir).latest_step() == STOP
  last = train_vqvae.train(vq_config(), workdir)
  a, step_a = train_vqvae.load_vqvae(vq_run[0])
  b, step_b = train_vqvae.load_vqvae(workdir)
  assert step_a == step_b == 12
  for x, y in zip(states_of(a), states_of(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert last['loss'] == vq_run[1]['loss']


def test_vqvae_refuses_other_config(vq_run):
  config = vq_config()
  config.lr = 1e-4
  with pytest.raises(ValueError, match=r'different config:\n  lr: saved 0.001, now 0.0001'):
    train_vqvae.train(config, vq_run[0])


def test_nan_guard_vqvae(tmp_path):
  config = vq_config()
  config.lr = float('nan')
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='non-finite training signal at step 0.*last finite state'):
    train_vqvae.train(config, workdir)
  model, step = train_vqvae.load_vqvae(workdir)
  assert step == 0
  fresh = common.create_model(train_vqvae.VQVAE, model.cfg, config.seed)    # the initial state
  for x, y in zip(states_of(model), states_of(fresh), strict=True):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- VAR
def test_var_trains_and_logs(var_run):
  workdir, last = var_run
  scalars = read_scalars(workdir)
  loss = scalars['train/loss']
  assert loss[12] < 0.8 * loss[2], loss
  assert scalars['train/acc'][12] > scalars['train/acc'][2]
  for tag in ('train/acc_tail', 'train/loss_tail', 'eval/loss', 'eval/acc'):
    assert tag in scalars, sorted(scalars)
  assert 'eval/samples_by_class' in scalars, sorted(scalars)          # CFG samples, one per class
  assert sorted(common.checkpoint_manager(workdir).all_steps()) == [6, 12]
  model, _ = train_var.load_var(workdir)
  assert model.cfg.num_classes == 12 and model.cfg.head_dim == 64
  tokens = np.load(os.path.join(workdir, train_var.TOKENS_FILE))
  assert tokens['idx'].shape == (8, model.cfg.seq_len) and tokens['idx'].max() < model.cfg.vocab_size
  assert int(tokens['vqvae_step']) == 12


def test_var_tokens_are_the_vqvae_codes(var_run, vq_run):
  """Row i of the token file holds image i's codes (encoded alone, in another batch) and label."""
  from var_jax.data import BuiltinDataset
  vae, _ = train_vqvae.load_vqvae(vq_run[0])
  tokens = np.load(os.path.join(var_run[0], train_var.TOKENS_FILE))
  ds = BuiltinDataset(8, vae.cfg.image_size, seed=0)
  order = np.array([5, 2, 7])
  want = train_var.encode_dataset(vae, ds[order], len(order))
  np.testing.assert_array_equal(tokens['idx'][order], want)
  np.testing.assert_array_equal(tokens['labels'], ds.labels)
  per_scale = train_var.split_scales(tokens['idx'], vae.cfg.patch_nums)
  assert [s.shape[1] for s in per_scale] == [pn * pn for pn in vae.cfg.patch_nums]


def test_var_resume_matches_uninterrupted(var_run, vq_run, tmp_path):
  workdir = str(tmp_path / 'run')
  train_var.train(var_config(vq_run[0]), workdir, stop_at_step=STOP)
  tokens_mtime = os.path.getmtime(os.path.join(workdir, train_var.TOKENS_FILE))
  last = train_var.train(var_config(vq_run[0]), workdir)
  assert os.path.getmtime(os.path.join(workdir, train_var.TOKENS_FILE)) == tokens_mtime
  a, _ = train_var.load_var(var_run[0])
  b, _ = train_var.load_var(workdir)
  for x, y in zip(states_of(a), states_of(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert last['loss'] == var_run[1]['loss']


def test_nan_guard_var(vq_run, tmp_path):
  config = var_config(vq_run[0])
  config.lr = float('nan')
  with pytest.raises(FloatingPointError, match='non-finite training signal at step 0'):
    train_var.train(config, str(tmp_path / 'nan'))


def test_schedule_matches_optax():
  import optax
  config = vqvae_configs.get_config('default')
  hp = common.OptimHParams.from_config(config)
  ref = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.num_steps,
                                           end_value=config.lr * config.end_lr_ratio)
  steps = np.array([0, 1, 50, config.warmup_steps, config.warmup_steps + 7, config.num_steps // 2,
                    config.num_steps - 1, config.num_steps, config.num_steps + 10])
  np.testing.assert_allclose(hp.schedule()(steps), ref(steps), rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- workdir safety
def test_overwrite_moves_old_run_aside(tmp_path):
  workdir = str(tmp_path / 'run')
  config = vq_config()
  workdir_guard.prepare_workdir(workdir, config, '{}')
  open(os.path.join(workdir, 'keep.txt'), 'w').write('old result')
  config.num_steps = 99
  with pytest.raises(ValueError, match='num_steps: saved 12, now 99'):
    workdir_guard.prepare_workdir(workdir, config, '{}')
  config.log_every = 5          # runtime keys never block a resume
  config.num_steps = 12
  workdir_guard.prepare_workdir(workdir, config, '{}')
  config.num_steps = 99
  config.overwrite = True
  workdir_guard.prepare_workdir(workdir, config, '{}')
  backups = glob.glob(workdir + '.old-*')
  assert len(backups) == 1 and open(os.path.join(backups[0], 'keep.txt')).read() == 'old result'
  assert json.load(open(os.path.join(workdir, 'config.json')))['num_steps'] == 99


def test_missing_vqvae_workdir_is_explained(tmp_path):
  config = var_configs.get_config('tiny')
  with pytest.raises(ValueError, match='vqvae_workdir is empty'):
    train_var.train(config, str(tmp_path / 'x'))
  config.vqvae_workdir = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='model_config.json'):
    train_var.train(config, str(tmp_path / 'x'))
