"""Closed loop = teacher forced: a compressor inside generation computes, at every layer and scale, the
attention outputs that `compress.run_teacher_forced` computes on exactly the q, k, v generation gave it.

One greedy generation (`var_jax.sampling.generate`, the tiny random-weights official model, capture_qkv
and capture_logits) runs four `CompressorPolicy`s side by side, one per image, all for the same class:
`full` (the exact reference), `h2o` (no params), `pca` (calibrated) and `lowrank_learned` (learned params,
moved off their PCA initialisation, different per layer and head), at a compressing budget (25 %). The
test policy `Split` gives each its image's two CFG rows and records every output it returns (passed
through unchanged); one generation compiles the model once for all four.

Asserted per compressor: the recorded outputs equal `run_teacher_forced(comp, params, q, k, v)` on the
captured q, k, v of its rows to 1e-5 relative per layer and scale (measured: 0 for h2o, 8e-8 and 2e-6
for lowrank_learned and pca: float32 order; their errors against exact attention are 0.2-0.4), so the
policy ran the compressor with these params, layer by layer, threading its state across scales; its
bits match teacher forcing's and hold the budget; and the model consumed the compressed outputs: while
a compressor's outputs equal `full`'s, its image gets the same logits and greedy tokens (so the same
next input); at the first scale where they differ (scale 1 for pca and lowrank_learned, 2 for h2o, which
holds 3 tokens) its logits differ from `full`'s (measured 0.03 to 0.14 relative).
A policy ignored, its state reset between scales, its params dropped (replaced by fresh ones) or taken
from another layer, or its outputs discarded by the model all fail (checked by breaking
`CompressorPolicy.attend`, and the sampler's `_through_policy` for the last, in a scratch copy).
"""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
import var_jax
from compress.core.budget import CacheGeometry
from var_jax.sampling import generate

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
NAMES = ('full', 'h2o', 'pca', 'lowrank_learned')      # one image each; 'full' is the exact reference
LABEL = 3
BUDGET = '25%'


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """A cache policy running `policies[j]` on image j's rows (j and j + n of the 2n CFG rows) and keeping
  every output each returned: per layer (tuple of inner states, outputs (2n, H, L, D) float32).

  `params` (each policy's params) is what the sampler passes to its jitted steps as traced arrays
  (`var_jax.sampling.policy_arrays` / `bind_arrays`), as it does a `CompressorPolicy`'s; `attend` runs
  each policy with them, so params the sampler drops or mangles reach the compressors.
  """
  policies: tuple[compress.CompressorPolicy, ...]
  params: tuple = ()

  def rows(self, j: int) -> np.ndarray:
    return np.array([j, j + len(self.policies)])

  def policy(self, j: int) -> compress.CompressorPolicy:
    return dataclasses.replace(self.policies[j], params=self.params[j])

  def init(self, batch, num_heads, head_dim, num_layers, **kw):
    assert batch == 2 * len(self.policies), batch
    inner = [p.init(2, num_heads, head_dim, num_layers, **kw) for p in self.policies]
    L = self.policies[0].compressor.geometry.num_tokens
    return tuple((tuple(s[n] for s in inner), jnp.zeros((batch, num_heads, L, head_dim), jnp.float32))
                 for n in range(num_layers))

  def attend(self, state_layer, layer, scale, q_BHSD, k_BHSD, v_BHSD):
    states, rec = state_layer
    out = jnp.zeros_like(q_BHSD)
    new_states = []
    for j, state in enumerate(states):
      r = self.rows(j)
      o, state = self.policy(j).attend(state, layer, scale, q_BHSD[r], k_BHSD[r], v_BHSD[r])
      out = out.at[r].set(o)
      new_states.append(state)
    start = self.policies[0].compressor.geometry.scale_starts[scale]
    rec = jax.lax.dynamic_update_slice_in_dim(rec, out.astype(jnp.float32), start, axis=2)
    return out, (tuple(new_states), rec)


def stack_qkv(qkv):
  """generate's per-scale tuples over layers of (q, k, v) -> three (layers, rows, H, L, D) arrays."""
  return tuple(jnp.concatenate([jnp.stack([layer[i] for layer in scale]) for scale in qkv], axis=3)
               for i in range(3))


