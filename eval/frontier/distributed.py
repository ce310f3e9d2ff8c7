"""Splitting a frontier run over processes (jax.distributed): each process its own shards and points.

One command on every process (every host of a TPU slice or GPU cluster, or N local processes started
by `python -m eval.frontier.launch`) with `--config.distributed.enabled=True`; the processes share the workdir
(a shared filesystem). Process i of P captures the capture shards j with j % P == i, computes the
full-cache reference outputs of its batches of held-out sequences, and evaluates its sweep points
(`assign`: round robin, except that every budget of a learned method goes to one process, which trains
its parameters once). Each writes its rows to `WORKDIR/parts/frontier.p<i>.csv`; after a barrier,
process 0 merges them into frontier.csv and alone runs the bounds, the closed loop and the outputs.

Barriers are the jax.distributed coordination service's (through `orbax.checkpoint.multihost`), which
need no device collectives: the same code runs on CPU, GPU and TPU processes.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import zlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
from absl import logging

from eval.engine.results import ResultTable


@dataclasses.dataclass(frozen=True)
class Cluster:
  """This process's place among the run's processes (index 0 of 1 when not distributed)."""
  index: int = 0
  count: int = 1
  barrier_timeout_s: int = 7 * 24 * 3600

  @property
  def lead(self) -> bool:
    return self.index == 0

  def owns(self, i: int) -> bool:
    return i % self.count == self.index

  def barrier(self, name: str) -> None:
    """Waits until every process reaches the barrier `name` (each name once per run)."""
    if self.count > 1:
      from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
      # the coordination service's barrier (no device collectives, a timeout), as orbax uses it
      multihost.get_barrier_sync_fn()(key=f'var_kv_frontier_{name}', timeout_ms=self.barrier_timeout_s * 1000)


SINGLE = Cluster()


def assign(cluster: Cluster, jobs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
  """The (spec, budget) jobs this process evaluates: learned methods whole (by a hash of the method,
  so the process that trains a method's parameters is the only one that needs them), the others round
  robin in job order; every job goes to exactly one process."""
  mine, k = [], 0
  for spec, budget in jobs:
    if spec.cls.learned:
      owner = zlib.crc32(str(spec).encode()) % cluster.count
    else:
      owner, k = k % cluster.count, k + 1
    if owner == cluster.index:
      mine.append((spec, budget))
  return mine


def known_lead(config: ml_collections.ConfigDict) -> bool | None:
  """Whether this process is the run's lead (process 0), when that is known before joining: always
  in one process, from config.distributed.process_id when given; None when only the cluster's
  environment says (jax.distributed finds the process ids itself)."""
  d = config.get('distributed')
  if d is None or not d.enabled:
    return True
  if jax.distributed.is_initialized():
    return jax.process_index() == 0
  return d.process_id == 0 if d.process_id >= 0 else None


def init(config: ml_collections.ConfigDict) -> Cluster:
  """Joins the run's processes when config.distributed.enabled (jax.distributed.initialize: the
  coordinator, process count and id from the config, or from the TPU/GPU cluster's environment when
  left empty); the single-process `SINGLE` otherwise. Call before any other JAX work."""
  d = config.get('distributed')
  if d is None or not d.enabled:
    return SINGLE
  if jax.distributed.is_initialized():
    return Cluster(jax.process_index(), jax.process_count(), int(d.barrier_timeout_s))
  kwargs = {}
  if d.coordinator:
    kwargs['coordinator_address'] = d.coordinator
  if d.num_processes:
    kwargs['num_processes'] = int(d.num_processes)
  if d.process_id >= 0:
    kwargs['process_id'] = int(d.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ValueError(f'cannot join the distributed run ({e}); on one machine start it with python -m '
                     'eval.frontier.launch --processes N -- <frontier flags>, elsewhere set '
                     '--config.distributed.coordinator=HOST:PORT, .num_processes and .process_id '
                     '(or run on a TPU/GPU cluster that JAX detects)') from e
  cluster = Cluster(jax.process_index(), jax.process_count(), int(d.barrier_timeout_s))
  logging.info('distributed run: process %d of %d (%d local devices)', cluster.index, cluster.count,
               jax.local_device_count())
  return cluster


def capture(cluster: Cluster, model: Any, path: str, **kwargs: Any) -> None:
  """var_jax.capture.capture over the processes: the lead opens the manifest, each process captures
  its shards (entry files), the lead folds them into the manifest."""
  from var_jax import capture as cap  # pylint: disable=g-import-not-at-top
  if cluster.count == 1:
    cap.capture(model, path, **kwargs)
    return
  progress = kwargs.pop('progress', True)
  if cluster.lead:
    cap.open_capture(model, path, **kwargs)
  cluster.barrier('capture_manifest')
  cap.capture(model, path, **kwargs, progress=progress, part=(cluster.index, cluster.count))
  cluster.barrier('capture_shards')
  if cluster.lead:
    cap.merge_entries(path)
  cluster.barrier('capture_merged')


def references(cluster: Cluster, data: Any, batch: int, open_store: Callable[[], Any]) -> None:
  """Gives `data` its reference store (`open_store()`: the lead first, which empties another capture's
  store, then the others) and, with several processes, computes the full-cache reference outputs of
  this process's batches into it (batches of the sweep's size: every process then reads them all)."""
  if cluster.lead:
    data.exact_store = open_store()
  cluster.barrier('exact_store')
  if not cluster.lead:
    data.exact_store = open_store()
  if cluster.count == 1:
    return                                  # one process computes each batch's on first use
  for i, (a, b) in enumerate(data.batches(batch)):
    if cluster.owns(i):
      data.exact(a, b)
  cluster.barrier('references')


def part_path(workdir: str, index: int) -> str:
  return os.path.join(workdir, 'parts', f'frontier.p{index}.csv')


def my_points(cluster: Cluster, table: ResultTable, jobs: Sequence[tuple[Any, Any]], dataset: str = 'val'
              ) -> tuple[ResultTable, list[tuple[Any, Any]]]:
  """(the table this process appends to, the jobs it evaluates): `table` and `jobs` in one process;
  else its part table and its `assign`ed jobs that `table` lacks (after the lead merged the parts an
  interrupted earlier run left)."""
  if cluster.count == 1:
    return table, list(jobs)
  workdir = os.path.dirname(table.path)
  if cluster.lead:
    merge_parts(table, workdir)
  cluster.barrier(f'parts_merged_{dataset}')
  table = ResultTable(table.path, table.columns, table.key)
  todo = [(s, b) for s, b in assign(cluster, jobs)
          if {'dataset': dataset, 'method': s.name, 'setting': s.setting, 'budget': b} not in table]
  return ResultTable(part_path(workdir, cluster.index), table.columns, table.key), todo


def gather_points(cluster: Cluster, table: ResultTable) -> ResultTable | None:
  """After every process's sweep: the lead gets `table` with every part merged in; the others None,
  once the lead is done with the rest of the run (so that every process leaves together)."""
  if cluster.count == 1:
    return table
  cluster.barrier('sweep')
  if not cluster.lead:
    cluster.barrier('done')
    return None
  merge_parts(table, os.path.dirname(table.path))
  return ResultTable(table.path, table.columns, table.key)


def merge_parts(table: Any, workdir: str) -> int:
  """Appends the rows of every process's part table that `table` lacks, then removes the parts;
  returns the rows added. Parts of an earlier run with another process count merge the same way."""
  added = 0
  for part in sorted(glob.glob(os.path.join(workdir, 'parts', 'frontier.p*.csv'))):
    for row in ResultTable(part, table.columns, table.key).rows:
      if row not in table:
        table.append(row)
        added += 1
    os.remove(part)
  return added
