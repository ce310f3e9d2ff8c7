"""Safe reader for `torch.save` checkpoints (zip + pickle) that needs neither torch nor trust.

A torch checkpoint is a zip archive `<prefix>/data.pkl` + `<prefix>/data/<key>` (one raw storage per
key). Unpickling normally imports and calls whatever globals the pickle names, i.e. runs arbitrary code.
Here a restricted `pickle.Unpickler` maps the handful of globals a state dict needs (tensor rebuild
functions, typed storage classes, `collections.OrderedDict`) to local stand-ins and raises
`UnsafeCheckpointError` for every other global, before anything is called.

Tensors come back as numpy arrays with their stored dtype; bfloat16 stays bfloat16 (`ml_dtypes.bfloat16`,
no silent widening; cast with `.astype(np.float32)` where needed). Each storage is read from the zip
exactly once, into a fresh buffer; a tensor that covers its whole storage contiguously is a view of that
buffer (no second copy), anything else (offset, sub-range, strides, shared storage) is copied out.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ['CheckpointFormatError', 'UnsafeCheckpointError', 'load_torch_pickle', 'load_torch_state_dict']

# Legacy (torch < 1.6 / `_use_new_zipfile_serialization=False`) files start with a pickled magic number.
_LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)

_CHUNK_BYTES = 64 << 20
_STORAGE_DTYPES: dict[str, np.dtype] = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'ComplexFloatStorage': np.dtype(np.complex64),
    'ComplexDoubleStorage': np.dtype(np.complex128),
    'UntypedStorage': np.dtype(np.uint8),  # raw bytes (torch >= 2 saves bare storages this way)
}


class CheckpointFormatError(ValueError):
  """The file is missing, not a torch zip checkpoint, damaged, or not a state dict."""


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle names a global outside the allow-list (it would run code if loaded with torch.load)."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for `torch.<X>Storage` classes: only remembers the element dtype."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A storage read from the zip: a flat array of `numel` elements."""
  key: str
  data_N: np.ndarray
  handed_out: bool = False


