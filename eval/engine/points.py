"""Runs a sweep's points in order, compiling the next points' programs while the current one runs.

On CPU a point is a trace and an XLA compile (one core) and a run (XLA's thread pool); one after the
other, a 2-core machine idles a core through every compile. With `prepare`, the next `ahead` points'
compressors and parameters are made (on this thread: calibration and training run programs) and their
programs are traced and compiled on background threads (`sweep.warm_point`, nothing executed there)
while this thread runs the current point; the point's own call then finds them in jax's compile cache.
Programs still execute one at a time: two points *executing* at once can deadlock XLA's CPU runtime
(seen with three points in flight, every thread waiting on a result), and this never does that.
Results are those of the plain loop, bit for bit; rows are appended in job order.

Compiled programs stay in jax's caches, and on Linux each XLA:CPU executable holds hundreds of memory
mappings (measured: ~25,700 for the main job's process after 37 tuning points and two trainings); at
`vm.max_map_count` (65,530 by default) LLVM can no longer map code ("Cannot allocate memory") and the
process dies. So before each point, with no compile in flight, the caches are cleared once the
process holds more than half that many mappings (`free_code`): a later point compiles again, nothing else
changes.
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


def mappings() -> int:
  """Memory mappings this process holds (/proc/self/maps lines; 0 where there is no /proc)."""
  try:
    with open('/proc/self/maps', 'rb') as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


def map_budget() -> int:
  """Mappings above which compiled programs are freed: half of vm.max_map_count (65,530 by default)."""
  try:
    with open('/proc/sys/vm/max_map_count') as f:
      return int(f.read()) // 2
  except (OSError, ValueError):
    return 32_765


def free_code(budget: int | None = None) -> bool:
  """Clears jax's compile caches when the process holds more than `budget` (default `map_budget()`)
  mappings; call it with no compile in flight. Returns whether it cleared them."""
  held = mappings()
  if held <= (map_budget() if budget is None else budget):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  logging.info('%d memory mappings: compiled programs freed (jax.clear_caches)', held)
  return True


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
      if not any(f is not None and not f.done() for f in compiling.values()):
        free_code()                                # only with no compile in flight (module docstring)
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
