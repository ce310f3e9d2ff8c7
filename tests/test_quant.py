"""Quantisers, packing and the quantised caches (`kivi`, `quant_auto`): closed forms and brute force."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import compress
from compress.core import synthetic
from compress.core.attention import rel_error
from compress.core.budget import Budget, CacheGeometry
from compress.core.stable_slots import window_slot_positions
from compress.quantization import codes as quant

HYP = settings(max_examples=6, deadline=None, derandomize=True, database=None)
G4 = CacheGeometry((1, 2, 3, 4), head_dim=8)


# ---- packing --------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('bits', 'n'))
def _round_trip(codes, bits, n):
  packed = quant.pack_codes(codes, bits)
  return packed, quant.unpack_codes(packed, bits, n)


@pytest.mark.parametrize('n', [1, 3, 8, 13])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_pack_unpack_round_trip(bits, n):
  @HYP
  @given(codes=hnp.arrays(np.uint8, (3, n), elements=st.integers(0, 2 ** bits - 1)))
  def check(codes):
    packed, back = _round_trip(jnp.asarray(codes), bits, n)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, math.ceil(n * bits / 8))
    np.testing.assert_array_equal(np.asarray(back), codes)
  check()


def test_pack_layout_by_hand():
  # 2 bits: code j at bits 2j..2j+1 -> 1 + 2*4 + 3*16 + 0*64 = 57; 4 bits: 0xA | 0x5 << 4 = 0x5A
  assert np.asarray(quant.pack_codes(jnp.array([1, 2, 3, 0, 3], jnp.uint8), 2)).tolist() == [57, 3]
  assert np.asarray(quant.pack_codes(jnp.array([10, 5], jnp.uint8), 4)).tolist() == [0x5A]


# ---- quantisers -----------------------------------------------------------------------------------
def _check_half_scale(x, xhat, scale):
  """Closed form: |x - x_hat| <= scale / 2 per element (float32 arithmetic slack)."""
  x, xhat, s = (np.asarray(a, np.float64) for a in (x, xhat, scale))
  assert np.all(np.abs(x - xhat) <= s / 2 + 1e-6 * (np.abs(x) + 256 * s)), np.max(np.abs(x - xhat) - s / 2)


_SAMPLES = st.tuples(st.integers(0, 2 ** 16), st.sampled_from([1e-3, 1.0, 300.0]))


@functools.partial(jax.jit, static_argnames=('bits', 'group'))
def _per_token(x, bits, group):
  codes, scale, zero = quant.quantize_per_token(x, bits, group)
  return codes, scale, zero, quant.dequantize_per_token(codes, scale, zero, group)


@pytest.mark.parametrize('D,group', [(1, 1), (13, 4), (13, 13), (8, 32)])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_per_token_error_within_half_scale(bits, D, group):
  g, ng = quant.token_groups(D, group)

  @HYP
  @given(sample=_SAMPLES)
  def check(sample):
    seed, mag = sample
    x = (mag * np.random.default_rng(seed).standard_normal((2, 5, D))).astype(np.float32)
    codes, scale, zero, xhat = _per_token(jnp.asarray(x), bits, group)
    assert scale.dtype == zero.dtype == jnp.float16 and scale.shape == (2, 5, ng)
    assert codes.dtype == jnp.uint8 and int(codes.max()) < 2 ** bits
    per = lambda a: np.repeat(np.asarray(a, np.float64), g, axis=-1)[..., :D]
    _check_half_scale(x, xhat, per(scale))
    xg = np.pad(x, [(0, 0), (0, 0), (0, ng * g - D)], mode='edge').reshape(2, 5, ng, g)
    s, z = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    assert np.all(z <= xg.min(-1))                                    # the grid covers the group
    assert np.all(z + (2 ** bits - 1) * s >= xg.max(-1) - 1e-6 * np.abs(xg).max(-1))
  check()


@functools.partial(jax.jit, static_argnames=('bits', 'group'))
def _per_channel(x, valid, bits, group):
  codes, scale, zero = quant.quantize_per_channel(x, valid, bits, group)
  return codes, scale, zero, quant.dequantize_per_channel(codes, scale, zero, group)


@pytest.mark.parametrize('M,group', [(11, 4), (5, 5), (3, 8)])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_per_channel_error_within_half_scale_and_ignores_invalid(bits, M, group):
  @HYP
  @given(sample=_SAMPLES)
  def check(sample):
    seed, mag = sample
    rng = np.random.default_rng(seed)
    x = (mag * rng.standard_normal((1, M, 3))).astype(np.float32)
    valid = rng.random((1, M)) < 0.7
    x_junk = np.where(valid[..., None], x, 1e4).astype(np.float32)    # invalid entries must not matter
    codes, scale, zero, xhat = _per_channel(jnp.asarray(x_junk), jnp.asarray(valid), bits, group)
    assert scale.dtype == jnp.float16 and scale.shape == (1, math.ceil(M / group), 3)
    ok = np.broadcast_to(valid[..., None], x.shape)
    per = np.asarray(quant.expand_channel_groups(scale, M, group), np.float64)
    _check_half_scale(x[ok], np.asarray(xhat)[ok], per[ok])
    assert np.all(np.asarray(codes)[~valid] == 0)
    for gi in range(math.ceil(M / group)):        # an all-invalid group stores scale = zero = 0
      if not valid[0, gi * group:(gi + 1) * group].any():
        assert not np.any(np.asarray(scale[0, gi])) and not np.any(np.asarray(zero[0, gi]))
  check()


def test_constant_group_is_exact_and_rounding_is_directed():
  x = jnp.full((1, 4), 0.1, jnp.float32)                 # 0.1 is not a float16
  codes, scale, zero = quant.quantize_per_token(x, 2, 4)
  assert float(zero[0, 0]) <= 0.1 <= float(zero[0, 0]) + 3 * float(scale[0, 0])
  np.testing.assert_allclose(quant.dequantize_per_token(codes, scale, zero, 4), x,
                             atol=float(scale[0, 0]) / 2)
  assert float(quant.round_up_f16(jnp.float32(0.1))) >= 0.1 >= float(quant.round_down_f16(jnp.float32(0.1)))


# ---- the cache ------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 5))
def _step(comp, state, q, k, v, scale):
  return comp.step(None, state, q, k, v, scale)


def _run(comp, q_BHLD, k_BHLD, v_BHLD):
  """Steps through every scale: outputs (B, H, L, D) and the states after each scale."""
  g = comp.geometry
  state, outs, states = comp.init_state(*q_BHLD.shape[:2]), [], []
  for si, (s0, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(s0, s0 + S)
    out, state = _step(comp, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si)
    outs.append(out)
    states.append(state)
  return np.concatenate(outs, 2), states


def _hand_bits(m, count):
  """kivi 4-bit, D=8, G=4: entry = 4 B key codes + 4 B value codes + 2 value groups x (scale + zero)
  fp16 = 32 + 32 + 64 = 128 bits; per head: ceil(m/4) key groups x 8 channels x (scale + zero) fp16
  + 16 (count)."""
  return count * 128 + math.ceil(m / 4) * 8 * 32 + 16


_KIVI4 = dict(bit_width=4, group_size=4, evict='window')
_QKV4 = synthetic.var_like_qkv(jax.random.key(0), G4.patch_nums, layers=1, batch=2, heads=2, head_dim=8)


def test_bits_equal_hand_count():
  comp = compress.make('kivi', G4, Budget(_hand_bits(10, 10)), **_KIVI4)
  assert comp.capacity == 10
  assert compress.make('kivi', G4, Budget(_hand_bits(10, 10) - 1), **_KIVI4).capacity == 9
  state = comp.init_state(2, 2)
  assert state.k.dtype == jnp.uint8 and state.k.shape == (2, 2, 10, 4)        # packed: 8 x 4 bits
  assert state.header['k_scale'].shape == (2, 2, 3, 8) and state.header['k_zero'].dtype == jnp.float16
  assert state.extra['v_scale'].shape == (2, 2, 10, 2) and state.extra['v_zero'].dtype == jnp.float16
  _, states = _run(comp, *(x[0] for x in _QKV4))
  counts = [int(s.count[0, 0]) for s in states]
  assert counts == [1, 5, 10, 10]           # all kept until the capacity, then full; last scale: as is
  for s, c in zip(states, counts):
    np.testing.assert_array_equal(np.asarray(comp.bits(s)), _hand_bits(10, c))


def test_window_keeps_the_most_recent_tokens_and_values_are_quantised_once():
  comp = compress.make('kivi', G4, Budget(_hand_bits(10, 10)), **_KIVI4)       # shares the compilation above
  q, k, v = (x[0] for x in _QKV4)
  _, states = _run(comp, q, k, v)
  v_q = np.asarray(_per_token(v, 4, 4)[3])           # per-token codes: every token quantised on its own
  for si, (s0, S) in enumerate(zip(G4.scale_starts[:-1], G4.scale_sizes[:-1])):
    n = min(10, s0 + S)
    pos = window_slot_positions(G4.scale_sizes, 10, si + 1)[:n]
    assert sorted(pos.tolist()) == list(range(s0 + S - n, s0 + S))      # the last n positions
    k_hat, v_hat = jax.jit(comp.decode)(states[si])
    np.testing.assert_array_equal(np.asarray(v_hat[:, :, :n]), v_q[:, :, pos])
    # keys: per channel over slot groups; a survivor of a rewritten group is rounded once per rewrite
    step = np.asarray(quant.expand_channel_groups(states[si].header['k_scale'], 10, 4), np.float64)
    err = np.abs(np.asarray(k_hat[:, :, :n]) - np.asarray(k[:, :, pos]))
    assert np.all(err <= (si + 1) * 0.5 * step[:, :, :n] + 1e-6)


def test_budget_never_exceeded_and_other_layouts_count_right():
  """kivi 2-bit, keys per token / values per channel, G=3, h2o, D=8: entry = 2 B key codes + 3 key
  groups x 32 + 2 B value codes + 16 (score) = 144 bits; per head ceil(m/3) x 8 x 32 + 16."""
  hand = lambda m, count: count * 144 + math.ceil(m / 3) * 8 * 32 + 16
  settings_ = dict(bit_width=2, key_layout='token', value_layout='channel', group_size=3, evict='h2o')
  comp = compress.make('kivi', G4, Budget(hand(6, 6) + 100), **settings_)
  assert comp.capacity == 6
  out, states = _run(comp, *(x[0] for x in _QKV4))
  assert np.all(np.isfinite(out))
  for s in states:
    assert int(comp.bits(s).max()) == hand(6, int(s.count.max())) <= comp.budget.bits
  empty = compress.make('kivi', G4, Budget(hand(1, 1) - 1), **settings_)      # nothing fits: zero bits
  assert empty.capacity == 0 and int(empty.bits(empty.init_state(1, 1)).max()) == 0


def _np_attention_eviction(q, k, v, g, m, rule):
  """Brute force for 16-bit entries: per scale attend over kept fp16 entries + the scale; keep the m
  best by accumulated (h2o, stored as fp16) or current (snapkv) attention. Returns outputs, kept sets."""
  f16 = lambda x: np.asarray(np.asarray(x, np.float32).astype(np.float16), np.float64)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  outs, kept = [], []
  pos, acc = np.zeros(0, int), np.zeros(0)
  for si, (s0, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    new = np.arange(s0, s0 + S)
    keys = np.concatenate([f16(k[pos]), k[new]])
    vals = np.concatenate([f16(v[pos]), v[new]])
    lg = q[new] @ keys.T
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    outs.append(p @ vals)
    if si == len(g.scale_sizes) - 1:
      break
    score = p.sum(0) + (np.concatenate([acc, np.zeros(S)]) if rule == 'h2o' else 0)
    best = np.argsort(-score, kind='stable')[:m]
    pos, acc = np.concatenate([pos, new])[best], f16(score[best])
    kept.append(set(pos.tolist()))
  return np.concatenate(outs), kept


@pytest.mark.parametrize('rule', ['h2o', 'snapkv'])
def test_attention_eviction_matches_brute_force(rule):
  g = CacheGeometry((1, 2, 3, 4), head_dim=8, kv_dtype='float32')
  comp = compress.make('kivi', g, 0.2, bit_width=16, evict=rule)
  M = comp.capacity
  assert 0 < M < g.prefix_tokens
  q, k, v = (x[0] for x in _QKV4)
  out, states = _run(comp, q, k, v)
  assert all(int(comp.bits(s).max()) <= comp.budget.bits for s in states)
  for b, h in ((0, 0), (1, 1)):
    ref, kept = _np_attention_eviction(q[b, h], k[b, h], v[b, h], g, M, rule)
    np.testing.assert_allclose(out[b, h], ref, rtol=1e-5, atol=1e-6)
    keys16 = np.asarray(k[b, h].astype(jnp.float16))
    for s, want in zip(states, kept):
      stored = np.asarray(s.k[b, h, :int(s.count[b, h])])
      assert {int(np.flatnonzero((keys16 == row).all(1))[0]) for row in stored} == want


def test_attention_error_falls_with_bits_at_all_tokens():
  g = CacheGeometry((2, 3, 4), head_dim=16)
  q, k, v = synthetic.var_like_qkv(jax.random.key(4), g.patch_nums, layers=1, batch=2, heads=2, head_dim=16)
  exact = np.asarray(compress.exact_outputs(q, k, v, g.patch_nums)[0])
  errs = {}
  for b in (8, 4, 2):
    probe = compress.make('kivi', g, Budget(0), bit_width=b)
    entry, header = probe.layout_bits(b, g.prefix_tokens)
    comp = compress.make('kivi', g, Budget(g.prefix_tokens * entry + header), bit_width=b)
    assert comp.capacity == g.prefix_tokens                 # every token, at b bits
    errs[b] = float(rel_error(jnp.asarray(_run(comp, q[0], k[0], v[0])[0]), exact))
  assert errs[8] < 1e-2 and errs[8] < errs[4] < errs[2], errs


def test_quant_auto_rules():
  g = CacheGeometry((1, 2, 3, 4, 5, 6), head_dim=16)
  T = g.prefix_tokens
  probe = compress.make('kivi', g, Budget(0))
  need = {b: T * probe.layout_bits(b, T)[0] + probe.layout_bits(b, T)[1] for b in (8, 4, 2)}
  auto = lambda bits, **kw: compress.make('quant_auto', g, Budget(bits), **kw)
  # keep_all: the widest width that keeps every token, else 2 bits
  assert auto(need[8], rule='keep_all').bit_width == 8
  assert auto(need[8] - 1, rule='keep_all').bit_width == 4
  assert auto(need[4] - 1, rule='keep_all').bit_width == 2
  assert auto(need[2] // 3, rule='keep_all').bit_width == 2
  # tradeoff: argmin of (1 / (2^b - 1))^2 + (w (1 - kept fraction))^2, by hand
  for bits in (need[8], need[8] - 1, need[4], need[4] - 1, (need[4] + need[2]) // 2, need[2] // 3):
    c = auto(bits)
    err = {b: math.hypot(0 if b == 16 else 1 / (2 ** b - 1), 0.8 * (1 - c.capacity_at(b) / T))
           for b in (16, 8, 4, 2)}
    assert c.bit_width == min(err, key=err.get)
  assert auto(need[8]).bit_width == 8 and auto(need[4]).bit_width == 4
  assert auto(need[4] - 1).bit_width == 4                    # one token evicted beats 2-bit codes
  assert auto(need[8], evict_weight=0.0).bit_width == 16     # eviction free: widest codes
  g32 = CacheGeometry((1, 2, 3), head_dim=8, kv_dtype='float32')           # fp16 entries are a choice
  assert compress.make('quant_auto', g32, Budget(g32.full_bits // 2 + 16)).bit_width == 16


def test_bad_settings_name_the_fix():
  with pytest.raises(ValueError, match='bit_width must be one of'):
    compress.make('kivi', G4, 0.2, bit_width=3)
  with pytest.raises(ValueError, match='evict must be one of'):
    compress.make('kivi', G4, 0.2, evict='lru')
  with pytest.raises(ValueError, match='key_layout/value_layout'):
    compress.make('kivi', G4, 0.2, key_layout='row')
  with pytest.raises(ValueError, match='group_size'):
    compress.make('quant_auto', G4, 0.2, group_size=0)
  with pytest.raises(ValueError, match='rule must be'):
    compress.make('quant_auto', G4, 0.2, rule='best')
