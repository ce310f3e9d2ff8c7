r"""Trains a learned KV-cache compressor on captured (or synthetic) VAR caches, teacher forced.

  python -m train.compressor --config configs/compressor.py:default --workdir runs/lowrank_learned_25 \
      --config.data.path=runs/capture_default
  python -m train.compressor --config configs/compressor.py:tiny --workdir /tmp/compressor_tiny

Loss: the aggregate relative L2 error sqrt(sum |out - exact|^2 / sum |exact|^2) of the attention outputs
of every scale's queries, summed over layers, sequences, heads, tokens and dims, where `out` is the
compressor's differentiable relaxation (`train_outputs`, vmapped over layers) and `exact` the full-cache
attention (`compress.exact_outputs`); at large geometries (d16) the loss and its gradient are computed a
few layers at a time, exactly (`config.grad_layers` / `grad_bytes`: train/compressor_loss.py). Batches
are sequence-major (b, layers, H, L, D) and split over the mesh axis 'data'; the sums are global, so the
sharded step computes the single-device loss.
Evaluation runs the HARD path (`compress_step`, exactly within the budget) over the validation split.

Workdir: config.json, provenance.json (fingerprints of the model and capture trained on: a resume or
load for another is refused), compressor.json (name, budget, settings, geometry, layers, heads: enough
to rebuild the compressor), checkpoints/<step>/ (items `model` = {'params', 'rest': {}} and `opt`), tb/.
TensorBoard: train/{loss, lr, grad_norm, update_norm, steps_per_s}; eval/{overall, soft, per_layer/<i>,
per_scale/<k>, bits_over_budget} (also at step 0, the initialisation) and eval/baseline/... once at the
start (the heuristic of the same family at the same budget, `config.baseline`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorboardX
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

import compress
from compress.core.budget import Budget, CacheGeometry
from compress.core.teacher_forced import exact_outputs, run_teacher_forced
from train import common, workdir_guard, workdir_lock
from train.compressor_loss import (auto_group, grouped_sums, loss_and_grad,  # noqa: F401  (re-exported)
                                   relaxed_error)
from var_jax import cli
# the caches (synthetic or a capture's train and held-out splits) and their provenance; re-exported
from train.compressor_data import (ArraySplit, PROVENANCE_FILE, QKV, check_provenance,  # noqa: F401
                                   data_provenance, data_shape, load_data, split_shape)

COMPRESSOR_FILE = 'compressor.json'


# ----------------------------------------------------------------------------- compressor
def settings_dict(settings: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Compressor settings as dataclass arguments (lists become tuples, so the compressor is hashable)."""
  def fix(x):
    if isinstance(x, (list, tuple)):
      return tuple(fix(y) for y in x)
    if isinstance(x, dict):
      return {k: fix(y) for k, y in x.items()}
    return x
  if isinstance(settings, ml_collections.ConfigDict):
    settings = settings.to_dict()
  return {k: fix(v) for k, v in settings.items()}


def build_compressor(name: str, geometry: CacheGeometry, budget: Budget | str | float,
                     settings: dict[str, Any]) -> compress.Compressor:
  """The learned compressor `name` at `budget`; clear errors for anything that cannot be trained."""
  learned = compress.available(oracle=False, calibrated=True)
  learned = [n for n in learned if compress.REGISTRY[n].learned]
  if name not in compress.REGISTRY:
    raise ValueError(f'config.compressor {name!r} is not a registered compressor; learned ones: {learned}')
  if not compress.REGISTRY[name].learned:
    raise ValueError(f'compressor {name!r} has no trained parameters (learned = False); pick a learned '
                     f'one: {learned}')
  if not isinstance(budget, Budget):
    budget = Budget.parse(budget, geometry)
  comp = compress.make(name, geometry, budget, **settings)
  if comp.passthrough:
    raise ValueError(f'budget {budget.bits} bits holds the whole cache ({geometry.full_bits} bits): '
                     f'{name} keeps it exactly and has nothing to learn; lower config.budget')
  if not hasattr(comp, 'train_outputs'):
    raise TypeError(f'{name} is marked learned but has no train_outputs(params, q, k, v)')
  return comp


def compressor_info(comp: compress.Compressor, budget_spec: Any, num_layers: int, num_heads: int,
                    settings: dict[str, Any]) -> dict[str, Any]:
  g = comp.geometry
  return {'name': comp.name, 'budget_bits': int(comp.budget.bits), 'budget_spec': str(budget_spec),
          'settings': settings, 'num_layers': num_layers, 'num_heads': num_heads,
          'geometry': {'patch_nums': list(g.patch_nums), 'head_dim': g.head_dim, 'kv_dtype': g.kv_dtype}}


