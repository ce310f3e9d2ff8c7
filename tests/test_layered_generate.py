"""Generation as shared model programs + per-policy steps (var_jax/layered_generate.py) against
`sampling.generate`.

The programs are the sampler's functions split at the attention, so for the same labels and key the
tokens must be those of `sampling.generate` and the logits and images equal to float rounding (XLA
fuses differently across the splits), with the full cache, a compressor without parameters (kivi) and
one whose parameters differ per layer (pca: each layer must get its own). Faults caught (checked by
breaking the code): every layer given layer 0's parameters, a block's state reused for another
layer, the guidance weight of another scale, the state of one layer written to another.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import var_jax
from compress.core.budget import CacheGeometry
from compress.core.policy import CompressorPolicy
from compress.core.registry import make
from var_jax import sampling, xla_cpu
from var_jax.layered_generate import ModelPrograms, compile_layered

LABELS = [0, 3, 11]


@pytest.fixture(autouse=True, scope='module')
def xla_defaults():
  """XLA's default options for both sides (VAR_XLA_DEFAULTS=1): what is compared is the split into
  programs, not XLA's fusion choices (tests/test_xla_cpu.py checks the generation options)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(xla_cpu.DEFAULTS_ENV, '1')
    yield


@pytest.fixture(scope='module')
def model():
  return var_jax.load_default()


@pytest.fixture(scope='module')
def programs(model):
  return ModelPrograms.compile(model.var, model.vae, len(LABELS), top_k=0, top_p=0.0, capture_logits=True)


def _policy(model, method):
  if method == 'full':
    return None
  cfg = model.var.cfg
  comp = make(method, CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '10%')
  params = None
  if comp.needs_calibration:     # per-layer parameters from the model's own caches (random sequences)
    out = sampling.generate(model.var, model.vae, list(range(8)), key=jax.random.key(9), top_k=0, top_p=0.0,
                            capture_qkv=True)
    cat = lambda i: np.stack([np.concatenate([np.asarray(s[layer][i]) for s in out.qkv], axis=2)
                              for layer in range(cfg.depth)])
    params = comp.init_params(jax.random.key(0), cfg.depth, cfg.num_heads,
                              calibration={'q': cat(0), 'k': cat(1), 'v': cat(2)})
  return CompressorPolicy(comp, params)


@pytest.mark.parametrize('method', ['full', 'kivi', 'pca'])
def test_layered_generation_equals_the_sampler(model, programs, method):
  policy = _policy(model, method)
  want = sampling.generate(model.var, model.vae, LABELS, key=jax.random.key(5), cfg=1.5, top_k=0, top_p=0.0,
                           policy=policy, capture_logits=True)
  got = compile_layered(programs, policy)(LABELS, jax.random.key(5), 1.5)
  for a, b in zip(want.tokens, got.tokens):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(want.logits, got.logits):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.images), np.asarray(want.images), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(want.cache), jax.tree.leaves(got.cache)):   # the final states, layer by layer
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-4, atol=1e-4)


def test_policies_share_the_model_programs_and_refuse_another_batch(model, programs):
  a = compile_layered(programs, None)
  b = compile_layered(programs, _policy(model, 'kivi'))
  assert a.model is b.model and a.decode is b.decode and len(b.attend) == len(model.patch_nums)
  out = b(LABELS, jax.random.key(0))
  assert out.images.shape == (3, 32, 32, 3) and out.logits is not None
  assert [t.shape for t in out.tokens] == [(3, p * p) for p in model.patch_nums]
  with pytest.raises(ValueError, match='compiled for 3 labels, got 2'):
    b([1, 2], jax.random.key(0))
  with pytest.raises(ValueError, match='options_per_scale has 2 entries'):
    compile_layered(programs, None, [None, None])
  with pytest.raises(ValueError, match='generate with var_jax.sampling.generate'):   # layer-dependent policies
    compile_layered(programs, SimpleNamespace(init=None, attend=None))
