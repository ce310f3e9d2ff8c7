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
  policy = CompressorPolicy(compress.make('snapkv', g, compress.Budget(g.full_bits)))
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


def test_policy_for_another_schedule_is_refused_at_generation(model):
  """A geometry built for other patch_nums would hold budgets relative to another cache."""
  d = model.var.cfg.head_dim
  other = tuple(model.patch_nums[:-1])
  bad = CompressorPolicy(compress.make('window', CacheGeometry(other, d), '30%'))
  with pytest.raises(ValueError) as e:
    model.generate([0], seed=0, policy=bad)
  msg = str(e.value)
  assert str(tuple(model.patch_nums)) in msg and str(other) in msg, msg
  assert 'CacheGeometry(model.patch_nums, head_dim)' in msg, msg


def test_policy_init_checks_the_schedule_it_is_given():
  g = CacheGeometry((1, 2, 3), head_dim=8)
  policy = CompressorPolicy(compress.make('window', g, '50%'))
  state = policy.init(2, 3, 8, 4, patch_nums=[1, 2, 3])       # the same schedule, as a list
  assert len(state) == 4
  with pytest.raises(ValueError, match=r'patch_nums \(1, 2, 3, 4\) .* patch_nums \(1, 2, 3\)'):
    policy.init(2, 3, 8, 4, patch_nums=(1, 2, 3, 4))
  with pytest.raises(ValueError, match='head_dim 16'):
    policy.init(2, 3, 16, 4, patch_nums=(1, 2, 3))


def test_second_policy_of_the_same_compressor_compiles_nothing(model):
  """Params are traced arguments of the sampling steps: a new policy object with other params reuses
  the compiled steps, and still uses ITS params (the outputs are those of a fresh compile)."""
  from var_jax import sampling
  g = geometry(model, 'float16')
  comp = compress.make('pca', g, '25%')
  out = model.generate([1, 2], seed=0, cfg=1.5, top_k=1, top_p=0, return_qkv=True)
  k = np.stack([np.concatenate([np.asarray(s[layer][1]) for s in out.qkv], axis=2)
                for layer in range(model.var.cfg.depth)])
  v = np.stack([np.concatenate([np.asarray(s[layer][2]) for s in out.qkv], axis=2)
                for layer in range(model.var.cfg.depth)])
  n, h = model.var.cfg.depth, model.var.cfg.num_heads
  p1 = comp.init_params(jax.random.key(0), n, h, calibration={'k': k, 'v': v})
  p2 = comp.init_params(jax.random.key(0), n, h, calibration={'k': k[:, ::-1] * 0.5, 'v': v * -1.0})
  a, b = CompressorPolicy(comp, p1), CompressorPolicy(comp, p2)
  assert a == b and hash(a) == hash(b)                    # by value: the compressor and its settings
  gen = lambda policy: model.generate([1, 2], seed=0, cfg=1.5, top_k=1, top_p=0, policy=policy)
  first = gen(a)
  sizes = (sampling._scale_step._cache_size(), sampling._start._cache_size())
  second = gen(b)
  assert (sampling._scale_step._cache_size(), sampling._start._cache_size()) == sizes
  jax.clear_caches()
  fresh = gen(CompressorPolicy(comp, p2))                  # compiled anew with p2 only
  np.testing.assert_array_equal(np.asarray(second.images), np.asarray(fresh.images))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(first.tokens + [first.images], second.tokens + [second.images]))


def test_composed_generation_with_a_layout_per_scale(model):
  """composed's state changes shape by scale (exact, then codes: compress/composed/schedule.py); the
  sampler's per-scale steps carry it, and the final state is the last stage's, within the budget."""
  g = geometry(model, 'float16')
  cfg = model.var.cfg
  comp = compress.make('composed', g, '30%')
  assert [s.mode for s in comp.stages()] == ['exact', 'coded', 'coded']
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(0), g.patch_nums, layers=cfg.depth, batch=2,
                                            heads=cfg.num_heads, head_dim=g.head_dim)
  params = comp.init_params(jax.random.key(0), cfg.depth, cfg.num_heads, calibration={'q': q, 'k': k, 'v': v})
  policy = CompressorPolicy(comp, params)
  out = model.generate([1, 2], seed=0, cfg=1.5, top_k=1, top_p=0, policy=policy, return_cache=True)
  bits = np.asarray(policy.bits(out.cache))          # (layers, 2B, H)
  assert np.all(bits == comp.stages()[-1].bits()) and bits.max() <= comp.budget.bits
  assert np.isfinite(np.asarray(out.images)).all()
