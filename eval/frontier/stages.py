"""The model-mode stages of the frontier job (eval/frontier/job.py): the model, the capture, the bounds
and references on the held-out caches, and the closed loop (generation with compressed caches)."""
from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from compress.core.budget import Budget
from eval.bounds import gaussian_reference, rank_bound
from eval.engine import sweep
from eval.engine.params import Params
from eval.engine.points import free_code
from eval.engine.results import Paths, ResultTable, write_table
from eval.engine.sweep import FULL_BUDGET
from eval.frontier import distributed
from eval.quality import closed_loop, rank_correlation
from eval.report import plots, tb

GRID_IMAGES = 12            # images per column of a samples_*.png grid (the first of each label)


def load_model(mc: ml_collections.ConfigDict) -> Any:
  import var_jax  # pylint: disable=g-import-not-at-top
  pn = tuple(mc.patch_nums) or None
  if mc.source == 'default':
    return var_jax.load_default()
  if mc.source == 'random':        # official architecture and schedule, random weights (benchmarks)
    from var_jax.api import VARModel  # pylint: disable=g-import-not-at-top
    from var_jax.random_init import random_models  # pylint: disable=g-import-not-at-top
    return VARModel(*random_models(mc.get('size', 'd16'), 0))
  if mc.source == 'official':
    if not (mc.var_ckpt and mc.vae_ckpt):
      raise ValueError('model.source "official" needs --config.model.var_ckpt=var_d16.pth and '
                       '--config.model.vae_ckpt=vae_ch160v4096z32.pth')
    return var_jax.load_official(mc.var_ckpt, mc.vae_ckpt, pn)
  if mc.source == 'converted':
    if not mc.converted:
      raise ValueError('model.source "converted" needs --config.model.converted=DIR (python -m var_jax.convert)')
    return var_jax.load_converted(mc.converted)
  raise ValueError(f'model.source must be "default", "official", "converted" or "random" (with model.size), '
                   f'got {mc.source!r}')


def capture_stage(config: ml_collections.ConfigDict, model: Any, path: str,
                  cluster: distributed.Cluster = distributed.SINGLE) -> None:
  from var_jax import capture  # pylint: disable=g-import-not-at-top
  c = config.capture
  if os.path.exists(os.path.join(path, capture.MANIFEST)):
    logging.info('capture: reusing %s (its manifest is checked against config.capture)', path)
  distributed.capture(cluster, model, path, train_shards=c.train_shards, val_shards=c.val_shards,
                      dev_shards=c.get('dev_shards', 0), shard_size=c.shard_size, seed=c.seed, cfg=c.cfg,
                      top_k=c.top_k, top_p=c.top_p, dtype=c.dtype, progress=config.progress,
                      source={'kind': config.model.source})


def bounds_stage(config, table, data, geometry, jobs, batch: int) -> list[dict]:
  """Rank-bound rows at every budget of the sweep (appended if missing) and curves for the plot: the
  rank bound (for caches of full-precision entries only) and the Gaussian ideal-code reference."""
  curves = []
  if config.get('gaussian_reference', True):
    c = gaussian_reference.curve(data, geometry, batch)
    curves.append({'dataset': 'val', 'bound': 'gaussian_ideal_code', 'label': gaussian_reference.LABEL,
                   'setting': 'keys_free', 'applies_to': 'reference', **c})
  if not config.rank_bound.settings:
    return curves
  budgets = sorted({(str(b), Budget.parse(b, geometry).bits) for _, b in jobs if b != FULL_BUDGET},
                   key=lambda x: x[1])
  bound = rank_bound.RankBound(data, batch)
  for row in rank_bound.rows(bound, geometry, budgets, tuple(config.rank_bound.settings)):
    if row not in table:
      table.append(row)
  for s in config.rank_bound.settings:
    c = bound.curve(geometry, s, config.rank_bound.curve_points)
    curves.append({'dataset': 'val', 'bound': 'rank_bound', 'label': f'rank bound ({s}; full-precision entries)',
                   'setting': s, 'families': rank_bound.ENTRY_FAMILIES,
                   'applies_to': ' '.join(rank_bound.ENTRY_FAMILIES), 'bits': c['bits'],
                   'bits_per_coordinate': c['bits'] / geometry.coordinates, 'rel_error': c['rel_error']})
  return curves


