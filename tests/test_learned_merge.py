"""Learned token merging (`merge_learned`): plan, closed forms, hard limit of the relaxation, budget, training."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compress import base, evaluate, learned_merge, synthetic
from compress.attention import attend, block_causal_attention, rel_error
from compress.budget import CacheGeometry
from compress_helpers import random_qkv, run_steps

PN = (1, 2, 3, 4)


def entry_bits(D: int, kv_bits: int, logmass_bits: int = 16) -> int:
  return 2 * D * kv_bits + logmass_bits


def budget_for(capacity: int, D: int, kv_bits: int, logmass_bits: int = 16) -> int:
  """Bits that hold exactly `capacity` entries (+ the 16-bit count)."""
  return capacity * entry_bits(D, kv_bits, logmass_bits) + 16


def layer(params, i: int = 0):
  return None if params is None else jax.tree_util.tree_map(lambda x: x[i], params)


def perturbed(params, seed: int, scale: float = 1.0):
  """Parameters away from the initial plan (random logit noise, gains), as after training."""
  keys = iter(jax.random.split(jax.random.key(seed), len(params)))
  return {n: a + scale * jax.random.normal(next(keys), a.shape) for n, a in params.items()}


# ---- the static plan ------------------------------------------------------------------------------
def test_cell_centres_of_a_full_scale_are_its_tokens():
  for pn in (1, 2, 3, 5):
    np.testing.assert_allclose(learned_merge.cell_centres(pn * pn), learned_merge.grid_centres(pn))


@pytest.mark.parametrize('total,weights,caps,want', [
    (3, [1, 4, 9], [1, 4, 9], [1, 1, 1]), (7, [1, 4, 9], [1, 4, 9], [1, 2, 4]),
    (2, [1, 4, 9], [1, 4, 9], [1, 1, 0]), (50, [1, 4, 9], [1, 2, 9], [1, 2, 9]),
    (6, [1, 1, 1], [1, 3, 3], [1, 3, 2])])
def test_allocate(total, weights, caps, want):
  assert learned_merge.allocate(total, weights, caps) == want


def test_plan_keeps_everything_while_it_fits_then_pools_by_position():
  """M = 8 on (1, 2, 3, 4): scales 0 and 1 kept one token per slot; then area pooling per scale."""
  used, logits = learned_merge.merge_plan(PN, 8, 1.0, 4.0, 2.0)
  assert used == (1, 5, 8)
  assert [lg.shape for lg in logits] == [(8, 9), (8, 12), (8, 17)]
  # step 1: kept slot 0 (scale 0) stays in slot 0; the 4 new tokens each get their own slot 1..4
  np.testing.assert_array_equal(logits[1][:5, [0, 8, 9, 10, 11]].argmax(0), [0, 1, 2, 3, 4])
  # step 2: slots per scale (1, 2, 5): scale 1's 2x2 slots pool by columns into 2 cells (rows of
  # cell_centres(2): one row, 2 cells), scale 2's 3x3 tokens into 5 cells (rows of 3 and 2)
  assert learned_merge.allocate(8, [1, 4, 9], [1, 4, 9]) == [1, 2, 5]
  target = logits[2][:8].argmax(0)
  np.testing.assert_array_equal(target[:5], [0, 1, 2, 1, 2])
  np.testing.assert_array_equal(target[8:], [3, 4, 5, 3, 4, 5, 6, 6, 7])   # nearest cell; ties: lower slot


# ---- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize('hard', [True, False])
def test_merging_identical_tokens_keeps_their_attention(hard):
  """n identical (k, v) merged into one slot with log-mass log n give exactly their attention."""
  rng = np.random.default_rng(0)
  B, H, S, M, D, n = 1, 2, 6, 3, 8, 4
  k = rng.standard_normal((B, H, S, D)).astype(np.float32)
  v = rng.standard_normal((B, H, S, D)).astype(np.float32)
  k[:, :, :n], v[:, :, :n] = k[:, :, :1], v[:, :, :1]      # tokens 0..3 identical
  pos_HMC = np.full((H, M, M + S), -20.0, np.float32)          # token j -> slot [0,0,0,0,1,2][j]
  for j, i in enumerate([0, 0, 0, 0, 1, 2]):
    pos_HMC[:, i, M + j] = 0.0
  relax = learned_merge.Relaxation(hard=hard, temperature=1e-3)
  zeros_H = jnp.zeros((H,))
  key, val, mass, corr = learned_merge.merge_candidates(
      pos_HMC, zeros_H, zeros_H, jnp.ones((H,)), jnp.zeros((B, H, M, D)), jnp.zeros((B, H, M, D)),
      jnp.zeros((B, H, M)), k, v, M, 0, relax)
  np.testing.assert_allclose(mass, np.broadcast_to([n, 1, 1], (B, H, M)), rtol=1e-6)
  np.testing.assert_allclose(corr, 0.0, atol=1e-6)            # no spread: no correction
  q = 3 * rng.standard_normal((B, H, 5, D)).astype(np.float32)
  kn, vn = rng.standard_normal((2, B, H, 5, D)).astype(np.float32)
  lm = learned_merge.log_mass(mass, corr)
  got, _, _ = attend(q, key, val, jnp.ones((B, H, M), bool), lm, kn, vn)
  want, _, _ = attend(q, k, v, jnp.ones((B, H, S), bool), None, kn, vn)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_spread_correction_is_the_second_order_jensen_term():
  """Two keys k +- d merged: log-mass = log 2 + gamma |d|^2 (mass-weighted key variance)."""
  D, H = 4, 1
  d = np.array([0.3, -0.1, 0.2, 0.0], np.float32)
  k = np.stack([1 + d, 1 - d])[None, None]
  pos = np.zeros((H, 1, 3), np.float32)
  key, _, mass, corr = learned_merge.merge_candidates(
      pos, jnp.zeros(H), jnp.zeros(H), jnp.full((H,), 0.7), jnp.zeros((1, H, 1, D)),
      jnp.zeros((1, H, 1, D)), jnp.zeros((1, H, 1)), k, k, 1, 0, learned_merge.Relaxation())
  np.testing.assert_allclose(key[0, 0, 0], np.ones(D), rtol=1e-6)
  np.testing.assert_allclose(float(mass[0, 0, 0]), 2.0)
  np.testing.assert_allclose(float(corr[0, 0, 0]), 0.7 * float(d @ d), rtol=1e-5)


@pytest.mark.parametrize('path', ['hard', 'relaxed'])
def test_identical_keys_are_exact_through_the_pyramid(path):
  """Every key identical: any mass-preserving merge is exact (float32 entries and log-masses)."""
  D = 8
  g = CacheGeometry(PN, head_dim=D, kv_dtype='float32')
  comp = base.make('merge_learned', g, budget_for(4, D, 32, 32), logmass_dtype='float32',
                   content_iters=1)
  assert comp.capacity == 4
  q, k, v = random_qkv(3, g.num_tokens, D, B=2, H=2)
  k[:] = k[:1, :1, :1]
  params = perturbed(comp.init_params(None, 1, 2), seed=1)
  exact = block_causal_attention(q, k, v, PN)
  if path == 'hard':
    out = evaluate.run_teacher_forced(comp, params, q[None], k[None], v[None])['out'][0]
  else:
    out = comp.train_outputs(layer(params), q, k, v)
  np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)


# ---- the relaxation's hard limit ------------------------------------------------------------------
@pytest.mark.parametrize('kv_dtype,content_iters', [('float32', 0), ('float16', 2)])
def test_relaxation_at_zero_temperature_is_the_hard_path(kv_dtype, content_iters):
  """train_outputs with temperature -> 0 equals the evaluated hard path (same structure, roundings)."""
  D = 8
  g = CacheGeometry(PN, head_dim=D, kv_dtype=kv_dtype)
  comp = base.make('merge_learned', g, budget_for(8, D, g.kv_bits), temperature=1e-6,
                   content_iters=content_iters)
  assert comp.capacity == 8
  q, k, v = synthetic.var_like_qkv(jax.random.key(2), PN, layers=1, batch=2, heads=2, head_dim=D)
  params = perturbed(comp.init_params(None, 1, 2), seed=3, scale=0.5)
  hard = evaluate.run_teacher_forced(comp, params, q, k, v)['out'][0]
  soft = jax.jit(comp.train_outputs)(layer(params), q[0], k[0], v[0])
  np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-6)
  warm = dataclasses.replace(comp, temperature=1.0)         # and a warm relaxation differs from it
  assert float(rel_error(jax.jit(warm.train_outputs)(layer(params), q[0], k[0], v[0]), hard)) > 1e-3


# ---- budget, finiteness, jit ----------------------------------------------------------------------
@pytest.mark.parametrize('budget', [0, 300, 0.1, 0.9])
def test_budget_counts_and_finite(budget):
  """Bits = 16 + min(M, tokens so far) entries (2 D fp16 + 16 log-mass), never above the budget."""
  D = 16
  g = CacheGeometry(PN, head_dim=D)
  comp = base.make('merge_learned', g, budget)
  q, k, v = random_qkv(5, g.num_tokens, D, B=2, H=3, scale=40.0)
  out, _, bits = run_steps(comp, q, k, v)          # params None: the initial plan
  assert np.isfinite(out).all()
  M = comp.capacity
  for si, b in enumerate(bits[:-1]):
    held = min(M, sum(g.scale_sizes[:si + 1]))
    assert (b == (held * entry_bits(D, 16) + 16 if M else 0)).all(), (si, b)
    assert (b <= comp.budget.bits).all()


def test_full_budget_is_exact_in_both_paths():
  g = CacheGeometry(PN, head_dim=8, kv_dtype='float32')
  comp = base.make('merge_learned', g, g.full_bits)
  assert comp.passthrough and comp.init_params(None, 1, 2) is None
  q, k, v = random_qkv(7, g.num_tokens, 8, H=2)
  exact = block_causal_attention(q, k, v, PN)
  np.testing.assert_allclose(run_steps(comp, q, k, v)[0], exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(comp.train_outputs(None, q, k, v), exact, rtol=1e-6, atol=1e-6)


def test_jit_equals_no_jit_and_params_shapes():
  D = 4
  g = CacheGeometry(PN[:3], head_dim=D)
  comp = base.make('merge_learned', g, budget_for(4, D, 16), content_iters=1)
  params = comp.init_params(jax.random.key(0), 3, 2)
  M = comp.capacity
  assert M == 4 and params['pos1'].shape == (3, 2, M, M + 4) and params['spread_gain'].shape == (3, 2)
  assert comp.shared_bits(params) == 32 * sum(int(a.size) for a in params.values())
  p0 = perturbed(layer(params), seed=4, scale=0.5)
  q, k, v = random_qkv(6, g.num_tokens, D, H=2)
  state = comp.init_state(1, 2)
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    a = jax.jit(comp.step, static_argnums=5)(p0, state, q[:, :, sl], k[:, :, sl], v[:, :, sl], si)
    b = comp.step(p0, state, q[:, :, sl], k[:, :, sl], v[:, :, sl], si)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a[1].extra['logmass'], b[1].extra['logmass'])
    state = b[1]


def test_calibration_sets_the_spread_gain():
  g = CacheGeometry(PN, head_dim=16)
  comp = base.make('merge_learned', g, 0.25)
  q, k, v = synthetic.var_like_qkv(jax.random.key(0), PN, layers=2, batch=2, heads=2, head_dim=16,
                                   logit_scale=4.0)
  params = comp.init_params(None, 2, 2, calibration={'q': q, 'k': k, 'v': v})
  np.testing.assert_allclose(params['spread_gain'], np.full((2, 2), 16.0 / 32), rtol=1e-5)
  assert comp.init_params(None, 2, 2, calibration={'k': k, 'v': v})['spread_gain'].max() == 0
  with pytest.raises(ValueError, match='calibration'):
    comp.init_params(None, 3, 2, calibration={'q': q})
  assert base.make('merge_learned', g, 1.0).init_params(None, 2, 2) is None


# ---- training -------------------------------------------------------------------------------------
def test_training_beats_init_and_tome_on_held_out_sequences():
  """60 Adam steps on train_outputs' aggregate relative error lower the HARD path's held-out error
  below its initial plan and below ToMe at the same budget (25%: M = 3 slots of 14 tokens)."""
  g = CacheGeometry(PN, head_dim=16)
  qkv = synthetic.var_like_qkv(jax.random.key(0), PN, layers=2, batch=8, heads=2, head_dim=16)
  train, held = (tuple(x[:, :4] for x in qkv), tuple(x[:, 4:] for x in qkv))   # same model, new seqs
  exact_train, exact_held = (evaluate.exact_outputs(*d, PN) for d in (train, held))
  comp = base.make('merge_learned', g, '25%')
  params = comp.init_params(jax.random.key(0), 2, 2)

  def hard_error(name, p):
    c = base.make(name, g, '25%')
    return float(rel_error(evaluate.run_teacher_forced(c, p, *held)['out'], exact_held))

  def loss(p):
    return rel_error(jax.vmap(comp.train_outputs)(p, *train), exact_train)

  opt = optax.adam(0.1)

  @jax.jit
  def update(p, s):
    l, grads = jax.value_and_grad(loss)(p)
    u, s = opt.update(grads, s, p)
    return optax.apply_updates(p, u), s, l

  init_err, tome_err = hard_error('merge_learned', params), hard_error('tome', None)
  state = opt.init(params)
  for _ in range(60):
    params, state, _ = update(params, state)
  trained_err = hard_error('merge_learned', params)
  print(f'held-out rel. error: init {init_err:.4f} trained {trained_err:.4f} tome {tome_err:.4f}')
  assert trained_err < 0.9 * init_err and trained_err < 0.9 * tome_err