def make_policy(name: str, g: CacheGeometry, layers: int, heads: int) -> compress.CompressorPolicy:
  comp = compress.make(name, g, BUDGET)
  rng = np.random.default_rng(0)                        # calibration caches (layers, B, H, L, D)
  calib = {t: rng.standard_normal((layers, 2, heads, g.num_tokens, g.head_dim)).astype(np.float32)
           for t in ('k', 'v')}
  params = comp.init_params(jax.random.key(0), layers, heads, calibration=calib)
  if comp.learned:                                      # off the PCA initialisation, per layer and head
    params = {n: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
              for n, p in params.items()}
  return compress.CompressorPolicy(comp, params)


@pytest.fixture(scope='module')
def run():
  model = var_jax.load_official(FIX / 'var.pth', FIX / 'vae.pth', patch_nums=(1, 2, 3, 4))
  cfg = model.var.cfg
  g = CacheGeometry(model.patch_nums, cfg.head_dim)
  policies = tuple(make_policy(n, g, cfg.depth, cfg.num_heads) for n in NAMES)
  policy = Split(policies, tuple(p.params for p in policies))
  out = generate(model.var, model.vae, [LABEL] * len(NAMES), key=jax.random.key(2), cfg=1.5, top_k=1,
                 top_p=0.0, policy=policy, capture_qkv=True, capture_logits=True)
  return policy, out


@pytest.mark.parametrize('j,name', list(enumerate(NAMES))[1:])      # full: the reference row
def test_generation_runs_the_compressor_as_teacher_forcing_does(run, j, name):
  policy, out = run
  comp, params = policy.policies[j].compressor, policy.policies[j].params
  assert comp.budget.bits < comp.geometry.full_bits
  r = policy.rows(j)
  q, k, v = (x[:, r] for x in stack_qkv(out.qkv))             # (layers, 2, H, L, D)
  closed = jnp.stack([rec[r] for _, rec in out.cache])          # what generation's attention got back
  teacher = compress.run_teacher_forced(comp, params, q, k, v)
  pn = comp.geometry.patch_nums
  err = compress.errors(closed, teacher['out'], pn)['per_layer_scale']
  assert err.max() < 1e-5, f'{name}: closed loop vs teacher forced, per layer x scale:\n{err}'
  bits = np.asarray(jnp.stack([comp.bits(states[j]) for states, _ in out.cache]))
  np.testing.assert_array_equal(bits, np.asarray(teacher['bits'][..., -1]))
  assert bits.max() <= comp.budget.bits
  exact_err = compress.errors(closed, compress.exact_outputs(q, k, v, pn), pn)['overall']
  assert exact_err > 1e-2, exact_err                            # it compressed


def test_the_model_consumes_the_compressed_outputs(run):
  """Every image has the same class and greedy sampling: while a compressor's outputs equal `full`'s,
  its image gets the same logits and tokens (so the same next input); at the first scale where they
  differ (the cache first exceeds the budget) its logits must differ from `full`'s too."""
  policy, out = run
  pn = policy.policies[0].compressor.geometry.patch_nums
  starts = policy.policies[0].compressor.geometry.scale_starts
  recs = np.stack([np.asarray(rec) for _, rec in out.cache])     # (layers, 2n, H, L, D)
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  for j in range(1, len(NAMES)):
    a, b = policy.rows(j), policy.rows(0)
    for s, S in enumerate(p * p for p in pn):
      sl = slice(starts[s], starts[s] + S)
      logit_gap = rel(np.asarray(out.logits[s])[a], np.asarray(out.logits[s])[b])
      if rel(recs[:, a, :, sl], recs[:, b, :, sl]) > 1e-3:      # its attention differs here
        assert logit_gap > 1e-3, (NAMES[j], s, logit_gap)
        break
      assert logit_gap < 1e-4, (NAMES[j], s, logit_gap)            # same outputs, same logits
      np.testing.assert_array_equal(out.tokens[s][j], out.tokens[s][0])
    else:
      raise AssertionError(f'{NAMES[j]} never differed from the full cache at {BUDGET}')
