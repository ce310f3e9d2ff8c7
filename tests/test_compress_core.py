"""The compressor core: budgets, accounting, attention and the full-cache reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.core import synthetic
from compress.core.attention import attend, block_causal_attention
from compress.core.budget import Budget, CacheGeometry

G256 = CacheGeometry((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), head_dim=64)


def test_geometry_matches_var_256px_schedule():
  assert G256.num_tokens == 680
  assert G256.prefix_tokens == 424                   # RESEARCH.md: the cache peaks at 424 tokens
  assert G256.scale_starts[-1] == 424
  assert G256.fp16_bits == 424 * 2 * 64 * 16
  # d16 with CFG: 16 layers x 16 heads x 2 sequences, in MiB (RESEARCH.md: 85 MiB per image for L=680)
  full_680 = 680 * 2 * 64 * 2 * 16 * 16 * 2 / 2**20
  assert full_680 == pytest.approx(85, abs=0.1)


@pytest.mark.parametrize('spec,bits', [('25%', 0.25 * 868352), (0.5, 0.5 * 868352),
                                       ('2bpc', 2 * 54272), ('1000bits', 1000), ('123bits', 123)])
def test_budget_parse(spec, bits):
  b = Budget.parse(spec, G256)
  assert b.bits == int(bits)
  assert b.fraction_of_fp16(G256) == pytest.approx(b.bits / G256.fp16_bits)
  assert b.bits_per_coordinate(G256) * 16 == pytest.approx(16 * b.bits / G256.coordinates)


@pytest.mark.parametrize('bad', ['lots', '-5%', -1.0])
def test_budget_errors_name_the_fix(bad):
  with pytest.raises(ValueError, match='budget|fraction'):
    Budget.parse(bad, G256)


# ---- strict budget specs: every spec carries its unit --------------------------------------------
FORMS = ("'25%'", '0.25', "'2bpc'", "'100000bits'")    # what every refusal must show
G_ODD = CacheGeometry((1, 3), head_dim=3)              # 1 cached token: 6 coordinates, 96 fp16 bits


@pytest.mark.parametrize('geometry,spec,bits', [
    (G256, '25%', 868352 // 4), (G256, 0.25, 868352 // 4), (G256, '12.5%', 868352 // 8),
    (G256, '100%', 868352), (G256, 1.0, 868352), (G256, '2bpc', 2 * 54272), (G256, '2.5bpc', 135680),
    (G256, '100000bits', 100000), (G256, ' 2BPC ', 2 * 54272), (G256, '1e5bits', 100000),
    (G_ODD, '33%', 31), (G_ODD, 0.33, 31), (G_ODD, '2.5bpc', 15)])
def test_budget_forms_give_exact_bits(geometry, spec, bits):
  """'P%' and P/100 = floor(P/100 * fp16_bits); 'Xbpc' = floor(X * coordinates); 'Nbits' = N."""
  assert geometry.fp16_bits == geometry.coordinates * 16
  assert Budget.parse(spec, geometry) == Budget(bits)


def test_budget_percent_is_of_fp16_whatever_the_kv_dtype():
  """A float32 geometry's full cache is twice the fp16 yardstick: reachable in bits, not as a share."""
  g32 = CacheGeometry(G256.patch_nums, head_dim=64, kv_dtype='float32')
  assert g32.full_bits == 2 * g32.fp16_bits
  assert Budget.parse('25%', g32).bits == Budget.parse('25%', G256).bits == 868352 // 4
  assert Budget.parse('100%', g32).bits == g32.fp16_bits
  assert Budget.parse(f'{g32.full_bits}bits', g32).bits == g32.full_bits
  assert Budget.parse('32bpc', g32).bits == g32.full_bits
  assert compress.make('window', g32, Budget(g32.full_bits)).passthrough


@pytest.mark.parametrize('bad', [
    25, 123, np.int64(5), True, False, '25', '0.25', ' 7 ',       # bare numbers: no unit
    2.0, 25.0, 1.0000001, '150%', '100.5%',                       # above the whole fp16 cache
    0.0, -0.25, '0%', '-5%', '0bits', '-3bits', '0bpc', '-1bpc',  # zero or negative
    float('nan'), 'nan%', 'inf%', 'infbits',                      # not finite
    '2.5bits', 'lots', '25 percent', '%', 'bits', '', None])      # not whole bits, no unit, no number
def test_budget_refusals_list_the_accepted_forms(bad):
  with pytest.raises(ValueError) as e:
    Budget.parse(bad, G256)
  msg = str(e.value)
  assert msg.startswith(f'cannot read budget {bad!r}'), msg
  for form in FORMS:
    assert form in msg, (form, msg)


