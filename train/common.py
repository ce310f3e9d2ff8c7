"""What the trainers share: mesh, optimiser, guarded update, checkpoints, the loop (workdir safety:
`train.workdir_guard`; image data: `train.image_data`).

A run lives in one workdir:
  config.json         the training config (ml_collections), compared on every start
  model_config.json   the model dataclass (`var_jax.config.to_json`), to rebuild the trained model
  checkpoints/<step>/ orbax: items `model` ({'params', 'rest'} nnx states) and `opt` (optax state)
  tb/                 TensorBoard event files (tensorboardX)

Training state is a pytree {'params', 'rest', 'opt', 'step'}; the jitted step takes it donated and
returns the next one. `guarded_update` keeps the old state when the loss, the gradients or the update
are not finite, and `train_loop` then saves that last finite state and raises `FloatingPointError`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
import tqdm
from absl import logging
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax import cli

TrainState = dict[str, Any]     # {'params': nnx.State, 'rest': nnx.State, 'opt': optax state, 'step': int32}
Metrics = dict[str, jax.Array]
# Official VAR `filter_params`: parameters whose path contains one of these get no weight decay.
NO_DECAY_KEYS = ('pos_start', 'pos_1LC', 'lvl_embed', 'scale_mul', 'ada_gss', 'bias', 'gamma', 'beta')


class _DropOrbaxInfo:
  """absl-logging filter: hides orbax's per-save INFO chatter (warnings and errors still show)."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or 'orbax' not in record.pathname


def quiet_orbax() -> None:
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  absl_logger = std_logging.getLogger('absl')
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


# ----------------------------------------------------------------------------- mesh
def make_mesh() -> Mesh:
  """1-D mesh over this process's devices with axis 'data' (batch split, state replicated). In a run
  split over processes (eval/frontier/distributed.py) each process trains its own compressors on its own
  devices; one training run is not spread over processes."""
  return Mesh(np.asarray(jax.local_devices()), ('data',))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f'batch_size {batch_size} is not divisible by the {mesh.size} devices of the data axis; '
                     f'pick a multiple of {mesh.size}')


@functools.lru_cache(maxsize=16)
def jit_step(step_fn: Callable[..., tuple[TrainState, Metrics]], mesh: Mesh, num_consts: int = 0,
             num_static: int = 0) -> Callable[..., tuple[TrainState, Metrics]]:
  """jit `step_fn(state, batch, *consts, *static)`: state replicated and donated, batch split over
  'data', `num_consts` replicated (not donated) arguments, then `num_static` static (hashable) ones.
  Cached, so that runs in one process with the same structure share the compiled step."""
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(step_fn, in_shardings=(repl, data) + (repl,) * num_consts, out_shardings=(repl, repl),
                 donate_argnums=0, static_argnums=tuple(range(2 + num_consts, 2 + num_consts + num_static)))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------- data
def num_params(params: nnx.State) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Indices of the batch of `step`: epochs of a seeded permutation (remainder dropped); pure in `step`."""
  if num_examples < batch_size:
    raise ValueError(f'the dataset has {num_examples} images, fewer than batch_size {batch_size}; '
                     'lower batch_size or add images')
  per_epoch = num_examples // batch_size
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch, 0xBA7C]).permutation(num_examples)
  return np.sort(perm[i * batch_size:(i + 1) * batch_size])


# ----------------------------------------------------------------------------- optimiser
def decay_mask(params: nnx.State) -> nnx.State:
  """True for parameters that get weight decay: matrices and kernels not named in `NO_DECAY_KEYS`."""
  def keep(path, x):
    names = '.'.join(str(getattr(p, 'key', p)) for p in path)
    return x.ndim >= 2 and not any(k in names for k in NO_DECAY_KEYS)
  return jax.tree.map_with_path(keep, params)


@struct.dataclass
class OptimHParams:
  """Optimiser settings, passed to the jitted step as an argument: the float fields are traced (a new
  lr does not recompile), the others are static (part of the pytree structure)."""
  lr: float
  end_lr_ratio: float
  weight_decay: float
  grad_clip: float
  warmup_steps: int = struct.field(pytree_node=False)
  num_steps: int = struct.field(pytree_node=False)
  b1: float = struct.field(pytree_node=False)
  b2: float = struct.field(pytree_node=False)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> OptimHParams:
    return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})

  def schedule(self) -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine decay to `lr * end_lr_ratio` at
    `num_steps` (optax's warmup_cosine_decay_schedule, written so that `lr` may be traced)."""
    warmup, total = max(self.warmup_steps, 1), max(self.num_steps, self.warmup_steps + 1)

    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      t = jnp.clip((step - self.warmup_steps) / (total - self.warmup_steps), 0.0, 1.0)
      cosine = self.end_lr_ratio + (1 - self.end_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * t))
      return self.lr * jnp.where(step < self.warmup_steps, step / warmup, cosine)
    return schedule


