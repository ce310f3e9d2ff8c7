r"""The memory-error Pareto frontier of KV-cache compressors against the lower bounds, in one command.

  python -m eval.frontier --config configs/default.py --workdir runs/frontier       # the main job
  python -m eval.frontier --config configs/frontier.py:tiny --workdir /tmp/frontier_tiny
  python -m eval.frontier --config configs/frontier.py:hard --workdir runs/frontier_hard
  tensorboard --logdir runs/frontier/tb

Stages (model mode; each resumes from what the workdir holds, nothing earlier is deleted):
 1. model      config.model: the built-in default, official checkpoints or a converted directory.
 2. capture    WORKDIR/capture: q, k, v of generated images (var_jax.capture; train / dev / val splits:
               train calibrates and trains, dev chooses settings, val is read only by the sweep,
               bounds and closed loop).
 3. params     calibrated compressors on the train split; learned ones trained on demand into
               WORKDIR/train/ (train.compressor) or loaded from config.learned.checkpoint_root.
 4. sweep      every method x setting x budget teacher forced on the val split -> frontier.csv, one
               row per point appended when done (a re-run skips the rows already there).
 5. bounds     the rank (Eckart-Young) bound on the same caches -> rows 'rank_bound', bounds.csv
               (drawn only against caches of full-precision entries), and the Gaussian ideal-code
               reference (eval/bounds/gaussian_reference.py; not a bound).
 6. frontier   pareto.csv (lower envelope, all deployable methods and per family), frontier.png.
 7. closed loop generation with compressors vs the full cache -> closed_loop.csv, samples_*.png.
 8. TensorBoard WORKDIR/tb (eval/report/tb.py, docs/tensorboard.md: one chart of every method's error against
               amortised bits per coordinate (step = x 1000), the bounds where they hold, closed loop,
               per-family charts, the figure and image grids; hparams apart in WORKDIR/tb_hparams).
Mode 'hard' (configs/frontier.py:hard) runs stages 4-6 and 8 on the hard instances instead (eval/bounds/hard.py).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

import compress
from compress.core.budget import Budget, CacheGeometry
from eval.bounds import hard
from eval.engine import exact_store, sweep, tuning
from eval.engine.params import Params
from eval.engine.points import run_points
from eval.engine.results import Paths, ResultTable, write_table
from eval.engine.sweep import FULL_BUDGET, MethodSpec
from eval.frontier import distributed
from eval.frontier.stages import (bounds_stage, capture_stage, closed_jobs, closed_loop_stage, closed_specs,
                                  load_model)
from eval.report import pareto, plots, quality_plot, tb

ALL = 'all'          # in a methods list: every registered compressor of that kind
# Config keys that may change between runs in one workdir: they only add (or drop) points, each of
# which is keyed by itself (rows by dataset/method/setting/budget, trained compressors by their folder),
# or say how the points are scheduled (sweep.compile_ahead).
EXTENDABLE = ('sweep.compile_ahead', 'learned.retrain_corrupt', 'sweep.methods', 'sweep.budgets', 'learned.methods', 'learned.budgets', 'learned.method_budgets',
              'closed_loop.methods',
              'closed_loop.budgets', 'rank_bound.settings', 'hard.methods', 'hard.budgets')
# applies_to: the families a bound holds for ('all': every compressor; 'reference': not a bound)
BOUND_COLUMNS = ('dataset', 'bound', 'setting', 'applies_to', 'bits', 'bits_per_coordinate', 'rel_error')


# ---------------------------------------------------------------------------- jobs
def specs_of(names: Sequence[str], learned: bool) -> list[MethodSpec]:
  """Parsed method specs; 'all' stands for every registered compressor of that kind (learned or not)."""
  names = list(names)
  if ALL in names:
    names = [n for n in names if n != ALL] + [n for n in compress.available()
                                              if compress.REGISTRY[n].learned == learned and n not in names]
  specs = sweep.parse_methods(names)
  wrong = [str(s) for s in specs if s.cls.learned != learned]
  if wrong:
    where = ('learned.methods (they are trained per budget)' if not learned else 'sweep.methods')
    raise ValueError(f'{wrong} belong in {where}')
  return specs


def sweep_jobs(config: ml_collections.ConfigDict, geometry: CacheGeometry) -> list[tuple[MethodSpec, Any]]:
  """(spec, budget label) of every teacher-forced point; budget-free references run once ('full')."""
  jobs = []
  by_method = config.learned.get('method_budgets', {}) or {}
  unknown = set(by_method) - set(config.learned.methods)
  if unknown:
    raise ValueError(f'learned.method_budgets names {sorted(unknown)}, which are not in learned.methods')
  for specs, budgets in ((specs_of(config.sweep.methods, False), config.sweep.budgets),
                         (specs_of(config.learned.methods, True), config.learned.budgets)):
    for spec in specs:
      if not spec.cls.respects_budget:
        jobs.append((spec, FULL_BUDGET))
        continue
      for b in (by_method.get(str(spec), budgets) if spec.cls.learned else budgets):
        Budget.parse(b, geometry)       # a bad budget fails here, before any work
        jobs.append((spec, b))
  return jobs


def point_compiler_options(config: ml_collections.ConfigDict):
  """XLA options of the sweep's point programs: fast compiles on CPU with config.fast_compile (a point
  is compile-bound there: one program per method, setting and budget), XLA's defaults otherwise."""
  from compress.core.teacher_forced import fast_compile_options  # pylint: disable=g-import-not-at-top
  return fast_compile_options() if config.fast_compile else None


