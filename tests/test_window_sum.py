"""window_sum (Haris-Onak sliding window + evicted-sum summary) against brute force and its exact setting."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from compress.core.attention import block_causal_attention
from compress.core.budget import Budget, CacheGeometry
from compress.core.registry import make
from compress_helpers import run_steps, random_qkv

PN = (1, 2, 3, 4)


def summary_bits(D: int) -> int:
  return 2 * D * 32 + 16


def budget_for(window: int, D: int, kv_bits: int = 32) -> Budget:
  """Bits that hold the summary, a 16-bit count and exactly `window` tokens."""
  return Budget(summary_bits(D) + 16 + window * 2 * D * kv_bits)


def np_window_sum(g, window: int, q, k, v):
  """The algorithm for one head, written plainly (float64): outputs (L, D) and the final state."""
  win_k, win_v = [], []
  ksum, vsum, evicted = np.zeros(g.head_dim), np.zeros(g.head_dim), 0
  outs = []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    keys, vals, bias = list(win_k), list(win_v), [0.0] * len(win_k)
    if evicted:
      keys.append(ksum / evicted)
      vals.append(vsum / evicted)
      bias.append(np.log(evicted))
    keys = np.array(keys + list(k[st:st + S]))
    vals = np.array(vals + list(v[st:st + S]))
    bias = np.array(bias + [0.0] * S)
    logits = q[st:st + S] @ keys.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    outs.append((p / p.sum(1, keepdims=True)) @ vals)
    if si == len(g.scale_sizes) - 1:
      break
    win_k += list(k[st:st + S])
    win_v += list(v[st:st + S])
    while len(win_k) > window:                 # evict the oldest token into the summary
      ksum, vsum, evicted = ksum + win_k.pop(0), vsum + win_v.pop(0), evicted + 1
  return np.concatenate(outs), (np.array(win_k), np.array(win_v), ksum, vsum, evicted)


@pytest.mark.parametrize('window', [0, 3, 9])
def test_matches_numpy(window):
  D = 8
  g = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = make('window_sum', g, budget_for(window, D))
  assert comp.capacity == window and comp.has_summary
  q, k, v = random_qkv(window, g.num_tokens, D)
  out, state, bits = run_steps(comp, q, k, v)
  assert all((b <= comp.budget.bits).all() for b in bits)
  for h in range(q.shape[1]):
    e_out, (wk, wv, ksum, vsum, n) = np_window_sum(g, window, q[0, h], k[0, h], v[0, h])
    np.testing.assert_allclose(out[0, h], e_out, rtol=1e-5, atol=1e-5)
    assert int(state.count[0, h]) == len(wk) and int(state.header['evicted'][0, h]) == n
    if len(wk):
      np.testing.assert_array_equal(np.asarray(state.k[0, h, :len(wk)]), wk)
      np.testing.assert_array_equal(np.asarray(state.v[0, h, :len(wk)]), wv)
    np.testing.assert_allclose(np.asarray(state.header['ksum'][0, h]), ksum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.header['vsum'][0, h]), vsum, rtol=1e-5, atol=1e-5)


def test_exact_when_evicted_tokens_share_a_logit():
  """Haris-Onak's setting: every out-of-window token gives each query the same logit -> exact.

  With a window of 5 over (1, 2, 3, 4) the tokens ever evicted are positions 0..8. Head 0: those keys
  are identical. Head 1: they differ, but only along a direction orthogonal to every query (so each
  query sees one logit for all of them) -- the summary's mean key then gives that same logit.
  """
  D, window, evicted = 8, 5, 9
  g = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  q, k, v = random_qkv(11, g.num_tokens, D)
  rng = np.random.default_rng(0)
  k[0, 0, :evicted] = k[0, 0, 0]
  q[0, 1, :, -1] = 0.0
  k[0, 1, :evicted] = k[0, 1, 0]
  k[0, 1, :evicted, -1] = rng.standard_normal(evicted)
  comp = make('window_sum', g, budget_for(window, D))
  out, state, _ = run_steps(comp, q, k, v)
  assert (np.asarray(state.header['evicted']) == evicted).all()
  np.testing.assert_allclose(out, block_causal_attention(q, k, v, PN), rtol=1e-5, atol=1e-5)
  # the same caches with generic keys are not exact: the test is not vacuous
  q2, k2, v2 = random_qkv(11, g.num_tokens, D)
  out2, _, _ = run_steps(comp, q2, k2, v2)
  assert np.abs(out2 - block_causal_attention(q2, k2, v2, PN)).max() > 1e-2


@pytest.mark.parametrize('budget', [Budget(0), Budget(900), Budget(1100), 0.5])
def test_budget_and_finite(budget):
  """fp16 windows; budgets below the summary keep a plain window (or nothing); bits never exceed."""
  D = 16
  g = CacheGeometry(PN, head_dim=D)
  comp = make('window_sum', g, budget)
  assert comp.has_summary == (comp.budget.bits >= summary_bits(D))
  q, k, v = random_qkv(3, g.num_tokens, D, B=2, H=3, scale=8.0)
  out, _, bits = run_steps(comp, q, k, v)
  assert np.isfinite(out).all()
  assert all((b <= comp.budget.bits).all() for b in bits)


def test_jit_equals_no_jit():
  D = 8
  g = CacheGeometry(PN[:3], head_dim=D)
  comp = make('window_sum', g, 0.8)                  # the summary and a 1-token window
  q, k, v = random_qkv(4, g.num_tokens, D)
  out, state, _ = run_steps(comp, q, k, v)
  out2, state2, _ = run_steps(comp, q, k, v, jit=False)
  assert comp.has_summary and comp.capacity == 1
  np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.header['vsum']), np.asarray(state2.header['vsum']),
                             rtol=1e-6, atol=1e-6)
