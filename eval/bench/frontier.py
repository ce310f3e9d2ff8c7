r"""Frontier-engine benchmark at official scale: capture N images, sweep M methods x B budgets.

    python -m eval.bench.frontier --workdir /tmp/bench_d16                       # configs/frontier.py:d16
    python -m eval.bench.frontier --workdir /tmp/bench_d16 --config.capture.val_shards=4   # 16 images
    python -m eval.bench.frontier --workdir /tmp/bench_d16 --config=configs/frontier.py:d16 \
        --config.model.source=official --config.model.var_ckpt=var_d16.pth --config.model.vae_ckpt=...

Runs `eval.frontier` (random d16 weights by default: the engine's cost does not depend on their values)
in a new workdir and prints, as a table and one JSON line: wall seconds per stage, XLA compiles and the
seconds spent tracing, lowering and compiling, sweep run time (sweep wall - its compile time; with
`sweep.compile_ahead`, whose compiles overlap the points, the sum of the points' own seconds), seconds
per point, peak RSS of the process and bytes on disk of the capture and of the stored full-cache
reference outputs (eval/engine/exact_store.py).
"""
from __future__ import annotations

import collections
import json
import os
import resource
from typing import Sequence

import jax

COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')


class CompileLog:
  """Compile events (jax.monitoring) since creation: count of backend compiles, seconds per event."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self.compiles = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      self.seconds[event] += duration
      self.compiles += event == COMPILE_EVENTS[-1]

  @property
  def total_seconds(self) -> float:
    return sum(self.seconds.values())


def disk_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def figures(result: dict, log: CompileLog, rows: list[dict], workdir: str, sweep_compile_s: float,
            overlapped: bool) -> dict:
  """The printed figures; with compile-ahead (`overlapped`) compiles run beside the points, so the
  sweep's run time is the points' own evaluation seconds, not the sweep's wall minus its compiles."""
  stages = result['stages']
  n_points = len(rows)
  seq = {int(r['num_sequences']) for r in rows}
  return {
      'device': jax.devices()[0].platform, 'devices': jax.device_count(), 'points': n_points,
      'held_out_sequences': sorted(seq), 'wall_s': round(result['seconds'], 1),
      **{f'{k}_s': round(v, 1) for k, v in stages.items()},
      'compiles': log.compiles, 'compile_s': round(log.total_seconds, 1),
      'sweep_compile_s': round(sweep_compile_s, 1),
      'sweep_run_s': round(sum(float(r['seconds']) for r in rows) if overlapped else
                           stages['sweep'] - sweep_compile_s, 1),
      'point_s_median': round(sorted(float(r['seconds']) for r in rows)[n_points // 2], 2) if rows else None,
      'point_s_max': round(max(float(r['seconds']) for r in rows), 2) if rows else None,
      'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
      'capture_bytes': disk_bytes(os.path.join(workdir, 'capture')),
      'exact_bytes': disk_bytes(os.path.join(workdir, 'exact')),
  }


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from eval.frontier import job as frontier  # pylint: disable=g-import-not-at-top
  from eval.engine import sweep  # pylint: disable=g-import-not-at-top
  from eval.engine.results import Paths, ResultTable  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')
  F = flags.FLAGS
  if os.path.exists(F.workdir) and os.listdir(F.workdir):
    raise FileExistsError(f'{F.workdir} is not empty: a benchmark needs a new workdir (a frontier run '
                          'there would reuse its capture and points and time nothing)')
  log = CompileLog()
  compile_at = {}                        # compile seconds when each stage ended
  result = frontier.run(F.config, F.workdir, on_stage=lambda stage, _: compile_at.update({stage: log.total_seconds}))
  rows = [r for r in ResultTable(Paths(F.workdir).frontier, sweep.COLUMNS, sweep.KEY).rows
          if r['method'] != 'rank_bound']
  sweep_compile = compile_at.get('sweep', 0.0) - compile_at.get('tuning', compile_at.get('capture', 0.0))
  figs = figures(result, log, rows, F.workdir, sweep_compile, F.config.sweep.compile_ahead > 0)
  width = max(len(k) for k in figs)
  print('\n'.join(f'{k.ljust(width)}  {v}' for k, v in figs.items()))
  print(json.dumps(figs))
  if result['failed']:
    raise SystemExit('FAILED points:\n  ' + '\n  '.join(result['failed']))


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', 'configs/frontier.py:d16', 'frontier config to benchmark')
  flags.DEFINE_string('workdir', None, 'a new run directory')
  flags.mark_flags_as_required(['workdir'])
  from var_jax import cli
  cli.run(main)
