"""`lowrank_learned`: equals `pca` at init, train_outputs equals the hard path, honest bits, training helps."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compress
from compress.core import synthetic
from compress.core.attention import block_causal_attention, rel_error
from compress.core.budget import Budget, CacheGeometry
from compress_helpers import (layer_params as _layer, teacher_forced as _teacher_forced,
                             train_outputs_all as _train_outputs)

PN = (1, 2, 3, 4)
G = CacheGeometry(PN, head_dim=16)
T, D = G.prefix_tokens, G.head_dim


@functools.partial(jax.jit, static_argnums=(0, 6))
def _step(comp, params, state, q, k, v, scale):
  return comp.step(params, state, q, k, v, scale)


def _run(comp, params, q_BHLD, k_BHLD, v_BHLD, jit=True):
  """One layer through every scale: outputs (B, H, L, D) and the state after each scale."""
  step = _step if jit else (lambda c, p, s, q, k, v, si: c.step(p, s, q, k, v, si))
  state, outs, states = comp.init_state(*q_BHLD.shape[:2]), [], []
  for si, (s0, S) in enumerate(zip(G.scale_starts, G.scale_sizes)):
    sl = slice(s0, s0 + S)
    out, state = step(comp, params, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si)
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, 2), states


@pytest.fixture(scope='module')
def data():
  """Train / held-out halves of one synthetic draw (same VAR-like structure, independent noise)."""
  make = functools.partial(synthetic.var_like_qkv, patch_nums=PN, layers=2, batch=16, heads=2, head_dim=D)
  q, k, v = jax.jit(make)(jax.random.key(0))
  train = tuple(x[:, :8] for x in (q, k, v))
  test = tuple(x[:, 8:] for x in (q, k, v))
  return train, test


def _perturbed(params, seed=1, size=0.1):
  """Params moved off the PCA initialisation (so tests do not only see the PCA special case)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + size * jax.random.normal(kk, x.shape) for x, kk in zip(leaves, keys)])


def test_init_equals_pca_exactly(data):
  (_, ck, cv), (q, k, v) = data
  calib = {'k': ck, 'v': cv}                               # no 'q': not needed
  learned, pca = compress.make('lowrank_learned', G, '25%'), compress.make('pca', G, '25%')
  assert learned.plan() == pca.plan() == (T, 4, 3)   # 8 dims per token but the count's 16 bits
  p, pp = (c.init_params(jax.random.key(0), 2, 2, calibration=calib) for c in (learned, pca))
  np.testing.assert_array_equal(p['k_enc'], pp['k_basis'].astype(jnp.float32))
  np.testing.assert_array_equal(p['v_dec'], jnp.swapaxes(pp['v_basis'], -1, -2).astype(jnp.float32))
  res, ref = (_teacher_forced(c, x, q, k, v) for c, x in ((learned, p), (pca, pp)))
  np.testing.assert_array_equal(res['out'], ref['out'])
  np.testing.assert_array_equal(res['bits'], ref['bits'])


@pytest.mark.parametrize('perturb', [False, True])
def test_train_outputs_equal_hard_path(data, perturb):
  (_, ck, cv), (q, k, v) = data
  comp = compress.make('lowrank_learned', G, Budget(T * 16 * 7 + 16), key_fraction=0.4)   # ranks 3 (k), 4 (v) + count
  assert comp.plan() == (T, 3, 4)
  params = comp.init_params(jax.random.key(0), 2, 2, calibration={'k': ck, 'v': cv})
  params = _perturbed(params) if perturb else params
  hard = _teacher_forced(comp, params, q, k, v)['out']
  soft = _train_outputs(comp, params, q, k, v)
  np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-6)


