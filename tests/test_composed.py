"""The composed compressors (compress/composed/): bit packing, quantiser, allocation, the coding path
against a numpy re-implementation, the learned relaxation against the hard path, and the accounting."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.composed import allocation
from compress.composed.bitstream import pack_stream, unpack_stream
from compress.composed.transform_code import dequantize, quantize
from compress.core.accounting import tree_bits
from compress.core.budget import CacheGeometry
from fast_jit import run_scales

PN, D, H = (1, 2, 3), 8, 2


def test_bitstream_round_trip():
  rng = np.random.default_rng(0)
  width = rng.integers(0, 9, (3, 12))
  E = int(width.sum(1).max()) + 5
  codes = rng.integers(0, 256, (2, 3, 4, 12)) % (2 ** width)[None, :, None]
  stream = pack_stream(jnp.asarray(codes), jnp.asarray(width), E)
  assert stream.dtype == jnp.uint8 and stream.shape == (2, 3, 4, -(-E // 8))
  np.testing.assert_array_equal(np.asarray(unpack_stream(stream, jnp.asarray(width))), codes)


def test_quantiser_bound_and_no_drift():
  rng = np.random.default_rng(1)
  width = np.arange(9, dtype=np.float32)
  step = rng.uniform(0.05, 1.0, 9).astype(np.float32)
  coef = rng.normal(0, 2, (500, 9)).astype(np.float32)
  code = np.asarray(quantize(coef, step, width))
  assert code.min() >= 0 and np.all(code <= 2 ** width - 1)
  back = np.asarray(dequantize(code, step, width))
  inside = np.abs(coef) <= step * 2 ** width / 2          # within the quantiser's range
  assert np.all(np.abs(back - coef)[inside] <= step.repeat(500).reshape(9, 500).T[inside] / 2 * (1 + 1e-5))
  np.testing.assert_array_equal(np.asarray(quantize(back, step, width)), code)   # read back, re-encoded
  assert np.all(back[:, 0] == 0)                                                  # width 0 reads the mean


def test_greedy_allocation_is_optimal():
  rng = np.random.default_rng(2)
  for _ in range(5):
    wv = rng.lognormal(0, 2, (1, 3))
    for E in (0, 3, 7, 12):
      got = allocation.allocate(wv, E)[0]
      cost = lambda w: float((wv[0] * allocation.GAUSS_MSE[list(w)]).sum())
      best = min(cost(w) for w in itertools.product(range(9), repeat=3) if sum(w) <= E)
      assert got.sum() <= E and cost(got) == pytest.approx(best, rel=1e-12)


def calib(seed=1, B=2, patch_nums=PN):
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(seed), patch_nums, layers=1, batch=B, heads=H,
                                            head_dim=D)
  return {'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}


def numpy_reference(comp, params, q, k, v):
  """Every earlier token projected, quantised, read back and reconstructed in numpy (keep = 1)."""
  p = {n: np.asarray(a[0], np.float64) for n, a in params.items()}
  f16 = lambda a: np.asarray(np.asarray(a, np.float16), np.float64)
  read = {}
  for t, x in (('k', k), ('v', v)):
    mean, basis, step = f16(p[f'{t}_mean']), f16(p[f'{t}_basis']), f16(p[f'{t}_step'])
    w = np.round(p[f'{t}_width'])
    coef = np.einsum('bhld,hdr->bhlr', np.asarray(x, np.float64) - mean[None, :, None], basis)
    code = np.clip(np.floor(coef / step[None, :, None] + 2 ** w[None, :, None] / 2), 0, 2 ** w[None, :, None] - 1)
    back = (code + 0.5 - 2 ** w[None, :, None] / 2) * step[None, :, None]
    read[t] = np.einsum('bhlr,hdr->bhld', back, basis) + mean[None, :, None]
  g = comp.geometry
  out = np.zeros(q.shape)
  for st, S in zip(g.scale_starts, g.scale_sizes):
    keys = np.concatenate([read['k'][:, :, :st], k[:, :, st:st + S]], 2)
    vals = np.concatenate([read['v'][:, :, :st], v[:, :, st:st + S]], 2)
    lg = np.einsum('bhsd,bhnd->bhsn', q[:, :, st:st + S], keys)
    a = np.exp(lg - lg.max(-1, keepdims=True))
    out[:, :, st:st + S] = np.einsum('bhsn,bhnd->bhsd', a / a.sum(-1, keepdims=True), vals)
  return out


@pytest.mark.parametrize('budget', ['10%', '30%', '60%'])
def test_coding_path_equals_numpy_and_holds_the_budget(budget):
  g = CacheGeometry(PN, D)
  comp = compress.make('composed', g, budget, keep=1.0)
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib())
  x = calib(seed=3)
  q, k, v = (np.asarray(x[t][0], np.float64) for t in 'qkv')
  out, state = run_scales(comp, jax.tree.map(lambda a: a[0], params), *(jnp.asarray(x[t][0]) for t in 'qkv'))
  np.testing.assert_allclose(np.asarray(out), numpy_reference(comp, params, q, k, v), rtol=1e-4, atol=1e-5)
  m, E = comp.plan()
  assert m == g.prefix_tokens and E % 8 == 0 and E > 0
  assert int(np.asarray(comp.bits(state)).max()) == tree_bits(comp.init_state(1, 1)) <= comp.budget.bits
  assert comp.shared_bits(params) == tree_bits(comp.shared_params(params))
  widths = np.concatenate([np.asarray(params['k_width']), np.asarray(params['v_width'])], -1)
  assert widths.sum(-1).max() <= E and widths.max() <= 8


def test_fewer_slots_merge_and_count_their_sizes():
  g = CacheGeometry((1, 2, 3, 4), D)
  comp = compress.make('composed', g, '10%', keep=0.4)
  m, E = comp.plan()
  assert m == round(0.4 * g.prefix_tokens) and comp.merging
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib(5, patch_nums=g.patch_nums))
  x = calib(6, patch_nums=g.patch_nums)
  out, state = run_scales(comp, jax.tree.map(lambda a: a[0], params), *(jnp.asarray(x[t][0]) for t in 'qkv'))
  assert np.all(np.isfinite(np.asarray(out)))
  count, size = np.asarray(state.count), np.asarray(state.extra['size'])
  assert np.all(count <= m) and np.all(size[..., :m].sum(-1) <= g.prefix_tokens)
  assert np.all(size[np.arange(m)[None, None] >= count[..., None]] == 0)         # empty slots hold nothing
  assert int(np.asarray(comp.bits(state)).max()) <= comp.budget.bits


@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_learned_relaxation_equals_the_hard_path(keep):
  g = CacheGeometry((1, 2, 3, 4), D)
  comp = compress.make('composed_learned', g, '20%', keep=keep)
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib(patch_nums=g.patch_nums))
  x = calib(seed=3, patch_nums=g.patch_nums)
  p0 = jax.tree.map(lambda a: a[0], params)
  assert comp.merging == (keep < 1)
  hard, _ = run_scales(comp, p0, *(jnp.asarray(x[t][0]) for t in 'qkv'))
  relaxed = comp.train_outputs(p0, *(jnp.asarray(x[t][0]) for t in 'qkv'))
  np.testing.assert_allclose(np.asarray(relaxed), np.asarray(hard), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda p: jnp.sum(comp.train_outputs(p, *(jnp.asarray(x[t][0]) for t in 'qkv')) ** 2))(p0)
  assert float(jnp.abs(grads['k_logstep']).sum()) > 0 and float(jnp.abs(grads['v_basis']).sum()) > 0
  assert float(jnp.abs(grads['k_width']).sum()) == 0                              # widths are not trained
