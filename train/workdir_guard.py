"""A run's workdir: created, or checked to belong to the same run; never silently overwritten.

`prepare_workdir` writes `config.json` (and the model config) on the first start and compares the saved
config on every later start: a different config is refused with the differences listed, unless
`config.overwrite` moves the old run aside.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

# Keys that do not change what is computed: they may differ when a run is resumed.
RUNTIME_KEYS = frozenset({'overwrite', 'progress', 'log_every', 'ckpt_every', 'keep_ckpts', 'eval_every',
                          'eval_at_start'})


def _comparable(config: ml_collections.ConfigDict | Mapping) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def _diff(a: Mapping, b: Mapping, prefix: str = '') -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += _diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      out.append(f'{prefix}{k}: saved {va!r}, now {vb!r}')
  return out


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, model_config_json: str,
                    model_config_file: str = 'model_config.json') -> None:
  """Creates `workdir` or checks that it belongs to the same run; never deletes anything.

  A workdir whose saved config differs (other than `RUNTIME_KEYS`) is refused, unless
  `config.overwrite` is set: then the old workdir is renamed to `<workdir>.old-<time>` and a fresh run starts.
  Writes `config.json` and `model_config_json` (as `model_config_file`).
  """
  cfg_path = os.path.join(workdir, 'config.json')
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      saved = json.load(f)
    diffs = _diff(_comparable(saved), _comparable(config))
    if diffs and not config.get('overwrite', False):
      raise ValueError(f'workdir {workdir!r} holds a run with a different config:\n  ' + '\n  '.join(diffs)
                       + '\nuse another --workdir, or pass --config.overwrite=True to move the old run aside '
                       f'(to {workdir}.old-<time>) and start afresh')
    if diffs:
      backup = f'{workdir.rstrip(os.sep)}.old-{time.strftime("%Y%m%d-%H%M%S")}'
      logging.warning('config differs from the saved one; moving %s to %s', workdir, backup)
      shutil.move(workdir, backup)
  elif os.path.isdir(workdir) and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'workdir {workdir!r} has checkpoints but no config.json; refusing to mix runs: '
                     'use an empty or new --workdir')
  os.makedirs(workdir, exist_ok=True)
  for name, text in (('config.json', config.to_json_best_effort(indent=2)),
                     (model_config_file, model_config_json)):
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text + '\n')


def read_json(workdir: str, name: str) -> Any:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path!r} not found: is {workdir!r} the workdir of a training run?')
  with open(path) as f:
    return json.load(f)
