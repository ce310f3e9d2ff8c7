"""Converts an official VAR + VQ-VAE checkpoint pair (torch `.pth`) into a fast-loading orbax checkpoint.

  python -m var_jax.convert --var var_d16.pth --vae vae_ch160v4096z32.pth --out ckpt/d16 \
      [--patch_nums 1,2,3,4,5,6,8,10,13,16] [--overwrite]

Output directory layout:
  config.json  {"format": ..., "var": VARConfig, "vae": VQVAEConfig, "source": {...}}
  var/, vae/   orbax `StandardCheckpointer` directories holding `nnx.state(model)` (fp32)

`load_converted(dir)` rebuilds both models abstractly (`nnx.eval_shape`, no init compute) and restores
the saved states into them; `load_converted_models(dir)` merges them into ready `VAR` / `VQVAE` modules.
The torch files are read with `var_jax.torch_pickle` (no torch, no pickle code execution).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from var_jax import cli
from var_jax import config as config_lib
from var_jax.config import VARConfig, VQVAEConfig
from var_jax.torch_pickle import load_torch_state_dict
from var_jax.var import VAR, infer_var_config, load_var_state_dict
from var_jax.vqvae import VQVAE, infer_vqvae_config, load_vqvae_state_dict

FORMAT = 'var_jax.convert/v1'
M = TypeVar('M', bound=nnx.Module)
CONFIG_FILE = 'config.json'


class ConvertedCheckpoint(NamedTuple):
  """Configs, graph definitions and restored `nnx.State`s of a converted checkpoint."""
  var_cfg: VARConfig
  vae_cfg: VQVAEConfig
  var_graphdef: Any
  var_state: nnx.State
  vae_graphdef: Any
  vae_state: nnx.State


def infer_patch_nums(var_sd: dict[str, np.ndarray]) -> tuple[int, ...]:
  """The scale schedule of an official VAR state dict, read from its `lvl_1L` buffer.

  `lvl_1L[0]` is the scale index of every token, so scale k has pn_k^2 entries equal to k.
  """
  if 'lvl_1L' not in var_sd:
    raise ValueError('the VAR state dict has no `lvl_1L` buffer to read the scale schedule from; '
                     'pass --patch_nums explicitly (256px: 1,2,3,4,5,6,8,10,13,16)')
  lvl_L = np.asarray(var_sd['lvl_1L']).reshape(-1).astype(np.int64)
  if lvl_L.size == 0 or np.any(np.diff(lvl_L) < 0) or lvl_L[0] != 0:
    raise ValueError(f'`lvl_1L` is not a sorted scale index starting at 0 ({lvl_L[:8]}...); pass --patch_nums')
  counts = np.bincount(lvl_L)
  patch_nums = tuple(math.isqrt(int(c)) for c in counts)
  if any(pn * pn != c for pn, c in zip(patch_nums, counts)):
    raise ValueError(f'`lvl_1L` tokens per scale {counts.tolist()} are not squares; pass --patch_nums')
  return patch_nums


def _configs(var_sd: dict[str, np.ndarray], vae_sd: dict[str, np.ndarray],
             patch_nums: Sequence[int] | None) -> tuple[VARConfig, VQVAEConfig]:
  if patch_nums is None:
    patch_nums = infer_patch_nums(var_sd)
  else:
    patch_nums = tuple(int(p) for p in patch_nums)
    if 'lvl_1L' in var_sd and infer_patch_nums(var_sd) != patch_nums:
      raise ValueError(f'--patch_nums {patch_nums} disagree with the checkpoint\'s own schedule '
                       f'{infer_patch_nums(var_sd)} (from lvl_1L); drop --patch_nums or fix it')
  var_cfg = infer_var_config(var_sd, patch_nums)
  vae_cfg = infer_vqvae_config(vae_sd, patch_nums)
  if (var_cfg.vocab_size, var_cfg.z_channels) != (vae_cfg.vocab_size, vae_cfg.z_channels):
    raise ValueError(
        f'VAR and VQ-VAE do not belong together: VAR expects V={var_cfg.vocab_size}, '
        f'Cvae={var_cfg.z_channels} but the VQ-VAE has V={vae_cfg.vocab_size}, Cvae={vae_cfg.z_channels}')
  return var_cfg, vae_cfg


def _placeholder(s: Any) -> Any:
  """A value no loader writes (NaN / the int minimum), so 'was it set?' is a cheap test afterwards."""
  if jnp.issubdtype(s.dtype, jnp.floating):
    return np.full(s.shape, np.nan, s.dtype)
  if jnp.issubdtype(s.dtype, jnp.integer):
    return np.full(s.shape, np.iinfo(s.dtype).min, s.dtype)
  return jax.ShapeDtypeStruct(s.shape, s.dtype)  # other dtypes stay abstract, hence always unset


def _is_unset(x: Any) -> bool:
  if isinstance(x, jax.ShapeDtypeStruct):
    return True
  x = np.asarray(x)
  if x.size == 0:
    return False
  if jnp.issubdtype(x.dtype, jnp.floating):
    return bool(np.isnan(x.flat[0]) and np.isnan(x).all())
  if jnp.issubdtype(x.dtype, jnp.integer):
    return bool(x.flat[0] == np.iinfo(x.dtype).min and (x == np.iinfo(x.dtype).min).all())
  return False  # was abstract, now concrete: set


def build_loaded(build: Callable[[], M], load_fn: Callable[[M, dict[str, np.ndarray]], None],
                 sd: dict[str, np.ndarray]) -> M:
  """`build()` then `load_fn(model, sd)`, without paying for the random init that `sd` overwrites.

  `build` is traced once under `jax.jit`, which returns only the non-parameter variables (buffers,
  counters: their true initial values); XLA drops the parameters' random init. Parameters start as
  NaN / int-minimum placeholders, and one the loader leaves unset is an error, never a silent value.
  """
  captured = {}

  def init_non_params():
    graphdef, params, rest = nnx.split(build(), nnx.Param, ...)
    captured['graphdef'] = graphdef
    captured['params'] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return rest

  rest = jax.jit(init_non_params)()
  params = jax.tree.map(_placeholder, captured['params'])
  model = nnx.merge(captured['graphdef'], params, rest)
  load_fn(model, sd)
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  unset = sorted(jax.tree_util.keystr(p) for p, x in flat if _is_unset(x))
  if unset:
    raise ValueError(f'{getattr(load_fn, "__name__", load_fn)} left parameters {unset[:10]} unset: the '
                     'state dict loader does not cover the whole model (a bug in the loader)')
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
  return model


def load_official_models(var_path: str | os.PathLike, vae_path: str | os.PathLike,
                         patch_nums: Sequence[int] | None = None) -> tuple[VAR, VQVAE]:
  """Builds `VAR` and `VQVAE` straight from the official torch files (slow path, no cache)."""
  var_sd, vae_sd = load_torch_state_dict(var_path), load_torch_state_dict(vae_path)
  var_cfg, vae_cfg = _configs(var_sd, vae_sd, patch_nums)
  var_model = build_loaded(lambda: VAR(var_cfg, rngs=nnx.Rngs(0)), load_var_state_dict, var_sd)
  del var_sd
  vae_model = build_loaded(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)), load_vqvae_state_dict, vae_sd)
  return var_model, vae_model


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f'--out {out_dir} exists and is not a directory; choose another path')
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f'--out {out_dir} exists and is not empty; pass --overwrite to replace it '
                          'or choose another directory')


def convert(var_path: str | os.PathLike, vae_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            patch_nums: Sequence[int] | None = None, overwrite: bool = False) -> Path:
  """Converts an official pair into `out_dir` (written to a temporary sibling, then moved in place)."""
  out_dir = Path(out_dir).absolute()
  _check_out_dir(out_dir, overwrite)  # fail before the slow part
  var_model, vae_model = load_official_models(var_path, vae_path, patch_nums)
  meta = {
      'format': FORMAT,
      'var': json.loads(config_lib.to_json(var_model.cfg)),
      'vae': json.loads(config_lib.to_json(vae_model.cfg)),
      'source': {name: {'file': os.path.basename(os.fspath(p)), 'bytes': os.path.getsize(p)}
                 for name, p in (('var', var_path), ('vae', vae_path))},
  }
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / 'var', nnx.state(var_model))
      ckptr.save(tmp / 'vae', nnx.state(vae_model))
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + '\n')
    _check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def read_converted_configs(ckpt_dir: str | os.PathLike) -> tuple[VARConfig, VQVAEConfig]:
  """The (VARConfig, VQVAEConfig) stored in a converted checkpoint's config.json."""
  path = Path(ckpt_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: {ckpt_dir} is not a converted checkpoint; create one with '
                            'python -m var_jax.convert --var var_d16.pth --vae vae_ch160v4096z32.pth --out DIR')
  meta = json.loads(path.read_text())
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")!r}, expected {FORMAT!r}; re-run var_jax.convert')
  var_cfg, vae_cfg = config_lib.from_json(meta['var']), config_lib.from_json(meta['vae'])
  assert isinstance(var_cfg, VARConfig) and isinstance(vae_cfg, VQVAEConfig)
  return var_cfg, vae_cfg