def make_optimizer(hp: OptimHParams, params: nnx.State) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (no decay on `decay_mask`-excluded parameters) on `hp.schedule()`."""
  return optax.chain(
      optax.clip_by_global_norm(hp.grad_clip),
      optax.adamw(hp.schedule(), b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, mask=decay_mask(params)))


@functools.lru_cache(maxsize=8)
def _init_state_fn(cls: type[nnx.Module], cfg: Any, seed: int) -> Callable[[], nnx.State]:
  # Initialisation runs once: compile it without XLA's backend optimisations (several times faster
  # to compile on CPU than one optimised compile, or than eager mode's one compile per initialiser).
  return jax.jit(lambda: nnx.state(cls(cfg, rngs=nnx.Rngs(seed))),
                 compiler_options={'xla_backend_optimization_level': 0})


def create_model(cls: type[nnx.Module], cfg: Any, seed: int) -> nnx.Module:
  """`cls(cfg, rngs=nnx.Rngs(seed))`, initialised by one cached jitted function."""
  graphdef, _ = nnx.split(abstract_model(cls, cfg))
  return nnx.merge(graphdef, _init_state_fn(cls, cfg, seed)())


def abstract_model(cls: type[nnx.Module], cfg: Any) -> nnx.Module:
  """`cls(cfg)` with shape-only variables, to restore a checkpoint into (no initialisation)."""
  return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def init_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, {'params': params, 'rest': rest, 'opt': optimizer.init(params),
                    'step': jnp.zeros((), jnp.int32)}


def guarded_update(state: TrainState, grads: nnx.State, rest: nnx.State, loss: jax.Array,
                   optimizer: optax.GradientTransformation) -> tuple[TrainState, Metrics]:
  """One optimiser step; if loss, gradients or update are not finite, returns `state` unchanged."""
  updates, opt = optimizer.update(grads, state['opt'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  new = {'params': params, 'rest': rest, 'opt': opt, 'step': state['step'] + 1}
  old = {**state, 'step': state['step']}
  out = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return out, {'grad_norm': grad_norm, 'update_norm': update_norm, 'finite': finite}


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  quiet_orbax()
  kwargs = {}
  if jax.process_count() > 1:   # a process of a multi-process run checkpoints its own runs alone
    me = jax.process_index()
    kwargs['multiprocessing_options'] = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f'process{me}')
    os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)   # orbax will not, in that mode
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not kwargs, enable_async_checkpointing=False,
                                         **kwargs)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
                               item_names=('model', 'opt'))


def _local(tree: Any) -> Any:
  """`tree` as orbax may write or read it: as is in one process; host numpy arrays in a process of a
  multi-process run, whose arrays are local to it (orbax serialises only global jax.Arrays there)."""
  return jax.device_get(tree) if jax.process_count() > 1 else tree


def _like(got: Any, target: Any) -> Any:
  """Restored `got` on the devices and shardings of `target` (a no-op in one process)."""
  if jax.process_count() == 1:
    return got
  return jax.tree.map(lambda g, t: jax.device_put(g, t.sharding) if isinstance(t, jax.Array) else g,
                      got, target)


class CorruptCheckpoint(cli.UserError):
  """A checkpoint step that cannot be read; `run` is the workdir of its training run."""

  def __init__(self, message: str, run: str):
    super().__init__(message)
    self.run = run


class _DropClosedLoop:
  """sys.unraisablehook that drops the "Event loop is closed" RuntimeErrors which the storage layer's
  leftover reads raise after orbax closed the event loop of a failed restore; passes the rest on."""

  def __init__(self, previous: Callable[[Any], None]):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      self.previous(unraisable)


def read_checkpoint(mngr: ocp.CheckpointManager, workdir: str, step: int, args: Any) -> Any:
  """`mngr.restore(step, args=args)`; a step that cannot be read (corrupt, truncated, or written by
  other code) raises `CorruptCheckpoint` naming its folder and the fix. The "Event loop is closed"
  tracebacks that the storage layer prints after a failed read are dropped (shown with --debug or
  VAR_DEBUG=1); after a failure the filter stays, as the step's other reads may end later."""
  previous = sys.unraisablehook
  if not (isinstance(previous, _DropClosedLoop) or cli.debug()):
    sys.unraisablehook = _DropClosedLoop(previous)
  try:
    got = mngr.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
    error = e
  else:
    sys.unraisablehook = previous
    return got
  folder = os.path.join(workdir, 'checkpoints', str(step))
  earlier = sorted(s for s in mngr.all_steps() if s < step) or 'none'
  cause = ' '.join(str(error).split())
  raise CorruptCheckpoint(
      f'checkpoint {folder!r} cannot be read ({type(error).__name__}: {cause[:300]}): it is corrupt, '
      f'incomplete or written by other code. Delete that step folder to fall back on an earlier one '
      f'({earlier}), or delete {workdir!r} to train it again', workdir) from error