def _rebuild_tensor_v2(storage: _Storage, storage_offset: int, size: tuple[int, ...],
                       stride: tuple[int, ...], requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
  """Stand-in for `torch._utils._rebuild_tensor_v2`: a strided view of the storage, validated."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'tensor rebuilt from {type(storage).__name__}, expected a zip storage record')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset, flat = int(storage_offset), storage.data_N
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or offset < 0:
    raise CheckpointFormatError(
        f'storage {storage.key}: invalid tensor geometry offset={offset} size={size} stride={stride}')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointFormatError(
        f'storage {storage.key}: tensor (offset={offset}, size={size}, stride={stride}) reads element '
        f'{last} but the storage has {flat.size}; the checkpoint is damaged')
  numel = int(np.prod(size))
  contiguous = all(st == int(np.prod(size[i + 1:])) for i, st in enumerate(stride) if size[i] > 1)
  if contiguous and offset == 0 and numel == flat.size and not storage.handed_out:
    storage.handed_out = True
    return flat.reshape(size)
  item = flat.itemsize
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None,
                       *unused: Any) -> np.ndarray:
  """Stand-in for `torch._utils._rebuild_parameter`: a Parameter is just its data here."""
  del requires_grad, backward_hooks, unused
  return data


def _codecs_encode(text: str, encoding: str = 'utf-8', errors: str = 'strict') -> bytes:
  """Stand-in for `_codecs.encode`, which protocol-2 pickles use to store `bytes` (latin-1 only)."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise UnsafeCheckpointError(f'refusing _codecs.encode with encoding {encoding!r}')
  return text.encode('latin1', errors)


_ALLOWED: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('_codecs', 'encode'): _codecs_encode,
    **{('torch', n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
    ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', _STORAGE_DTYPES['UntypedStorage']),
}


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only allow-listed globals and reads storages from the zip on demand."""

  def __init__(self, file: Any, zf: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self._zf, self._prefix, self._byteorder, self._path = zf, prefix, byteorder, path
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f'{self._path}: refusing to load global {module}.{name}: a state dict only needs tensor '
          'rebuild functions, torch storage types and collections.OrderedDict. If you trust this file, '
          'load it with torch and re-save just the state dict (torch.save(model.state_dict(), path)).'
      ) from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise CheckpointFormatError(f'{self._path}: unexpected persistent id {pid!r:.200}')
    _, stype, key, _location, numel = pid
    if not isinstance(stype, _StorageType):
      raise CheckpointFormatError(f'{self._path}: storage {key!r} has type {stype!r:.100}, not a torch storage')
    key = str(key)
    if key not in self._storages:
      self._storages[key] = _Storage(key, self._read_storage(key, stype.dtype, int(numel)))
    return self._storages[key]

  def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f'{self._prefix}data/{key}'
    try:
      info = self._zf.getinfo(name)
    except KeyError:
      raise CheckpointFormatError(f'{self._path}: storage record {name!r} is missing from the zip') from None
    nbytes = numel * dtype.itemsize
    if info.file_size < nbytes:
      raise CheckpointFormatError(
          f'{self._path}: storage {name!r} has {info.file_size} bytes, expected {nbytes} '
          f'({numel} x {dtype}); the checkpoint is truncated or damaged')
    buf = np.empty(nbytes, np.uint8)
    view, got = memoryview(buf), 0
    try:
      with self._zf.open(info) as f:  # chunked, so a multi-GB storage is never held twice
        while got < nbytes:
          n = f.readinto(view[got:got + _CHUNK_BYTES])
          if not n:
            break
          got += n
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise CheckpointFormatError(f'{self._path}: cannot read storage {name!r} ({e}); the file is damaged') from e
    if got != nbytes:
      raise CheckpointFormatError(f'{self._path}: storage {name!r} ended after {got} of {nbytes} bytes')
    data = buf.view(dtype)
    if self._byteorder != sys.byteorder:
      data.byteswap(inplace=True)
    return data


def archive_record(zf: zipfile.ZipFile, path: str, what: str) -> tuple[str, str, str]:
  """(data.pkl member, its folder prefix 'name/', byteorder 'little' | 'big') of a torch zip archive
  (torch.save or torch.jit.save); `what` names the expected kind in the error. Raises
  `CheckpointFormatError` without exactly one <prefix>/data.pkl or with an unknown byteorder record."""
  names = zf.namelist()
  pkls = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pkls) != 1:
    raise CheckpointFormatError(
        f'{path!r} is a zip but not a {what}: expected exactly one <prefix>/data.pkl, found {pkls}')
  prefix = pkls[0][:-len('data.pkl')]
  byteorder = 'little'
  if f'{prefix}byteorder' in names:
    byteorder = zf.read(f'{prefix}byteorder').decode().strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointFormatError(f'{path!r}: unknown byteorder record {byteorder!r}')
  return pkls[0], prefix, byteorder


def load_torch_pickle(path: str | os.PathLike) -> Any:
  """Loads any `torch.save` zip checkpoint made of tensors, dicts, lists and plain Python values.

  Tensors become numpy arrays. Raises `UnsafeCheckpointError` if the pickle names any other global and
  `CheckpointFormatError` if the file is missing, not a zip checkpoint, or damaged.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFormatError(
        f'checkpoint {path!r} does not exist; expected a torch.save file such as the official '
        'var_d16.pth / vae_ch160v4096z32.pth (download them from the FoundationVision/VAR release)')
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
      raise CheckpointFormatError(
          f'{path!r} uses the legacy torch<1.6 (non-zip) format; re-save it with a recent torch: '
          'torch.save(torch.load(p), p2)')
    raise CheckpointFormatError(
        f'{path!r} is not a zip archive ({os.path.getsize(path)} bytes): not a torch.save checkpoint, '
        'or truncated/corrupt (re-download it)')
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointFormatError(f'{path!r} is a damaged zip archive ({e}); re-download it') from e
  with zf:
    pkl, prefix, byteorder = archive_record(zf, path, 'torch checkpoint')
    try:
      with zf.open(pkl) as f:
        return _SafeUnpickler(f, zf, prefix, byteorder, path).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, AttributeError) as e:
      raise CheckpointFormatError(f'{path!r}: cannot unpickle data.pkl ({type(e).__name__}: {e}); '
                                  'the file is damaged or not a state dict') from e


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
          and all(isinstance(v, np.ndarray) for v in obj.values()))


def load_torch_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, np.ndarray]:
  """Loads a torch state dict as `{name: numpy array}` without torch and without running pickle code.

  A top-level dict that wraps exactly one state dict (e.g. `{'model': sd, 'epoch': 3}`) is unwrapped;
  when it wraps several (e.g. `'model'` and `'ema'`), pass `key` to pick one. bfloat16 tensors are
  returned as `ml_dtypes.bfloat16` arrays (not widened).
  """
  obj = load_torch_pickle(path)
  where = repr(os.fspath(path))
  if key is not None:
    if not isinstance(obj, dict) or key not in obj:
      top = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
      raise CheckpointFormatError(f'{where} has no top-level key {key!r} (top level: {top})')
    obj = obj[key]
    if not _is_state_dict(obj):
      raise CheckpointFormatError(f'{where}[{key!r}] is not a dict of tensors')
  if _is_state_dict(obj):
    return dict(obj)
  if isinstance(obj, dict):
    inner = sorted(str(k) for k, v in obj.items() if _is_state_dict(v))
    if len(inner) == 1:
      return dict(obj[inner[0]])
    top = sorted(map(str, obj))
    raise CheckpointFormatError(
        f'{where} holds a dict with top-level keys {top[:30]}' + (' ...' if len(top) > 30 else '') + '; '
        + (f'several are state dicts ({inner}): pass key=... to pick one' if inner else
           'none is a state dict of tensors: save the weights alone with torch.save(model.state_dict(), p)'))
  raise CheckpointFormatError(f'{where} holds a {type(obj).__name__}, not a state dict of tensors')
