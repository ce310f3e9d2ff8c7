r"""Runs one frontier job as N processes on this machine (jax.distributed over localhost).

    python -m eval.frontier.launch --processes 4 -- --config configs/frontier.py:d16 --workdir runs/d16
    python -m eval.frontier.launch --processes 8 --one_gpu_each -- --config ... --workdir ...   # 8 GPUs, 1 each

Starts `python -m eval.frontier <frontier flags> --config.distributed.enabled=True
--config.distributed.{coordinator,num_processes,process_id}=...` N times (eval/frontier/distributed.py: each
process captures its shards and evaluates its points; process 0 merges and writes the outputs).
Process 0 prints to this terminal, process i > 0 to WORKDIR/parts/process<i>.log. If one process
fails, the others are stopped; the exit status is the first failure's (0 when all succeed). Process 0
holds WORKDIR/.lock for the whole job (train/workdir_lock.py); a workdir another run holds is refused
before anything starts.
On a TPU slice or a GPU cluster, run `python -m eval.frontier ... --config.distributed.enabled=True`
on every host instead: jax.distributed finds the coordinator and the process ids itself.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Sequence

from train import workdir_lock
from var_jax import cli
from var_jax.cli import UserError


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def workdir_of(args: Sequence[str]) -> str | None:
  for i, a in enumerate(args):
    if a.startswith('--workdir='):
      return a.split('=', 1)[1]
    if a == '--workdir' and i + 1 < len(args):
      return args[i + 1]
  return None


def commands(processes: int, port: int, frontier_args: Sequence[str]) -> list[list[str]]:
  """The command line of every process."""
  return [[sys.executable, '-m', 'eval.frontier', *frontier_args, '--config.distributed.enabled=True',
           f'--config.distributed.coordinator=localhost:{port}',
           f'--config.distributed.num_processes={processes}', f'--config.distributed.process_id={i}']
          for i in range(processes)]


def launch(processes: int, frontier_args: Sequence[str], one_gpu_each: bool = False, port: int = 0) -> int:
  """Runs the processes to the end; returns the exit status (the first failure's, else 0)."""
  if processes < 1:
    raise UserError(f'--processes must be >= 1, got {processes}')
  workdir = workdir_of(frontier_args)
  if workdir is None:
    raise UserError('give the frontier flags after --, including --workdir DIR')
  workdir_lock.probe(workdir)          # a run holds it: stop before touching its logs (process 0 takes it)
  logs = os.path.join(workdir, 'parts')
  os.makedirs(logs, exist_ok=True)
  procs = []
  for i, cmd in enumerate(commands(processes, port or free_port(), frontier_args)):
    env = dict(os.environ, **({'CUDA_VISIBLE_DEVICES': str(i)} if one_gpu_each else {}))
    out = None if i == 0 else open(os.path.join(logs, f'process{i}.log'), 'w')
    procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
  status, stopped = 0, 0.0
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.returncode not in (None, 0)]
    if failed and not status:
      status, stopped = failed[0].returncode, time.time()
      i = procs.index(failed[0])
      print(f'process {i} failed (exit {status}'
            + (f'; see {logs}/process{i}.log' if i else '') + '): stopping the others', file=sys.stderr)
      for p in procs:
        if p.poll() is None:
          p.terminate()
    if status and time.time() - stopped > 30:     # one stuck in jax.distributed (its peer gone): kill it
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.5)
  return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = cli.ArgumentParser(prog='python -m eval.frontier.launch', description=__doc__.split('\n\n')[0],
                              usage='%(prog)s --processes N [--one_gpu_each] [--port P] -- <eval.frontier flags>')
  p.add_argument('--processes', type=int, required=True, help='processes on this machine')
  p.add_argument('--one_gpu_each', action='store_true', help='process i sees only GPU i')
  p.add_argument('--port', type=int, default=0, help='coordinator port on localhost (0: a free one)')
  split = argv.index('--') if '--' in argv else len(argv)
  a = p.parse_args(argv[:split])
  if a.debug:
    os.environ[cli.DEBUG_ENV] = '1'      # the processes show tracebacks too
  if split == len(argv):
    p.error('give the frontier flags after --, e.g. -- --config configs/default.py --workdir runs/frontier')
  sys.exit(launch(a.processes, argv[split + 1:], a.one_gpu_each, a.port))


if __name__ == '__main__':
  cli.run_main(main)
