"""The generation programs' XLA options (var_jax/xla_cpu.py): on CPU no YNNPACK fusions, but for the
decode's reductions.

Checked: the option reaches every program of `ModelPrograms` and `compile_layered` (no `__ynn_fusion`
in their compiled HLO, where XLA's defaults make some at these shapes) and the sampler's VQ-VAE decode
(YNN fusions of reductions only, where the defaults also fuse its convolutions), options given by the
caller win, VAR_XLA_DEFAULTS=1 turns it off, and generation with it draws the same tokens and images
(to float rounding) as with XLA's defaults. Faults caught (checked by breaking the code): a program of
ModelPrograms compiled without the options; the sampler's decode compiled with XLA's defaults or
without YNN fusions.
"""
import re

import jax
import numpy as np
import pytest
from flax import nnx

import var_jax
from var_jax import sampling, xla_cpu
from var_jax.layered_generate import ModelPrograms, compile_layered

LABELS = [0, 3, 11, 5]


@pytest.fixture(scope='module')
def model():
  return var_jax.load_default()


def _programs(model):
  mp = ModelPrograms.compile(model.var, model.vae, len(LABELS), top_k=0, top_p=0.0, capture_logits=True)
  return mp, compile_layered(mp, None)


def _texts(mp, gen):
  progs = [mp.start, *mp.block_in, *mp.block_out, *mp.head, gen.init, *gen.attend]
  return [p.as_text() for p in progs]


def _ynn_ops(hlo: str) -> list[str]:
  """The op names (metadata) of a compiled program's YNN fusions, e.g. 'jit(_decode)/reduce_sum'."""
  return [re.search(r'op_name="([^"]+)"', line).group(1) for line in hlo.splitlines()
          if '"kind":"__ynn_fusion"' in line]


def _reductions_only(hlo: str) -> bool:
  ops = _ynn_ops(hlo)
  return bool(ops) and all(re.search(r'/reduce_(sum|max|min)$', op) for op in ops)


def test_options_merge_and_turn_off(monkeypatch):
  monkeypatch.delenv(xla_cpu.DEFAULTS_ENV, raising=False)
  assert xla_cpu.generation_options() == xla_cpu.NO_YNN          # this jaxlib (CPU) accepts the option
  assert xla_cpu.generation_options(decode=True) == xla_cpu.DECODE
  mine = {'xla_backend_optimization_level': 0, 'xla_cpu_experimental_ynn_fusion_type': 'dot'}
  assert xla_cpu.generation_options(mine) == mine                  # the caller's options win
  monkeypatch.setenv(xla_cpu.DEFAULTS_ENV, '1')
  assert xla_cpu.generation_options() is None and xla_cpu.generation_options(decode=True) is None
  assert xla_cpu.generation_options({'xla_backend_optimization_level': 0}) == {'xla_backend_optimization_level': 0}


def test_generation_programs_compile_without_ynn_fusions_and_draw_the_same_images(model, monkeypatch):
  monkeypatch.delenv(xla_cpu.DEFAULTS_ENV, raising=False)
  mp, gen = _programs(model)
  assert not any('__ynn_fusion' in t for t in _texts(mp, gen))
  assert _reductions_only(mp.decode.as_text())
  got = gen(LABELS, jax.random.key(3), 1.5)
  monkeypatch.setenv(xla_cpu.DEFAULTS_ENV, '1')
  mp0, gen0 = _programs(model)
  assert any('__ynn_fusion' in t for t in _texts(mp0, gen0))       # XLA's defaults do fuse here
  want = gen0(LABELS, jax.random.key(3), 1.5)
  for a, b in zip(want.tokens, got.tokens):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(got.images), np.asarray(want.images), rtol=1e-5, atol=1e-5)


def test_the_samplers_decode_compiles_with_ynn_reductions_only(model, monkeypatch):
  monkeypatch.delenv(xla_cpu.DEFAULTS_ENV, raising=False)
  vae_graph, vae_state = nnx.split(model.vae)
  f_hat = jax.random.normal(jax.random.key(1), (len(LABELS), 8, 8, model.vae.cfg.z_channels))
  got = sampling.decode_images(vae_graph, vae_state, f_hat)
  progs = [p for k, p in sampling._DECODES.items() if k[0] == vae_graph and k[2] == f_hat.shape and k[-1]]
  assert len(progs) == 1 and _reductions_only(progs[0].as_text())
  defaults = sampling._decode.lower(vae_graph, vae_state, f_hat).compile().as_text()
  assert not _reductions_only(defaults) and _ynn_ops(defaults)      # XLA's defaults fuse more than sums
  want = sampling._decode(vae_graph, vae_state, f_hat)                # XLA's defaults
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