def save(mngr: ocp.CheckpointManager, state: TrainState) -> int:
  step = int(jax.device_get(state['step']))
  if step not in mngr.all_steps():
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(_local({'params': state['params'], 'rest': state['rest']})),
        opt=ocp.args.StandardSave(_local({'opt': state['opt'], 'step': state['step']}))))
    mngr.wait_until_finished()
  return step


def restore(mngr: ocp.CheckpointManager, state: TrainState, step: int, workdir: str) -> TrainState:
  """Restores the full training state of `step` with the structure and shardings of `state`
  (`CorruptCheckpoint` if that step of `workdir` cannot be read)."""
  got = read_checkpoint(mngr, workdir, step, ocp.args.Composite(
      model=ocp.args.StandardRestore(_local({'params': state['params'], 'rest': state['rest']})),
      opt=ocp.args.StandardRestore(_local({'opt': state['opt'], 'step': state['step']}))))
  got = {'model': _like(dict(got['model']), {'params': state['params'], 'rest': state['rest']}),
         'opt': _like(dict(got['opt']), {'opt': state['opt'], 'step': state['step']})}
  return {'params': got['model']['params'], 'rest': got['model']['rest'], 'opt': got['opt']['opt'],
          'step': got['opt']['step']}


def restore_model(workdir: str, model: nnx.Module, step: int | None = None) -> int:
  """Loads the trained weights (item `model`) of `workdir` into `model` in place; returns the step."""
  mngr = checkpoint_manager(workdir)
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")!r}; train first '
                            '(python -m train.vqvae / train.var --workdir ...)')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f'no checkpoint for step {step} in {workdir!r}; available steps: {sorted(steps)}')
  _, params, rest = nnx.split(model, nnx.Param, ...)
  got = read_checkpoint(mngr, workdir, step, ocp.args.Composite(
      model=ocp.args.StandardRestore(_local({'params': params, 'rest': rest}))))
  got = _like(dict(got['model']), {'params': params, 'rest': rest})
  nnx.update(model, got['params'], got['rest'])
  mngr.close()
  return step


