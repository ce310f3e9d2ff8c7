r"""Exports trained workdirs as the package's built-in default model (float16 official state dicts).

    python -m train.export_default --vqvae_workdir runs/vqvae_default --var_workdir runs/var_default
    python -m train.export_default --parts var --var_workdir runs/var_default --overwrite

Writes `var_jax/assets/{vqvae,var}_default/`: `<part>_fp16.npz` (official names and layouts, floats
as float16), `model_config.json`, the training `config.json` / `dataset.json` and `provenance.json`
(workdir, step); an existing README.md there is kept. Loaded by `var_jax.load_default()`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import app, flags

from train.var import load_var
from train.vqvae import load_vqvae
from var_jax.config import to_json
from var_jax.default_model import ASSETS, PARTS
from var_jax.var import var_state_dict
from var_jax.vqvae import vqvae_to_torch_state_dict


def fp16_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Floating arrays cast to float16, others unchanged."""
  return {k: np.asarray(v).astype(np.float16) if np.issubdtype(np.asarray(v).dtype, np.floating)
          else np.asarray(v) for k, v in sd.items()}


def export(out: str | os.PathLike, *, vqvae_workdir: str | None = None, var_workdir: str | None = None,
           overwrite: bool = False) -> list[Path]:
  """Writes the asset folder of each given workdir under `out`; returns the folders written."""
  written = []
  for part, workdir in (('vqvae', vqvae_workdir), ('var', var_workdir)):
    if not workdir:
      continue
    model, step = (load_vqvae if part == 'vqvae' else load_var)(workdir)
    sd = vqvae_to_torch_state_dict(model) if part == 'vqvae' else var_state_dict(model)
    sub, weights, _ = PARTS[part]
    folder = Path(out) / sub
    if (folder / weights).exists() and not overwrite:
      raise FileExistsError(f'{folder / weights} exists; pass --overwrite to replace it')
    tmp = Path(out) / f'.{sub}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / weights, **fp16_state_dict(sd))
    (tmp / 'model_config.json').write_text(to_json(model.cfg) + '\n')
    for name in ('config.json', 'dataset.json'):
      if os.path.exists(os.path.join(workdir, name)):
        shutil.copy(os.path.join(workdir, name), tmp / name)
    (tmp / 'provenance.json').write_text(json.dumps({'workdir': workdir, 'step': step}) + '\n')
    if (folder / 'README.md').exists():
      shutil.copy(folder / 'README.md', tmp / 'README.md')
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp, folder)
    written.append(folder)
  return written


flags.DEFINE_string('vqvae_workdir', '', 'train.vqvae workdir to export (empty: skip)')
flags.DEFINE_string('var_workdir', '', 'train.var workdir to export (empty: skip)')
flags.DEFINE_string('out', str(ASSETS), 'assets root to write {vqvae,var}_default/ into')
flags.DEFINE_bool('overwrite', False, 'replace existing assets')
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {list(argv[1:])}')
  if not (FLAGS.vqvae_workdir or FLAGS.var_workdir):
    raise app.UsageError('nothing to export: give --vqvae_workdir and / or --var_workdir')
  for folder in export(FLAGS.out, vqvae_workdir=FLAGS.vqvae_workdir, var_workdir=FLAGS.var_workdir,
                       overwrite=FLAGS.overwrite):
    print(f'wrote {folder}')


if __name__ == '__main__':
  from var_jax import cli
  cli.run(main)
