"""bits(state) is what the state holds: for every registered compressor, after all scales of a tiny
geometry at a compressing budget (the cache ends full), `Compressor.bits(state)` per head equals the bits
of the arrays in the state (`tree_bits` over its leaves, / (batch * heads)).

The one documented exception (`Slots.count_implied`): a count that follows from the schedule is not
stored state: the full cache (the passthrough state of every compressor: its count is the scale's
start) and a cache that can hold nothing (capacity 0, or `pca` at rank 0: its count is 0 or costs no
entry bits). At this compressing budget, where every cache holds something, only the `full` reference
(which ignores the budget) has one, and the difference is exactly that 16-bit count. (Before this test,
`pca` / `lowrank_learned` kept an uncounted count: 16 bits per head above what they reported, e.g.
1808 bits held at a 1792-bit budget that they reported filling exactly, patch_nums (1, 2, 3, 4) at 25 %.)
"""
import jax
import numpy as np
import pytest

import compress
from compress.core.accounting import COUNT_DTYPE, dtype_bits, tree_bits
from compress.core.budget import Budget, CacheGeometry
from compress.core.slots import Slots
from fast_jit import run_scales, run_scales_states

G = CacheGeometry((1, 2, 3), head_dim=16)               # fp16 cache; 5 tokens at the peak
B, H = 2, 2
BUDGET = '70%'                                           # 1792 bits: every cache here ends full
VARIANTS = [(n, {}) for n in compress.available()] + [
    ('kivi', {'evict': 'h2o', 'key_layout': 'token'}), ('pca_evict', {'evict': 'h2o'})]


@pytest.fixture(scope='module')
def qkv():
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(0), G.patch_nums, layers=1, batch=B,
                                            heads=H, head_dim=G.head_dim)
  return q, k, v


@pytest.mark.parametrize('name,settings', VARIANTS, ids=[f'{n}{"-" + "-".join(s.values()) if s else ""}'
                                                          for n, s in VARIANTS])
def test_bits_equal_the_bits_the_state_holds(qkv, name, settings):
  q, k, v = qkv
  comp = compress.make(name, G, BUDGET, **settings)
  params = comp.init_params(jax.random.key(1), 1, H, calibration={'q': q, 'k': k, 'v': v})
  p0 = None if params is None else jax.tree.map(lambda x: x[0], params)
  _, state = run_scales(comp, p0, q[0], k[0], v[0])

  bits = np.asarray(comp.bits(state))
  assert bits.shape == (B, H) and np.all(bits == bits.flat[0]), bits
  held = tree_bits(state)                              # every array of the state at its dtype
  assert held % (B * H) == 0
  per_head = held // (B * H)
  assert isinstance(state, Slots), type(state)         # every built-in keeps Slots (another kind of
  implied = dtype_bits(COUNT_DTYPE) if state.count_implied else 0   # state needs its rule here)
  where = f'{name} {settings} at {comp.budget.bits} bits: reports {bits.flat[0]}, holds {per_head}'
  assert bits.flat[0] == per_head - implied, where
  if comp.respects_budget:
    assert not state.count_implied, f'{where}: a compressing cache stores its count'
    assert comp.budget.bits < G.full_bits and not comp.passthrough
    # the cache ends full: every allocated entry is valid, so no slack hides in unused slots
    np.testing.assert_array_equal(np.asarray(state.count), state.capacity, err_msg=where)
    assert state.capacity > 0, where
    assert bits.flat[0] == state.allocated_bits() <= comp.budget.bits, where
  else:                                                # only the full reference: count = the schedule's
    assert name == 'full' and state.count_implied and bits.flat[0] == G.full_bits, where


def test_pca_counts_its_count_and_stays_within_budget():
  """The fix: pca's ranks leave room for the stored 16-bit count. At exactly R dims per token the
  budget no longer fits R dims plus the count (R - 1 do); 16 bits more fit R again."""
  T, cb = G.prefix_tokens, G.kv_bits
  for R in (3, 8, 2 * G.head_dim):
    at = compress.make('pca', G, Budget(T * R * cb))
    plus = compress.make('pca', G, Budget(T * R * cb + 16))
    assert sum(at.plan()[1:]) == R - 1 and sum(plus.plan()[1:]) == R
    for c in (at, plus):
      state = c.init_compressed(1, 1)
      assert not state.count_implied
      assert state.allocated_bits() == tree_bits(state) <= c.budget.bits
  zero = compress.make('pca', G, Budget(T * cb + 15))  # not even one dim beside the count: rank 0,
  assert zero.plan()[1:] == (0, 0)                      # nothing stored, nothing to count
  assert zero.init_compressed(1, 1).allocated_bits() == 0


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
@pytest.mark.parametrize('budget,keep', [('10%', 0.0), ('40%', 0.0), ('40%', 0.4), ('65%', 1.0), ('1%', 0.0)])
def test_composed_bits_at_every_scale_equal_its_arrays(name, budget, keep):
  """composed's layout changes by scale (exact fp16 while the tokens fit, then codes that narrow, then
  merged slots with sizes: compress/composed/schedule.py): after EVERY scale its state's arrays are
  exactly what bits() counts, the planned stage's bits, and within the budget. (1 %: scale 0's token
  coded, then nothing: an empty cache, whose count follows from the schedule.)"""
  g = CacheGeometry((1, 2, 3, 4), head_dim=8)
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(2), g.patch_nums, layers=1, batch=B, heads=H,
                                            head_dim=g.head_dim)
  comp = compress.make(name, g, budget, keep=keep)
  params = comp.init_params(jax.random.key(1), 1, H, calibration={'q': q, 'k': k, 'v': v})
  _, states = run_scales_states(comp, jax.tree.map(lambda x: x[0], params), q[0], k[0], v[0])
  plan = comp.stages()
  modes = {s.mode for s in plan}
  assert modes == ({'coded', 'empty'} if budget == '1%' else {'exact', 'coded'}), plan
  for si, (stage, state) in enumerate(zip(plan + plan[-1:], states)):   # the last scale keeps the state
    bits = np.asarray(comp.bits(state))
    where = f'{name} at {budget}, keep {keep}, after scale {si}: {stage}'
    implied = dtype_bits(COUNT_DTYPE) if state.count_implied else 0
    assert state.count_implied == (stage.mode == 'empty'), where
    assert np.all(bits == stage.bits()) and stage.bits() <= comp.budget.bits, (where, bits)
    assert tree_bits(state) // (B * H) - implied == stage.bits(), where
    np.testing.assert_array_equal(np.asarray(state.count), state.capacity, err_msg=where)
