r"""The main job: the memory-error frontier on the built-in default model, end to end.

  python -m eval.frontier --config configs/default.py --workdir runs/frontier    # <= 10 min on 2 CPU cores
  tensorboard --logdir runs/frontier/tb

Captures caches, trains the learned compressors, sweeps the budgets, writes frontier.png, the CSVs and
TensorBoard logs. This is `configs/frontier.py:default`; see that file for the fields and the larger
variants (`--config configs/frontier.py:full`, or another model with --config.model.source=...).
"""
import ml_collections

from configs import frontier


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The `default` variant of configs/frontier.py (takes no argument)."""
  if arg:
    raise ValueError(f'configs/default.py takes no argument (got {arg!r}); for variants use '
                     f'configs/frontier.py:<{"|".join(frontier.VARIANTS)}>')
  return frontier.get_config('default')
