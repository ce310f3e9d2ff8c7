r"""Trains the multi-scale VQ-VAE (var_jax.vqvae.VQVAE) on images in [-1, 1].

  python -m train.vqvae --config configs/vqvae.py:default --workdir runs/vqvae_default

Loss: `l1_weight * |x - rec| + l2_weight * (x - rec)^2 + vq_weight * vq_loss`, where `rec` decodes the
straight-through quantised features and `vq_loss` is the official codebook + beta * commitment term.
Logged: losses, per-scale codebook usage (official EMA criterion), grad norm, lr; every `eval_every`
steps a held-out batch's L1 / PSNR of the clamped reconstruction, the fraction of codes it uses, and
an image grid (originals above reconstructions). Rerunning the same command resumes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx, struct
from ml_collections import config_flags

from train import common, image_data, workdir_guard, workdir_lock
from var_jax import cli
from var_jax.config import VQVAEConfig, from_json, to_json
from var_jax.vqvae import VQVAE


EVAL_IMAGES = 64
GRID_IMAGES = 8


def model_config(config: ml_collections.ConfigDict) -> VQVAEConfig:
  return VQVAEConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model.items()})


def load_vqvae(workdir: str, step: int | None = None) -> tuple[VQVAE, int]:
  """The trained VQ-VAE of a `train.vqvae` workdir (latest checkpoint unless `step`), and its step."""
  cfg = from_json(workdir_guard.read_json(workdir, 'model_config.json'))
  if not isinstance(cfg, VQVAEConfig):
    raise ValueError(f'{workdir!r} holds a {type(cfg).__name__} run, not a VQ-VAE run (train.vqvae)')
  model = common.abstract_model(VQVAE, cfg)
  return model, common.restore_model(workdir, model, step)


@struct.dataclass
class LossWeights:
  """Loss weights (traced arguments of the step)."""
  l1: float
  l2: float
  vq: float


def _loss_fn(model: VQVAE, img_BHWC: jax.Array, w: LossWeights) -> tuple[jax.Array, dict[str, jax.Array]]:
  out = model(img_BHWC, update_usage=True)
  err = out.rec_BHWC - img_BHWC
  l1, l2 = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
  loss = w.l1 * l1 + w.l2 * l2 + w.vq * out.vq_loss
  metrics = {'l1': l1, 'l2': l2, 'vq_loss': out.vq_loss, 'usage_mean': jnp.mean(out.usages_S),
             'usage_min': jnp.min(out.usages_S)}
  metrics.update({f'usage_scale{i}': u for i, u in enumerate(out.usages_S)})
  return loss, metrics


def train_step(state: common.TrainState, batch: dict[str, jax.Array], hp: common.OptimHParams,
               weights: LossWeights, graphdef: nnx.GraphDef) -> tuple[common.TrainState, dict[str, jax.Array]]:
  """One step on batch {'image': (B, H, W, 3)}; the usage statistics (`rest`) advance with it."""
  model = nnx.merge(graphdef, state['params'], state['rest'], copy=True)   # no aliasing of `state`
  grad_fn = nnx.value_and_grad(_loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
  (loss, metrics), grads = grad_fn(model, batch['image'], weights)
  _, _, rest = nnx.split(model, nnx.Param, ...)
  lr = hp.schedule()(state['step'])
  optimizer = common.make_optimizer(hp, state['params'])
  state, guard = common.guarded_update(state, grads, rest, loss, optimizer)
  return state, {'loss': loss, 'lr': lr, **metrics, **guard}


@functools.partial(jax.jit, static_argnums=0)
def _eval_forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, img_BHWC: jax.Array):
  model = nnx.merge(graphdef, params, rest)
  idx_list, f_hats = model.quantize.quantize_scales(model.encode(img_BHWC))
  return model.fhat_to_img(f_hats[-1]), idx_list


def make_eval_fn(graphdef: nnx.GraphDef, cfg: VQVAEConfig, images: np.ndarray):
  """Held-out reconstruction quality, code usage and an image grid, logged to TensorBoard."""
  def eval_fn(state: common.TrainState, step: int, writer) -> dict[str, float]:
    rec, idx_list = jax.device_get(_eval_forward(graphdef, state['params'], state['rest'], images))
    mse = float(np.mean(np.square((rec - images) / 2)))     # in [0, 1] units
    out = {'l1': float(np.mean(np.abs(rec - images))), 'psnr': float(-10 * np.log10(max(mse, 1e-12)))}
    used = [np.unique(i).size / cfg.vocab_size for i in idx_list]
    out['codes_used_last_scale'] = used[-1]
    all_codes = np.concatenate([i.ravel() for i in idx_list])
    out['codes_used_all_scales'] = np.unique(all_codes).size / cfg.vocab_size
    grid = np.concatenate([images[:GRID_IMAGES], rec[:GRID_IMAGES]], axis=1)        # (n, 2H, W, 3)
    writer.add_images('eval/original_over_reconstruction', (grid + 1) / 2, step, dataformats='NHWC')
    return out
  return eval_fn


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at_step: int | None = None) -> dict[str, float]:
  """Trains (or resumes) the VQ-VAE described by `config` in `workdir`; returns the last metrics."""
  cfg = model_config(config)
  workdir_guard.prepare_workdir(workdir, config, to_json(cfg))
  mesh = common.make_mesh()
  common.check_batch(config.batch_size, mesh)
  dataset = image_data.open_dataset(config.data, cfg.image_size)
  image_data.write_dataset_info(workdir, len(dataset), dataset.class_names)
  eval_images, _ = image_data.eval_set(config.data, dataset, cfg.image_size, EVAL_IMAGES)

  model = common.create_model(VQVAE, cfg, config.seed)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  hp = common.OptimHParams.from_config(config)
  graphdef, state = common.init_state(model, common.make_optimizer(hp, params))
  state = common.replicate(state, mesh)
  weights = LossWeights(config.l1_weight, config.l2_weight, config.vq_weight)
  jitted = common.jit_step(train_step, mesh, num_consts=2, num_static=1)
  step_fn = lambda state, batch: jitted(state, batch, hp, weights, graphdef)  # noqa: E731

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    idx = common.batch_indices(step, config.batch_size, len(dataset), config.seed)
    return {'image': dataset[idx]}

  logging.info('VQ-VAE %s: %d params, %d images of %dpx', cfg, common.num_params(params), len(dataset),
               cfg.image_size)
  _, last = common.train_loop(config, workdir, state, step_fn, batch_fn,
                              make_eval_fn(graphdef, cfg, eval_images), stop_at_step)
  return last


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  with workdir_lock.hold(flags.FLAGS.workdir):                # one run per workdir
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Flags are defined here, not at import, so that train.var can import train.vqvae.
  config_flags.DEFINE_config_file('config', None, 'configs/vqvae.py:<variant>', lock_config=True)
  flags.DEFINE_string('workdir', None, 'directory of the run (config, checkpoints, TensorBoard)')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