def check_params(comp: compress.Compressor, params: Any, num_layers: int, num_heads: int) -> None:
  if params is None or not jax.tree.leaves(params):
    raise ValueError(f'{comp.name} at {comp.budget.bits} bits has no parameters to train (init_params '
                     'returned none: e.g. no entry fits the budget); raise config.budget')
  for path, x in jax.tree.leaves_with_path(params):
    if x.shape[:2] != (num_layers, num_heads) or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{comp.name}.init_params leaf {jax.tree_util.keystr(path)} is {x.dtype}{x.shape}; '
                       f'every trained leaf must be floating with leading axes (layers={num_layers}, '
                       f'heads={num_heads})')


# ----------------------------------------------------------------------------- step
def train_step(state: common.TrainState, batch: dict[str, jax.Array], hp: common.OptimHParams,
               comp: compress.Compressor, group: int = 0) -> tuple[common.TrainState, dict[str, jax.Array]]:
  """One AdamW step on batch {'q', 'k', 'v'}: (b, layers, H, L, D), sequence-major (split over 'data');
  `group` > 0: the gradient is computed that many layers at a time (train/compressor_loss.py)."""
  q, k, v = (jnp.moveaxis(batch[t], 0, 1) for t in QKV)
  loss, grads = loss_and_grad(comp, state['params'], q, k, v, group)
  lr = hp.schedule()(state['step'])
  optimizer = common.make_optimizer(hp, state['params'])
  state, guard = common.guarded_update(state, grads, state['rest'], loss, optimizer)
  return state, {'loss': loss, 'lr': lr, **guard}


def init_train_state(comp: compress.Compressor, params: Any, hp: common.OptimHParams) -> common.TrainState:
  opt = common.make_optimizer(hp, params).init(params)
  return {'params': params, 'rest': {}, 'opt': opt, 'step': jnp.zeros((), jnp.int32)}