def test_bits_fill_the_budget_and_shared_bits_count_every_parameter(data):
  (_, ck, cv), (q, k, v) = data
  budget = Budget(T * 16 * 7 + 200)                         # 7 dims per token, the rest unusable
  comp = compress.make('lowrank_learned', G, budget)
  _, rk, rv = comp.plan()
  assert rk + rv == 7
  params = comp.init_params(jax.random.key(0), 2, 2, calibration={'k': ck, 'v': cv})
  _, states = _run(comp, _layer(params), q[0], k[0], v[0])
  for si, s in enumerate(states):
    held = min(G.scale_starts[si] + G.scale_sizes[si], T)         # the last scale is not stored
    assert int(s.count.max()) == held
    bits = np.asarray(comp.bits(s))
    assert np.all(bits == held * 7 * 16 + 16), (si, bits)         # coefficients + the stored count
  assert int(comp.bits(states[-1]).max()) <= budget.bits < T * 8 * 16   # one more dim would not fit
  # encoder + decoder (D x r each) + mean (D), for keys and values, per layer and head, at fp16
  assert comp.shared_bits(params) == 2 * 2 * (2 * D * rk + 2 * D * rv + 2 * D) * 16


def test_full_budget_is_exact_and_needs_no_params(data):
  _, (q, k, v) = data
  g32 = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = compress.make('lowrank_learned', g32, Budget(g32.full_bits))
  assert comp.init_params(jax.random.key(0), 2, 2) is None
  exact = compress.exact_outputs(q, k, v, PN)
  np.testing.assert_allclose(_teacher_forced(comp, None, q, k, v)['out'], exact,
                             rtol=1e-5, atol=1e-6)
  soft = jax.vmap(lambda a, b, c: comp.train_outputs(None, a, b, c))(q, k, v)
  np.testing.assert_allclose(soft, exact, rtol=1e-5, atol=1e-6)


def test_jit_equals_no_jit(data):
  (_, ck, cv), (q, k, v) = data
  comp = compress.make('lowrank_learned', G, '25%')
  params = _layer(_perturbed(comp.init_params(jax.random.key(0), 2, 2, calibration={'k': ck, 'v': cv})))
  out_jit, _ = _run(comp, params, q[0, :2], k[0, :2], v[0, :2], jit=True)
  out_eager, _ = _run(comp, params, q[0, :2], k[0, :2], v[0, :2], jit=False)
  np.testing.assert_allclose(out_jit, out_eager, rtol=1e-5, atol=1e-6)


def test_errors_name_the_fix(data):
  _, (q, k, v) = data
  comp = compress.make('lowrank_learned', G, '25%')
  with pytest.raises(ValueError, match='calibration='):
    comp.init_params(jax.random.key(0), 1, 2)
  other = compress.make('lowrank_learned', G, '40%').init_params(
      jax.random.key(0), 2, 2, calibration={'k': k, 'v': v})
  with pytest.raises(ValueError, match='rebuild params'):
    comp.train_outputs(_layer(other), q[0], k[0], v[0])


def test_training_lowers_held_out_hard_error_below_pca(data):
  """40 adam steps on train_outputs' relative error (one layer); the hard path's held-out error must
  drop below the initialisation, which is `pca` exactly (the low-rank heuristic at the same budget)."""
  train, test = (tuple(x[:1] for x in split) for split in data)
  comp = compress.make('lowrank_learned', G, '25%')
  params = comp.init_params(jax.random.key(0), 1, 2, calibration={'k': train[1], 'v': train[2]})
  exact_train = compress.exact_outputs(*train, PN)
  exact_test = compress.exact_outputs(*test, PN)
  loss = lambda p: rel_error(jax.vmap(comp.train_outputs)(p, *train), exact_train)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(p, updates), s, value, grads

  held_out = lambda p: float(rel_error(_teacher_forced(comp, p, *test)['out'], exact_test))
  init_err = held_out(params)
  state = opt.init(params)
  for i in range(40):
    params, state, value, grads = step(params, state)
    if i == 0:
      assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))
  trained_err = held_out(params)
  print(f'lowrank_learned 25% held-out rel. error: init (= pca) {init_err:.4f} -> trained '
        f'{trained_err:.4f} (train loss {float(value):.4f})')
  assert trained_err < 0.9 * init_err