def _restore(ckptr: ocp.StandardCheckpointer, path: Path, build: Any) -> tuple[Any, nnx.State]:
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  try:
    state = ckptr.restore(path, abstract_state)
  except Exception as e:  # orbax raises assorted types for missing / mismatched trees
    raise ValueError(f'cannot restore {path} into the model its config.json describes ({type(e).__name__}: '
                     f'{e}); the checkpoint is damaged or from another var_jax version: re-run '
                     'var_jax.convert') from e
  return graphdef, state


def load_converted(ckpt_dir: str | os.PathLike) -> ConvertedCheckpoint:
  """Restores a converted checkpoint into abstractly built models' states (no random init)."""
  ckpt_dir = Path(ckpt_dir).absolute()
  var_cfg, vae_cfg = read_converted_configs(ckpt_dir)
  with ocp.StandardCheckpointer() as ckptr:
    var_graphdef, var_state = _restore(ckptr, ckpt_dir / 'var', lambda: VAR(var_cfg, rngs=nnx.Rngs(0)))
    vae_graphdef, vae_state = _restore(ckptr, ckpt_dir / 'vae', lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(0)))
  return ConvertedCheckpoint(var_cfg, vae_cfg, var_graphdef, var_state, vae_graphdef, vae_state)


def load_converted_models(ckpt_dir: str | os.PathLike) -> tuple[VAR, VQVAE]:
  """Ready-to-use (`VAR`, `VQVAE`) modules from a converted checkpoint."""
  ck = load_converted(ckpt_dir)
  return nnx.merge(ck.var_graphdef, ck.var_state), nnx.merge(ck.vae_graphdef, ck.vae_state)


