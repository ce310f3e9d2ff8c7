"""ToMe and CaM merging compressors against brute-force numpy versions and exact cases."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.core.attention import block_causal_attention
from compress.core.budget import Budget, CacheGeometry
from compress.core.registry import make
from compress.merging.tome import tome_merge
from compress_helpers import run_steps, random_qkv

PN = (1, 2, 3, 4)


def entry_bits(D: int, kv_bits: int, extra_bits: int) -> int:
  return 2 * D * kv_bits + extra_bits


def budget_for(capacity: int, D: int, kv_bits: int, extra_bits: int) -> Budget:
  """Bits that hold exactly `capacity` entries (+ the 16-bit count)."""
  return Budget(capacity * entry_bits(D, kv_bits, extra_bits) + 16)


def np_attend(q_SD, ck_MD, cv_MD, cbias_M, k_SD, v_SD):
  """Softmax over [cache entries (with bias); new tokens], float64."""
  lc = q_SD @ ck_MD.T + cbias_M[None]
  ln = q_SD @ k_SD.T
  logits = np.concatenate([lc, ln], axis=1)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return p @ np.concatenate([cv_MD, v_SD]), p


# ---- ToMe brute force -----------------------------------------------------------------------------
def np_tome(k, v, size, capacity):
  """ToMe bipartite soft matching on a list of entries, written plainly (float64)."""
  k, v, size = [np.array(x, np.float64) for x in (k, v, size)]
  while len(size) > capacity:
    n = len(size)
    a_idx, b_idx = np.arange(0, n, 2), np.arange(1, n, 2)
    r = min(n - capacity, len(a_idx))
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    sim = kn[a_idx] @ kn[b_idx].T
    best, edge = sim.argmax(1), sim.max(1)
    merged_a = np.argsort(-edge, kind='stable')[:r]
    new_k, new_v, new_s = k.copy(), v.copy(), size.copy()
    for j, b in enumerate(b_idx):
      group = [b] + [a_idx[i] for i in merged_a if best[i] == j]
      w = size[group]
      new_s[b] = w.sum()
      new_k[b] = (w[:, None] * k[group]).sum(0) / w.sum()
      new_v[b] = (w[:, None] * v[group]).sum(0) / w.sum()
    alive = np.ones(n, bool)
    alive[a_idx[merged_a]] = False
    k, v, size = new_k[alive], new_v[alive], new_s[alive]
  return k, v, size


@pytest.mark.parametrize('n,capacity', [(11, 6), (11, 3), (12, 1), (4, 9)])
def test_tome_merge_matches_numpy(n, capacity):
  N, D = 12, 4
  rng = np.random.default_rng(n * 10 + capacity)
  k = rng.standard_normal((N, D)).astype(np.float32)
  v = rng.standard_normal((N, D)).astype(np.float32)
  size = rng.integers(1, 4, N).astype(np.float32)
  valid = np.zeros(N, bool)
  valid[rng.permutation(N)[:n]] = True               # valid entries scattered among invalid ones
  got = jax.jit(tome_merge, static_argnums=4)(k, v, size, valid, capacity)
  gk, gv, gs, keep = map(np.asarray, got)
  ek, ev, es = np_tome(k[valid], v[valid], size[valid], capacity)
  m = len(es)
  assert keep.sum() == m and keep[:m].all()
  np.testing.assert_allclose(gs[:m], es, rtol=0, atol=0)
  np.testing.assert_allclose(gk[:m], ek, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gv[:m], ev, rtol=1e-5, atol=1e-6)


def np_tome_run(g, capacity, q, k, v):
  """The whole ToMe compressor for one head (float64): outputs (L, D) and final (k, v, size)."""
  ck, cv, cs = np.zeros((0, g.head_dim)), np.zeros((0, g.head_dim)), np.zeros(0)
  outs = []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    out, _ = np_attend(q[sl], ck, cv, np.log(cs), k[sl], v[sl])
    outs.append(out)
    if si < len(g.scale_sizes) - 1:
      ck, cv, cs = np_tome(np.concatenate([ck, k[sl]]), np.concatenate([cv, v[sl]]),
                           np.concatenate([cs, np.ones(S)]), capacity)
  return np.concatenate(outs), (ck, cv, cs)


@pytest.mark.parametrize('capacity', [2, 9])
def test_tome_compressor_matches_numpy(capacity):
  """Outputs and states equal a plain numpy ToMe; with identical keys (head 2) attention is exact."""
  D = 8
  g = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = make('tome', g, budget_for(capacity, D, 32, 16))
  assert comp.capacity == capacity
  q, k, v = random_qkv(capacity, g.num_tokens, D, H=3)
  k[:, 2] = k[:, 2, :1]                      # head 2: every key identical, so merging is exact
  out, state, _ = run_steps(comp, q, k, v)
  np.testing.assert_allclose(out[:, 2], block_causal_attention(q, k, v, PN)[:, 2], rtol=1e-5,
                             atol=1e-5)
  assert int(state.extra['size'][0, 2].sum()) == g.prefix_tokens
  for h in range(2):                         # heads 0, 1: random keys
    e_out, (ek, ev, es) = np_tome_run(g, capacity, q[0, h], k[0, h], v[0, h])
    np.testing.assert_allclose(out[0, h], e_out, rtol=1e-4, atol=1e-5)
    m = len(es)
    assert int(state.count[0, h]) == m
    np.testing.assert_array_equal(np.asarray(state.extra['size'][0, h, :m]), es)
    np.testing.assert_allclose(np.asarray(state.k[0, h, :m]), ek, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.v[0, h, :m]), ev, rtol=1e-5, atol=1e-6)


def test_tome_duplicated_neighbour_keys_is_exact():
  """Each new token pair (A, B) shares a key: ToMe merges exactly those pairs, so attention is exact."""
  D, pn = 8, (2, 4, 4)
  g = CacheGeometry(pn, head_dim=D, kv_dtype='float32')
  q, k, v = random_qkv(1, g.num_tokens, D)
  k[:, :, 1::2] = k[:, :, 0::2]                       # token 2i+1 repeats token 2i's key
  comp = make('tome', g, budget_for(12, D, 32, 16))  # scale 1: 4 + 16 candidates, 8 merges
  out, state, _ = run_steps(comp, q, k, v)
  np.testing.assert_allclose(out, block_causal_attention(q, k, v, pn), rtol=1e-5, atol=1e-5)
  assert int(state.count[0, 0]) == 12


# ---- CaM brute force ------------------------------------------------------------------------------
def np_cam_run(g, capacity, q, k, v, threshold, accumulate):
  """The whole CaM compressor for one head (float64, scores rounded to float16 when stored)."""
  D = g.head_dim
  ck, cv, cs, csc = np.zeros((0, D)), np.zeros((0, D)), np.zeros(0), np.zeros(0)
  outs = []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    out, p = np_attend(q[sl], ck, cv, np.log(np.maximum(cs, 1)), k[sl], v[sl])
    outs.append(out)
    if si == len(g.scale_sizes) - 1:
      break
    K, V = np.concatenate([ck, k[sl]]), np.concatenate([cv, v[sl]])
    size, prev = np.concatenate([cs, np.ones(S)]), np.concatenate([csc, np.zeros(S)])
    score = p.sum(0) + (prev if accumulate else 0)
    mass = p.mean(0)
    kept = np.argsort(-score, kind='stable')[:capacity]
    kn = K / np.linalg.norm(K, axis=1, keepdims=True)
    groups = {int(j): [int(j)] for j in kept}
    for i in set(range(len(score))) - set(groups):
      sims = kn[i] @ kn[kept].T
      if sims.max() >= threshold:
        groups[int(kept[sims.argmax()])].append(i)
    ck = np.stack([(mass[gr, None] * K[gr]).sum(0) / mass[gr].sum() for gr in groups.values()])
    cv = np.stack([(mass[gr, None] * V[gr]).sum(0) / mass[gr].sum() for gr in groups.values()])
    cs = np.array([size[gr].sum() for gr in groups.values()])
    csc = np.array([score[gr].sum() for gr in groups.values()]).astype(np.float16).astype(np.float64)
  return np.concatenate(outs), (ck, cv, cs)


@pytest.mark.parametrize('threshold,accumulate', [(0.2, True), (-2.0, False), (2.0, True)])
def test_cam_compressor_matches_numpy(threshold, accumulate):
  """Outputs and states equal a plain numpy CaM (2.0: pure eviction); identical keys merge exactly."""
  D, capacity = 8, 4
  g = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = make('cam', g, budget_for(capacity, D, 32, 32 if accumulate else 16),
              threshold=threshold, accumulate=accumulate)
  assert comp.capacity == capacity
  q, k, v = random_qkv(7, g.num_tokens, D, H=3)
  k[:, 2] = k[:, 2, :1]                      # head 2: every key identical, so merging is exact
  out, state, _ = run_steps(comp, q, k, v)
  if threshold <= 1:
    np.testing.assert_allclose(out[:, 2], block_causal_attention(q, k, v, PN)[:, 2], rtol=1e-5,
                               atol=1e-5)
  for h in range(2):                         # heads 0, 1: random keys
    e_out, (ek, ev, es) = np_cam_run(g, capacity, q[0, h], k[0, h], v[0, h], threshold, accumulate)
    np.testing.assert_allclose(out[0, h], e_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.extra['size'][0, h]), es)
    np.testing.assert_allclose(np.asarray(state.k[0, h]), ek, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.v[0, h]), ev, rtol=1e-4, atol=1e-5)


# ---- contract: budget, finiteness, jit ------------------------------------------------------------
@pytest.mark.parametrize('name,settings', [('tome', {}), ('cam', {'accumulate': True})])
@pytest.mark.parametrize('budget', [Budget(0), Budget(600), 0.3])
def test_budget_and_finite(name, settings, budget):
  """Bits held (from the state) never exceed the budget; outputs stay finite, even with 0 or 1 entry."""
  D = 16
  g = CacheGeometry(PN[:3], head_dim=D)
  comp = make(name, g, budget, **settings)
  q, k, v = random_qkv(5, g.num_tokens, D, B=2, H=3, scale=8.0)
  out, _, bits = run_steps(comp, q, k, v)
  assert np.isfinite(out).all()
  assert all((b <= comp.budget.bits).all() for b in bits)


def test_jit_equals_no_jit():
  g = CacheGeometry(PN[:3], head_dim=8)
  comp = make('tome', g, 0.3)
  q, k, v = random_qkv(6, g.num_tokens, 8)
  out, state, _ = run_steps(comp, q, k, v)
  out_nojit, state_nojit, _ = run_steps(comp, q, k, v, jit=False)
  np.testing.assert_allclose(out, out_nojit, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.extra['size']), np.asarray(state_nojit.extra['size']))

