"""Tests for the torch-free, code-free checkpoint reader `var_jax.torch_pickle`.

Expected tensors are decoded independently: the fixture's pickle is walked by a plain stdlib Unpickler
with fake torch globals that only record (storage key, offset, size, stride), and every element is then
read from the raw zip bytes with `struct`, one multi-index at a time. Synthetic checkpoints (fp16, bf16,
int64, offsets, strides, shared and big-endian storages) are written with a fake `torch` module.
"""
from __future__ import annotations

import collections
import io
import itertools
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from var_jax.torch_pickle import CheckpointFormatError, UnsafeCheckpointError, load_torch_state_dict

FIXTURE = Path(__file__).parent / 'data' / 'var_official_tiny'

# --------------------------------------------------------------------------- independent brute force

_STRUCT = {'FloatStorage': 'f', 'LongStorage': 'q', 'HalfStorage': 'e', 'DoubleStorage': 'd',
           'IntStorage': 'i'}


class _RecordingUnpickler(pickle.Unpickler):
  """Plain unpickler (trusted fixture only) whose torch globals just record their arguments."""

  def persistent_load(self, pid):
    return pid  # ('storage', storage_type_name, key, location, numel)

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return lambda storage, offset, size, stride, *rest: ('tensor', storage, offset, size, stride)
    if module == 'torch' and name.endswith('Storage'):
      return name
    raise AssertionError(f'unexpected global {module}.{name} in fixture')


def _brute_force_state_dict(path: Path) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as zf:
    pkl = next(n for n in zf.namelist() if n.endswith('/data.pkl'))
    prefix = pkl[:-len('data.pkl')]
    records = _RecordingUnpickler(io.BytesIO(zf.read(pkl))).load()
    out = {}
    for name, (_, (_, stype, key, _, _), offset, size, stride) in records.items():
      raw, fmt = zf.read(f'{prefix}data/{key}'), '<' + _STRUCT[stype]
      item = struct.calcsize(fmt)
      vals = [struct.unpack_from(fmt, raw, item * (offset + sum(i * s for i, s in zip(idx, stride))))[0]
              for idx in itertools.product(*map(range, size))]
      out[name] = np.array(vals).reshape(size)
  return out


