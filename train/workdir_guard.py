"""A run's workdir: created, or checked to belong to the same run; never silently overwritten.

`prepare_workdir` writes `config.json` (and the model config) on the first start and compares the saved
config on every later start: a different config is refused with the differences listed, unless
`config.overwrite` moves the old run aside.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Collection, Mapping
from typing import Any

import ml_collections
from absl import logging

from train import workdir_lock

# Keys that do not change what is computed: they may differ when a run is resumed (grad_layers and
# grad_bytes split the gradient's computation over layers: the same gradient up to float summation order).
RUNTIME_KEYS = frozenset({'overwrite', 'progress', 'log_every', 'ckpt_every', 'keep_ckpts', 'eval_every',
                          'eval_at_start', 'eval_at_end', 'allow_code_change', 'distributed',
                          'grad_layers', 'grad_bytes'})
CODE_KEY = 'code_sha256'          # in config.json: the package sources the run was made with
PACKAGES = ('var_jax', 'compress', 'train', 'eval', 'configs')


def source_fingerprint() -> str:
  """sha256 of the project's Python sources (every .py file of `PACKAGES`, by relative path)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sha = hashlib.sha256()
  for pkg in PACKAGES:
    for folder, dirs, files in sorted(os.walk(os.path.join(root, pkg))):
      dirs.sort()
      for name in sorted(f for f in files if f.endswith('.py')):
        path = os.path.join(folder, name)
        sha.update(os.path.relpath(path, root).encode() + b'\0')
        with open(path, 'rb') as f:
          sha.update(f.read() + b'\0')
  return sha.hexdigest()


def _comparable(config: ml_collections.ConfigDict | Mapping) -> dict:
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return {k: v for k, v in config.items() if k not in RUNTIME_KEYS and k != CODE_KEY}


def _diff(a: Mapping, b: Mapping, prefix: str = '') -> list[tuple[str, Any, Any]]:
  """(dotted key, saved value, new value) of every leaf that differs."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, '<absent>'), b.get(k, '<absent>')
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += _diff(va, vb, f'{prefix}{k}.')
    elif va != vb:
      out.append((f'{prefix}{k}', va, vb))
  return out


def _lines(diffs: list[tuple[str, Any, Any]]) -> str:
  return '\n  '.join(f'{k}: saved {a!r}, now {b!r}' for k, a, b in diffs)


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, model_config_json: str,
                    model_config_file: str = 'model_config.json', *, extendable: Collection[str] = (),
                    code_sha256: str | None = None) -> list[str]:
  """Creates `workdir` or checks that it belongs to the same run; never deletes anything.

  A workdir whose saved config differs (other than `RUNTIME_KEYS`) is refused, unless
  `config.overwrite` is set: then the old workdir is renamed to `<workdir>.old-<time>` and a fresh run
  starts. Differences in `extendable` keys (dotted, e.g. 'sweep.methods': lists whose new entries only
  add work) are accepted: the run is extended. With `code_sha256` (see `source_fingerprint`) the
  sources are recorded in config.json, and a resume after they changed is refused unless
  `config.allow_code_change` (keep the earlier results) or `config.overwrite` (start afresh).
  Writes `config.json` and `model_config_json` (as `model_config_file`). Returns the accepted
  extensions, one line each.
  """
  cfg_path = os.path.join(workdir, 'config.json')
  extended: list[str] = []
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      saved = json.load(f)
    diffs = _diff(_comparable(saved), _comparable(config))
    grows = lambda k: any(k == e or k.startswith(e + '.') for e in extendable)
    fixed = [d for d in diffs if not grows(d[0])]
    old_code = saved.get(CODE_KEY)
    code_moved = bool(code_sha256 and old_code and old_code != code_sha256)
    overwrite = config.get('overwrite', False)
    if fixed and not overwrite:
      raise ValueError(f'workdir {workdir!r} holds a run with a different config:\n  ' + _lines(fixed)
                       + '\nuse another --workdir, or pass --config.overwrite=True to move the old run aside '
                       f'(to {workdir}.old-<time>) and start afresh'
                       + (f' (these may change in place: {", ".join(sorted(extendable))})' if extendable else ''))
    if code_moved and not overwrite and not config.get('allow_code_change', False):
      raise ValueError(f'the package sources changed since the run in {workdir!r} was made (sha256 '
                       f'{old_code[:12]} then, {code_sha256[:12]} now): its results came from other code. '
                       'Pass --config.overwrite=True to move it aside and recompute everything, or '
                       '--config.allow_code_change=True to keep its results and only add what is missing')
    if overwrite and (fixed or code_moved):
      backup = f'{workdir.rstrip(os.sep)}.old-{time.strftime("%Y%m%d-%H%M%S")}'
      logging.warning('config or code differs from the saved run; moving %s to %s', workdir, backup)
      shutil.move(workdir, backup)
    else:
      extended = [f'{k}: was {a!r}, now {b!r}' for k, a, b in diffs]
      if code_moved:
        logging.warning('package sources changed (%s -> %s); keeping the earlier results as asked',
                        old_code[:12], code_sha256[:12])
  elif os.path.isdir(workdir) and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise ValueError(f'workdir {workdir!r} has checkpoints but no config.json; refusing to mix runs: '
                     'use an empty or new --workdir')
  os.makedirs(workdir, exist_ok=True)
  workdir_lock.renew(workdir)       # a run moved aside above: its lock moves to the fresh workdir
  cfg = json.loads(config.to_json_best_effort())
  if code_sha256:
    cfg[CODE_KEY] = code_sha256
  for name, text in (('config.json', json.dumps(cfg, indent=2)), (model_config_file, model_config_json)):
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text + '\n')
  return extended


def read_json(workdir: str, name: str) -> Any:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path!r} not found: is {workdir!r} the workdir of a training run?')
  with open(path) as f:
    return json.load(f)