def test_make_refuses_bare_numbers_and_takes_budgets():
  with pytest.raises(ValueError, match=r"cannot read budget 1000: .*'100000bits'"):
    compress.make('window', G256, 1000)
  with pytest.raises(ValueError, match=r"cannot read budget '25': .*'25%'"):
    compress.make('window', G256, '25')
  b = Budget(1000)                                       # a Budget object passes as it is
  assert compress.make('window', G256, b).budget is b and Budget.parse(b, G256) is b
  assert compress.make('window', G256, '1000bits').budget == b


def test_budget_of_bits_is_a_whole_non_negative_number():
  assert Budget(0).bits == 0 and Budget(np.int64(7)).bits == 7   # Budget(bits) directly: 0 allowed
  for bad in (-1, 1.5, True, '100'):
    with pytest.raises(ValueError, match='whole number of bits'):
      Budget(bad)


def test_hard_sweep_cli_budgets():
  from compress.theory.hard_sweep import _budget_spec
  assert _budget_spec('5%') == '5%' and _budget_spec('2bpc') == '2bpc' and _budget_spec('100bits') == '100bits'
  assert _budget_spec('0.05') == 0.05 and _budget_spec('1') == 1.0   # a bare number: a fraction in (0, 1]
  for bad in ('25', '0', '-0.1', '1.5'):
    with pytest.raises(ValueError, match=r'fraction of the fp16 cache in \(0, 1\].*"25%"'):
      _budget_spec(bad)


def test_bad_geometry_and_unknown_compressor():
  with pytest.raises(ValueError, match='patch_nums'):
    CacheGeometry((4,))
  with pytest.raises(KeyError, match='registered'):
    compress.make('no-such-method', G256, 0.5)
  with pytest.raises(TypeError, match='settings'):
    compress.make('full', G256, 0.5, nonsense=3)


def test_attend_equals_brute_force_softmax():
  rng = np.random.default_rng(0)
  B, H, M, S, D = 2, 3, 5, 4, 8
  q, ck, cv = rng.normal(size=(B, H, S, D)), rng.normal(size=(B, H, M, D)), rng.normal(size=(B, H, M, D))
  k, v = rng.normal(size=(B, H, S, D)), rng.normal(size=(B, H, S, D))
  valid = np.array([True, True, False, True, False])
  bias = rng.normal(size=(B, H, M))
  out, pc, pn = attend(*(jnp.asarray(x, jnp.float32) for x in (q, ck, cv)), jnp.broadcast_to(valid, (B, H, M)),
                       jnp.asarray(bias, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32))
  keys = np.concatenate([ck[:, :, valid], k], 2)
  vals = np.concatenate([cv[:, :, valid], v], 2)
  logits = np.einsum('bhsd,bhnd->bhsn', q, keys)
  logits[..., :valid.sum()] += bias[:, :, None, valid]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum('bhsn,bhnd->bhsd', p, vals), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pc[..., ~valid], 0)
  np.testing.assert_allclose(pc.sum(-1) + pn.sum(-1), 1, rtol=1e-6)


def test_full_reference_is_exact_and_counts_every_bit():
  g = CacheGeometry((1, 2, 3, 4), head_dim=16, kv_dtype='float32')
  q, k, v = synthetic.var_like_qkv(jax.random.key(0), g.patch_nums, head_dim=16)
  exact = compress.exact_outputs(q, k, v, g.patch_nums)
  res = compress.run_teacher_forced(compress.make('full', g, 1.0), None, q, k, v)
  assert compress.errors(res['out'], exact, g.patch_nums)['overall'] < 1e-6
  # after scale s the cache holds every token of scales <= s (none after the last), 2*16*32 bits each
  held = np.asarray(res['bits'][0, 0, 0])
  np.testing.assert_array_equal(held, [1 * 1024, 5 * 1024, 14 * 1024, 14 * 1024])
  assert held.max() == g.full_bits


def test_fp16_full_cache_equals_attention_over_rounded_cache():
  g = CacheGeometry((1, 2, 3, 4), head_dim=16)
  q, k, v = synthetic.var_like_qkv(jax.random.key(1), g.patch_nums, head_dim=16)
  res = compress.run_teacher_forced(compress.make('full', g, 1.0), None, q, k, v)
  # the last scale attends to an fp16 prefix cache plus its own fp32 tokens
  r16 = lambda x: x.at[..., :g.prefix_tokens, :].set(x[..., :g.prefix_tokens, :].astype(jnp.float16).astype(jnp.float32))
  ref = compress.exact_outputs(q, r16(k), r16(v), g.patch_nums)
  last = slice(g.prefix_tokens, None)
  np.testing.assert_allclose(res['out'][..., last, :], ref[..., last, :], rtol=1e-5, atol=1e-6)
  assert not np.allclose(res['out'][..., last, :], compress.exact_outputs(q, k, v, g.patch_nums)[..., last, :],
                         rtol=1e-7, atol=1e-8)  # fp16 storage is visible, so the check has teeth


