"""What a frontier run settles before it reads its test split `val`: settings chosen on `dev`, and the
learned compressors trained on `train`.

Settings (config.tuning.grids: {method: (candidate setting, ...)}): for every (method, budget) of the
sweep whose method has a grid, each candidate (e.g. `kivi(bit_width=2|4|8)`) runs teacher forced on
the `dev` split (its rows in WORKDIR/tuning.csv, same columns as frontier.csv, resumable); the
candidate with the lowest dev error is the one the sweep evaluates on `val` at that budget, its row
saying so in `selection`. One rule for every family: the best of its grid on dev, per budget; a
method without a grid keeps its given settings. Then every learned compressor the sweep and the
closed loop use is trained (or loaded), so that `val` is opened only by the final evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from compress.core.budget import CacheGeometry
from eval.engine import sweep
from eval.engine.params import Params
from eval.engine.points import run_points
from eval.engine.results import ResultTable
from eval.engine.sweep import FULL_BUDGET, MethodSpec

TUNING_FILE = 'tuning.csv'
Job = tuple[MethodSpec, Any]


def grids(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """{method name: candidate settings ('key=value,...')} of config.tuning (empty: nothing tuned)."""
  t = config.get('tuning') or {}
  return {str(k): tuple(v) for k, v in (t.get('grids') or {}).items() if v}


def candidates(spec: MethodSpec, grid: Sequence[str]) -> list[MethodSpec]:
  """`spec` with each candidate setting of `grid` laid over its own settings (a candidate wins)."""
  out = []
  for cand in grid:
    over = dict(MethodSpec.parse(f'{spec.name}({cand})').settings)    # parsed and checked here
    out.append(MethodSpec(spec.name, tuple(sorted((dict(spec.settings) | over).items()))))
  return out


def check(config: ml_collections.ConfigDict, jobs: Sequence[Job]) -> None:
  """Refuses grids of unknown or learned methods, or unreadable candidates (before any work); grids
  of methods the run does not sweep are ignored."""
  import compress  # pylint: disable=g-import-not-at-top
  names = {s.name for s, _ in jobs}
  for name, grid in grids(config).items():
    if name not in compress.REGISTRY:
      raise ValueError(f'tuning.grids names {name!r}, which is not a registered compressor')
    if name not in names:                         # a grid of a method this run does not sweep: unused
      continue
    spec = next(s for s, _ in jobs if s.name == name)
    if spec.cls.learned:
      raise ValueError(f'tuning.grids.{name}: learned methods are not tuned by grid (each candidate '
                       'would be trained); drop it')
    candidates(spec, grid)                        # a bad candidate fails here


def tuned_jobs(config: ml_collections.ConfigDict, jobs: Sequence[Job], evaluate_dev: Callable[[Job], dict],
               table_path: str, prepare: Callable[[MethodSpec, Any], Callable[[], None]] | None = None
               ) -> tuple[list[Job], dict[tuple[str, Any], str], list[str]]:
  """(jobs with each grid method's setting chosen on dev per budget, {(str(spec), budget): selection
  text}, failed dev points). `evaluate_dev(spec, budget)` is a dev row (sweep.evaluate_spec on dev)."""
  g = grids(config)
  dev_jobs = [(c, b) for s, b in jobs if s.name in g and b != FULL_BUDGET for c in candidates(s, g[s.name])]
  if not dev_jobs:
    return list(jobs), {}, []
  table = ResultTable(table_path, sweep.COLUMNS, sweep.KEY)
  failed = run_points(table, dev_jobs, evaluate_dev, config.progress, 'dev', prepare,
                      config.sweep.get('compile_ahead', 1))
  err = {(r['method'], r['setting'], r['budget']): float(r['rel_error']) for r in table.rows
         if r['dataset'] == 'dev' and r['rel_error'] not in ('', 'nan')}
  out, selection = [], {}
  for spec, b in jobs:
    if spec.name not in g or b == FULL_BUDGET:
      out.append((spec, b))
      continue
    cands = candidates(spec, g[spec.name])
    scored = [(err[(c.name, c.setting, b)], i, c) for i, c in enumerate(cands) if (c.name, c.setting, b) in err]
    if not scored:
      raise RuntimeError(f'no candidate of {spec} at {b} could be evaluated on dev: {failed}')
    best = min(scored, key=lambda x: (x[0], x[1]))[2]
    text = f'best on dev of {spec.name}({"|".join(g[spec.name])}): {best.setting}'
    logging.info('%s at %s: %s (dev error %.4g)', spec, b, text, err[(best.name, best.setting, b)])
    out.append((best, b))
    selection[(str(best), b)] = text
  return out, selection, failed


def read_only(spec: MethodSpec, budget: Any) -> dict:
  """`evaluate_dev` of a process that only reads the lead's tuning rows: a missing row is an error."""
  raise RuntimeError(f'{spec}@{budget}: no dev row in tuning.csv, which the lead process writes first')


def train_learned(jobs: Sequence[Job], closed: Sequence[Job], geometry: CacheGeometry, params: Params,
                  share: Callable[[MethodSpec, Any], float] | None) -> None:
  """Trains (or loads) the parameters of every learned compressor in `jobs` and `closed` now, so that
  nothing trains once `val` is open (Params memoises them for the sweep and the closed loop)."""
  for spec, b in [*jobs, *closed]:
    if spec.cls.learned and b != FULL_BUDGET:
      try:
        comp = sweep.fitted(spec, b, geometry, share)
      except ValueError as e:                      # does not fit: the sweep reports the point as failed
        logging.warning('%s', e)
        continue
      if not comp.passthrough:
        params(spec, comp)


def dev_set(capture_dir: str, max_sequences: int) -> sweep.CacheSet | None:
  """The dev split of the capture as a CacheSet (None when the capture has none)."""
  from var_jax.capture_data import CaptureDataset, read_manifest  # pylint: disable=g-import-not-at-top
  if not read_manifest(capture_dir).get('splits', {}).get('dev'):
    return None
  return sweep.CacheSet.from_dataset(CaptureDataset(capture_dir, 'dev'), max_sequences)


def val_sequences(config: ml_collections.ConfigDict, capture_dir: str) -> int:
  """Sequences of `val` the sweep evaluates, from the capture's manifest (val itself is not opened)."""
  from var_jax.capture_data import read_manifest  # pylint: disable=g-import-not-at-top
  m = read_manifest(capture_dir)
  n = int(np.sum([m['shards'][s]['num_sequences'] for s in m['splits'].get('val', []) if s in m['shards']]))
  return n if config.sweep.val_sequences <= 0 else min(n, config.sweep.val_sequences)