def closed_specs(config) -> list[Any]:
  """closed_loop.methods parsed; 'all' stands for every registered compressor but the oracles."""
  import compress  # pylint: disable=g-import-not-at-top
  names = list(config.closed_loop.methods)
  if 'all' in names:
    names = [n for n in names if n != 'all'] + [n for n in compress.available()
                                                if not compress.REGISTRY[n].oracle and n not in names]
  return sweep.parse_methods(names)


def closed_jobs(config, jobs) -> list[tuple[Any, Any]]:
  """(spec, budget) of every closed-loop point: each of closed_loop.methods at each closed_loop.budgets,
  a tuned method (tuning.grids) at the setting chosen on dev for that budget (from the tuned sweep
  `jobs`), a learned one only at the budgets it is trained at (learned.method_budgets)."""
  cl, out = config.closed_loop, []
  by_method = config.learned.get('method_budgets', {}) or {}
  chosen = {(s.name, b): s for s, b in jobs}
  grids = config.get('tuning', {}).get('grids', {}) or {}
  for spec in closed_specs(config):
    for b in cl.budgets:
      if spec.cls.learned and str(spec) in by_method and b not in by_method[str(spec)]:
        logging.info('closed loop: %s is trained at %s only (learned.method_budgets), not at %s', spec,
                     ', '.join(by_method[str(spec)]), b)
        continue
      if spec.name in grids and not spec.settings and (spec.name, b) in chosen:
        spec_b = chosen[(spec.name, b)]
      else:
        if spec.name in grids and not spec.settings:
          logging.warning('closed loop: %s@%s has no setting chosen on dev (%s is not a sweep budget): '
                          'its default setting runs', spec, b, b)
        spec_b = spec
      out.append((spec_b, b))
  return out


