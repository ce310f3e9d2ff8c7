"""Provenance: what a model's weights and a capture directory are, as sha256 fingerprints.

`weights_sha256(model)` identifies a VAR + VQ-VAE by every variable; `fingerprint(capture_dir)` gives
{'model', 'capture'} for a capture written by `var_jax.capture` (its manifest records the weights'
sha256 and every shard's files). Trained compressors record these and refuse to be loaded for another.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

MANIFEST = 'manifest.json'


def weights_sha256(model: Any) -> str:
  """sha256 over every VAR and VQ-VAE variable (path, dtype, shape, bytes): the model's identity."""
  sha = hashlib.sha256()
  for prefix, module in (('var', model.var), ('vae', model.vae)):
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Not(nnx.RngState)))[0]
    for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
      arr = np.ascontiguousarray(np.asarray(leaf))
      sha.update(f'{prefix}{jax.tree_util.keystr(path)}:{arr.dtype.str}:{arr.shape};'.encode())
      sha.update(arr.tobytes())
  return sha.hexdigest()


def manifest_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
  """What a re-run must match: everything but the finished shards and the model's source."""
  ident = {k: v for k, v in manifest.items() if k != 'shards'}
  ident['model'] = {k: v for k, v in ident.get('model', {}).items() if k != 'source'}
  return ident


def fingerprint(path: str | os.PathLike) -> dict[str, str]:
  """Provenance of a capture directory: {'model': the weights' sha256, 'capture': sha256 of the
  capture's identity (arguments, model configs and weights) and of every finished shard's files}."""
  mpath = Path(path) / MANIFEST
  if not mpath.exists():
    raise FileNotFoundError(f'{mpath} not found: {path!r} is not a capture (python -m var_jax.capture)')
  m = json.loads(mpath.read_text())
  shards = {n: e['sha256'] for n, e in sorted(m['shards'].items())}
  body = json.dumps({'identity': manifest_identity(m), 'shards': shards}, sort_keys=True).encode()
  return {'model': m['model']['weights_sha256'], 'capture': hashlib.sha256(body).hexdigest()}
