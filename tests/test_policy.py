"""Compressors in closed loop: `CompressorPolicy` inside the model's sampling loop."""
import json
import pathlib

import jax
import numpy as np
import pytest

import compress
from compress.core.budget import CacheGeometry
from compress.core.policy import CompressorPolicy
import var_jax

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'


@pytest.fixture(scope='module')
def model():
  ref = np.load(FIX / 'reference.npz')
  cfg = json.loads(str(ref['config']))
  return var_jax.load_official(FIX / 'var.pth', FIX / 'vae.pth', patch_nums=tuple(cfg['patch_nums']))


def geometry(model, dtype='float32'):
  return CacheGeometry(model.patch_nums, model.var.cfg.head_dim, kv_dtype=dtype)


def test_full_budget_policy_reproduces_full_cache_generation(model):
  labels = [3, 7]
  ref = model.generate(labels, seed=0, cfg=1.5, top_k=1, top_p=0)
  g = geometry(model)              # float32 cache: its full size is twice the fp16 yardstick
  policy = CompressorPolicy(compress.make('snapkv', g, g.full_bits))
  out = model.generate(labels, seed=0, cfg=1.5, top_k=1, top_p=0, policy=policy)
  for a, b in zip(out.tokens, ref.tokens):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(out.images, ref.images, atol=1e-5)


@pytest.mark.parametrize('name', ['window', 'kivi', 'tome'])
def test_compressed_generation_holds_the_budget(model, name):
  comp = compress.make(name, geometry(model, 'float16'), '30%')
  policy = CompressorPolicy(comp)
  out = model.generate([1, 2], seed=0, cfg=1.5, top_k=1, top_p=0, policy=policy, return_cache=True)
  bits = np.asarray(policy.bits(out.cache))          # (layers, 2B, H)
  assert bits.shape == (2, 4, 2)
  assert bits.max() <= comp.budget.bits
  assert np.isfinite(np.asarray(out.images)).all()
  # fewer than all tokens of the prefix fit, so the compressor really compressed
  assert comp.budget.bits < comp.geometry.full_bits


def test_oracle_and_uncalibrated_policies_are_refused(model):
  g = geometry(model)
  with pytest.raises(ValueError, match='oracle'):
    CompressorPolicy(compress.make('oracle', g, '30%'))
  with pytest.raises(ValueError, match='calibrat'):
    CompressorPolicy(compress.make('pca', g, '30%'))
  bad = CompressorPolicy(compress.make('window', CacheGeometry(model.patch_nums, 32), '30%'))
  with pytest.raises(ValueError, match='head_dim'):
    model.generate([0], seed=0, policy=bad)
