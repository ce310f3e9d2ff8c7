"""The caches a learned compressor trains on: synthetic or a capture directory, its train split and its
held-out split (`data.eval_split`, 'dev' by default), and their provenance (train/compressor.py)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from compress.core.synthetic import var_like_qkv

PROVENANCE_FILE = 'provenance.json'   # {'model', 'capture'} fingerprints of the training caches
QKV = ('q', 'k', 'v')


class ArraySplit:
  """Caches held in memory, with the reader interface of `var_jax.capture.CaptureDataset`."""

  def __init__(self, qkv_NBHLD: dict[str, np.ndarray], patch_nums: tuple[int, ...]):
    self.qkv, self.patch_nums = qkv_NBHLD, tuple(patch_nums)
    self.num_layers, self.num_sequences, self.num_heads, _, self.head_dim = qkv_NBHLD['q'].shape

  def get(self, indices: Any) -> dict[str, np.ndarray]:
    """{'q', 'k', 'v'}: float32 (layers, len(indices), H, L, D)."""
    return {t: self.qkv[t][:, indices] for t in QKV}


def load_data(data: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(train, held-out) splits of the configured caches; each has `get(indices)` -> layer-major q, k, v.
  The held-out split is `data.eval_split` of a capture ('dev' by default: the trainer's checks choose
  nothing on the test split 'val', which only the final evaluation reads)."""
  if data.source == 'synthetic':
    n_train, n_val = int(data.num_train), int(data.num_val)
    q, k, v = var_like_qkv(jax.random.PRNGKey(data.seed), tuple(data.patch_nums), layers=data.layers,
                           batch=n_train + n_val, heads=data.heads, head_dim=data.head_dim)
    arrays = {t: np.array(x, np.float32) for t, x in zip(QKV, (q, k, v))}
    return (ArraySplit({t: x[:, :n_train] for t, x in arrays.items()}, data.patch_nums),
            ArraySplit({t: x[:, n_train:] for t, x in arrays.items()}, data.patch_nums))
  if data.source != 'capture':
    raise ValueError(f'unknown data.source {data.source!r}; use "capture" (with data.path) or "synthetic"')
  if not data.path:
    raise ValueError('data.source is "capture" but data.path is empty: pass --config.data.path=<a capture '
                     'directory written by python -m var_jax.capture --out DIR>')
  if not os.path.isfile(os.path.join(data.path, 'manifest.json')):
    raise FileNotFoundError(f'data.path {data.path!r} has no manifest.json: it is not a capture directory '
                            '(write one with python -m var_jax.capture --out DIR)')
  from var_jax.capture_data import CaptureDataset, read_manifest  # pylint: disable=g-import-not-at-top
  held = data.get('eval_split', 'dev')
  have = read_manifest(data.path).get('splits', {})
  for name in ('train', held):
    if not have.get(name):
      more = (' (the dev split holds the trainer\'s held-out checks; or pass --config.data.eval_split=val '
              'to check on the test split knowingly)' if name == 'dev' else '')
      raise ValueError(f'the capture {data.path!r} has no {name} sequences; capture with '
                       f'--{name}_shards >= 1 (python -m var_jax.capture){more}')
  return CaptureDataset(data.path, 'train'), CaptureDataset(data.path, held)


def data_provenance(data: ml_collections.ConfigDict) -> dict[str, str]:
  """What the caches come from: {'model': weights sha256, 'capture': capture fingerprint}
  (`var_jax.provenance.fingerprint`); synthetic caches: 'synthetic' and a hash of their config."""
  if data.source == 'synthetic':
    key = json.dumps({k: data[k] for k in sorted(data.keys()) if k != 'path'}, sort_keys=True, default=list)
    return {'model': 'synthetic', 'capture': 'synthetic-' + hashlib.sha256(key.encode()).hexdigest()}
  from var_jax.provenance import fingerprint  # pylint: disable=g-import-not-at-top
  return fingerprint(data.path)


def check_provenance(workdir: str, want: Mapping[str, str]) -> None:
  """Refuses a trained run whose `provenance.json` names another model or capture than `want`."""
  path = os.path.join(workdir, PROVENANCE_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{workdir!r} has no {PROVENANCE_FILE}: it was trained by an older version, so its '
                     'model and capture are unknown; retrain it (python -m train.compressor)')
  with open(path) as f:
    got = json.load(f)
  for what, fix in (('model', 'its parameters were fitted to another model\'s caches'),
                    ('capture', 'it was trained on other caches (the held-out split may overlap its data)')):
    if got.get(what) != want.get(what):
      raise ValueError(f'the compressor trained in {workdir!r} comes from another {what} (sha256 '
                       f'{str(got.get(what))[:16]}, expected {str(want.get(what))[:16]}): {fix}. Retrain it '
                       'on this capture (another --workdir, or delete that one)')


def split_shape(split: Any) -> tuple[tuple[int, ...], int, int, int]:
  """(patch_nums, layers, heads, head_dim) of a split."""
  return tuple(int(p) for p in split.patch_nums), split.num_layers, split.num_heads, split.head_dim


def data_shape(data: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int, int, int]:
  """(patch_nums, layers, heads, head_dim) of the configured caches, without generating or reading them."""
  if data.source == 'synthetic':
    return tuple(int(p) for p in data.patch_nums), int(data.layers), int(data.heads), int(data.head_dim)
  return split_shape(load_data(data)[0])          # a capture is memory-mapped: opening it reads no caches
