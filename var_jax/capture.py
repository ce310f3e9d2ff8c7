r"""Captures VAR's per-layer q, k, v over many labels and seeds as a memory-mapped dataset on disk.

    python -m var_jax.capture --out data/capture_default --model=default \
        --train_shards=32 --val_shards=4 --shard_size=8
    python -m var_jax.capture --out data/capture_d16 --var_ckpt=var_d16.pth \
        --vae_ckpt=vae_ch160v4096z32.pth --train_shards=2 --val_shards=1 --shard_size=1
    python -m var_jax.capture --out data/capture_d16 --converted=ckpt/d16 ...   # var_jax.convert output

A shard is one `model.generate(labels, seed=shard_seed, return_qkv=True)` batch of `shard_size`
images; train shard i uses seed `seed + i`, validation shard j seed `seed + 1_000_000 + j`, dev shard j
seed `seed + 2_000_000 + j` (the split is by seed). Three splits: `train` (calibration and training),
`dev` (every choice of a setting: learning rates, bit widths, the trainer's held-out checks) and `val`
(the held-out test split: read only by the final evaluation). Every image gives two sequences, the CFG conditional half (rows 0..B-1, `half` 0) then
the unconditional one (rows B..2B-1, `half` 1, run with the null class; `labels` holds the image's
class for both). Layout of `--out`:

  manifest.json            arguments, model configs + weights sha256, and every finished shard
                           with its files' sizes and sha256
  <split>-<seed>.{q,k,v}.npy   (2B, N_layers, H, L, D) at `dtype`, scales concatenated on L, q pre-scaled
  <split>-<seed>.meta.npz  labels, seeds, half (2B,), tokens (2B, L) int32 (the image's sampled codes)

Files are written to a temporary name and renamed, the manifest after each shard: re-running the same
command skips finished shards, re-creates missing or corrupt ones and finishes an interrupted capture
with byte-identical files; other arguments into the same directory are refused. Several processes
may share one capture (`part=(i, P)`: shard j by process j % P; see `capture`). Read with
`CaptureDataset(out, 'train').get(indices)` -> {'q', 'k', 'v'} float32 (N_layers, b, H, L, D)
(var_jax/capture_data.py).
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np

from var_jax import config as config_lib
from var_jax.api import VARModel
from var_jax.capture_data import CaptureDataset as CaptureDataset  # re-exported: the reader of what this writes
from var_jax.capture_data import FORMAT, KINDS, file_problem, sha256_file
from var_jax.provenance import MANIFEST, manifest_identity, weights_sha256

__all__ = ('CaptureDataset', 'DTYPES', 'FORMAT', 'KINDS', 'MANIFEST', 'capture', 'merge_entries', 'open_capture',
           'shard_plan')
VAL_SEED_OFFSET = 1_000_000
DEV_SEED_OFFSET = 2_000_000
SPLITS = ('train', 'val', 'dev')
DTYPES = ('float32', 'float16')
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # fixed zip member timestamps: byte-identical .npz files


# ------------------------------------------------------------------------------ files
def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> dict[str, Any]:
  """Writes via `<dir>/.<name>.partial`, fsync, os.replace; returns {'bytes', 'sha256'}."""
  tmp = path.with_name(f'.{path.name}.partial')
  with open(tmp, 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return {'bytes': path.stat().st_size, 'sha256': sha256_file(path)}


def _npy(arr: np.ndarray) -> Callable[[BinaryIO], None]:
  return lambda f: np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _npz(arrays: Mapping[str, np.ndarray]) -> Callable[[BinaryIO], None]:
  """A deterministic .npz (sorted members, fixed timestamps, stored) that np.load reads."""
  def write(f: BinaryIO) -> None:
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
      for name in sorted(arrays):
        with zf.open(zipfile.ZipInfo(f'{name}.npy', date_time=_ZIP_TIME), 'w', force_zip64=True) as m:
          np.lib.format.write_array(m, np.ascontiguousarray(arrays[name]), allow_pickle=False)
  return write


def _write_json(path: Path, obj: Any) -> None:
  text = json.dumps(obj, indent=1, sort_keys=True) + '\n'
  _atomic_write(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------ plan and identity
def shard_plan(train_shards: int, val_shards: int, shard_size: int, seed: int,
               num_classes: int, dev_shards: int = 0) -> list[dict[str, Any]]:
  """Every shard: {'split', 'name', 'seed', 'labels'}; labels cycle over the classes (val offset by
  half the classes so a small validation set covers other classes than the first train shards, dev
  by a quarter)."""
  plan = []
  for split, count, seed0, offset in (('train', train_shards, seed, 0),
                                      ('val', val_shards, seed + VAL_SEED_OFFSET, num_classes // 2),
                                      ('dev', dev_shards, seed + DEV_SEED_OFFSET, num_classes // 4)):
    for i in range(count):
      labels = (i * shard_size + np.arange(shard_size) + offset) % num_classes
      plan.append({'split': split, 'name': f'{split}-{seed0 + i:07d}', 'seed': seed0 + i,
                   'labels': [int(x) for x in labels]})
  return plan


def _diff(old: Any, new: Any, prefix: str = '') -> list[str]:
  """Dotted names of the fields where two JSON values differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new))
            for d in _diff(old.get(k), new.get(k), f'{prefix}{k}.')]
  return [] if old == new else [f'{prefix[:-1]} ({old!r:.60} -> {new!r:.60})']


