"""Keeping everything is exact, with the compressor's own code running (not the passthrough).

A budget at or above the uncompressed cache makes `Compressor.step` run the plain full cache
(`passthrough`), so "full budget is exact" in tests/test_properties.py never runs a compressor's own
code. Here every compressor for which keeping every token is lossless by design runs its own
`compress_step` (`passthrough` turned off in a subclass) at the budget its own layout needs to hold
every token (the allocated bits of its state at capacity = all tokens, e.g. keys, values, count and its
per-entry fields), and its attention outputs must equal exact attention (`compress.exact_outputs`) up to
the rounding of the stored keys and values: per scale, no more error than the full cache at the same
dtype has (measured here on the same q, k, v: 2.1e-5 and 4.5e-5 relative at fp16, 9e-8 at float32),
plus 1e-6 for float32 summation order (the largest excess measured is 3e-8, attn_matching's fitted
values). One bit less (one token evicted, merged, quantised below 16 bits or a rank lower) gives errors
of 6e-4 to 0.16 (window_sum excepted: one token in its summary is still exact).

Per family:
- eviction, merging, matching, window: all, at fp16. Every candidate fits, so nothing is evicted,
  merged (sizes / log-masses stay 1 / 0), fitted away (w = 1, U = V) or summarised.
- quantization: `kivi` at bit_width 16 and `quant_auto` (which picks 16 bits when every token fits at
  16): fp16 storage, lossless like the full cache. Below 16 bits quantisation is lossy by design.
- lowrank: `pca`, `pca_evict`, `lowrank_learned` at full rank (rk = rv = head_dim: a rotation), at a
  float32 geometry. At fp16 their bases and means (shared parameters) are rounded to fp16 too, which
  adds two roundings to the cache's own (measured 2.1-3.2x the fp16 full-cache error), so fp16 storage
  is not their floor; at float32 their error is the float32 full cache's. Below full rank: lossy.
- `full`: skipped, it is the reference (its only code is the passthrough full cache).
- `composed`, `composed_learned`: skipped, their layout changes by scale (exact fp16 while the tokens
  fit, then codes: compress/composed/schedule.py), so no single layout holds every token;
  tests/test_composed.py checks that the scales whose whole prefix fits are exact.
"""
import dataclasses

import jax
import numpy as np
import pytest

import compress
from compress.core.accounting import tree_bits
from compress.core.budget import Budget, CacheGeometry
from fast_jit import run_scales

PATCH_NUMS, D, B, H = (1, 2, 3), 16, 2, 2
SKIPPED = {'full': 'the reference itself: its only code is the passthrough full cache',
           'composed': 'layout by scale: exact while the tokens fit, then codes (tests/test_composed.py)',
           'composed_learned': 'layout by scale: exact while the tokens fit, then codes (tests/test_composed.py)'}
SETTINGS = {'kivi': {'bit_width': 16}}                 # 16-bit codes = fp16 storage (others are lossy)
FLOAT32_FAMILIES = ('lowrank',)                        # fp16 parameters would add roundings (doc above)
SLACK = 1e-6                                           # float32 summation order, relative error units
NAMES = [n for n in compress.available() if n not in SKIPPED]


def own_code(comp: compress.Compressor, budget: Budget) -> compress.Compressor:
  """`comp` at `budget` with `passthrough` off: `step` runs the compressor's own `compress_step`."""
  cls = type(comp)
  sub = type(f'{cls.__name__}OwnCode', (cls,), {'passthrough': property(lambda self: False)})
  return sub(**{**{f.name: getattr(comp, f.name) for f in dataclasses.fields(comp)}, 'budget': budget})


def scale_errors(out_BHLD, q, k, v, g: CacheGeometry) -> np.ndarray:
  """(K,) relative L2 error per scale of one layer's outputs against exact attention."""
  exact = compress.exact_outputs(q, k, v, g.patch_nums)
  return compress.errors(out_BHLD[None], exact, g.patch_nums)['per_scale']


@pytest.fixture(scope='module')
def data():
  """Per kv dtype: (geometry, q, k, v (1, B, H, L, D), calibration, full-cache error per scale)."""
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(0), PATCH_NUMS, layers=1, batch=B, heads=H,
                                            head_dim=D)
  cq, ck, cv = compress.synthetic.var_like_qkv(jax.random.key(1), PATCH_NUMS, layers=1, batch=B,
                                               heads=H, head_dim=D)
  out = {}
  for dt in ('float16', 'float32'):
    g = CacheGeometry(PATCH_NUMS, D, dt)
    full_out, _ = run_scales(compress.make('full', g, '100%'), None, q[0], k[0], v[0])
    floor = scale_errors(full_out, q, k, v, g)
    assert floor[0] < 1e-6 and floor.max() < (1e-3 if dt == 'float16' else 1e-6), (dt, floor)
    out[dt] = (g, q, k, v, {'q': cq, 'k': ck, 'v': cv}, floor)
  return out


@pytest.mark.parametrize('name', NAMES)
def test_keeping_every_token_is_exact_in_the_compressors_own_code(data, name):
  family = compress.REGISTRY[name].family
  g, q, k, v, calib, floor = data['float32' if family in FLOAT32_FAMILIES else 'float16']
  T = g.prefix_tokens
  settings = SETTINGS.get(name, {})
  roomy = own_code(compress.make(name, g, Budget(4 * g.full_bits), **settings), Budget(4 * g.full_bits))
  need = tree_bits(roomy.init_state(1, 1))           # its own layout holding all T tokens
  comp = own_code(roomy, Budget(need))
  assert compress.make(name, g, Budget(need), **settings).passthrough   # why this needs the subclass
  state0 = comp.init_state(1, 1)
  assert state0.capacity == T and tree_bits(state0) == need, (name, state0.capacity, need)
  if family == 'lowrank':
    assert comp.plan() == (T, D, D)
  if name == 'quant_auto':
    assert comp.bit_width == 16

  params = comp.init_params(jax.random.key(2), 1, H, calibration=calib)
  p0 = None if params is None else jax.tree.map(lambda x: x[0], params)
  out, state = run_scales(comp, p0, q[0], k[0], v[0])
  # it ran its own code and ended holding every token in its own layout (not the full cache's)
  np.testing.assert_array_equal(np.asarray(state.count), T)
  np.testing.assert_array_equal(np.asarray(comp.bits(state)), need)
  err = scale_errors(out, q, k, v, g)
  assert np.all(err <= floor + SLACK), (f'{name} keeps every token but is not exact: error per scale '
                                        f'{err}, the {g.kv_dtype} full cache has {floor}')
