"""The model-mode stages of the frontier job (eval/frontier/job.py): the model, the capture, the bounds
and references on the held-out caches, and the closed loop (generation with compressed caches)."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from compress.core.budget import Budget
from eval.bounds import gaussian_reference, rank_bound
from eval.engine import sweep
from eval.engine.params import Params
from eval.engine.results import Paths, ResultTable, write_table
from eval.engine.sweep import FULL_BUDGET
from eval.frontier import distributed
from eval.quality import closed_loop, rank_correlation
from eval.report import plots, tb


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


def closed_loop_stage(config, paths: Paths, model, geometry, params: Params, share=None) -> tuple[list, dict]:
  """closed_loop.csv rows and {name: image grid} (full cache | method at each budget); `share`: the
  sweep's amortised fit (the same compressors, and trained parameters, as its points). FID / KID and
  the noise-floor row only for the built-in model (model.source 'default'): the shipped classifier
  whose features they use knows its domain (32 px, 12 classes) only. Prints (and writes
  rank_correlation.csv) the rank correlation of the teacher-forced error with each image metric."""
  cl = config.closed_loop
  specs = sweep.parse_methods(list(cl.methods))
  if not specs:
    return [], {}
  table = ResultTable(paths.closed, closed_loop.COLUMNS, closed_loop.KEY)
  gen = {'cfg': cl.cfg, 'top_k': cl.top_k, 'top_p': cl.top_p}
  n_images = len(cl.labels) * len(cl.seeds)
  builtin = config.model.source == 'default' and n_images >= 2         # FID needs 2 images per set
  if config.model.source == 'default' and not builtin:
    logging.warning('closed loop: FID / KID need >= 2 images (labels x seeds), %d here: left empty', n_images)
  frontier_rows = tb.read_table(paths.frontier)
  x_tf = {(r['method'], r['setting'], r['budget']): r.get('amortised_bits_per_coordinate')
          for r in frontier_rows if r['dataset'] == 'val'}
  os.makedirs(paths.samples, exist_ok=True)
  img_path = lambda name: os.path.join(paths.samples, f'{tb.tag(name).replace("/", "_")}.npy')
  ref = []

  def reference():
    if not ref:
      ref.append(closed_loop.full_reference(model, cl.labels, cl.seeds, gen, distribution_metrics=builtin))
      np.save(img_path('full'), np.round(ref[0]['images'] * 255).astype(np.uint8))
    return ref[0]

  def append(row):
    table.append({**row, 'amortised_bits_per_coordinate': x_tf.get((row['method'], row['setting'],
                                                                     str(row['budget'])))})
  if builtin and {'method': 'full', 'setting': 'default', 'budget': FULL_BUDGET} not in table:
    append(closed_loop.noise_floor(model, reference(), cl.labels, cl.seeds, gen, config.confidence,
                                   geometry.fp16_bits)[0])
  for spec in specs:
    for budget in cl.budgets:
      if {'method': spec.name, 'setting': spec.setting, 'budget': budget} in table:
        continue
      comp = sweep.fitted(spec, budget, geometry, share)
      row, images = closed_loop.evaluate_policy(model, comp, params(spec, comp), spec.setting, budget,
                                                reference(), cl.labels, cl.seeds, gen, config.confidence)
      np.save(img_path(f'{spec}@{budget}'), np.round(images * 255).astype(np.uint8))
      append(row)
      jax.clear_caches()              # this policy's generation steps are not used again
  grids = {}
  for spec in specs:
    cols = [img_path('full')] + [img_path(f'{spec}@{b}') for b in cl.budgets]
    if all(os.path.exists(p) for p in cols):
      grid = plots.image_grid([np.load(p) / 255.0 for p in cols])
      plots.save_png(grid, os.path.join(paths.workdir, f'samples_{tb.tag(str(spec))}.png'), scale=2)
      grids[f'val/{spec}'] = grid
  corr = rank_correlation.table(frontier_rows, table.rows, config.confidence)
  write_table(os.path.join(paths.workdir, 'rank_correlation.csv'), rank_correlation.COLUMNS, corr)
  print(rank_correlation.text(corr, config.confidence), flush=True)
  return table.rows, grids