# ------------------------------------------------------------------------------ writer
def _shard_arrays(model: VARModel, labels: Sequence[int], seed: int, cfg: float, top_k: int,
                  top_p: float) -> tuple[Any, dict[str, np.ndarray]]:
  """Generates one shard: (per scale per layer (q, k, v), meta arrays per sequence)."""
  out = model.generate(labels, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p, return_qkv=True)
  tokens_BL = np.concatenate([np.asarray(t, np.int32) for t in out.tokens], axis=1)
  b = len(labels)
  meta = {'labels': np.asarray(list(labels) * 2, np.int32), 'seeds': np.full(2 * b, seed, np.int64),
          'half': np.repeat(np.arange(2, dtype=np.int8), b), 'tokens': np.concatenate([tokens_BL] * 2)}
  return out.qkv, meta


def _stack(qkv: Any, kind: int, dtype: str) -> np.ndarray:
  """(2B, N_layers, H, L, D): scales concatenated on the token axis, layers stacked on axis 1."""
  layers = [np.concatenate([np.asarray(scale[layer][kind]) for scale in qkv], axis=2)
            for layer in range(len(qkv[0]))]
  return np.stack(layers, axis=1).astype(dtype, copy=False)


def _manifest(model: VARModel, plan: list[dict[str, Any]], **args: Any) -> dict[str, Any]:
  """The manifest of a capture with no finished shard yet, as its JSON view."""
  vcfg = model.var.cfg
  return json.loads(json.dumps({
      'format': FORMAT,
      'model': {'var_config': json.loads(config_lib.to_json(vcfg)),
                'vqvae_config': json.loads(config_lib.to_json(model.vae.cfg)),
                'weights_sha256': weights_sha256(model), 'source': dict(args.pop('source') or {})},
      'sampling': {k: args.pop(k) for k in ('cfg', 'top_k', 'top_p')},
      'patch_nums': list(vcfg.patch_nums), 'num_layers': vcfg.depth, 'num_heads': vcfg.num_heads,
      'head_dim': vcfg.head_dim, 'num_tokens': vcfg.seq_len, 'q_prescaled': True, **args,
      'val_seed_offset': VAL_SEED_OFFSET,
      'layout': {'q|k|v': '(2B, N_layers, H, L, D)', 'rows': '0..B-1 conditional (half 0), B..2B-1 '
                 'unconditional (half 1, null class; labels = the image class)'},
      'splits': {s: [p['name'] for p in plan if p['split'] == s] for s in SPLITS
                 if s != 'dev' or args.get('dev_shards')},
      'shards': {}}))