def share_of(config: ml_collections.ConfigDict, params: Params, served: int):
  """The shared-bits share that fits a point's amortised bits into its budget (sweep.fit_amortised),
  or None (the budget is per head; points over it get a warning)."""
  if not config.sweep.get('fit_amortised', False):
    return None
  return params.share(served)


def point_fns(config: ml_collections.ConfigDict, data: sweep.CacheSet, geometry: CacheGeometry,
              params: Params, batch: int, served: int, dataset: str,
              selection: dict[tuple[str, Any], str] | None = None) -> tuple[Callable, Callable]:
  """(evaluate, prepare) of the points on `data` for eval.engine.points.run_points: a row, and a
  compile-ahead (makes the point, returns its compile; runs nothing). Shared bits are amortised over
  `served` sequences; `selection`: {(str(spec), budget): how its setting was chosen}."""
  options, share = point_compiler_options(config), share_of(config, params, served)
  evaluate = lambda spec, b: sweep.evaluate_spec(
      spec, b, data, geometry, params, batch=batch, level=config.confidence, dataset=dataset,
      served_sequences=served, compiler_options=options, trained_bits=params.trained_bits, share=share,
      selection=(selection or {}).get((str(spec), b), ''))

  def prepare(spec: MethodSpec, budget: Any) -> Callable[[], None]:
    comp, p = sweep.make_point(spec, budget, geometry, params, share)
    return lambda: sweep.warm_point(comp, p, data, batch, options)
  return evaluate, prepare


# ---------------------------------------------------------------------------- model mode
def check_methods(config: ml_collections.ConfigDict) -> None:
  """Method lists and sweep sizes of the model mode are valid (before the model is even loaded)."""
  for key, low in (('batch', 1), ('batch_bytes', 0), ('compile_ahead', 0)):
    value = config.sweep.get(key, low)
    if not isinstance(value, int) or value < low:
      raise ValueError(f'sweep.{key} must be an integer >= {low}, got {value!r}')
  specs_of(config.sweep.methods, False)
  specs_of(config.learned.methods, True)
  cl = config.closed_loop
  for spec in closed_specs(config):
    if spec.cls.oracle:
      raise ValueError(f'closed_loop.methods has the oracle {spec}: it needs future queries, which '
                       'generation does not have; evaluate it teacher forced only (sweep.methods)')
  if cl.methods and not (cl.labels and cl.seeds and cl.budgets):
    raise ValueError('closed_loop.methods is set but closed_loop.labels, .seeds or .budgets is empty')
  if int(cl.get('repeats', 1)) < 1:
    raise ValueError(f'closed_loop.repeats must be >= 1 (images per label and seed), got {cl.repeats}')
  if cl.methods and config.model.source in ('official', 'converted') and cl.get('inception', True):
    from eval.quality.inception import locate  # pylint: disable=g-import-not-at-top
    locate(cl.get('inception_weights', '') or None)     # the FID network's weights: found now, or the fix


