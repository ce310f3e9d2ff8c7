"""The reference-facing API (`var_jax.load_official`) against the official outputs of the tiny model."""
import json
import pathlib

import numpy as np
import pytest

import var_jax

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'


@pytest.fixture(scope='module')
def ref():
  return np.load(FIX / 'reference.npz')


@pytest.fixture(scope='module')
def model(ref):
  cfg = json.loads(str(ref['config']))
  return var_jax.load_official(FIX / 'var.pth', FIX / 'vae.pth', patch_nums=tuple(cfg['patch_nums']))


def nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def rel(a, b):
  return np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)


def test_encode_teacher_force_decode(model, ref):
  idx = model.img_to_idx(nhwc(ref['in/image']))
  for i, x in enumerate(idx):
    np.testing.assert_array_equal(np.asarray(x), ref[f'out/idx_scale{i}'])
  var_input = model.idx_to_var_input(idx)
  assert rel(var_input, ref['out/var_input']) < 1e-5
  logits = model.logits(ref['in/labels'], var_input)
  assert rel(logits, ref['out/teacher_forced_logits']) < 1e-5
  assert rel(model.decode_idx(idx), nhwc(ref['out/reconstruction'])) < 1e-5


def test_greedy_generation_tokens_images_and_cache(model, ref):
  cfg = json.loads(str(ref['config']))
  out = model.generate(ref['in/labels'], seed=cfg['seed'], cfg=cfg['cfg'], top_k=cfg['top_k'],
                       top_p=cfg['top_p'], return_cache=True)
  for i, t in enumerate(out.tokens):
    np.testing.assert_array_equal(np.asarray(t), ref[f'out/greedy_idx_scale{i}'])
  assert out.images.shape == (2, 64, 64, 3)
  assert rel(out.images, nhwc(ref['out/greedy_image'])) < 1e-5
  assert len(out.cache) == cfg['depth']
  for b, layer in enumerate(out.cache):
    for name in 'kv':
      want = ref[f'out/kv_cache/block{b}/{name}']
      assert layer[name].shape == want.shape
      assert rel(layer[name], want) < 1e-5


def test_clear_errors_for_wrong_shapes(model):
  with pytest.raises(ValueError, match='NHWC'):
    model.img_to_idx(np.zeros((1, 3, 64, 64), np.float32))
  with pytest.raises(ValueError, match='pn\\*pn'):
    model.decode_idx([np.zeros((1, 1), np.int32)])
  with pytest.raises(ValueError, match='var_input'):
    model.logits([0], np.zeros((1, 5, 8), np.float32))


def test_missing_checkpoint_names_the_file(tmp_path):
  with pytest.raises(Exception, match='missing.pth'):
    var_jax.load_official(tmp_path / 'missing.pth', FIX / 'vae.pth')