def open_capture(model: VARModel, out_dir: str | os.PathLike, *, train_shards: int, val_shards: int,
                 shard_size: int, seed: int = 0, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                 dtype: str = 'float32', source: Mapping[str, Any] | None = None,
                 write: bool = True, dev_shards: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The manifest of the capture in `out_dir` (created if new: `write`; another capture's arguments
  are refused) with the finished shards of an interrupted multi-process capture folded in, and the
  shard plan. `write=False` only reads an existing manifest (a process of a multi-process capture)."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  if min(train_shards, val_shards, dev_shards) < 0 or shard_size < 1 or train_shards + val_shards < 1:
    raise ValueError(f'need train_shards, val_shards, dev_shards >= 0 (train and val not both 0) and '
                     f'shard_size >= 1; got {train_shards}, {val_shards}, {dev_shards}, {shard_size}')
  out, path = Path(out_dir), Path(out_dir) / MANIFEST
  plan = shard_plan(train_shards, val_shards, shard_size, seed, model.var.cfg.num_classes, dev_shards)
  dev = {'dev_shards': int(dev_shards)} if dev_shards else {}      # captures without dev keep their identity
  manifest = _manifest(model, plan, cfg=float(cfg), top_k=int(top_k), top_p=float(top_p), dtype=dtype,
                       shard_size=int(shard_size), seed=int(seed), train_shards=int(train_shards),
                       val_shards=int(val_shards), source=source, **dev)
  if path.is_file():
    old = json.loads(path.read_text())
    diffs = _diff(manifest_identity(old), manifest_identity(manifest))
    if diffs:
      raise ValueError(f'{out} holds a capture made with other arguments; differing: {"; ".join(diffs)}. '
                       'Use a new --out directory (earlier results are never deleted), or re-run with '
                       f'the arguments recorded in {path} to resume it')
    manifest['model']['source'], manifest['shards'] = old['model'].get('source', {}), old['shards']
  elif not write:
    raise FileNotFoundError(f'{path} is missing: the first process of a multi-process capture writes it '
                            'before the others start (open_capture)')
  elif out.exists() and any(out.iterdir()):
    raise ValueError(f'{out} is not empty and has no {MANIFEST}: choose a new --out directory')
  if write:
    out.mkdir(parents=True, exist_ok=True)
    merge_entries(out, manifest)
  return manifest, plan


def merge_entries(out_dir: str | os.PathLike, manifest: dict[str, Any] | None = None) -> None:
  """Folds the `<shard>.entry.json` files of a multi-process capture into the manifest (written)."""
  out = Path(out_dir)
  if manifest is None:
    manifest = json.loads((out / MANIFEST).read_text())
  entries = sorted(out.glob('*' + _ENTRY))
  for e in entries:
    manifest['shards'][e.name[:-len(_ENTRY)]] = json.loads(e.read_text())
  _write_json(out / MANIFEST, manifest)
  for e in entries:
    e.unlink()


_ENTRY = '.entry.json'


def capture(model: VARModel, out_dir: str | os.PathLike, *, train_shards: int, val_shards: int,
            shard_size: int, seed: int = 0, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
            dtype: str = 'float32', progress: bool = True,
            source: Mapping[str, Any] | None = None, part: tuple[int, int] = (0, 1),
            dev_shards: int = 0) -> str:
  """Captures `train_shards + val_shards + dev_shards` shards of `shard_size` images into `out_dir` (resumable).

  `source` (optional, informational: where the model came from) is stored in the manifest but not
  compared on re-runs; the model's configs and weights_sha256 are. Returns `out_dir`.
  `part=(i, P)`, P > 1: process i of P sharing `out_dir` captures the shards j with j % P == i and
  records each in `<shard>.entry.json` (the manifest, written beforehand by `open_capture` on one
  process, is only read); `merge_entries` folds them into the manifest once every process is done.
  """
  index, count = part
  if not 0 <= index < count:
    raise ValueError(f'part must be (index, count) with 0 <= index < count, got {part}')
  args = dict(train_shards=train_shards, val_shards=val_shards, shard_size=shard_size, seed=seed,
              cfg=cfg, top_k=top_k, top_p=top_p, dtype=dtype, source=source, dev_shards=dev_shards)
  manifest, plan = open_capture(model, out_dir, **args, write=count == 1)
  out, path = Path(out_dir), Path(out_dir) / MANIFEST

  from tqdm import tqdm
  todo = []
  for j, p in enumerate(plan):
    if j % count != index:
      continue
    entry = manifest['shards'].get(p['name'])
    if entry is None and (out / (p['name'] + _ENTRY)).is_file():
      entry = json.loads((out / (p['name'] + _ENTRY)).read_text())
    problems = [] if entry is None else [
        pr for n, f in entry['files'].items() if (pr := file_problem(out / f, entry, n, True))]
    if problems:
      print(f're-creating shard {p["name"]}: {"; ".join(problems)}')
    if entry is None or problems:
      todo.append(p)
  mine = sum(j % count == index for j in range(len(plan)))
  with tqdm(total=mine, initial=mine - len(todo), desc='capture', unit='shard',
            disable=not progress) as bar:
    for p in todo:
      qkv, meta = _shard_arrays(model, p['labels'], p['seed'], cfg, top_k, top_p)
      files = {n: f'{p["name"]}.{n}.npy' for n in KINDS} | {'meta': f'{p["name"]}.meta.npz'}
      written = {n: _atomic_write(out / files[n], _npy(_stack(qkv, i, dtype)))
                 for i, n in enumerate(KINDS)}
      written['meta'] = _atomic_write(out / files['meta'], _npz(meta))
      del qkv
      entry = {'split': p['split'], 'seed': p['seed'], 'labels': p['labels'], 'num_sequences': 2 * shard_size,
               'files': files, 'bytes': {n: w['bytes'] for n, w in written.items()},
               'sha256': {n: w['sha256'] for n, w in written.items()}}
      if count > 1:                 # the shard counts as finished only from here on
        _write_json(out / (p['name'] + _ENTRY), entry)
      else:
        manifest['shards'][p['name']] = entry
        _write_json(path, manifest)
      bar.update(1)
  return os.fspath(out_dir)


# ------------------------------------------------------------------------------ CLI
def define_flags(fv: Any = None) -> None:
  """Defines the CLI flags on `fv` (default absl's global FLAGS)."""
  from absl import flags
  fv = flags.FLAGS if fv is None else fv
  d = lambda f, *args: f(*args, flag_values=fv)
  d(flags.DEFINE_string, 'out', None, 'output directory (created; a re-run resumes it)')
  d(flags.DEFINE_enum, 'model', None, ['default'], 'default: the shipped built-in model')
  d(flags.DEFINE_string, 'var_ckpt', None, 'official var_d*.pth (with --vae_ckpt)')
  d(flags.DEFINE_string, 'vae_ckpt', None, 'official vae_ch160v4096z32.pth (with --var_ckpt)')
  d(flags.DEFINE_string, 'converted', None, 'a directory written by python -m var_jax.convert')
  d(flags.DEFINE_integer, 'train_shards', 8, 'training shards (seeds seed .. seed+n-1)')
  d(flags.DEFINE_integer, 'val_shards', 2, 'validation (test) shards (seeds seed+1e6 ..)')
  d(flags.DEFINE_integer, 'dev_shards', 1, 'dev shards for choosing settings (seeds seed+2e6 ..)')
  d(flags.DEFINE_integer, 'shard_size', 4, 'images per shard (one generate batch; 2x sequences)')
  d(flags.DEFINE_integer, 'seed', 0, 'first sampling seed')
  d(flags.DEFINE_float, 'cfg', 1.5, 'classifier-free guidance')
  d(flags.DEFINE_integer, 'top_k', 0, 'top-k (0: off)')
  d(flags.DEFINE_float, 'top_p', 0.0, 'top-p (0: off)')
  d(flags.DEFINE_enum, 'dtype', 'float32', list(DTYPES), 'stored dtype of q, k, v')
  d(flags.DEFINE_bool, 'progress', True, 'tqdm bar over shards')
  flags.mark_flag_as_required('out', flag_values=fv)


def load_model(fv: Any) -> tuple[VARModel, dict[str, Any]]:
  """The model the flags name, and a description of its source."""
  import var_jax
  given = [n for n in ('model', 'var_ckpt', 'vae_ckpt', 'converted') if getattr(fv, n)]
  if given == ['model']:
    return var_jax.load_default(), {'kind': 'default'}
  if sorted(given) == ['vae_ckpt', 'var_ckpt']:
    src = {'kind': 'official'} | {n: {'file': os.path.basename(p), 'bytes': os.path.getsize(p)}
                                  for n, p in (('var', fv.var_ckpt), ('vae', fv.vae_ckpt))}
    return var_jax.load_official(fv.var_ckpt, fv.vae_ckpt), src
  if given == ['converted']:
    return var_jax.load_converted(fv.converted), {'kind': 'converted',
                                                  'dir': os.path.basename(os.path.abspath(fv.converted))}
  raise ValueError(f'give exactly one model source: --model=default, --var_ckpt with --vae_ckpt, or '
                   f'--converted (got {["--" + g for g in given] or "none"})')


def main(argv: Sequence[str], fv: Any = None) -> str:
  """Runs the capture the (parsed) flags `fv` (default absl FLAGS) describe; returns --out."""
  from absl import flags
  fv = flags.FLAGS if fv is None else fv
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {list(argv[1:])}')
  model, source = load_model(fv)
  out = capture(model, fv.out, train_shards=fv.train_shards, val_shards=fv.val_shards,
                shard_size=fv.shard_size, seed=fv.seed, cfg=fv.cfg, top_k=fv.top_k, top_p=fv.top_p,
                dtype=fv.dtype, progress=fv.progress, source=source, dev_shards=fv.dev_shards)
  mib = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file()) / 2**20
  n_train, n_val, n_dev = (2 * fv.shard_size * k for k in (fv.train_shards, fv.val_shards, fv.dev_shards))
  print(f'wrote {out} ({mib:.1f} MiB): {n_train} train + {n_dev} dev + {n_val} val sequences of '
        f'{model.var.cfg.depth} layers x {model.var.cfg.num_heads} heads x {model.var.cfg.seq_len} '
        f'tokens x {model.var.cfg.head_dim}; read with var_jax.capture.CaptureDataset({out!r}, "train")')
  return out


if __name__ == '__main__':
  from var_jax import cli
  define_flags()
  cli.run(lambda argv: main(argv) and None)      # a user error: one `error:` line, exit 2