def main(argv: Sequence[str] | None = None) -> Path:
  parser = cli.ArgumentParser(prog='python -m var_jax.convert', description=__doc__.split('\n')[0])
  parser.add_argument('--var', required=True, help='official VAR checkpoint, e.g. var_d16.pth')
  parser.add_argument('--vae', required=True, help='official VQ-VAE checkpoint, e.g. vae_ch160v4096z32.pth')
  parser.add_argument('--out', required=True, help='output directory (must not exist or be empty)')
  parser.add_argument('--patch_nums', default=None,
                      help='comma-separated scale schedule; default: read from the checkpoint (lvl_1L)')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out directory')
  args = parser.parse_args(argv)
  patch_nums = None
  if args.patch_nums:
    try:
      patch_nums = tuple(int(p) for p in args.patch_nums.split(','))
    except ValueError:
      parser.error(f'--patch_nums must be comma-separated integers, got {args.patch_nums!r}')
  t0 = time.perf_counter()
  out = convert(args.var, args.vae, args.out, patch_nums=patch_nums, overwrite=args.overwrite)
  var_cfg, vae_cfg = read_converted_configs(out)
  mib = sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20
  print(f'wrote {out} ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f}s: VAR depth {var_cfg.depth} '
        f'width {var_cfg.width}, VQ-VAE V={vae_cfg.vocab_size} Cvae={vae_cfg.z_channels}, '
        f'patch_nums {var_cfg.patch_nums}')
  return out


if __name__ == '__main__':
  cli.run_main(main)
