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
                                       ('2bpc', 2 * 54272), ('1000bits', 1000), (123, 123)])
def test_budget_parse(spec, bits):
  b = Budget.parse(spec, G256)
  assert b.bits == int(bits)
  assert b.fraction_of_fp16(G256) == pytest.approx(b.bits / G256.fp16_bits)
  assert b.bits_per_coordinate(G256) * 16 == pytest.approx(16 * b.bits / G256.coordinates)


@pytest.mark.parametrize('bad', ['lots', '-5%', -1.0])
def test_budget_errors_name_the_fix(bad):
  with pytest.raises(ValueError, match='budget|fraction'):
    Budget.parse(bad, G256)


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
