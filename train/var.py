r"""Trains VAR (var_jax.var.VAR) by teacher-forced next-scale prediction on a trained VQ-VAE's tokens.

  python -m train.var --config configs/var.py:default --workdir runs/var_default \
      --config.vqvae_workdir=runs/vqvae_default

At the first start the dataset is encoded once into token pyramids (B, L) with the VQ-VAE checkpoint
(saved as `tokens.npz` in the workdir, with the VQ-VAE step, and reused on resume). Each step builds
the teacher-forcing input with `VQVAE.idx_to_var_input`, drops labels with `cond_drop_rate` (for CFG)
and minimises the mean cross-entropy over all L tokens. Logged: loss, token accuracy, the last scale's
loss / accuracy, grad norm, lr; every `eval_every` steps held-out loss / accuracy and CFG samples.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from flax import nnx, struct
from ml_collections import config_flags

from train import common, image_data, workdir_guard, workdir_lock
from train.vqvae import load_vqvae
from var_jax import cli
from var_jax.config import VARConfig, VQVAEConfig, from_json, to_json
from var_jax.sampling import generate
from var_jax.var import VAR
from var_jax.vqvae import VQVAE


ENCODE_BATCH = 256
TOKENS_FILE = 'tokens.npz'


def model_config(config: ml_collections.ConfigDict, vae_cfg: VQVAEConfig, num_classes: int) -> VARConfig:
  m = config.model
  return VARConfig(depth=m.depth, width=m.width or 64 * m.depth, num_heads=m.num_heads or m.depth,
                   mlp_ratio=m.mlp_ratio, num_classes=num_classes, vocab_size=vae_cfg.vocab_size,
                   z_channels=vae_cfg.z_channels, patch_nums=tuple(vae_cfg.patch_nums),
                   attn_l2_norm=m.attn_l2_norm, shared_aln=m.shared_aln, cond_drop_rate=m.cond_drop_rate)


def load_var(workdir: str, step: int | None = None) -> tuple[VAR, int]:
  """The trained VAR of a `train.var` workdir (latest checkpoint unless `step`), and its step."""
  cfg = from_json(workdir_guard.read_json(workdir, 'model_config.json'))
  if not isinstance(cfg, VARConfig):
    raise ValueError(f'{workdir!r} holds a {type(cfg).__name__} run, not a VAR run (train.var)')
  model = common.abstract_model(VAR, cfg)
  return model, common.restore_model(workdir, model, step)


# ----------------------------------------------------------------------------- tokens
@functools.partial(jax.jit, static_argnums=0)
def _encode(vae_graphdef: nnx.GraphDef, vae_state: nnx.State, img_BHWC: jax.Array) -> jax.Array:
  return jnp.concatenate(nnx.merge(vae_graphdef, vae_state).img_to_idx(img_BHWC), axis=1)


def encode_dataset(vae: VQVAE, images: Any, num: int, progress: bool = False) -> np.ndarray:
  """(num, L) int32 token pyramids of `images[0:num]` (scales concatenated, coarse to fine)."""
  graphdef, state = nnx.split(vae)
  out = []
  for s in tqdm.trange(0, num, ENCODE_BATCH, desc='encoding', disable=not progress, dynamic_ncols=True):
    idx = np.arange(s, min(s + ENCODE_BATCH, num))
    batch = images[idx]
    pad = ENCODE_BATCH - len(idx)          # keep one compiled shape
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    out.append(np.asarray(_encode(graphdef, state, batch))[:len(idx)])
  return np.concatenate(out).astype(np.int32)


def load_or_encode_tokens(config: ml_collections.ConfigDict,
                          workdir: str) -> tuple[VQVAE, dict[str, np.ndarray]]:
  """The VQ-VAE (at the recorded step) and the tokens of the training and evaluation images."""
  path = os.path.join(workdir, TOKENS_FILE)
  vae_dir = os.path.abspath(config.vqvae_workdir)
  if os.path.exists(path):
    with np.load(path) as z:
      tokens = dict(z)
    step = int(tokens['vqvae_step'])
    if config.vqvae_step not in (-1, step):
      raise ValueError(f'{path} was encoded with VQ-VAE step {step}, the config asks for {config.vqvae_step}')
    vae, _ = load_vqvae(vae_dir, step)
    return vae, tokens
  vae, step = load_vqvae(vae_dir, None if config.vqvae_step == -1 else config.vqvae_step)
  dataset = image_data.open_dataset(config.data, vae.cfg.image_size)
  eval_images, eval_labels = image_data.eval_set(config.data, dataset, vae.cfg.image_size, config.eval_images)
  logging.info('encoding %d images with the VQ-VAE of %s (step %d)', len(dataset), vae_dir, step)
  tokens = {'idx': encode_dataset(vae, dataset, len(dataset), config.progress),
            'labels': np.asarray(dataset.labels, np.int32),
            'eval_idx': encode_dataset(vae, eval_images, len(eval_images)),
            'eval_labels': np.asarray(eval_labels, np.int32), 'vqvae_step': np.asarray(step)}
  tmp = os.path.join(workdir, 'tokens.tmp.npz')
  np.savez(tmp, **tokens)
  os.replace(tmp, path)
  return vae, tokens


def split_scales(idx_BL: jax.Array, patch_nums: tuple[int, ...]) -> list[jax.Array]:
  ends = np.cumsum([pn * pn for pn in patch_nums])[:-1]
  return jnp.split(idx_BL, ends, axis=1)


# ----------------------------------------------------------------------------- step
def _loss_fn(model: VAR, labels_B: jax.Array, x_BlC: jax.Array, idx_BL: jax.Array,
             key: jax.Array | None, label_smoothing: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over all B x L tokens; metrics: accuracy, and loss / accuracy of the last scale."""
  cfg = model.cfg
  logits_BLV = model(labels_B, x_BlC, cond_drop_key=key)
  targets_BLV = optax.smooth_labels(jax.nn.one_hot(idx_BL, cfg.vocab_size), label_smoothing)
  ce_BL = optax.softmax_cross_entropy(logits_BLV, targets_BLV)
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == idx_BL).astype(jnp.float32)
  tail = cfg.begin_ends[-1][0]
  metrics = {'acc': jnp.mean(hit_BL), 'loss_tail': jnp.mean(ce_BL[:, tail:]),
             'acc_tail': jnp.mean(hit_BL[:, tail:])}
  return jnp.mean(ce_BL), metrics