# ----------------------------------------------------------------------------- loop
def _to_host(metrics: Metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_loop(config: ml_collections.ConfigDict, workdir: str, state: TrainState,
               step_fn: Callable[[TrainState, Any], tuple[TrainState, Metrics]],
               batch_fn: Callable[[int], Any],
               eval_fn: Callable[[TrainState, int, tensorboardX.SummaryWriter], dict[str, float]] | None = None,
               stop_at_step: int | None = None) -> tuple[TrainState, dict[str, float]]:
  """Resumes from the latest checkpoint of `workdir`, then trains to `config.num_steps`.

  `step_fn(state, batch)` is the jitted (donating) step; `batch_fn(step)` gives the host batch of a
  step as a pure function of the step, so a resumed run sees the same batches. Metrics are averaged
  over `config.log_every` steps and written to TensorBoard; checkpoints every `config.ckpt_every`
  steps and at the end. `stop_at_step` ends this call early after saving (simulated pre-emption).
  Returns the final state and the last logged metrics.
  """
  mngr = checkpoint_manager(workdir, config.keep_ckpts)
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    state = restore(mngr, state, start, workdir)
    logging.info('resumed from %s at step %d of %d', workdir, start, config.num_steps)
  # tensorboardX names files by the second: a unique suffix keeps a quick resume from overwriting the log
  writer = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start or None,
                                      filename_suffix=f'.{time.time_ns()}')
  end = config.num_steps if stop_at_step is None else min(stop_at_step, config.num_steps)
  last: dict[str, float] = {}
  acc: dict[str, float] = {}
  n_acc, busy = 0, 0.0
  bar = tqdm.tqdm(total=config.num_steps, initial=start, disable=not config.progress, dynamic_ncols=True,
                  desc=os.path.basename(os.path.normpath(workdir)))
  try:
    for step in range(start, end):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch_fn(step))
      m = _to_host(metrics)
      busy += time.perf_counter() - t0
      if not m.pop('finite'):
        saved = save(mngr, state)
        raise FloatingPointError(
            f'non-finite training signal at step {step}: loss={m.get("loss")}, '
            f'grad_norm={m.get("grad_norm")}, update_norm={m.get("update_norm")}, lr={m.get("lr")}. '
            'The update was not applied; the last finite '
            f'state (step {saved}) is saved in {os.path.join(workdir, "checkpoints")}. Lower config.lr or '
            'config.grad_clip, or check the data, and train in a new workdir (or resume from that checkpoint).')
      for k, v in m.items():
        acc[k] = acc.get(k, 0.0) + v
      n_acc += 1
      done = step + 1
      bar.update(1)
      if done % config.log_every == 0 or done == end:
        last = {k: v / n_acc for k, v in acc.items()}
        last['steps_per_s'] = n_acc / busy         # data + step, without evaluation and checkpoints
        for k, v in last.items():
          writer.add_scalar(f'train/{k}', v, done)
        bar.set_postfix({k: f'{last[k]:.4g}' for k in ('loss', 'acc') if k in last})
        logging.info('step %d: %s', done, ', '.join(f'{k}={v:.4g}' for k, v in last.items()))
        acc, n_acc, busy = {}, 0, 0.0
      periodic = config.eval_every > 0 and done % config.eval_every == 0
      final = done == config.num_steps and config.get('eval_at_end', True)
      if eval_fn is not None and (periodic or final):
        for k, v in eval_fn(state, done, writer).items():
          writer.add_scalar(f'eval/{k}', v, done)
          last[f'eval_{k}'] = v
      if done % config.ckpt_every == 0 or done == end:
        save(mngr, state)
  finally:
    bar.close()
    writer.close()
    mngr.close()
  return state, last
