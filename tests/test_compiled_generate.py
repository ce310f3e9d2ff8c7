"""Generation compiled ahead of time (var_jax/compiled_generate.py) against `sampling.generate`.

With XLA's default options the compiled programs are the sampler's own jitted steps, so tokens, logits
and images must be bit-identical to `sampling.generate` for the same labels and key, with the full cache
and with a compressor's policy (whose state changes shape between scales). Faults caught (checked by
breaking the code): a step called with another scale's guidance weight, keys split differently from
the sampler.
"""
import jax
import numpy as np
import pytest

import var_jax
from compress.core.budget import CacheGeometry
from compress.core.policy import CompressorPolicy
from compress.core.registry import make
from var_jax import sampling
from var_jax.compiled_generate import compile_decode, compile_generate, fast_early_scales


@pytest.fixture(scope='module')
def model():
  return var_jax.load_default()


@pytest.mark.parametrize('method', ['full', 'kivi'])
def test_compiled_generation_equals_the_sampler(model, method):
  cfg = model.var.cfg
  policy = None if method == 'full' else CompressorPolicy(
      make(method, CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '10%'))
  labels = [0, 3, 11]
  want = sampling.generate(model.var, model.vae, labels, key=jax.random.key(5), cfg=1.5, top_k=0, top_p=0.0,
                           policy=policy, capture_logits=True)
  gen = compile_generate(model.var, model.vae, policy, 3, top_k=0, top_p=0.0, capture_logits=True)
  got = gen(labels, jax.random.key(5), 1.5)
  for a, b in zip(want.tokens, got.tokens):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(want.logits, got.logits):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(want.images), np.asarray(got.images))


def test_fast_compiled_early_scales_keep_the_shapes_and_the_errors(model):
  opts = fast_early_scales(len(model.patch_nums), 3, {'xla_backend_optimization_level': 0})
  assert opts[:3] == [{'xla_backend_optimization_level': 0}] * 3 and opts[3:] == [None] * (len(opts) - 3)
  gen = compile_generate(model.var, model.vae, None, 2, top_k=0, top_p=0.0, options_per_scale=opts,
                         decode=compile_decode(model.vae, 2))
  out = gen([1, 2], jax.random.key(0), 1.5)
  assert out.images.shape == (2, 32, 32, 3) and out.logits is None
  assert [t.shape for t in out.tokens] == [(2, p * p) for p in model.patch_nums]
  with pytest.raises(ValueError, match='compiled for 2 labels, got 3'):
    gen([1, 2, 3], jax.random.key(0))
  with pytest.raises(ValueError, match='options_per_scale has 2 entries'):
    compile_generate(model.var, model.vae, None, 2, options_per_scale=[None, None])