@struct.dataclass
class LossHParams:
  """Traced arguments of the step: label smoothing and the seed of the label-dropout keys."""
  label_smoothing: float
  seed: int


def train_step(state: common.TrainState, batch: dict[str, jax.Array], vae_state: nnx.State,
               hp: common.OptimHParams, lhp: LossHParams, graphdef: nnx.GraphDef,
               vae_graphdef: nnx.GraphDef) -> tuple[common.TrainState, dict[str, jax.Array]]:
  """One step on batch {'idx': (B, L) int, 'label': (B,) int}; label dropout keyed by (seed, step)."""
  model = nnx.merge(graphdef, state['params'], state['rest'], copy=True)   # no aliasing of `state`
  vae = nnx.merge(vae_graphdef, vae_state)
  x_BlC = vae.idx_to_var_input(split_scales(batch['idx'], model.cfg.patch_nums))
  key = jax.random.fold_in(jax.random.PRNGKey(lhp.seed), state['step'])
  grad_fn = nnx.value_and_grad(_loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (loss, metrics), grads = grad_fn(model, batch['label'], x_BlC, batch['idx'], key, lhp.label_smoothing)
  lr = hp.schedule()(state['step'])
  optimizer = common.make_optimizer(hp, state['params'])
  state, guard = common.guarded_update(state, grads, state['rest'], loss, optimizer)
  return state, {'loss': loss, 'lr': lr, **metrics, **guard}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef: nnx.GraphDef, vae_graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
               vae_state: nnx.State, labels_B: jax.Array,
               idx_BL: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  model = nnx.merge(graphdef, params, rest)
  x_BlC = nnx.merge(vae_graphdef, vae_state).idx_to_var_input(split_scales(idx_BL, model.cfg.patch_nums))
  return _loss_fn(model, labels_B, x_BlC, idx_BL, None, 0.0)


def make_eval_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, vae: VQVAE,
                 tokens: dict[str, np.ndarray]):
  """Held-out teacher-forced loss / accuracy; CFG samples (one row per class) as a TensorBoard image."""
  vae_graphdef, vae_state = nnx.split(vae)

  def eval_fn(state: common.TrainState, step: int, writer) -> dict[str, float]:
    loss, metrics = _eval_step(graphdef, vae_graphdef, state['params'], state['rest'], vae_state,
                               tokens['eval_labels'], tokens['eval_idx'])
    out = {'loss': float(loss), **{k: float(v) for k, v in metrics.items()}}
    if config.samples_per_class:
      model = nnx.merge(graphdef, state['params'], state['rest'])
      labels = np.repeat(np.arange(model.cfg.num_classes), config.samples_per_class)
      key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)
      images = generate(model, vae, labels, key=key, cfg=config.sample_cfg, top_k=config.sample_top_k,
                        top_p=config.sample_top_p).images
      writer.add_images('eval/samples_by_class', np.asarray(images), step, dataformats='NHWC')
    return out
  return eval_fn


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None) -> dict[str, float]:
  """Trains (or resumes) the VAR described by `config` in `workdir`; returns the last metrics."""
  if not config.vqvae_workdir:
    raise ValueError('config.vqvae_workdir is empty: pass '
                     '--config.vqvae_workdir=<workdir of a train.vqvae run>')
  vae_cfg = from_json(workdir_guard.read_json(config.vqvae_workdir, 'model_config.json'))
  if not isinstance(vae_cfg, VQVAEConfig):
    raise ValueError(f'config.vqvae_workdir {config.vqvae_workdir!r} is not a train.vqvae run')
  class_names = image_data.dataset_class_names(config.data)
  cfg = model_config(config, vae_cfg, len(class_names))
  workdir_guard.prepare_workdir(workdir, config, to_json(cfg))
  mesh = common.make_mesh()
  common.check_batch(config.batch_size, mesh)
  vae, tokens = load_or_encode_tokens(config, workdir)
  if int(tokens['labels'].max()) >= cfg.num_classes:
    raise ValueError(f'dataset labels reach {int(tokens["labels"].max())} but the model has '
                     f'{cfg.num_classes} classes')
  image_data.write_dataset_info(workdir, len(tokens['labels']), class_names)

  model = common.create_model(VAR, cfg, config.seed)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  hp = common.OptimHParams.from_config(config)
  graphdef, state = common.init_state(model, common.make_optimizer(hp, params))
  state = common.replicate(state, mesh)
  vae_graphdef, vae_state = nnx.split(vae)
  vae_state = common.replicate(vae_state, mesh)
  lhp = LossHParams(config.label_smoothing, config.seed)
  jitted = common.jit_step(train_step, mesh, num_consts=3, num_static=2)
  step_fn = lambda state, batch: jitted(state, batch, vae_state, hp, lhp, graphdef, vae_graphdef)  # noqa: E731

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    idx = common.batch_indices(step, config.batch_size, len(tokens['labels']), config.seed)
    return {'idx': tokens['idx'][idx], 'label': tokens['labels'][idx]}

  logging.info('VAR %s: %d params, %d token pyramids of %d tokens', cfg, common.num_params(params),
               len(tokens['labels']), cfg.seq_len)
  _, last = common.train_loop(config, workdir, state, step_fn, batch_fn,
                              make_eval_fn(config, graphdef, vae, tokens), stop_at_step)
  return last


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  with workdir_lock.hold(flags.FLAGS.workdir):                # one run per workdir
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags are defined here, not at import, so that train.var can import train.vqvae.
  config_flags.DEFINE_config_file('config', None, 'configs/var.py:<variant>', lock_config=True)
  flags.DEFINE_string('workdir', None, 'directory of the run (config, checkpoints, TensorBoard)')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
