"""Reading a capture directory (var_jax/capture.py writes it): `CaptureDataset(path, split).get(indices)`
-> {'q', 'k', 'v'} float32 (N_layers, b, H, L, D), memory-mapped shard by shard, sha256-checked."""
from __future__ import annotations

import hashlib
import mmap
import os
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from var_jax.provenance import MANIFEST

FORMAT = 'var-kv-capture/1'
KINDS = ('q', 'k', 'v')
_DONTNEED = getattr(mmap, 'MADV_DONTNEED', None)


def map_npy(path: str | os.PathLike) -> tuple[np.ndarray, mmap.mmap]:
  """A read-only view of the .npy array at `path` over its memory map, and the map."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    offset = f.tell()
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  return np.ndarray(shape, dtype, buffer=mm, offset=offset, order='F' if fortran else 'C'), mm


def sha256_file(path: Path) -> str:
  sha = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      sha.update(block)
  return sha.hexdigest()


def file_problem(path: Path, entry: Mapping[str, Any], name: str, check_sha: bool) -> str | None:
  """Why the finished file `name` of a shard is unusable, or None if it is intact."""
  if not path.is_file():
    return f'{path} is missing'
  if path.stat().st_size != entry['bytes'][name]:
    return f'{path} has {path.stat().st_size} bytes, the manifest says {entry["bytes"][name]}'
  if check_sha and sha256_file(path) != entry['sha256'][name]:
    return f'{path} is corrupt (sha256 differs from the manifest)'
  return None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """The manifest of the capture directory `path` (its splits, shards, arguments), without opening a
  split's arrays."""
  mpath = Path(path) / MANIFEST
  if not mpath.is_file():
    raise FileNotFoundError(f'{mpath} not found: {path} is not a capture directory; create one with '
                            f'python -m var_jax.capture --out {path} --model=default (or --var_ckpt/'
                            '--vae_ckpt, --converted) first')
  return json.loads(mpath.read_text())


class CaptureDataset:
  """Memory-mapped reader of one split of a capture directory.

  `get(indices)` -> {'q', 'k', 'v'} float32 (N_layers, b, H, L, D) (q pre-scaled); per sequence
  `labels`, `seeds`, `halves` (0 conditional, 1 unconditional) (n,) and `tokens` (n, L) int32; sizes
  `num_sequences`, `patch_nums`, `num_layers`, `num_heads`, `head_dim`, `num_tokens`; `manifest`.
  With `verify` (default) a shard's files are checked against their sha256 the first time it is read.
  """

  MAX_OPEN: int = 64

  def __init__(self, path: str | os.PathLike, split: str = 'train', *, verify: bool = True):
    self.path, self.split, self.verify = Path(path), split, verify
    mpath = self.path / MANIFEST
    self.manifest = read_manifest(path)
    if self.manifest.get('format') != FORMAT:
      raise ValueError(f'{mpath} has format {self.manifest.get("format")!r}, expected {FORMAT!r}; '
                       'capture again into a new directory')
    if split not in self.manifest['splits']:
      raise ValueError(f'split must be one of {sorted(self.manifest["splits"])}, got {split!r}')
    names = self.manifest['splits'][split]
    unfinished = [n for n in names if n not in self.manifest['shards']]
    if unfinished:
      raise ValueError(f'{path} is an unfinished capture ({len(unfinished)} of {len(names)} {split} '
                       'shards missing): re-run the same python -m var_jax.capture command to finish it')
    if not names:
      raise ValueError(f'{path} has no {split} shards; capture with --{split}_shards >= 1')
    self._shards = [self.manifest['shards'][n] for n in names]
    for entry in self._shards:
      for n in entry['files']:
        self._check(entry, n, sha=(n == 'meta' and verify))
    metas = [np.load(self.path / e['files']['meta']) for e in self._shards]
    self.labels, self.seeds, self.halves, self.tokens = (
        np.concatenate([m[k] for m in metas]) for k in ('labels', 'seeds', 'half', 'tokens'))
    self._ends = np.cumsum([e['num_sequences'] for e in self._shards])
    m = self.manifest
    self.num_sequences = int(self._ends[-1])
    self.patch_nums: tuple[int, ...] = tuple(m['patch_nums'])
    self.num_layers, self.num_heads, self.head_dim, self.num_tokens = (
        int(m[k]) for k in ('num_layers', 'num_heads', 'head_dim', 'num_tokens'))
    self._open: dict[int, dict[str, np.ndarray]] = {}
    self._verified: set[int] = set()

  def _check(self, entry: Mapping[str, Any], name: str, sha: bool) -> None:
    f = self.path / entry['files'][name]
    problem = file_problem(f, entry, name, sha)
    if problem:
      raise (FileNotFoundError if not f.is_file() else ValueError)(
          f'{problem}: re-run the python -m var_jax.capture command that made {self.path} with the '
          'same arguments; it re-creates missing or corrupt shards')

  def __len__(self) -> int:
    return self.num_sequences

  def _arrays(self, s: int) -> dict[str, tuple[np.ndarray, mmap.mmap]]:
    """Shard s's arrays over their memory maps (sha256-checked on first use; at most MAX_OPEN shards
    kept open)."""
    if s not in self._open:
      entry = self._shards[s]
      for n in KINDS:
        self._check(entry, n, sha=self.verify and s not in self._verified)
      self._verified.add(s)
      if len(self._open) >= self.MAX_OPEN:   # each memory map holds a file descriptor
        del self._open[next(iter(self._open))]
      self._open[s] = {n: map_npy(self.path / entry['files'][n]) for n in KINDS}
    return self._open[s]

  def get(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """{'q', 'k', 'v'}: float32 (N_layers, b, H, L, D) for sequence `indices` (b of them, any order)."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    n = self.num_sequences
    if idx.size and (idx.min() < -n or idx.max() >= n):
      raise IndexError(f'indices must be in [-{n}, {n}) for the {n} {self.split} sequences, '
                       f'got min {idx.min()} max {idx.max()}')
    idx = idx % n if idx.size else idx
    shard = np.searchsorted(self._ends, idx, side='right')
    shape = (self.num_layers, idx.size, self.num_heads, self.num_tokens, self.head_dim)
    out = {k: np.empty(shape, np.float32) for k in KINDS}
    for s in np.unique(shard):
      pos = np.nonzero(shard == s)[0]
      local = idx[pos] - (self._ends[s - 1] if s else 0)
      order = np.argsort(local, kind='stable')   # sorted reads from the memory map
      for k, (arr, mm) in self._arrays(int(s)).items():
        out[k][:, pos[order]] = np.swapaxes(arr[local[order]], 0, 1)
        if _DONTNEED is not None:     # the copy is made: drop the mapped pages from this process's
          mm.madvise(_DONTNEED)       # memory (they stay in the page cache; re-read on the next use)
    return out