# ----------------------------------------------------------------------------- evaluation
@jax.jit
def _sq_sums(out_NBHLD: jax.Array, exact_NBHLD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum |out - exact|^2, sum |exact|^2) per (layer, token): (N, L) each."""
  d = out_NBHLD.astype(jnp.float32) - exact_NBHLD
  return jnp.sum(d * d, axis=(1, 2, 4)), jnp.sum(exact_NBHLD * exact_NBHLD, axis=(1, 2, 4))


_exact = jax.jit(exact_outputs, static_argnums=3)
_soft_sums = jax.jit(grouped_sums, static_argnums=(0, 5))


def evaluate(comp: compress.Compressor, params: Any, split: Any, num_sequences: int, chunk: int,
             relaxed: bool = True, group: int = 0) -> dict[str, float]:
  """Hard-path errors over the first `num_sequences` of `split`, in chunks of `chunk` sequences (the
  relaxation's `group` layers at a time: `compressor_loss.grouped_sums`).

  Keys: overall, per_layer/<i>, per_scale/<k> (aggregate relative L2, as `compress.errors`),
  bits_over_budget (largest peak bits / budget: <= 1), soft (the relaxation's overall error).
  """
  g = comp.geometry
  n = min(num_sequences, split.num_sequences)
  d2 = e2 = soft = 0.0
  peak = 0
  for s in range(0, n, chunk):
    x = split.get(np.arange(s, min(s + chunk, n)))
    exact = _exact(x['q'], x['k'], x['v'], g.patch_nums)
    res = run_teacher_forced(comp, params, x['q'], x['k'], x['v'])
    a, b = _sq_sums(res['out'], exact)
    d2, e2 = d2 + np.asarray(a, np.float64), e2 + np.asarray(b, np.float64)
    peak = max(peak, int(np.max(res['peak_bits'])))
    if relaxed:
      soft = soft + float(_soft_sums(comp, params, x['q'], x['k'], x['v'], group)[0])
  bounds = np.cumsum((0,) + g.scale_sizes)
  d2_NK = np.stack([d2[:, i:j].sum(1) for i, j in zip(bounds[:-1], bounds[1:])], 1)
  e2_NK = np.stack([e2[:, i:j].sum(1) for i, j in zip(bounds[:-1], bounds[1:])], 1)
  ratio = lambda a, b: np.sqrt(a / np.maximum(b, 1e-30))
  out = {'overall': float(ratio(d2_NK.sum(), e2_NK.sum())),
         'bits_over_budget': peak / max(comp.budget.bits, 1)}
  out.update({f'per_layer/{i}': float(r) for i, r in enumerate(ratio(d2_NK.sum(1), e2_NK.sum(1)))})
  out.update({f'per_scale/{k}': float(r) for k, r in enumerate(ratio(d2_NK.sum(0), e2_NK.sum(0)))})
  if relaxed:
    out['soft'] = float(np.sqrt(soft / max(e2_NK.sum(), 1e-30)))
  return out


def baseline_errors(config: ml_collections.ConfigDict, comp: compress.Compressor, split: Any,
                    calibration: dict[str, np.ndarray], num_layers: int, num_heads: int
                    ) -> tuple[str, dict[str, float]]:
  """The heuristic `config.baseline[comp.name]` at the same budget ('' and {} when none is named)."""
  name = (config.get('baseline') or {}).get(comp.name, '')
  if not name:
    return '', {}
  ref = compress.make(name, comp.geometry, comp.budget)
  params = ref.init_params(jax.random.PRNGKey(config.seed), num_layers, num_heads,
                           calibration if ref.needs_calibration else None)
  return name, evaluate(ref, params, split, config.eval_sequences, config.eval_batch, relaxed=False)


def write_scalars(writer: tensorboardX.SummaryWriter, prefix: str, values: dict[str, float], step: int):
  for k, v in values.items():
    writer.add_scalar(f'{prefix}{k}', v, step)


# ----------------------------------------------------------------------------- training
def batch_at(split: Any, step: int, batch_size: int, seed: int, mesh: Mesh) -> dict[str, jax.Array]:
  """The training batch of `step` (a pure function of it): {'q', 'k', 'v'} global arrays
  (batch_size, layers, H, L, D) split over 'data'; each process of the mesh reads only its own rows."""
  idx = common.batch_indices(step, batch_size, split.num_sequences, seed)
  processes = sorted({d.process_index for d in mesh.devices.flat})      # those the mesh spans
  rank, per_process = processes.index(jax.process_index()), batch_size // len(processes)
  x = split.get(idx[rank * per_process:(rank + 1) * per_process])
  sharding = NamedSharding(mesh, P('data'))
  return {t: jax.make_array_from_process_local_data(sharding, np.moveaxis(x[t], 1, 0),
                                                    (batch_size,) + x[t].shape[:1] + x[t].shape[2:])
          for t in QKV}


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None,
          mesh: Mesh | None = None) -> tuple[compress.Compressor, Any]:
  """Trains (or resumes, or just loads when finished) the compressor of `config` in `workdir`.

  `mesh`: a 1-D mesh with axis 'data' (default: every device). Returns (compressor, params), params with
  leading axes (layers, heads). In one process, holds the workdir's lock (train/workdir_lock.py).
  """
  with workdir_lock.hold(workdir, enabled=jax.process_count() == 1):
    return _train(config, workdir, stop_at_step, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None,
           mesh: Mesh | None) -> tuple[compress.Compressor, Any]:
  shape = data_shape(config.data)
  patch_nums, num_layers, num_heads, head_dim = shape
  geometry = CacheGeometry(patch_nums, head_dim, config.kv_dtype)
  settings = settings_dict(config.settings)
  comp = build_compressor(config.compressor, geometry, config.budget, settings)
  mesh = common.make_mesh() if mesh is None else mesh
  common.check_batch(config.batch_size, mesh)
  train_split, val_split = load_data(config.data)        # val_split: the held-out split (data.eval_split)
  for name, split in (('train', train_split), (config.data.get('eval_split', 'dev'), val_split)):
    if split_shape(split) != shape:
      raise ValueError(f'the {name} caches are (patch_nums, layers, heads, head_dim) = '
                       f'{split_shape(split)}, expected {shape}; use caches of one model')
  n_train = train_split.num_sequences
  if n_train < config.batch_size:
    raise ValueError(f'the training split has {n_train} sequences, fewer than batch_size '
                     f'{config.batch_size}; lower batch_size or capture more')
  # layers per gradient (and relaxed evaluation) program: train/compressor_loss.py
  grouping = lambda batch: auto_group(num_layers, config.get('grad_layers', 0),  # noqa: E731
                                      config.get('grad_bytes', 0), geometry, batch, num_heads)
  group = grouping(config.batch_size // mesh.size)
  eval_group = grouping(min(config.eval_batch, config.eval_sequences, val_split.num_sequences))
  info = compressor_info(comp, config.budget, num_layers, num_heads, settings)
  workdir_guard.prepare_workdir(workdir, config, json.dumps(info, indent=2), COMPRESSOR_FILE)
  provenance = data_provenance(config.data)
  if os.path.exists(os.path.join(workdir, PROVENANCE_FILE)):
    check_provenance(workdir, provenance)       # same config, but the caches under data.path changed
  else:
    with open(os.path.join(workdir, PROVENANCE_FILE), 'w') as f:
      json.dump(provenance, f, indent=2)

  calibration = train_split.get(np.arange(min(config.calibration_sequences or n_train, n_train)))
  params = comp.init_params(jax.random.PRNGKey(config.seed), num_layers, num_heads, calibration=calibration)
  check_params(comp, params, num_layers, num_heads)
  shared_bits = comp.shared_bits(params)
  hp = common.OptimHParams.from_config(config)
  state = common.replicate(init_train_state(comp, params, hp), mesh)     # donated from here on
  del params
  jitted = common.jit_step(train_step, mesh, num_consts=1, num_static=2)
  step_fn = lambda state, batch: jitted(state, batch, hp, comp, group)  # noqa: E731
  batch_fn = lambda step: batch_at(train_split, step, config.batch_size, config.seed, mesh)  # noqa: E731

  def eval_fn(state: common.TrainState, step: int, writer) -> dict[str, float]:
    del step, writer
    return evaluate(comp, state['params'], val_split, config.eval_sequences, config.eval_batch,
                    group=eval_group)

  mngr = common.checkpoint_manager(workdir, config.keep_ckpts)
  fresh = mngr.latest_step() is None
  mngr.close()
  if fresh and config.get('eval_at_start', True):   # step 0: the init and the baseline, for reference
    writer = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'),
                                        filename_suffix=f'.init.{time.time_ns()}')
    write_scalars(writer, 'eval/', eval_fn(state, 0, writer), 0)
    name, ref = baseline_errors(config, comp, val_split, calibration, num_layers, num_heads)
    if name:
      writer.add_text('eval/baseline', f'{name} at {comp.budget.bits} bits', 0)
      write_scalars(writer, 'eval/baseline/', ref, 0)
      logging.info('baseline %s: hard error %.4g', name, ref['overall'])
    writer.close()
  del calibration                       # the whole training split at most: not held while training
  logging.info('training %s (%d bits per sequence, layer and head; %d shared bits) on %d sequences of '
               '%d layers x %d heads; gradient over %d layer(s) at a time', comp.name, comp.budget.bits,
               shared_bits, n_train, num_layers, num_heads, group)
  state, _ = common.train_loop(config, workdir, state, step_fn, batch_fn, eval_fn, stop_at_step)
  return comp, state['params']


def load_trained(workdir: str, step: int | None = None, *, expect: Mapping[str, str] | None = None
                 ) -> tuple[compress.Compressor, Any]:
  """The compressor of a `train.compressor` workdir and its trained parameters (latest step unless
  `step`); params are a pytree with leading axes (layers, heads). `expect`: the {'model', 'capture'}
  fingerprints (`data_provenance`) the run must have been trained on; another is refused."""
  info = workdir_guard.read_json(workdir, COMPRESSOR_FILE)
  if expect is not None:
    check_provenance(workdir, expect)
  g = info['geometry']
  geometry = CacheGeometry(tuple(g['patch_nums']), g['head_dim'], g['kv_dtype'])
  comp = compress.make(info['name'], geometry, Budget(info['budget_bits']), **settings_dict(info['settings']))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  mngr = common.checkpoint_manager(workdir)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {ckpt_dir!r}; train first: python -m train.compressor '
                              f'--config configs/compressor.py:<variant> --workdir {workdir}')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'no checkpoint for step {step} in {ckpt_dir!r}; available steps: {steps}')
    got = common.read_checkpoint(mngr, workdir, step, ocp.args.Composite(model=ocp.args.StandardRestore()))
    params = got['model']['params']
  finally:
    mngr.close()
  check_params(comp, params, info['num_layers'], info['num_heads'])
  comp.check_loaded(params)            # its layout under this version (e.g. composed's code widths)
  return comp, params


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if flags.FLAGS.multihost:
    jax.distributed.initialize()       # coordinator, process count and id from the cluster environment
  train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'configs/compressor.py:<variant>[,<compressor>]',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'directory of the run (config, checkpoints, TensorBoard)')
  flags.DEFINE_bool('multihost', False, 'call jax.distributed.initialize() first (multi-host TPU/GPU slice)')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