@pytest.mark.parametrize('name', ['var.pth', 'vae.pth'])
def test_fixture_matches_brute_force_decoder(name):
  sd = load_torch_state_dict(FIXTURE / name)
  ref = _brute_force_state_dict(FIXTURE / name)
  assert list(sd) == list(ref)
  for k in ref:
    assert sd[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(sd[k], ref[k].astype(sd[k].dtype), err_msg=k)


def test_fixture_known_keys_and_shapes():
  var = load_torch_state_dict(FIXTURE / 'var.pth')
  assert var['blocks.0.attn.mat_qkv.weight'].shape == (384, 128)   # 3C x C, C = 128
  assert var['class_emb.weight'].shape == (11, 128)                 # num_classes + 1 (null class)
  assert var['head.weight'].shape == (64, 128)                      # V x C
  assert var['blocks.1.attn.scale_mul_1H11'].shape == (1, 2, 1, 1)
  assert var['lvl_1L'].dtype == np.int64 and var['pos_start'].dtype == np.float32
  np.testing.assert_array_equal(var['lvl_1L'][0], np.repeat(np.arange(4), [1, 4, 9, 16]))
  vae = load_torch_state_dict(FIXTURE / 'vae.pth')
  assert vae['encoder.conv_in.weight'].shape == (32, 3, 3, 3)
  assert vae['quantize.embedding.weight'].shape == (64, 8)


# --------------------------------------------------------------------------- synthetic torch-layout files


class _Tensor:
  """A tensor view of a storage, pickled exactly as torch pickles a tensor."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __reduce__(self):
    rebuild = sys.modules['torch._utils']._rebuild_tensor_v2
    return rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


class _StorageRef:
  def __init__(self, key, type_name, numel):
    self.key, self.type_name, self.numel = key, type_name, numel


@pytest.fixture
def fake_torch(monkeypatch):
  """Installs a fake `torch` so that stdlib pickle writes the same globals torch.save writes."""
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called')

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for n in ('FloatStorage', 'HalfStorage', 'BFloat16Storage', 'LongStorage'):
    setattr(torch, n, type(n, (), {'__module__': 'torch', '__qualname__': n}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return torch


def _write_checkpoint(path, obj, storages: dict[str, bytes], prefix='archive', byteorder='little'):
  torch = sys.modules['torch']

  class _Pickler(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, _StorageRef):
        return ('storage', getattr(torch, o.type_name), o.key, 'cpu', o.numel)
      return None

  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{prefix}/data.pkl', buf.getvalue())
    zf.writestr(f'{prefix}/byteorder', byteorder)
    for key, raw in storages.items():
      zf.writestr(f'{prefix}/data/{key}', raw)


def _strided_reference(flat, offset, size, stride):
  return np.array([flat[offset + sum(i * s for i, s in zip(idx, stride))]
                   for idx in itertools.product(*map(range, size))]).reshape(size)


@pytest.mark.parametrize('byteorder', ['little', 'big'])
def test_dtypes_offsets_strides_and_shared_storage(fake_torch, tmp_path, byteorder):
  del fake_torch
  end = '<' if byteorder == 'little' else '>'
  f32 = np.arange(24, dtype=np.float32) * 0.5 - 3
  f16 = (np.arange(10) / 4).astype(np.float16)
  i64 = np.arange(-6, 6, dtype=np.int64) * 10**12
  bf16_vals = np.array([1.0, -2.5, 0.375, 1024.0, -0.0078125, 3.0], np.float32)  # exact in bf16
  bf16_bits = (bf16_vals.view(np.uint32) >> 16).astype(np.uint16)          # bf16 = top 16 bits of f32
  s_f32, s_f16 = _StorageRef('0', 'FloatStorage', 24), _StorageRef('1', 'HalfStorage', 10)
  s_i64, s_bf = _StorageRef('2', 'LongStorage', 12), _StorageRef('3', 'BFloat16Storage', 6)
  sd = collections.OrderedDict([
      ('full', _Tensor(s_f32, 0, (4, 6), (6, 1))),
      ('transposed', _Tensor(s_f32, 0, (6, 4), (1, 6))),
      ('offset_slice', _Tensor(s_f32, 5, (3, 2), (7, 2))),
      ('half', _Tensor(s_f16, 2, (2, 4), (4, 1))),
      ('long', _Tensor(s_i64, 0, (12,), (1,))),
      ('bf16', _Tensor(s_bf, 0, (2, 3), (3, 1))),
      ('scalar', _Tensor(s_f32, 7, (), ())),
      ('empty', _Tensor(s_f32, 0, (0, 3), (3, 1))),
  ])
  path = tmp_path / 'synthetic.pth'
  _write_checkpoint(path, sd, {
      '0': f32.astype(end + 'f4').tobytes(), '1': f16.astype(end + 'f2').tobytes(),
      '2': i64.astype(end + 'i8').tobytes(), '3': bf16_bits.astype(end + 'u2').tobytes()},
      byteorder=byteorder)

  out = load_torch_state_dict(path)
  assert list(out) == list(sd)
  for name, t in sd.items():
    flat = {'0': f32, '1': f16, '2': i64, '3': bf16_vals}[t.storage.key]
    np.testing.assert_array_equal(out[name].astype(flat.dtype),
                                  _strided_reference(flat, t.offset, t.size, t.stride), err_msg=name)
  assert out['half'].dtype == np.float16 and out['long'].dtype == np.int64
  assert out['bf16'].dtype == ml_dtypes.bfloat16 and out['empty'].shape == (0, 3)
  # tensors sharing a storage do not alias each other
  out['full'][0, 0] = 99.0
  assert out['transposed'][0, 0] == f32[0]


def test_out_of_bounds_geometry_is_refused(fake_torch, tmp_path):
  del fake_torch
  s = _StorageRef('0', 'FloatStorage', 4)
  path = tmp_path / 'oob.pth'
  _write_checkpoint(path, {'w': _Tensor(s, 2, (2, 2), (2, 1))}, {'0': np.zeros(4, np.float32).tobytes()})
  with pytest.raises(CheckpointFormatError, match='reads element 5 but the storage has 4'):
    load_torch_state_dict(path)


def test_wrapped_state_dicts(fake_torch, tmp_path):
  del fake_torch
  s = _StorageRef('0', 'FloatStorage', 3)
  storages = {'0': np.array([1, 2, 3], np.float32).tobytes()}
  weights = collections.OrderedDict(w=_Tensor(s, 0, (3,), (1,)))
  _write_checkpoint(tmp_path / 'one.pth', {'model': weights, 'epoch': 7, 'note': 'x'}, storages)
  np.testing.assert_array_equal(load_torch_state_dict(tmp_path / 'one.pth')['w'], [1, 2, 3])

  _write_checkpoint(tmp_path / 'two.pth', {'model': weights, 'ema': weights, 'epoch': 7}, storages)
  with pytest.raises(CheckpointFormatError, match=r"\['ema', 'epoch', 'model'\].*pass key="):
    load_torch_state_dict(tmp_path / 'two.pth')
  np.testing.assert_array_equal(load_torch_state_dict(tmp_path / 'two.pth', key='ema')['w'], [1, 2, 3])

  _write_checkpoint(tmp_path / 'none.pth', {'epoch': 7}, {})
  with pytest.raises(CheckpointFormatError, match=r"top-level keys \['epoch'\].*none is a state dict"):
    load_torch_state_dict(tmp_path / 'none.pth')


# --------------------------------------------------------------------------- malicious and broken files


class _Exploit:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return os.system, (self.cmd,)


def _write_raw_pickle_zip(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
    zf.writestr('archive/byteorder', 'little')
    zf.writestr('archive/version', '3\n')


def test_payload_is_live_under_plain_pickle(tmp_path):
  """Control: the payload really runs code with an unrestricted unpickler (so the next test means something)."""
  marker = tmp_path / 'control'
  pickle.loads(pickle.dumps(_Exploit(f'echo pwned > {marker}'), protocol=2))
  assert marker.exists()


@pytest.mark.parametrize('wrap', ['top_level', 'inside_state_dict'])
def test_malicious_checkpoint_is_refused_without_side_effect(tmp_path, wrap):
  marker = tmp_path / 'pwned'
  exploit = _Exploit(f'echo pwned > {marker}')
  obj = exploit if wrap == 'top_level' else collections.OrderedDict(w=exploit)
  path = tmp_path / 'evil.pth'
  _write_raw_pickle_zip(path, pickle.dumps(obj, protocol=2))
  with pytest.raises(UnsafeCheckpointError, match=rf'refusing to load global {os.system.__module__}\.system'):
    load_torch_state_dict(path)
  assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
  path = tmp_path / 'eval.pth'
  _write_raw_pickle_zip(path, b'\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x00\x85R.')
  with pytest.raises(UnsafeCheckpointError, match=r'builtins\.eval'):
    load_torch_state_dict(path)


def test_missing_file():
  with pytest.raises(CheckpointFormatError, match=r'nope\.pth.*does not exist.*var_d16\.pth'):
    load_torch_state_dict(Path('nope.pth'))


def test_not_a_zip(tmp_path):
  path = tmp_path / 'text.pth'
  path.write_text('hello')
  with pytest.raises(CheckpointFormatError, match='is not a zip archive'):
    load_torch_state_dict(path)
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2) + b'rest')
  with pytest.raises(CheckpointFormatError, match='legacy torch<1.6'):
    load_torch_state_dict(legacy)


def test_truncated_file(tmp_path):
  raw = (FIXTURE / 'var.pth').read_bytes()
  path = tmp_path / 'truncated.pth'
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(CheckpointFormatError, match='truncated/corrupt'):
    load_torch_state_dict(path)


def test_corrupted_storage_bytes(tmp_path):
  raw = bytearray((FIXTURE / 'var.pth').read_bytes())
  with zipfile.ZipFile(FIXTURE / 'var.pth') as zf:
    info = max(zf.infolist(), key=lambda i: i.file_size)
  name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
  raw[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
  path = tmp_path / 'corrupt.pth'
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointFormatError, match='Bad CRC-32'):
    load_torch_state_dict(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / 'other.zip'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('readme.txt', 'hi')
  with pytest.raises(CheckpointFormatError, match='not a torch checkpoint'):
    load_torch_state_dict(path)
