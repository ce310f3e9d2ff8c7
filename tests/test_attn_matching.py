"""Attention Matching: exact cases, the NNLS solver, and its gain over top-attention eviction."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.core.budget import Budget, CacheGeometry
from compress.core.registry import make
from compress.core.synthetic import var_like_qkv
from compress.matching.attn_matching import match_block, nnls_projected_gradient
from compress_helpers import run_steps

PN = (1, 2, 3, 4)


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def block_mass_and_output(q_SD, k_ND, v_ND, bias_N, valid_N):
  """Each query's attention mass on a block (relative to exp(max logit) = 1) and its local output."""
  logits = np.where(valid_N[None], q_SD @ k_ND.T + bias_N[None], -np.inf)
  top = logits.max(1, keepdims=True)
  e = np.exp(logits - top)
  return e.sum(1) * np.exp(top[:, 0]), (e / e.sum(1, keepdims=True)) @ v_ND


_match_block = jax.jit(match_block, static_argnames=('capacity', 'iters', 'ridge', 'bias_dtype'))


def fit(q_SD, k_ND, v_ND, bias_N, valid_N, capacity, iters=200, ridge=1e-2, bias_dtype=jnp.float32):
  """match_block on the queries' attention over the block; float64 numpy results."""
  logits = np.where(valid_N[None], q_SD @ k_ND.T + bias_N[None], -np.inf)
  p = softmax(logits).astype(np.float32)
  out = _match_block(p, k_ND, v_ND, bias_N, valid_N, capacity=capacity, iters=iters, ridge=ridge,
                     bias_dtype=bias_dtype)
  return [np.asarray(x, np.float64) for x in out]


def test_keeps_everything_exactly_when_it_fits():
  """capacity >= valid candidates: the compact block equals the block for any query (mass, output)."""
  rng = np.random.default_rng(0)
  N, D, S = 10, 8, 5
  k = rng.standard_normal((N, D)).astype(np.float32)
  v = rng.standard_normal((N, D)).astype(np.float32)
  bias = rng.uniform(0, 2, N).astype(np.float32)
  valid = np.arange(N) % 5 != 4                                 # 8 valid, 2 invalid
  ck, cv, cb, keep = fit(rng.standard_normal((S, D)), k, v, bias, valid, capacity=N)
  assert keep.sum() == valid.sum()
  q_new = 1.5 * rng.standard_normal((20, D))
  m0, o0 = block_mass_and_output(q_new, k, v, bias, valid)
  m1, o1 = block_mass_and_output(q_new, ck, cv, cb, keep.astype(bool))
  np.testing.assert_allclose(m1, m0, rtol=1e-5)
  np.testing.assert_allclose(o1, o0, rtol=1e-4, atol=1e-4)


def test_bias_fit_recovers_multiplicities():
  """Primary keys plus lower-mass 'shadow' copies (same key, same value, bias -3): the fit keeps the
  primaries and must give each bias log(1 + n_shadows * e^-3) -- then the block is exact for any query."""
  rng = np.random.default_rng(1)
  m, D, S = 4, 8, 12
  c = rng.standard_normal((m, D))
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  vals = rng.standard_normal((m, D))
  shadows = np.array([0, 1, 1, 2, 3, 3, 3])                   # which primary each shadow copies
  k = np.concatenate([c, c[shadows]]).astype(np.float32)
  v = np.concatenate([vals, vals[shadows]]).astype(np.float32)
  bias = np.concatenate([np.zeros(m), np.full(len(shadows), -3.0)]).astype(np.float32)
  valid = np.ones(len(k), bool)
  q = rng.standard_normal((S, D))
  q = 0.9 * q / np.linalg.norm(q, axis=1, keepdims=True)      # logits in [-0.9, 0.9]
  ck, cv, cb, keep = fit(q, k, v, bias, valid, m, iters=3000, bias_dtype=jnp.float32)
  assert keep.all()
  order = np.argsort([np.argmax(c @ key) for key in ck])        # map compact entries to primaries
  counts = np.bincount(shadows, minlength=m)
  np.testing.assert_allclose(ck[order], c, atol=1e-6)
  np.testing.assert_allclose(cb[order], np.log1p(counts * np.exp(-3.0)), atol=1e-4)
  np.testing.assert_allclose(cv[order], vals, atol=1e-3)
  q_new = 2.0 * rng.standard_normal((30, D))
  m0, o0 = block_mass_and_output(q_new, k, v, bias, valid)
  m1, o1 = block_mass_and_output(q_new, ck, cv, cb, keep)
  np.testing.assert_allclose(m1, m0, rtol=1e-3)
  np.testing.assert_allclose(o1, o0, atol=1e-3)


def test_nnls_matches_scipy():
  optimize = pytest.importorskip('scipy.optimize')
  rng = np.random.default_rng(2)
  A = rng.uniform(0, 1, (20, 6)) * rng.uniform(0, 1, (1, 6))
  b = A @ np.array([1.0, 0.0, 2.0, 0.5, 0.0, 3.0]) + 0.3 * rng.standard_normal(20)
  expected, _ = optimize.nnls(A, b)
  got = nnls_projected_gradient(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32),
                                jnp.ones(6), jnp.ones(6, bool), 5000)
  assert (np.asarray(got) >= 0).all()
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-3)


