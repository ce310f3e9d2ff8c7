"""Full-cache reference outputs of the held-out sequences, computed once per run and kept on disk.

Every sweep point compares a compressor's attention outputs with the same float32 full-cache outputs.
Computing them inside each point's program costs as much as a cheap compressor itself (at d16, ~2.7 s
of a 4-8 s batch of 4 sequences), so the sweep computes them once per batch of sequences and keeps
them here, as float32 .npy files (layers, b, H, L, D), read back whole per batch (no memory map: the
process's memory does not grow with the number of held-out sequences; the disk does, by
4 x layers x H x L x D bytes per sequence).

A `manifest.json` names the capture (its fingerprint) the files belong to; a store whose capture
differs is emptied before use, so a re-captured run never reads stale references.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import numpy as np


class ExactStore:
  """`get(a, b, compute)` -> float32 (layers, b - a, H, L, D) of sequences [a, b), computed once."""

  def __init__(self, directory: str, identity: dict[str, Any]):
    self.directory = directory
    self.identity = json.loads(json.dumps(identity))          # what a manifest reads back as
    manifest = os.path.join(directory, 'manifest.json')
    if os.path.isdir(directory):
      try:
        with open(manifest) as f:
          same = json.load(f) == self.identity
      except (OSError, ValueError):
        same = False
      if not same:                                           # another capture's (or a broken) store
        shutil.rmtree(directory)
    if not os.path.isdir(directory):
      os.makedirs(directory)
      _write_atomic(manifest, lambda f: f.write(json.dumps(self.identity, indent=1).encode()))

  def path(self, a: int, b: int) -> str:
    return os.path.join(self.directory, f'{a:07d}-{b:07d}.npy')

  def get(self, a: int, b: int, compute: Callable[[], Any]) -> np.ndarray:
    p = self.path(a, b)
    if os.path.exists(p):
      try:
        return np.load(p)
      except (OSError, ValueError, EOFError):                 # a torn or corrupt file: recompute it
        os.remove(p)
    out = np.asarray(compute(), np.float32)
    _write_atomic(p, lambda f: np.save(f, out))
    return out


def for_run(workdir: str, capture_dir: str, num_sequences: int, split: str = 'val') -> ExactStore:
  """The store of a frontier run: `WORKDIR/exact` (the dev split's: `WORKDIR/exact_dev`), for the first
  `num_sequences` sequences of `split` of the capture in `capture_dir` (named by its fingerprint)."""
  from var_jax.provenance import fingerprint  # pylint: disable=g-import-not-at-top
  identity = {**fingerprint(capture_dir), 'sequences': int(num_sequences)}
  if split == 'val':
    return ExactStore(os.path.join(workdir, 'exact'), identity)
  return ExactStore(os.path.join(workdir, f'exact_{split}'), {**identity, 'split': split})


def _write_atomic(path: str, write: Callable[[Any], None]) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)