def run_model(config: ml_collections.ConfigDict, paths: Paths, prepare: Callable[[str], None],
              on_stage: Callable[[str, float], None] | None = None,
              cluster: distributed.Cluster = distributed.SINGLE) -> dict:
  """Capture, sweep, bounds, closed loop, outputs. With several processes (`cluster`) each captures
  its shards and evaluates its points; the lead (process 0) merges them and does the rest."""
  from var_jax.capture import CaptureDataset  # pylint: disable=g-import-not-at-top
  from var_jax.config import to_json  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  check_methods(config)                                   # config errors surface before any work
  model = load_model(config.model)
  geometry = CacheGeometry(model.patch_nums, model.var.cfg.head_dim, config.kv_dtype)
  jobs = sweep_jobs(config, geometry)
  tuning.check(config, jobs)
  for b in config.closed_loop.budgets:
    Budget.parse(b, geometry)
  if cluster.lead:
    prepare(to_json(model.var.cfg))
  cluster.barrier('prepared')
  stages, mark = {}, [time.time()]

  def done(stage: str) -> None:       # wall seconds per stage (the log and eval/bench/frontier.py)
    now = time.time()
    stages[stage] = now - mark[0]
    mark[0] = now
    logging.info('stage %s: %.1f s', stage, stages[stage])
    if on_stage is not None:
      on_stage(stage, stages[stage])
  capture_stage(config, model, paths.capture, cluster)
  if not config.closed_loop.methods:
    model = None                  # only the closed loop generates again: free the weights (1.6 GB at d16)
  done('capture')
  # train and dev first: settings chosen on dev, learned compressors trained; val is opened after
  train = CaptureDataset(paths.capture, 'train')
  n_cal = min(config.sweep.calibration_sequences or train.num_sequences, train.num_sequences)
  params = Params(config, paths.workdir, paths.capture, lambda: train.get(np.arange(n_cal)),
                  train.num_layers, train.num_heads)
  served = config.sweep.served_sequences or tuning.val_sequences(config, paths.capture)
  dev = tuning.dev_set(paths.capture, config.get('tuning', {}).get('dev_sequences', 0))
  if dev is None and tuning.grids(config):
    raise ValueError('tuning.grids chooses settings on the dev split, which this capture lacks: set '
                     'capture.dev_shards >= 1 (a new --workdir), or tuning.grids={} to tune nothing')
  batch = sweep.CacheSet.from_dataset(train).capped_batch(config.sweep.batch, config.sweep.batch_bytes)
  if batch < config.sweep.batch:
    logging.info('sweep: %d sequences per batch instead of sweep.batch=%d (sweep.batch_bytes=%d)',
                 batch, config.sweep.batch, config.sweep.batch_bytes)
  selection, failed = {}, []
  if dev is not None:
    tuning_path = os.path.join(paths.workdir, tuning.TUNING_FILE)
    if cluster.lead:
      # references from a store, as the val sweep's: a setting's dev program is then the very program
      # its val point runs (same compressor and shapes, when it has no shared parameters), compiled once
      dev.exact_store = exact_store.for_run(paths.workdir, paths.capture, dev.num_sequences, 'dev')
      evaluate_dev, prepare_dev = point_fns(config, dev, geometry, params, batch, served, 'dev')
      jobs, selection, failed = tuning.tuned_jobs(config, jobs, evaluate_dev, tuning_path, prepare_dev)
    cluster.barrier('tuned')
    if not cluster.lead:                   # the lead's choices, read back (nothing left to compute)
      jobs, selection, _ = tuning.tuned_jobs(config, jobs, tuning.read_only, tuning_path)
  table = ResultTable(paths.frontier, sweep.COLUMNS, sweep.KEY)
  mine, my_jobs = distributed.my_points(cluster, table, jobs)   # (table, jobs) with one process
  closed = closed_jobs(config, jobs) if cluster.lead else []
  tuning.train_learned(my_jobs, closed, geometry, params, share_of(config, params, served))
  done('tuning')
  val = CaptureDataset(paths.capture, 'val')
  data = sweep.CacheSet.from_dataset(val, config.sweep.val_sequences)
  distributed.references(cluster, data, batch,
                         lambda: exact_store.for_run(paths.workdir, paths.capture, data.num_sequences))
  evaluate, prepare_val = point_fns(config, data, geometry, params, batch, served, 'val', selection)
  failed += run_points(mine, my_jobs, evaluate, config.progress, 'val', prepare_val,
                       config.sweep.compile_ahead)
  table = distributed.gather_points(cluster, table)
  if table is None:                    # a process other than the lead: the rest is the lead's
    return {'failed': failed, 'seconds': time.time() - t0, 'stages': stages}
  done('sweep')
  curves = bounds_stage(config, table, data, geometry, jobs, batch)
  done('bounds')
  jax.clear_caches()              # the sweep's point programs are not used again: free their code
  closed, grids = closed_loop_stage(config, paths, model, geometry, params, closed,
                                    share_of(config, params, served))
  done('closed_loop')
  finish(config, paths, table.rows, curves, closed, grids, 'VAR KV cache')
  done('outputs')
  cluster.barrier('done')
  return {'failed': failed, 'seconds': time.time() - t0, 'stages': stages}


