"""Budget allocation (totals kept, never exceeded, proportional against a bisection water-filling),
attention-spread statistics against brute force, and the layer-wise ScaleKV driver's total bits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.core.budget import Budget, CacheGeometry
from compress.core.synthetic import var_like_qkv
from compress.core.teacher_forced import run_teacher_forced
from compress.eviction import allocation
from compress.eviction.scalekv import build_layerwise, build_scalekv, LayerwiseCompressor, run_layerwise


def waterfill(total, w, cap):
  """Independent reference: real amounts min(cap, lam * w) summing to min(total, sum cap), by bisection."""
  total = min(total, cap.sum())
  lo, hi = 0.0, 1e12
  for _ in range(200):
    lam = (lo + hi) / 2
    lo, hi = (lam, hi) if np.minimum(cap, lam * w).sum() < total else (lo, lam)
  return np.minimum(cap, hi * w)


def test_allocate_keeps_total_caps_and_proportions():
  r = np.random.default_rng(0)
  for _ in range(300):
    n = int(r.integers(1, 9))
    w = r.uniform(0.05, 3.0, n)
    cap = r.integers(0, 50, n).astype(float)
    total = int(r.integers(0, 200))
    a = allocation.allocate(total, w, cap)
    assert a.dtype == np.int64 and a.shape == (n,)
    assert a.sum() == min(total, int(cap.sum())) and np.all(a >= 0) and np.all(a <= cap)
    assert np.all(np.abs(a - waterfill(total, w, cap)) < 1.0 + 1e-6)


def test_allocate_closed_forms_and_errors():
  np.testing.assert_array_equal(allocation.allocate(10, [1, 1, 1]), [4, 3, 3])   # remainder: first
  np.testing.assert_array_equal(allocation.allocate(10, [1, 1], caps=[2, 100]), [2, 8])
  np.testing.assert_array_equal(allocation.allocate(7, [0, 1, 0]), [0, 7, 0])
  np.testing.assert_array_equal(allocation.allocate(5, [1, 0], caps=[2, 9]), [2, 3])  # all-zero rest
  np.testing.assert_array_equal(allocation.allocate(6, np.ones((2, 3))), np.ones((2, 3)))  # heads
  with pytest.raises(ValueError, match='weights'):
    allocation.allocate(5, [1, -1])


def test_weight_policies():
  w = allocation.pyramid_weights(8, beta=10)
  assert np.isclose(w.mean(), 1) and np.all(np.diff(w) < 0)
  assert np.isclose(w[-1], 0.1) and np.isclose(w[0], 1.9)
  s = np.array([0.1, 0.9, 0.5, 0.7])
  w = allocation.scalekv_weights(s, drafter_fraction=0.5, drafter_ratio=3)
  assert np.isclose(w.mean(), 1) and np.allclose(w[[1, 3]], 1.5) and np.allclose(w[[0, 2]], 0.5)
  assert np.allclose(allocation.layer_weights('uniform', 3), 1)
  with pytest.raises(ValueError, match='drafter_score'):
    allocation.layer_weights('scalekv', 3)
  with pytest.raises(ValueError, match='unknown allocation'):
    allocation.layer_weights('nope', 3)


@pytest.mark.parametrize('policy', ['uniform', 'pyramid', 'scalekv'])
def test_layer_budgets_never_exceed_total(policy):
  g = CacheGeometry((1, 2, 3, 4, 5), head_dim=8)
  r = np.random.default_rng(1)
  for frac in [0.0, 0.01, 0.1, 0.37, 0.9, 1.0]:
    budget = Budget.from_fraction(frac, g)
    w = allocation.layer_weights(policy, 6, drafter_score=r.uniform(size=6))
    e, h = 2 * 8 * 16 + 16, 16
    bs = allocation.layer_budgets(g, budget, w, e, h)
    assert len(bs) == 6 and sum(b.bits for b in bs) <= 6 * budget.bits
    for b in bs:                        # whole entries: nothing wasted inside a layer
      assert b.bits == 0 or (b.bits - h) % e == 0 or b.bits >= g.full_bits
    if budget.bits > h + e * 6 and frac < 0.9:   # the pool is used up to less than one entry per layer
      assert 6 * budget.bits - sum(b.bits for b in bs) < e + 6 * h


def test_attention_spread_brute_force():
  pn = (1, 2, 3)
  r = np.random.default_rng(2)
  q, k = r.standard_normal((2, 2, 1, 2, 14, 4))
  st = allocation.attention_spread(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), pn)
  scale = np.repeat([0, 1, 2], [1, 4, 9])
  for n in range(2):
    for s in (1, 2):
      masses, spreads = [], []
      for b, h, i in np.ndindex(1, 2, 14):
        if scale[i] != s:
          continue
        seen = scale <= s
        lg = q[n, b, h, i] @ k[n, b, h].T
        p = np.where(seen, np.exp(lg - lg[seen].max()), 0)
        p /= p.sum()
        hist = scale < s
        masses.append(p[hist].sum())
        rr = p[hist] / p[hist].sum()
        spreads.append(np.exp(-(rr * np.log(rr)).sum()) / hist.sum())
      np.testing.assert_allclose(st['history_mass'][n, s], np.mean(masses), rtol=1e-5)
      np.testing.assert_allclose(st['history_spread'][n, s], np.mean(spreads), rtol=1e-5)
  np.testing.assert_allclose(st['drafter_score'],
                             (st['history_mass'] * st['history_spread'])[:, 1:].mean(1), rtol=1e-6)
  # closed forms: zero queries attend uniformly (a drafter: mass n_hist / n_seen, spread 1); queries
  # aligned with their own key (a refiner) put almost nothing on the history
  kk = r.standard_normal((1, 1, 14, 4))
  kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
  qs = np.stack([np.zeros((1, 1, 14, 4)), 60 * kk])
  st = allocation.attention_spread(jnp.asarray(qs, jnp.float32), jnp.asarray(np.stack([kk, kk]), jnp.float32), pn)
  np.testing.assert_allclose(st['history_mass'][0, 1:], [1 / 5, 5 / 14], rtol=1e-5)
  np.testing.assert_allclose(st['history_spread'][0, 1:], [1, 1], rtol=1e-5)
  assert st['drafter_score'][1] < 0.05 * st['drafter_score'][0]


def test_scalekv_layerwise_total_bits_and_uniform_equivalence():
  pn, N, B, H = (1, 2, 3, 4), 4, 1, 2
  g = CacheGeometry(pn, head_dim=8)
  q, k, v = var_like_qkv(jax.random.key(0), pn, layers=N, batch=B, heads=H, head_dim=8)
  score = allocation.attention_spread(q, k, pn)['drafter_score']
  assert score.shape == (N,) and np.all(np.isfinite(score))
  budget = Budget.from_fraction(0.3, g)
  lw = build_scalekv(g, budget, score, drafter_fraction=0.25, drafter_ratio=3.0)
  caps = [m.capacity for m in lw.members]
  assert caps[int(np.argmax(score))] == max(caps) > min(caps)
  res = run_layerwise(lw, None, q, k, v)
  assert np.all(np.isfinite(np.asarray(res['out'])))
  assert np.all(res['total_bits'] <= N * H * budget.bits)
  assert np.all(np.asarray(res['peak_bits']) <= lw.layer_bits()[:, None, None])
  # equal weights and a budget of whole entries: the same as the vmapped single compressor
  one = compress.make('scalekv', g, Budget(16 + 3 * 256))
  lw_u = build_layerwise('scalekv', g, one.budget, np.ones(N))
  assert all(m == one for m in lw_u.members)
  a, b = run_layerwise(lw_u, None, q, k, v), run_teacher_forced(one, None, q, k, v)
  np.testing.assert_allclose(a['out'], b['out'], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(a['bits'], b['bits'])
  with pytest.raises(ValueError, match='allocate'):
    LayerwiseCompressor(g, budget, (compress.make('scalekv', g, Budget(budget.bits + 1000)),) * 2)
