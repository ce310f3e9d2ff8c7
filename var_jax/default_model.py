r"""The built-in default model: a small VAR + multi-scale VQ-VAE trained on the built-in data.

Both ship inside the package (`var_jax/assets/{vqvae,var}_default/`) as float16 state dicts in the
official VAR naming and layouts (so the official PyTorch code could load them too), beside their
model configs, training configs and a README with the reproduction commands and measured figures.

    model = var_jax.load_default()        # VARModel: 32 px, 12 classes, 7 scales
    out = model.generate([0, 1, 2], seed=0, cfg=1.5, top_k=0, top_p=0.0)

Re-create the assets from training workdirs (`python -m train.vqvae`, `python -m train.var`) with
`python -m train.export_default` (see var_jax/assets/*/README.md for the exact commands).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from var_jax.api import VARModel
from var_jax.config import VARConfig, VQVAEConfig, from_json
from var_jax.convert import build_loaded
from var_jax.var import VAR, load_var_state_dict
from var_jax.vqvae import VQVAE, load_vqvae_state_dict

ASSETS = Path(__file__).resolve().parent / 'assets'
PARTS = {'vqvae': ('vqvae_default', 'vqvae_fp16.npz', VQVAEConfig),
         'var': ('var_default', 'var_fp16.npz', VARConfig)}
_FIX = ('reinstall the package (pip install -e .) or re-create the assets with '
        '`python -m train.export_default --vqvae_workdir ... --var_workdir ...`')


def _read_part(part: str, root: Path) -> tuple[object, dict[str, np.ndarray]]:
  sub, weights, cfg_type = PARTS[part]
  folder = root / sub
  cfg_path, npz_path = folder / 'model_config.json', folder / weights
  for p in (cfg_path, npz_path):
    if not p.is_file():
      raise FileNotFoundError(f'the built-in {part} asset {str(p)!r} is missing; {_FIX}')
  cfg = from_json(cfg_path.read_text())
  if not isinstance(cfg, cfg_type):
    raise ValueError(f'{cfg_path} holds a {type(cfg).__name__}, expected {cfg_type.__name__}; {_FIX}')
  try:
    with np.load(npz_path) as z:
      sd = {k: z[k].astype(np.float32) if np.issubdtype(z[k].dtype, np.floating) else z[k] for k in z.files}
  except Exception as e:  # zip / pickle errors of a truncated or corrupt file
    raise ValueError(f'the built-in {part} weights {str(npz_path)!r} are unreadable ({e}); {_FIX}') from e
  return cfg, sd


def load_default(root: str | os.PathLike | None = None) -> VARModel:
  """The shipped default VAR + VQ-VAE (float16 weights cast to float32). `root`: another assets dir."""
  root = ASSETS if root is None else Path(root)
  vae_cfg, vae_sd = _read_part('vqvae', root)
  var_cfg, var_sd = _read_part('var', root)
  if tuple(var_cfg.patch_nums) != tuple(vae_cfg.patch_nums):
    raise ValueError(f'built-in VAR patch_nums {var_cfg.patch_nums} != VQ-VAE {vae_cfg.patch_nums}; {_FIX}')
  vae = build_loaded(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)), load_vqvae_state_dict, vae_sd)
  var = build_loaded(lambda: VAR(var_cfg, rngs=nnx.Rngs(0)), load_var_state_dict, var_sd)
  return VARModel(var, vae)
