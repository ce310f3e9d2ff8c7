"""Runs a sweep's points in order, compiling the next points' programs while the current one runs.

On CPU a point is a trace and an XLA compile (one core) and a run (XLA's thread pool); one after the
other, a 2-core machine idles a core through every compile. With `prepare`, the next `ahead` points'
compressors and parameters are made (on this thread: calibration and training run programs) and their
programs are traced and compiled on background threads (`sweep.warm_point`, nothing executed there)
while this thread runs the current point; the point's own call then finds them in jax's compile cache.
Programs still execute one at a time: two points *executing* at once can deadlock XLA's CPU runtime
(seen with three points in flight, every thread waiting on a result), and this never does that.
Results are those of the plain loop, bit for bit; rows are appended in job order.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import sys
from typing import Any, Callable, Sequence

from absl import logging

from eval.engine.results import ResultTable

Job = tuple[Any, Any]           # (MethodSpec, budget label)


def trim_heap() -> None:
  """Hands the heap pages a finished point freed back to the OS (glibc's malloc_trim; XLA's freed
  buffers otherwise stay in the process: at d16 ~0.4 GB after a few points). No-op elsewhere."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _ahead(pool: concurrent.futures.Executor, prepare: Callable[[Any, Any], Callable[[], None]],
           job: Job) -> concurrent.futures.Future | None:
  """Prepares `job` here and submits its compile to `pool`; None when that fails (the point's own
  evaluation reports it)."""
  try:
    return pool.submit(prepare(*job))
  except Exception as e:  # pylint: disable=broad-except
    logging.info('%s@%s: not compiled ahead (%s: %s)', *job, type(e).__name__, e)
    return None


def run_points(table: ResultTable, jobs: Sequence[Job], evaluate: Callable[[Any, Any], dict], progress: bool,
               dataset: str, prepare: Callable[[Any, Any], Callable[[], None]] | None = None,
               ahead: int = 1) -> list[str]:
  """Evaluates every (spec, budget) job whose row `table` lacks, in order; returns the failures
  (`spec@budget: error`; their rows stay missing, the other points still run). `prepare(spec,
  budget)`, when given, makes the point's compressor and parameters and returns a function that
  compiles its programs without running them, called on one of `ahead` background threads for the
  next `ahead` points while the current one runs."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if ahead < 0:
    raise ValueError(f'sweep.compile_ahead must be >= 0 (points compiled ahead; 0: none), got {ahead}')
  todo = [(s, b) for s, b in jobs if {'dataset': dataset, 'method': s.name, 'setting': s.setting,
                                      'budget': b} not in table]
  if len(todo) < len(jobs):
    logging.info('%s: reusing %d finished points of %d from %s; computing %d', dataset,
                 len(jobs) - len(todo), len(jobs), table.path, len(todo))
  failed, compiling = [], {}                       # index into todo -> its compile's future (or None)
  with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f'frontier [{dataset}]', unit='point',
            disable=not progress) as bar, \
       concurrent.futures.ThreadPoolExecutor(max(ahead, 1), thread_name_prefix='compile_ahead') as pool:
    for i, (spec, budget) in enumerate(todo):
      if compiling.get(i) is not None:
        try:
          compiling.pop(i).result()                # its programs are in the cache: nothing compiles twice
        except Exception as e:  # pylint: disable=broad-except  (evaluate reports it, if it is real)
          logging.info('%s@%s: compile ahead failed (%s: %s)', spec, budget, type(e).__name__, e)
      if prepare is not None:
        for j in range(i + 1, min(i + 1 + ahead, len(todo))):
          if j not in compiling:
            compiling[j] = _ahead(pool, prepare, todo[j])
      bar.set_postfix_str(f'{spec}@{budget}')
      try:
        table.append(evaluate(spec, budget))
      except Exception as e:  # pylint: disable=broad-except  (one broken compressor must not stop the rest)
        failed.append(f'{spec}@{budget}: {type(e).__name__}: {e}')
        print(f'\nFAILED {failed[-1]}', file=sys.stderr)
      bar.update(1)
      trim_heap()
  return failed