def closed_loop_stage(config, paths: Paths, model, geometry, params: Params, jobs, share=None
                      ) -> tuple[list, dict]:
  """closed_loop.csv rows and {name: image grid} (full cache | method at each budget) of the closed-loop
  points `jobs` (`closed_jobs`); `share`: the sweep's amortised fit (the same compressors, and trained
  parameters, as its points). Each policy's programs are compiled on a background thread while the
  previous policy generates, and a point's metrics are computed while the next point generates (a row's
  `seconds` run from its dispatch to its row, so they overlap). FID / KID and the noise-floor row only for the built-in model
  (model.source 'default'): the shipped classifier whose features they use knows its domain (32 px,
  12 classes) only. Prints (and writes rank_correlation.csv) the rank correlation of the
  teacher-forced error with each image metric."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  from compress.core.policy import CompressorPolicy  # pylint: disable=g-import-not-at-top
  cl = config.closed_loop
  if not jobs:
    return [], {}
  table = ResultTable(paths.closed, closed_loop.COLUMNS, closed_loop.KEY)
  labels = tuple(cl.labels) * int(cl.get('repeats', 1))
  gen = {'cfg': cl.cfg, 'top_k': cl.top_k, 'top_p': cl.top_p, 'fast_scales': cl.get('fast_scales', 0),
         'draws': cl.get('bootstrap_draws', 1000)}
  n_images = len(labels) * len(cl.seeds)
  builtin = config.model.source == 'default' and n_images >= 2         # FID needs 2 images per set
  if config.model.source == 'default' and not builtin:
    logging.warning('closed loop: FID / KID need >= 2 images (labels x seeds), %d here: left empty', n_images)
  featurize = builtin          # built-in model: its classifier's features; official ones: Inception's
  if config.model.source in ('official', 'converted') and n_images >= 2 and cl.get('inception', True):
    featurize = closed_loop.inception_featurizer(cl.get('inception_weights', ''))
  frontier_rows = tb.read_table(paths.frontier)
  x_tf = {(r['method'], r['setting'], r['budget']): r.get('amortised_bits_per_coordinate')
          for r in frontier_rows if r['dataset'] == 'val'}
  os.makedirs(paths.samples, exist_ok=True)
  img_path = lambda name: os.path.join(paths.samples, f'{tb.tag(name).replace("/", "_")}.npy')
  key = lambda spec, b: {'method': spec.name, 'setting': spec.setting, 'budget': b}
  todo = [(spec, b) for spec, b in jobs if key(spec, b) not in table]
  noise_key = {'method': 'full', 'setting': 'default', 'budget': FULL_BUDGET}
  need_noise = bool(featurize) and noise_key not in table
  ref, shared = [], []

  def program(policy):                     # on the compile thread: runs nothing
    if not shared:                         # the model's programs: compiled once, for every policy
      shared.append(closed_loop.model_programs(model, len(labels), gen))
    return closed_loop.compiled(model, policy, len(labels), gen, shared[0])

  def append(row):
    table.append({**row, 'amortised_bits_per_coordinate': x_tf.get((row['method'], row['setting'],
                                                                     str(row['budget'])))})
  policies = [CompressorPolicy(comp, params(spec, comp)) for spec, b in todo
              for comp in [sweep.fitted(spec, b, geometry, share)]]
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='closed_loop_compile') as pool:
    if todo or need_noise:
      full = program(None)
      pending = pool.submit(program, policies[0]) if policies else None
      ref.append(closed_loop.full_reference(model, labels, cl.seeds, gen, distribution_metrics=featurize,
                                            program=full))
      np.save(img_path('full'), np.round(ref[0]['images'] * 255).astype(np.uint8))
      if need_noise:
        append(closed_loop.noise_floor(model, ref[0], labels, cl.seeds, gen, config.confidence,
                                       geometry.fp16_bits, program=full)[0])
      del full
    def finish(spec, budget, policy, prog, outs, started):   # waits for the generation, then metrics
      row, images = closed_loop.evaluate_policy(model, policy.compressor, policy.params, spec.setting,
                                                budget, ref[0], labels, cl.seeds, gen, config.confidence,
                                                program=prog, outs=outs, started=started)
      np.save(img_path(f'{spec}@{budget}'), np.round(images * 255).astype(np.uint8))
      append(row)

    previous = None     # the point generating while this one is dispatched: its metrics overlap ours
    for i, ((spec, budget), policy) in enumerate(zip(todo, policies)):
      prog = pending.result()
      free_code()                     # no compile in flight now: frees code past the mapping budget
      pending = pool.submit(program, policies[i + 1]) if i + 1 < len(policies) else None
      started = time.perf_counter()
      outs = closed_loop.dispatch(model, labels, cl.seeds, gen, program=prog)
      if previous is not None:
        finish(*previous)
      previous = (spec, budget, policy, prog, outs, started)
      del prog, outs
    if previous is not None:
      finish(*previous)
      previous = None
  grids = {}
  names = list(dict.fromkeys(spec.name for spec, _ in jobs))
  for name in names:
    cols = [img_path('full')] + [img_path(f'{spec}@{b}') for spec, b in jobs if spec.name == name]
    if all(os.path.exists(p) for p in cols) and len(cols) > 1:
      grid = plots.image_grid([np.load(p)[:GRID_IMAGES] / 255.0 for p in cols])
      plots.save_png(grid, os.path.join(paths.workdir, f'samples_{tb.tag(name)}.png'), scale=2)
      grids[f'val/{name}'] = grid
  corr = rank_correlation.table(frontier_rows, table.rows, config.confidence)
  write_table(os.path.join(paths.workdir, 'rank_correlation.csv'), rank_correlation.COLUMNS, corr)
  print(rank_correlation.text(corr, config.confidence), flush=True)
  return table.rows, grids
