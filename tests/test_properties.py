"""Invariants of EVERY registered compressor, over random schedules, head dims, batch/heads and budgets.

For each compressor in `compress.compress.available()`:
- bits(state) <= budget after every scale (unless the class says respects_budget = False);
- a budget at or above the full cache reproduces exact attention (float32 geometry: tight tolerance;
  float16: attention over fp16-rounded cached keys/values, each scale's own tokens exact). That budget
  runs the passthrough full cache, not the compressor's code: tests/test_exact_own_code.py runs each
  compressor's own code at a budget holding every token, tests/test_accounting.py checks bits(state)
  against the arrays the state holds;
- outputs are finite (budget 0, tiny budgets, large logits included);
- the jitted run (compress.compress.run_teacher_forced) equals an eager op-by-op run (in the explicit
  example marked 'eager': eager runs compile every primitive at every new shape, which is slow).
Calibration-needing compressors are calibrated on an independent synthetic cache.
Examples are few and derandomized (CI-stable; the first generated one is the minimal case: two 1-token
scales at budget 0); PROPERTY_EXAMPLES=n runs n generated ones per compressor (default 2).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import compress
from compress.core import synthetic
from compress.core.budget import Budget, CacheGeometry

NAMES = compress.available()
SETTINGS = settings(max_examples=int(os.environ.get('PROPERTY_EXAMPLES', 2)), deadline=None,
                    derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BUDGET_KINDS = ('zero', 'tiny', 'fraction', 'full', 'above')


@st.composite
def cases(draw):
  K = draw(st.integers(2, 5))
  return {
      'patch_nums': tuple(draw(st.lists(st.integers(1, 3), min_size=K, max_size=K))),
      'head_dim': draw(st.integers(4, 16)), 'batch': draw(st.integers(1, 2)),
      'heads': draw(st.integers(1, 2)), 'kv_dtype': draw(st.sampled_from(['float16', 'float32'])),
      'budget_kind': draw(st.sampled_from(BUDGET_KINDS)), 'fraction': draw(st.floats(0.0, 1.0)),
      'tiny_bits': draw(st.integers(1, 80)), 'logit_scale': draw(st.sampled_from([1.0, 4.0, 40.0])),
      'seed': draw(st.integers(0, 2 ** 16))}


def budget_bits(case, g: CacheGeometry) -> int:
  kind = case['budget_kind']
  if kind == 'zero':
    return 0
  if kind == 'tiny':
    return case['tiny_bits']
  if kind == 'fraction':
    return int(case['fraction'] * g.full_bits)
  return g.full_bits if kind == 'full' else int(g.full_bits * (1.0 + 2 * case['fraction'])) + 1


def reference(q, k, v, g: CacheGeometry) -> np.ndarray:
  """Per scale: softmax attention over the cached tokens rounded to kv_dtype plus the own scale exact."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))                  # (B, H, L, D)
  rnd = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(g.kv_dtype).astype(jnp.float32), np.float64)
  out = np.zeros_like(q)
  for st_, S in zip(g.scale_starts, g.scale_sizes):
    keys = np.concatenate([rnd(k[:, :, :st_]), k[:, :, st_:st_ + S]], 2)
    vals = np.concatenate([rnd(v[:, :, :st_]), v[:, :, st_:st_ + S]], 2)
    lg = np.einsum('bhsd,bhnd->bhsn', q[:, :, st_:st_ + S], keys)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    out[:, :, st_:st_ + S] = np.einsum('bhsn,bhnd->bhsd', p / p.sum(-1, keepdims=True), vals)
  return out