# ---------------------------------------------------------------------------- hard mode
def run_hard(config: ml_collections.ConfigDict, paths: Paths, prepare: Callable[[str], None]) -> dict:
  t0 = time.time()
  h = config.hard
  draws = hard.instances(h)
  specs = specs_of(h.methods, False)
  jobs = [(s, b) for s in specs for b in (h.budgets if s.cls.respects_budget else (FULL_BUDGET,))]
  for kind, ds in draws.items():                          # config errors surface before any work
    for _, b in jobs:
      if b != FULL_BUDGET:
        Budget.parse(b, ds[0][0].geometry)
  prepare(json.dumps(h.to_dict(), indent=2, default=list))
  table = ResultTable(paths.frontier, sweep.COLUMNS + hard.COLUMNS, sweep.KEY)
  failed, curves = [], []
  for kind, ds in draws.items():
    evaluate = lambda s, b, kind=kind, ds=ds: hard.evaluate_spec(kind, ds, s, b, config.confidence,
                                                                   point_compiler_options(config))
    failed += run_points(table, jobs, evaluate, config.progress, kind)
    curves.append({**hard.rd_curve(kind, ds), 'bound': 'rate_distortion', 'setting': 'keys_free'})
  finish(config, paths, table.rows, curves, [], {}, 'hard instance')
  return {'failed': failed, 'seconds': time.time() - t0}


# ---------------------------------------------------------------------------- outputs
def finish(config, paths: Paths, rows, curves, closed, grids, title) -> None:
  """pareto.csv, bounds.csv, frontier.png and the TensorBoard view of the tables."""
  front = pareto.frontier_rows(rows)
  write_table(paths.pareto, pareto.COLUMNS, front)
  write_table(paths.bounds, BOUND_COLUMNS,
              [{'dataset': c['dataset'], 'bound': c['bound'], 'setting': c['setting'],
                'applies_to': c.get('applies_to', 'all'), 'bits': b, 'bits_per_coordinate': x, 'rel_error': e}
               for c in curves for b, x, e in zip(c['bits'], c['bits_per_coordinate'], c['rel_error'])])
  fig = plots.frontier_figure(rows, front, curves, title)
  fig.savefig(paths.png, dpi=120)
  quality = quality_plot.quality_figure(closed, rows, title)
  if quality is not None:
    quality.savefig(paths.quality_png, dpi=110)
  key = tb.digest([paths.frontier, paths.closed, paths.bounds])
  if not tb.up_to_date(paths.tb, key):
    figures = {d: fig for d in {r['dataset'] for r in rows}}
    if len(figures) > 1:       # one figure per TensorBoard run
      figures = {d: plots.frontier_figure([r for r in rows if r['dataset'] == d], front,
                                          [c for c in curves if c['dataset'] == d], title) for d in figures}
    if quality is not None:
      figures[tb.QUALITY_FIGURE] = quality
    tb.write(paths.tb, key, rows, front, tb.read_table(paths.bounds), closed, figures, grids)
  plots.plt.close('all')


MODE_SECTIONS = {'model': ('model', 'capture', 'sweep', 'rank_bound', 'learned', 'closed_loop'),
                 'hard': ('hard',)}


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The part of `config` the run in its mode reads (saved as config.json and compared on resume)."""
  unused = {s for mode, sections in MODE_SECTIONS.items() if mode != config.mode for s in sections}
  return ml_collections.ConfigDict({k: v for k, v in config.items() if k not in unused})


def run(config: ml_collections.ConfigDict, workdir: str,
        on_stage: Callable[[str, float], None] | None = None) -> dict:
  """Runs (or resumes) the frontier of `config` in `workdir`; returns {'failed', 'seconds'} (and
  'stages': wall seconds per stage, in model mode). `on_stage(name, seconds)` is called as each stage
  (capture, sweep, bounds, closed_loop, outputs) ends. Holds WORKDIR/.lock throughout (train/workdir_lock.py):
  another run on `workdir` stops at once with `WorkdirBusy`."""
  from train import workdir_guard, workdir_lock  # pylint: disable=g-import-not-at-top
  if config.mode not in ('model', 'hard'):
    raise ValueError(f'config.mode must be "model" or "hard", got {config.mode!r}')
  paths = Paths(workdir)

  def prepare(model_json: str) -> None:
    extended = workdir_guard.prepare_workdir(workdir, run_config(config), model_json, extendable=EXTENDABLE,
                                             code_sha256=workdir_guard.source_fingerprint())
    if extended:
      logging.info('extending the run in %s (only what is new is computed):\n  %s', workdir,
                   '\n  '.join(extended))
  if config.mode == 'hard':
    if config.get('distributed') and config.distributed.enabled:
      raise ValueError('the hard mode runs in one process: drop --config.distributed.enabled')
    with workdir_lock.hold(workdir):
      return run_hard(config, paths, prepare)
  # one run per workdir: the lead (process 0) holds the lock for every process, taken before joining
  # when it knows it leads (a busy workdir then stops it before the others wait on it), else after
  lead = distributed.known_lead(config)
  with workdir_lock.hold(workdir, enabled=lead is True):
    cluster = distributed.init(config)
    with workdir_lock.hold(workdir, enabled=lead is None and cluster.lead):
      return run_model(config, paths, prepare, on_stage, cluster)

