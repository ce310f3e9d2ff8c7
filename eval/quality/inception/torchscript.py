"""Safe reader of the tensors of a TorchScript archive (`torch.jit.save`), without torch and without
running any pickle or TorchScript code.

A TorchScript archive is a zip like a `torch.save` checkpoint (`<prefix>/data.pkl` + `<prefix>/data/<key>`
storages, see var_jax/torch_pickle.py) plus `<prefix>/code/` (the module's TorchScript source, never
read here). Its data.pkl builds the module tree: each submodule is an object of a `__torch__.<...>`
class (`NEWOBJ` then `BUILD` with its attribute dict), lists of ints are `torch.jit._pickle.build_intlist`.
This reader extends the project's restricted unpickler with exactly those two: every `__torch__.*` class
becomes an inert `ScriptObject` (a qualified name and an attribute dict, no methods run), `build_intlist`
becomes `list`; every other global outside torch_pickle's allow-list still raises `UnsafeCheckpointError`.
"""
from __future__ import annotations

import functools
import os
import re
import zipfile
from typing import Any

import numpy as np

from var_jax.torch_pickle import (CheckpointFormatError, UnsafeCheckpointError, _SafeUnpickler,
                                  archive_record)

__all__ = ['ScriptObject', 'load_torchscript', 'load_torchscript_tensors']

_QUALNAME = re.compile(r'^__torch__(\.[A-Za-z_][A-Za-z0-9_]*)+$')


class ScriptObject:
  """Stand-in for an object of a TorchScript class: `qualname` and `attrs` (its pickled state)."""
  qualname = ''

  def __init__(self, *args: Any) -> None:        # REDUCE of the class: nothing to do
    del args
    self.attrs: dict[str, Any] = {}

  def __setstate__(self, state: Any) -> None:   # BUILD: keep the state, never run it
    if not isinstance(state, dict):
      raise CheckpointFormatError(f'TorchScript object {self.qualname} has state {type(state).__name__}, '
                                  'expected an attribute dict')
    self.attrs = dict(state)

  def __repr__(self) -> str:
    return f'ScriptObject({self.qualname}, {sorted(self.attrs)})'


@functools.lru_cache(maxsize=None)
def _script_class(module: str, name: str) -> type:
  """One inert `ScriptObject` subclass per TorchScript class name."""
  return type(name, (ScriptObject,), {'qualname': f'{module}.{name}', '__module__': __name__})


def _build_intlist(items: Any) -> list[int]:
  """Stand-in for `torch.jit._pickle.build_intlist`."""
  if not isinstance(items, list) or not all(isinstance(i, int) for i in items):
    raise CheckpointFormatError(f'build_intlist of {type(items).__name__}, expected a list of ints')
  return list(items)


class _ScriptUnpickler(_SafeUnpickler):
  """torch_pickle's restricted unpickler plus inert `__torch__.*` classes and `build_intlist`."""

  def find_class(self, module: str, name: str) -> Any:
    if _QUALNAME.match(f'{module}.{name}'):
      return _script_class(module, name)
    if (module, name) == ('torch.jit._pickle', 'build_intlist'):
      return _build_intlist
    return super().find_class(module, name)


def load_torchscript(path: str | os.PathLike) -> Any:
  """The module tree of a TorchScript archive: `ScriptObject`s whose attrs hold numpy arrays (tensors),
  ints, lists and nested `ScriptObject`s. Raises `CheckpointFormatError` for a missing, damaged or
  non-TorchScript file and `UnsafeCheckpointError` for a global outside the allow-list."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointFormatError(f'TorchScript file {path!r} does not exist')
  if not zipfile.is_zipfile(path):
    raise CheckpointFormatError(f'{path!r} is not a zip archive ({os.path.getsize(path)} bytes): not a '
                                'TorchScript file (torch.jit.save), or truncated')
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointFormatError(f'{path!r} is a damaged zip archive ({e})') from e
  with zf:
    pkl, prefix, byteorder = archive_record(zf, path, 'TorchScript archive')
    if not any(n.startswith(f'{prefix}code/') for n in zf.namelist()):
      raise CheckpointFormatError(f'{path!r} has no {prefix}code/ folder: a torch.save checkpoint, not a '
                                  'TorchScript archive (read it with var_jax.torch_pickle)')
    try:
      with zf.open(pkl) as f:
        return _ScriptUnpickler(f, zf, prefix, byteorder, path).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
      raise
    except (Exception,) as e:  # pylint: disable=broad-except  (any other unpickling failure: damaged)
      raise CheckpointFormatError(f'{path!r}: cannot unpickle {pkl} ({type(e).__name__}: {e}); the '
                                  'file is damaged') from e


def flatten(obj: Any, prefix: str = '') -> dict[str, Any]:
  """`{dotted.path: value}` of every leaf of a `ScriptObject` tree (arrays, ints, lists, ...), in the
  pickled attribute order; the bookkeeping attributes `training` and `_is_full_backward_hook` dropped."""
  out: dict[str, Any] = {}
  if isinstance(obj, ScriptObject):
    for k, v in obj.attrs.items():
      if k not in ('training', '_is_full_backward_hook'):
        out.update(flatten(v, f'{prefix}{k}.'))
  else:
    out[prefix[:-1]] = obj
  return out


def load_torchscript_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """`{dotted.path: numpy array}` of every tensor of a TorchScript archive's module tree."""
  return {k: v for k, v in flatten(load_torchscript(path)).items() if isinstance(v, np.ndarray)}
