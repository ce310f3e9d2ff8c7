"""`python -m eval.frontier --config configs/default.py --workdir runs/frontier`: the frontier job
(eval/frontier/job.py) from the command line; `--help` lists the flags."""
from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from eval.engine.results import Paths
from eval.frontier import job
from var_jax import cli


def main(argv: Sequence[str]) -> None:
  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')
  result = job.run(F.config, F.workdir)       # a user error: one `error:` line, exit 2 (var_jax/cli.py)
  p = Paths(F.workdir)
  print(f'\nfrontier done in {result["seconds"]:.0f} s: {p.frontier} (one row per point), {p.pareto}, '
        f'{p.bounds}, {p.png}' + (f', {p.closed}, samples_*.png' if os.path.exists(p.closed) else '')
        + f'\nTensorBoard: tensorboard --logdir {p.tb}   (then open http://localhost:6006/?smoothing=0#timeseries)')
  if result['failed']:
    raise SystemExit('FAILED points (re-run the same command to retry them):\n  ' + '\n  '.join(result['failed']))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', 'configs/default.py', 'frontier config (configs/frontier.py:<variant>)')
  flags.DEFINE_string('workdir', None, 'run directory (created; a re-run resumes it)')
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