def run_op_by_op(comp, params, q, k, v):
  """The teacher-forced loop for one layer, eager (op by op, no jit): outputs (B, H, L, D), bits (B, H, K)."""
  g = comp.geometry
  p0 = None if params is None else jax.tree_util.tree_map(lambda x: x[0], params)
  state = comp.init_state(q.shape[0], q.shape[1])
  outs, bits = [], []
  for si, (st_, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    ctx = compress.StepContext(future_q=q[:, :, st_ + S:] if comp.oracle else None)
    sl = slice(st_, st_ + S)
    out, state = comp.step(p0, state, q[:, :, sl], k[:, :, sl], v[:, :, sl], si, ctx)
    outs.append(out)
    bits.append(comp.bits(state))
  return np.concatenate(outs, 2), np.stack(bits, -1)


def var_like(rng: np.random.Generator, patch_nums, batch: int, heads: int, head_dim: int,
             logit_scale: float) -> tuple[np.ndarray, ...]:
  """(q, k, v) (1, B, H, L, D) float32 with VAR structure (smooth in image position, unit keys).

  numpy, not compress.core.synthetic: eager jax ops at every new shape compile, which would dominate.
  """
  coords = synthetic.token_coords(patch_nums)                                     # (L, 3)
  shp = (1, batch, heads, coords.shape[0], head_dim)
  phase = coords @ rng.normal(size=(heads, 3, head_dim)) * 3.0                     # (H, L, D)
  k = np.sin(phase) + 0.3 * rng.normal(size=shp)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = np.cos(phase) + 0.3 * rng.normal(size=shp)
  q = np.sin(phase) + 0.3 * rng.normal(size=shp)
  q *= logit_scale / np.linalg.norm(q, axis=-1, keepdims=True)
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def check(name: str, case: dict) -> None:
  g = CacheGeometry(case['patch_nums'], case['head_dim'], case['kv_dtype'])
  B, H, D = case['batch'], case['heads'], case['head_dim']
  budget = Budget(budget_bits(case, g))
  comp = compress.make(name, g, budget)
  rng = np.random.default_rng(case['seed'])
  q, k, v = var_like(rng, g.patch_nums, B, H, D, case['logit_scale'])
  calib = None
  if comp.needs_calibration:
    cq, ck, cv = var_like(rng, g.patch_nums, 2, H, D, 4.0)                # an independent draw
    calib = {'q': cq, 'k': ck, 'v': cv}
  params = comp.init_params(jax.random.key(case['seed']), 1, H, calibration=calib)

  res = compress.run_teacher_forced(comp, params, q, k, v)
  out, bits = np.asarray(res['out'][0]), np.asarray(res['bits'][0])       # (B, H, L, D), (B, H, K)
  where = f'{name} at {budget.bits} bits (full {g.full_bits}), geometry {g}'
  assert np.all(np.isfinite(out)), f'non-finite outputs: {where}'
  assert bits.shape == (B, H, len(g.patch_nums)), where
  if comp.respects_budget:
    assert bits.max() <= budget.bits, f'holds {bits.max()} bits after some scale: {where}; {bits}'
  if case.get('eager'):
    out_nojit, bits_nojit = run_op_by_op(comp, params, q[0], k[0], v[0])
    np.testing.assert_array_equal(bits_nojit, bits, err_msg=f'jit vs no jit bits: {where}')
    np.testing.assert_allclose(out_nojit, out, rtol=1e-4, atol=1e-5, err_msg=f'jit vs no jit: {where}')
  if budget.bits >= g.full_bits:
    # float32 against the float64 reference: logits of magnitude |l| carry |l| * 2^-24 rounding, which
    # moves an output by up to that times the values' magnitude (measured 1.8e-6 at logit scale 40)
    fp32 = 2.0 ** -23 * case['logit_scale'] * float(np.abs(np.asarray(v)).max())    # |q| = logit_scale, |k| = 1
    np.testing.assert_allclose(out, reference(q[0], k[0], v[0], g), rtol=1e-5, atol=1e-6 + fp32,
                               err_msg=f'a budget >= the full cache must be exact: {where}')


_BASE = {'patch_nums': (1, 2, 3), 'head_dim': 8, 'batch': 2, 'heads': 2, 'kv_dtype': 'float16',
         'fraction': 0.3, 'tiny_bits': 17, 'logit_scale': 4.0, 'seed': 0}


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
@SETTINGS
@given(case=cases())
@example(case={**_BASE, 'budget_kind': 'tiny', 'patch_nums': (2, 1, 3), 'batch': 1, 'logit_scale': 40.0})
@example(case={**_BASE, 'budget_kind': 'fraction', 'head_dim': 5, 'heads': 1, 'eager': True})
@example(case={**_BASE, 'budget_kind': 'full', 'kv_dtype': 'float32', 'patch_nums': (3, 1, 2)})
def test_compressor_invariants(name, case):
  check(name, case)


def test_registry_is_not_empty_and_names_are_unique():
  assert 'full' in NAMES and len(set(NAMES)) == len(NAMES)
