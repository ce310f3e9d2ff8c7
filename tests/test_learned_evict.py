"""`evict_learned` and compress.core.relax: heuristic at init, relaxation -> hard path as tau -> 0, honest
bits, exact at full budget, and training that beats the eviction heuristics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compress
from compress.core import relax, synthetic, topk
from compress.core.attention import rel_error
from compress.core.budget import Budget, CacheGeometry
from compress_helpers import (layer_params as _layer, teacher_forced as _teacher_forced,
                             train_outputs_all as _train_outputs)

PN = (1, 2, 3, 4)
G = CacheGeometry(PN, head_dim=16)
D = G.head_dim
ENTRY = 2 * D * 16 + 16 + 16                     # key, value (fp16), int16 pos, fp16 accumulated mass
STORE = {'store_pos': True, 'store_acc': True}   # every feature available (the default stores neither)


@functools.partial(jax.jit, static_argnums=0)
def _run(comp, params, q_BHLD, k_BHLD, v_BHLD):
  """One layer through every scale (one compiled program): outputs (B, H, L, D), state after each."""
  state, outs, states = comp.init_state(*q_BHLD.shape[:2]), [], []
  for si, (s0, S) in enumerate(zip(G.scale_starts, G.scale_sizes)):
    sl = slice(s0, s0 + S)
    out, state = comp.step(params, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si)
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, 2), states


def _kept_keys(state):
  """(B, H) sorted tuples of the kept keys (as stored): the kept set, independent of slot order."""
  k, n = np.asarray(state.k, np.float32), np.asarray(state.count)
  return [[sorted(map(tuple, k[b, h, :n[b, h]])) for h in range(k.shape[1])] for b in range(k.shape[0])]


def _perturbed(params, seed=1, size=0.3):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + size * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys)])


@pytest.fixture(scope='module')
def data():
  """Train / held-out halves of one synthetic draw (same VAR-like structure, independent noise)."""
  make = functools.partial(synthetic.var_like_qkv, patch_nums=PN, layers=2, batch=16, heads=2, head_dim=D)
  q, k, v = jax.jit(make)(jax.random.key(0))
  return tuple(x[:, :8] for x in (q, k, v)), tuple(x[:, 8:] for x in (q, k, v))


# ---- compress.core.relax -----------------------------------------------------------------------------
def test_soft_topk_threshold_and_limits():
  s = jnp.array([[0.3, -1.0, 2.0, 0.9, 5.0]])
  valid = jnp.array([[True, True, True, True, False]])           # 5.0 is not a candidate
  assert float(relax.topk_threshold(s, valid, 2)[0, 0]) == pytest.approx(0.5 * (0.9 + 0.3))   # 2nd and 3rd largest
  hard = np.array([[False, False, True, True, False]])
  np.testing.assert_array_equal(topk.topk_mask(s, valid, 2), hard)
  soft = np.exp(relax.soft_topk_log_mask(s, valid, 2, 1e-4))
  np.testing.assert_allclose(soft[valid], hard[valid], atol=1e-6)
  assert np.all(np.exp(relax.soft_topk_log_mask(s, valid, 4, 0.1)) == 1.0)        # all valid kept
  assert np.all(np.exp(relax.soft_topk_log_mask(s, valid, 0, 0.1)) == 0.0)        # nothing kept
  grad = jax.grad(lambda x: relax.soft_topk_log_mask(x, valid, 2, 0.5).sum())(s)
  assert np.all(np.isfinite(grad)) and np.abs(grad).min() > 0


def test_entropic_topk_sums_to_k_and_hardens():
  s = jnp.array([[0.1, 0.7, -0.3, 0.4, 0.95, 0.2]])
  valid = jnp.array([[True, True, True, True, True, False]])
  soft = relax.entropic_topk(s, valid, 2, eps=0.1)
  assert float(soft.sum()) == pytest.approx(2.0, abs=1e-4) and float(soft[0, 5]) == 0.0
  # closed form: sigmoid((s - t) / eps) with t solving sum = k, checked by brute force on a fine grid
  grid = np.linspace(-1, 2, 300001)
  sums = (1 / (1 + np.exp(-(np.asarray(s[0, :5])[:, None] - grid[None]) / 0.1))).sum(0)
  t = grid[np.argmin(np.abs(sums - 2))]
  np.testing.assert_allclose(soft[0, :5], 1 / (1 + np.exp(-(np.asarray(s[0, :5]) - t) / 0.1)), atol=1e-4)
  np.testing.assert_allclose(relax.entropic_topk(s, valid, 2, eps=1e-3), [[0, 1, 0, 0, 1, 0]], atol=1e-6)
  np.testing.assert_array_equal(relax.entropic_topk(s, valid, 9, eps=0.1), valid.astype(np.float32))
  # implicit gradient: the masks keep summing to k, so the gradient of their sum is ~0
  g_sum = jax.grad(lambda x: relax.entropic_topk(x, valid, 2, 0.1).sum())(s)
  np.testing.assert_allclose(g_sum, 0.0, atol=1e-4)
  g = jax.grad(lambda x: (relax.entropic_topk(x, valid, 2, 0.1) * jnp.arange(6.0)).sum())(s)
  assert np.all(np.isfinite(g)) and np.abs(g[0, :5]).min() > 0


# ---- the hard path ------------------------------------------------------------------------------
@pytest.mark.parametrize('rule', ['scalekv', 'snapkv', 'h2o', 'window'])
def test_init_keeps_what_the_heuristic_keeps(data, rule):
  _, (q, k, v) = data
  q, k, v = (x[0, :2] for x in (q, k, v))
  comp = compress.make('evict_learned', G, Budget(16 + 4 * ENTRY), init_rule=rule, **STORE)
  assert comp.capacity == 4
  heur = compress.make(rule, G, Budget(0))
  heur = compress.make(rule, G, Budget(16 + 4 * heur.layout().entry_bits()))   # the same capacity
  assert heur.capacity == 4
  out, states = _run(comp, _layer(comp.init_params(jax.random.key(0), 1, 2)), q, k, v)
  ref, ref_states = _run(heur, None, q, k, v)
  for s, r in zip(states, ref_states):
    assert _kept_keys(s) == _kept_keys(r)
  np.testing.assert_array_equal(out, ref)


def test_default_stores_what_scalekv_stores_and_keeps_its_choices(data):
  """No pos / acc fields by default: a scalekv entry's bits, scalekv's capacity and kept sets at init;
  rules whose feature needs a field say which setting to turn on."""
  _, (q, k, v) = data
  q, k, v = (x[0, :2] for x in (q, k, v))
  for budget in ('10%', '25%'):
    comp, heur = compress.make('evict_learned', G, budget), compress.make('scalekv', G, budget)
    assert comp.layout().entry_bits() == heur.layout().entry_bits() == 2 * D * 16
    assert comp.capacity == heur.capacity
    _, states = _run(comp, _layer(comp.init_params(jax.random.key(0), 1, 2)), q, k, v)
    _, ref_states = _run(heur, None, q, k, v)
    for s, r in zip(states, ref_states):
      assert _kept_keys(s) == _kept_keys(r)
  for rule, flag in (('snapkv', 'store_pos'), ('window', 'store_pos'), ('h2o', 'store_acc')):
    with pytest.raises(ValueError, match=flag):
      compress.make('evict_learned', G, '25%', init_rule=rule)


def test_bits_fill_the_budget(data):
  _, (q, k, v) = data
  budget = Budget.parse('25%', G)
  comp = compress.make('evict_learned', G, budget, **STORE)
  m = comp.capacity
  assert m == (budget.bits - 16) // ENTRY and m >= 1
  _, states = _run(comp, _layer(comp.init_params(jax.random.key(0), 1, 2)), q[0], k[0], v[0])
  for si, s in enumerate(states):
    n = min(G.scale_starts[si] + G.scale_sizes[si], m) if si < len(PN) - 1 else m
    assert np.all(np.asarray(s.count) == n)
    assert np.all(np.asarray(comp.bits(s)) == 16 + n * ENTRY)
  assert 16 + m * ENTRY <= budget.bits < 16 + (m + 1) * ENTRY


def test_full_budget_is_exact_and_needs_no_params(data):
  _, (q, k, v) = data
  g32 = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = compress.make('evict_learned', g32, Budget(g32.full_bits))
  assert comp.init_params(jax.random.key(0), 2, 2) is None
  exact = compress.exact_outputs(q, k, v, PN)
  np.testing.assert_allclose(_teacher_forced(comp, None, q, k, v)['out'], exact,
                             rtol=1e-5, atol=1e-6)
  soft = jax.vmap(lambda a, b, c: comp.train_outputs(None, a, b, c))(q, k, v)
  np.testing.assert_allclose(soft, exact, rtol=1e-5, atol=1e-6)


# ---- the relaxation -----------------------------------------------------------------------------
@pytest.mark.parametrize('budget', ['25%', Budget(16 + 0 * ENTRY)])  # capacity 3, and 0
def test_relaxation_equals_hard_path_as_tau_goes_to_zero(data, budget):
  _, (q, k, v) = data
  comp = compress.make('evict_learned', G, budget, tau=1e-6, **STORE)
  params = _perturbed(comp.init_params(jax.random.key(0), 2, 2))          # MLP and k/v terms active
  hard = _teacher_forced(comp, params, q, k, v)['out']
  soft = _train_outputs(comp, params, q, k, v)
  np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-5)


def test_relaxation_gradients_are_finite_and_nonzero(data):
  (q, k, v), _ = data
  comp = compress.make('evict_learned', G, '25%', tau=0.1, **STORE)
  exact = compress.exact_outputs(q, k, v, PN)
  loss = lambda p: rel_error(jax.vmap(comp.train_outputs)(p, q, k, v), exact)
  grad = jax.jit(jax.grad(loss))
  for params, nonzero in ((comp.init_params(jax.random.key(0), 2, 2), ('w_lin', 'w2')),
                          (_perturbed(comp.init_params(jax.random.key(0), 2, 2)), ('w_lin', 'w1', 'b1', 'w2'))):
    for n, g in grad(params).items():
      assert np.all(np.isfinite(g)), n
      if n in nonzero:
        assert np.abs(g).max() > 0, n        # at init w2 = 0, so W1 and b1 get no gradient yet


def test_training_beats_the_heuristics(data):
  """40 adam steps on train_outputs' relative error (tau 0.1, one layer); the HARD path's held-out
  error must drop below the init (= scalekv's choices) and below every eviction heuristic at the same
  budget."""
  train, test = (tuple(x[:1] for x in split) for split in data)
  comp = compress.make('evict_learned', G, '25%', tau=0.1)
  exact_train = compress.exact_outputs(*train, PN)
  exact_test = compress.exact_outputs(*test, PN)
  held_out = lambda c, p: float(rel_error(_teacher_forced(c, p, *test)['out'], exact_test))
  heuristics = {n: held_out(compress.make(n, G, '25%'), None)
                for n in ('snapkv', 'h2o', 'tova', 'window')}      # init = scalekv's choices
  params = comp.init_params(jax.random.key(0), 1, 2)
  loss = lambda p: rel_error(jax.vmap(comp.train_outputs)(p, *train), exact_train)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s, value

  init_err = held_out(comp, params)
  state = opt.init(params)
  for _ in range(40):
    params, state, value = step(params, state)
  trained_err = held_out(comp, params)
  print(f'evict_learned 25% held-out rel. error: init {init_err:.4f} -> trained {trained_err:.4f} '
        f'(train loss {float(value):.4f}); heuristics ' +
        ', '.join(f'{n} {e:.4f}' for n, e in heuristics.items()))
  assert trained_err < init_err and trained_err < min(heuristics.values())