def test_block_causal_attention_matches_loop():
  pn = (1, 2, 3)
  rng = np.random.default_rng(3)
  q, k, v = (rng.normal(size=(1, 1, 14, 4)).astype(np.float32) for _ in range(3))
  out = np.asarray(block_causal_attention(q, k, v, pn))
  ends = np.cumsum([p * p for p in pn])
  for i in range(14):
    n = ends[np.searchsorted(ends, i, side='right')]
    lg = q[0, 0, i] @ k[0, 0, :n].T
    p = np.exp(lg - lg.max())
    np.testing.assert_allclose(out[0, 0, i], (p / p.sum()) @ v[0, 0, :n], rtol=1e-5, atol=1e-6)


def test_wrong_scale_shape_is_a_clear_error():
  g = CacheGeometry((1, 2, 3), head_dim=8)
  c = compress.make('full', g, 1.0)
  s = c.init_state(1, 1)
  x = jnp.zeros((1, 1, 3, 8))
  with pytest.raises(ValueError, match='scale 1 has 4 tokens'):
    c.step(None, s, x, x, x, 1)


def test_first_max_index_is_argmax_with_ties_and_inf_rows():
  """`first_max_index` against numpy's argmax (first maximum) on rows full of ties and all -inf rows."""
  from compress.core.topk import first_max_index
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (50, 7)).astype(np.float32)       # many tied maxima per row
  x[::7] = -np.inf                                          # rows where every entry is -inf
  x[3, 5] = np.inf
  np.testing.assert_array_equal(np.asarray(first_max_index(jnp.asarray(x))), np.argmax(x, axis=1))


@pytest.mark.parametrize('N,k', [(9, 1), (9, 4), (9, 8), (506, 337), (274, 105)])
def test_topk_mask_is_a_stable_sort_of_the_valid_scores(N, k):
  """The sort-free `topk_mask` against numpy's stable sort: the k highest valid scores, ties broken by
  the lower index, every valid one when fewer than k are valid; on rows full of ties (few distinct
  values, float16-rounded), -inf and negative scores, rows with 0..N valid entries; and the same
  entries as `topk_indices` (lax.top_k)."""
  from compress.core.topk import topk_indices, topk_mask
  rng = np.random.default_rng(N + k)
  R = 64
  score = np.where(rng.random((R, N)) < 0.5, rng.integers(-3, 3, (R, N)),
                   rng.standard_normal((R, N)).astype(np.float16)).astype(np.float32)
  score[rng.random((R, N)) < 0.05] = -np.inf
  valid = rng.random((R, N)) < rng.random((R, 1)) * 1.2          # from none to every entry valid
  valid[0], valid[1] = False, True
  want = np.zeros((R, N), bool)
  for r in range(R):
    order = np.argsort(-np.where(valid[r], score[r], -np.inf), kind='stable')[:k]
    want[r, order] = True
  want &= valid
  got = np.asarray(topk_mask(jnp.asarray(score), jnp.asarray(valid), k))
  np.testing.assert_array_equal(got, want)
  idx, ok = topk_indices(jnp.asarray(score), jnp.asarray(valid), k)
  via_top_k = np.zeros((R, N), bool)
  np.put_along_axis(via_top_k, np.asarray(idx), np.asarray(ok), axis=-1)
  np.testing.assert_array_equal(got, via_top_k)


@pytest.mark.parametrize('M', [0, 1, 7])
def test_attend_output_is_attends_output(M):
  """The one-softmax form against `attend`'s two-part one: logit biases, invalid slots (zero weight),
  an empty cache."""
  from compress.core.attention import attend_output
  rng = np.random.default_rng(M)
  B, H, S, D = 2, 3, 5, 4
  q, k, v = (jnp.asarray(rng.standard_normal((B, H, S, D)), jnp.float32) for _ in range(3))
  ck, cv = (jnp.asarray(rng.standard_normal((B, H, M, D)), jnp.float32) for _ in range(2))
  valid = jnp.asarray(rng.random((B, H, M)) < 0.6)
  bias = jnp.asarray(rng.standard_normal((B, H, M)), jnp.float32)
  for b in (None, bias):
    want = attend(q, ck, cv, valid, b, k, v)[0]
    np.testing.assert_allclose(np.asarray(attend_output(q, ck, cv, valid, b, k, v)), np.asarray(want),
                               rtol=1e-5, atol=1e-6)
