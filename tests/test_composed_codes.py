"""The composed family's building blocks against independent truth: the bitstream against a bit-by-bit
numpy packer, the quantiser (the Gaussian compander) against a numpy re-implementation, its table
against quadrature and the optimal uniform quantiser, the
greedy allocation against brute force (and nested across budgets), and the per-scale schedule
(compress/composed/schedule.py) against its rules."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import compander_reference
import compress
from compress.composed import allocation, compander, schedule
from compress.composed.bitstream import MAX_WIDTH, pack_heads_first, unpack_heads_first
from compress.composed.compander import dequantize, quantize
from compress.core.budget import Budget, CacheGeometry


def numpy_pack(codes_BHMR, width_HR, num_bits):
  """Bit by bit: code j's bit b goes to stream bit o_j + b, stream bit e to byte e // 8, bit e % 8."""
  B, H, M, R = codes_BHMR.shape
  out = np.zeros((B, H, M, -(-num_bits // 8)), np.uint8)
  for h in range(H):
    e = 0
    for j in range(R):
      for b in range(int(width_HR[h, j])):
        bit = (codes_BHMR[:, h, :, j] >> b) & 1
        out[:, h, :, e // 8] |= (bit << (e % 8)).astype(np.uint8)
        e += 1
  return out


def _widths(case, rng):
  """(H, R) widths and the stream bits E of a case."""
  if case == 'random':
    width = rng.integers(0, MAX_WIDTH + 1, (3, 12))
    width[0, -3:] = 0                                     # trailing empty codes
    width[1] = MAX_WIDTH                                  # 16-bit codes straddle three bytes
    return width, int(width.sum(1).max()) + 5
  # a 1..31-bit lead, then 16-bit codes and fillers up to exactly E bits: every 32-bit word boundary
  # crossed at every offset, the stream full; E = 128 (whole words) or 120 (15 bytes, a partial word)
  E = 128 if case == 'words' else 120
  rows = []
  for lead in range(1, 32):
    row, left = [lead], E - lead
    while left:
      row.append(min(MAX_WIDTH, left))
      left -= row[-1]
    rows.append(row)
  R = max(map(len, rows))
  return np.array([r + [0] * (R - len(r)) for r in rows]), E


@pytest.mark.parametrize('case', ['random', 'words', 'short'])
def test_bitstream_equals_a_bitwise_packer_and_round_trips(case):
  rng = np.random.default_rng(0)
  width, E = _widths(case, rng)
  codes = rng.integers(0, 2 ** 16, (2, width.shape[0], 4, width.shape[1])) % (2 ** width)[None, :, None]
  stream = pack_heads_first(jnp.asarray(codes.transpose(1, 3, 0, 2)), jnp.asarray(width), E)  # (H, R, B, M)
  assert stream.dtype == jnp.uint8 and stream.shape == (2, width.shape[0], 4, -(-E // 8))
  np.testing.assert_array_equal(np.asarray(stream), numpy_pack(codes, width, E))
  back = np.asarray(unpack_heads_first(stream, jnp.asarray(width)))              # (H, R, B, M)
  np.testing.assert_array_equal(back.transpose(2, 0, 3, 1), codes)


def test_quantiser_codes_read_backs_and_no_drift():
  """Codes are the cells of the docstring's edges, read-backs their centroids (a numpy re-implementation
  from the docstring: tests/compander_reference.py); every code of every width reads back inside its
  cell, so re-encoding it gives it again (no drift); width 0 reads the mean."""
  rng = np.random.default_rng(1)
  for w in range(MAX_WIDTH + 1):
    scale = np.float32(rng.uniform(0.05, 2.0))
    coef = rng.normal(0, 1.5 * scale, 4000).astype(np.float32)
    coef[:4] = [0.0, 30 * scale, -30 * scale, scale]                   # far tails never clip
    wd = np.full(coef.shape, w, np.float32)
    code = np.asarray(quantize(jnp.asarray(coef), scale, jnp.asarray(wd)))
    np.testing.assert_array_equal(code, compander_reference.code((coef / scale).astype(np.float64), w))
    back = np.asarray(dequantize(jnp.asarray(code), scale, jnp.asarray(wd)))
    spread = compander.SPREAD[w]
    np.testing.assert_allclose(back, compander_reference.centroid(code.astype(np.int64), w, spread) * scale,
                               rtol=2e-6, atol=1e-30)
    every = np.arange(2 ** w, dtype=np.float32)
    ws = jnp.full(every.shape, w, jnp.float32)
    np.testing.assert_array_equal(np.asarray(quantize(dequantize(jnp.asarray(every), scale, ws), scale, ws)), every)
    assert np.all(np.isfinite(back))
  assert np.all(np.asarray(dequantize(jnp.zeros(3), 1.0, jnp.zeros(3))) == 0)


def gauss_uniform_mse(step: float, w: int) -> float:
  """MSE of the 2^w-level midrise uniform quantiser of a unit Gaussian: granular cells by 8-point
  Gauss-Legendre, the overload tail in closed form (E[(x - c)^2; x > L] = (1 + c^2) Q(L) + (L - 2c) phi(L))."""
  half = 2 ** (w - 1)
  lo = np.arange(half - 1) * step
  x, wt = np.polynomial.legendre.leggauss(8)
  u = lo[:, None] + step / 2 * (1 + x[None])
  c = lo[:, None] + step / 2
  gran = (step / 2 * ((u - c) ** 2 * np.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)) @ wt).sum()
  L, cl = (half - 1) * step, (half - 0.5) * step
  phi, tail = math.exp(-L * L / 2) / math.sqrt(2 * math.pi), math.erfc(L / math.sqrt(2)) / 2
  return 2 * (gran + (1 + cl * cl) * tail + (L - 2 * cl) * phi)


def optimal_step(w: int) -> float:
  """Golden-section search of the MSE over log(step)."""
  a, b = math.log(1e-5), math.log(4.0)
  r = (math.sqrt(5) - 1) / 2
  for _ in range(120):
    c, d = b - r * (b - a), a + r * (b - a)
    if gauss_uniform_mse(math.exp(c), w) < gauss_uniform_mse(math.exp(d), w):
      b = d
    else:
      a = c
  return math.exp((a + b) / 2)


def compander_mse(w: int, spread: float) -> float:
  """MSE of the compander (tests/compander_reference.py) on a unit Gaussian: sum over cells of
  int (x - r_c)^2 phi(x) dx, inner cells by 8-point Gauss-Legendre, the two outer ones in closed form
  (E[(x - c)^2; x > L] = (1 + c^2) Q(L) + (L - 2c) phi(L)). x in units of the component's deviation: the
  edges are spread x Phi^-1(i / 2^w), the read-backs spread x the centroids (in units of the scale)."""
  if w == 0:
    return 1.0
  n = 2 ** w
  e = spread * special.ndtri(np.arange(1, n) / n)
  r = spread * compander_reference.centroid(np.arange(n), w, spread)
  x, wt = np.polynomial.legendre.leggauss(8)
  lo, hi = e[:-1, None], e[1:, None]
  u = (lo + hi) / 2 + (hi - lo) / 2 * x[None]
  inner = (((hi - lo) / 2 * (u - r[1:-1, None]) ** 2 * np.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)) @ wt).sum()
  L, c = e[-1], r[-1]
  tail = (1 + c * c) * special.ndtr(-L) + (L - 2 * c) * math.exp(-L * L / 2) / math.sqrt(2 * math.pi)
  return float(inner + 2 * tail)            # symmetric: the lower outer cell equals the upper one


@pytest.mark.parametrize('w', range(1, MAX_WIDTH + 1))
def test_compander_table_is_its_mse_and_beats_the_uniform_quantiser(w):
  """MSE[w] is the compander's MSE by quadrature (to 1e-6 up to 11 bits; the high-rate law after, to
  0.1 %); its spread is optimal (1 % either way costs MSE) below 12 bits and sqrt(3) after; and it is
  below the MSE-optimal uniform quantiser from 3 bits on (0.5x at 8 bits), equal at 1 bit."""
  spread = compander.SPREAD[w]
  mse = compander_mse(w, spread)
  assert allocation.GAUSS_MSE[w] == pytest.approx(mse, rel=1e-6 if w <= 11 else 1e-3)
  if 2 <= w <= 11:
    assert min(compander_mse(w, spread * 0.99), compander_mse(w, spread * 1.01)) > mse
  else:
    assert spread == pytest.approx(math.sqrt(3), rel=1e-12)
  uniform = gauss_uniform_mse(optimal_step(w), w)
  assert mse < uniform * (0.93 if w >= 3 else 1.0 + 1e-9)
  if w == 8:
    assert mse < 0.5 * uniform


def test_gaussian_table_is_convex():
  """Each further bit removes less distortion than the one before: the greedy allocation is optimal."""
  gain = -np.diff(allocation.GAUSS_MSE)
  assert allocation.GAUSS_MSE.shape == allocation.GAUSS_SPREAD.shape == (MAX_WIDTH + 1,)
  assert np.all(gain > 0) and np.all(np.diff(gain) < 0)


def test_greedy_allocation_is_optimal_and_nested():
  rng = np.random.default_rng(2)
  grid = np.array(list(itertools.product(range(MAX_WIDTH + 1), repeat=3)))
  for _ in range(4):
    wv = rng.lognormal(0, 3, (1, 3))
    costs = (wv[0] * allocation.GAUSS_MSE[grid]).sum(1)
    budgets = (40, 30, 12, 7, 0)
    nested = allocation.allocate_nested(wv, budgets)
    for E, got in zip(budgets, nested):
      assert got[0].sum() <= E and got.max() <= MAX_WIDTH
      best = costs[grid.sum(1) <= E].min()
      assert (wv[0] * allocation.GAUSS_MSE[got[0]]).sum() == pytest.approx(best, rel=1e-12)
      np.testing.assert_array_equal(got, allocation.allocate(wv, E))
    assert np.all(np.diff(nested, axis=0) <= 0)        # fewer bits: no component gets wider


GEOMETRIES = [CacheGeometry((1, 2, 3, 4), 8), CacheGeometry((1, 2, 3, 4, 5, 6, 8), 64),
              CacheGeometry((1, 2, 3), 4, 'float32'), CacheGeometry((2, 1, 3), 16)]


def rule_modes(g, bits, m, sink):
  """The modes the schedule's rules give with `sink` exact tokens beside the codes (module doc of
  compress/composed/schedule.py)."""
  modes, coded, held, last = [], False, 0, None
  for T, S in zip(g.scale_starts[1:], g.scale_sizes):
    if not coded and T * 2 * g.head_dim * g.kv_bits + 16 <= bits:
      modes.append('exact')
      held = T - sink
      continue
    slots = max(1, min(T - sink, m, held + S))
    room = (bits - 16 - sink * 2 * g.head_dim * g.kv_bits - slots * (16 if slots < T - sink else 0)) // slots
    E = min(max(0, room) // 8 * 8, 2 * g.head_dim * MAX_WIDTH, last if last is not None else 1 << 30)
    ok = E > 0 and (not modes or modes[-1] != 'empty') and (not sink or bool(modes))
    modes.append('coded' if ok else 'empty')
    coded, held, last = True, slots if ok else 0, E
  return modes


@pytest.mark.parametrize('g', GEOMETRIES, ids=lambda g: f'{g.patch_nums}-{g.head_dim}-{g.kv_dtype}')
def test_schedule_rules(g):
  rng = np.random.default_rng(3)
  budgets = [0, 17, 16 + 8, 16 + 16 + 8] + list(rng.integers(1, g.full_bits, 30))
  sinks = set()
  for bits, keep in itertools.product(budgets, (0.0, 0.3, 1.0)):
    comp = compress.make('composed', g, Budget(int(bits)), keep=keep)
    T, D = g.prefix_tokens, g.head_dim
    m = T if comp.keep_share >= 1 else max(1, round(comp.keep_share * T))
    plan = comp.stages()
    assert [s.tokens for s in plan] == list(g.scale_starts[1:])
    # the first scale's tokens stay exact beside the codes unless that empties a stage coded without
    n0 = g.scale_sizes[0]
    empties = lambda n: rule_modes(g, bits, m, n).count('empty')
    cheap = n0 * 2 * D * g.kv_bits <= bits / 16                # at most 1/16 of the budget
    sink = n0 if cheap and empties(n0) <= empties(0) else 0
    assert [s.mode for s in plan] == rule_modes(g, bits, m, sink), (g, bits, keep)
    if 'coded' in rule_modes(g, bits, m, sink):
      sinks.add(sink)
    held, last_E, codes = 0, None, []
    for s, S in zip(plan, g.scale_sizes):
      where = f'{g} at {bits} bits, keep {keep}: {s}'
      assert s.bits() <= bits, where
      fits = s.tokens * 2 * D * g.kv_bits + 16 <= bits
      if s.mode == 'exact':
        assert fits and last_E is None and (s.slots, s.entry_bits) == (s.tokens, 2 * D * g.kv_bits), where
        assert s.sink == 0 and s.bits() == 16 + s.tokens * 2 * D * g.kv_bits, where
        held = s.tokens - sink
        continue
      if s.mode == 'coded':
        assert not fits or last_E is not None, where        # exact while it fits (and never after codes)
        assert (s.sink, s.sink_bits) == (sink, sink * 2 * D * g.kv_bits), where
        n = s.tokens - sink                                  # the coded tokens
        assert s.slots == min(n, m, held + S) and s.sizes == (s.slots < n), where
        room = (bits - 16 - s.sink_bits) // s.slots - (16 if s.sizes else 0)
        want = min(room // 8 * 8, 2 * D * MAX_WIDTH, last_E if last_E is not None else 1 << 30)
        assert s.entry_bits == want > 0 and s.entry_bits % 8 == 0, where
        assert s.bits() == 16 + s.slots * (s.entry_bits + (16 if s.sizes else 0)) + s.sink_bits, where
        if not codes or codes[-1] != s.entry_bits:
          codes.append(s.entry_bits)
        assert s.code == len(codes) - 1, where
        last_E = s.entry_bits
      else:
        assert s.mode == 'empty' and s.bits() == 0, where
        assert all(t.mode == 'empty' for t in plan[plan.index(s):]), where
      held = s.slots
    assert schedule.code_bits(plan) == tuple(codes)
    last = plan[-1]
    # the peak: min(m, T - sink) entries at the widest E its room gives, wherever 8-bit codes sufficed
    slots = min(m, T - sink)
    old_E = max(0, (bits - 16 - sink * 2 * D * g.kv_bits - slots * (16 if slots < T - sink else 0))
                // slots) // 8 * 8
    if old_E < 2 * D * 8 and last.mode == 'coded':
      assert (last.slots, last.entry_bits) == (slots, old_E) == comp.plan()
  both = 16 * g.scale_sizes[0] * 2 * g.head_dim * g.kv_bits < g.full_bits
  assert sinks == ({0, g.scale_sizes[0]} if both else {0})  # both layouts occur where the sink can


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
def test_loaded_widths_must_fit_this_versions_entry_bits(name):
  """Parameters allocated for another schedule (another keep: other entry widths E, the same number of
  codes) are refused when loaded, naming the code and the fix; this version's own pass."""
  g = CacheGeometry((1, 2, 3, 4), 64)
  rng = np.random.default_rng(0)
  cal = {t: rng.standard_normal((2, 2, 4, sum(p * p for p in g.patch_nums), 64)).astype(np.float32) for t in 'qkv'}
  comp, other = (compress.make(name, g, '25%', keep=k) for k in (0.5, 1.0))
  assert len(schedule.code_bits(comp.stages())) == len(schedule.code_bits(other.stages()))
  assert schedule.code_bits(comp.stages()) != schedule.code_bits(other.stages())
  params = comp.init_params(jax.random.key(0), 2, 4, calibration=cal)
  comp.check_loaded(params)                                        # its own widths fit
  # comp's second code (1000 bits: fewer slots) overflows other's (504 bits); the first is 1424 in both
  assert schedule.code_bits(comp.stages())[1] > schedule.code_bits(other.stages())[1]
  with pytest.raises(ValueError, match=r'widths of code 1 .* this version codes an entry there in '
                                       r'\d+ bits.*another schedule.*Retrain'):
    other.check_loaded(params)