def test_beats_top_attention_eviction_on_its_reference_queries():
  """Synthetic VAR caches: the block = scales 0..3 (30 tokens), the reference queries = scale 3's 16.
  With the same number of entries, matching beats keeping the top-attention tokens on those queries,
  for the block's local output and for the output once the next scale's tokens join (which needs the
  attention mass right)."""
  pn, D, m = (1, 2, 3, 4, 5), 16, 8
  q, k, v = var_like_qkv(jax.random.PRNGKey(0), pn, layers=2, batch=2, heads=2, head_dim=D)
  q, k, v = (np.asarray(x, np.float64).reshape(-1, *x.shape[-2:]) for x in (q, k, v))
  n_block, s3 = 30, 14                                          # scales 0..3: tokens 0..29
  err = {'match': [], 'top': [], 'match_next': [], 'top_next': []}
  for qh, kh, vh in zip(q, k, v):
    qs, kb, vb = qh[s3:n_block], kh[:n_block], vh[:n_block]     # scale 3's queries
    kn, vn = kh[n_block:], vh[n_block:]                         # scale 4's tokens
    valid = np.ones(n_block, bool)
    ck, cv, cb, keep = fit(qs, kb.astype(np.float32), vb.astype(np.float32), np.zeros(n_block,
                           np.float32), valid, m)
    top = np.argsort(-softmax(qs @ kb.T).sum(0))[:m]
    candidates = {'match': (ck, cv, cb), 'top': (kb[top], vb[top], np.zeros(m))}
    _, exact = block_mass_and_output(qs, kb, vb, np.zeros(n_block), valid)
    exact_next = softmax(qs @ np.concatenate([kb, kn]).T) @ np.concatenate([vb, vn])
    for name, (ek, ev, eb) in candidates.items():
      _, out = block_mass_and_output(qs, ek, ev, eb, np.ones(m, bool))
      out_next = softmax(np.concatenate([qs @ ek.T + eb, qs @ kn.T], 1)) @ np.concatenate([ev, vn])
      err[name].append(((out - exact) ** 2).sum() / (exact ** 2).sum())
      err[name + '_next'].append(((out_next - exact_next) ** 2).sum() / (exact_next ** 2).sum())
  rel = {n: float(np.sqrt(np.mean(e))) for n, e in err.items()}
  assert rel['match'] < 0.5 * rel['top'], rel
  assert rel['match_next'] < 0.75 * rel['top_next'], rel


# ---- contract: budget, finiteness, jit ------------------------------------------------------------
def random_qkv(seed, L, D, B=2, H=3, scale=8.0):
  rng = np.random.default_rng(seed)
  q = scale * rng.standard_normal((B, H, L, D)).astype(np.float32)
  k = rng.standard_normal((B, H, L, D)).astype(np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return q, k, rng.standard_normal((B, H, L, D)).astype(np.float32)


@pytest.mark.parametrize('budget,settings', [(Budget(0), {}), (Budget(600), {'bias_dtype': 'float32'}),
                                             (0.3, {})])
def test_budget_and_finite(budget, settings):
  D = 16
  g = CacheGeometry(PN, head_dim=D)
  comp = make('attn_matching', g, budget, **settings)
  out, _, bits = run_steps(comp, *random_qkv(3, g.num_tokens, D))
  assert np.isfinite(out).all()
  assert all((b <= comp.budget.bits).all() for b in bits)


def test_jit_equals_no_jit():
  g = CacheGeometry(PN[:3], head_dim=8)
  comp = make('attn_matching', g, 0.4)
  q, k, v = random_qkv(4, g.num_tokens, 8, B=1, H=2, scale=2.0)
  out, _, _ = run_steps(comp, q, k, v)
  out2, _, _ = run_steps(comp, q, k, v, jit=False)
  np.testing.assert_allclose(out, out2, rtol=1e-4, atol=1e-5)


def test_bad_settings_are_named():
  g = CacheGeometry(PN, head_dim=8)
  with pytest.raises(ValueError, match='ridge'):
    make('attn_matching', g, 0.3, ridge=0.0)
  with pytest.raises(ValueError, match='bias_dtype'):
    make('attn_matching', g, 0.3, bias_dtype='int8')


def test_oracle_fits_on_future_queries():
  """The oracle variant needs the later scales' queries; with them it respects the budget too."""
  from compress.core.teacher_forced import run_teacher_forced
  g = CacheGeometry(PN, head_dim=8)
  comp = make('attn_matching_oracle', g, 0.3)
  assert comp.oracle
  q, k, v = (jnp.asarray(x)[None] for x in random_qkv(5, g.num_tokens, 8, B=1, H=2, scale=2.0))
  res = run_teacher_forced(comp, None, q, k, v)
  assert np.isfinite(np.asarray(res['out'])).all()
  assert int(res['peak_bits'].max()) <= comp.budget.bits
  with pytest.raises(ValueError, match='future_q'):
    run_steps(comp, *(np.asarray(x[0]) for x in (q, k, v)))
