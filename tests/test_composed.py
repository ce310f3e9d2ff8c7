"""The composed compressors (compress/composed/): the coding path against a numpy re-implementation of
its schedule (exact fp16 while the cache fits, then codes re-coded narrower as it grows), exactness of
the scales whose whole prefix fits, the gain of a high budget, the learned relaxation against the hard
path, and the accounting. The codes themselves (bitstream, quantiser, allocation, schedule rules):
tests/test_composed_codes.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.core.accounting import tree_bits
from compress.core.budget import CacheGeometry
import compander_reference
from compress.composed import compander
from fast_jit import run_scales, run_scales_states

PN, D, H = (1, 2, 3, 4), 8, 2


def calib(seed=1, B=2, patch_nums=PN):
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(seed), patch_nums, layers=1, batch=B, heads=H,
                                            head_dim=D)
  return {'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}


def numpy_schedule(g: CacheGeometry, bits: int) -> tuple[list[tuple[str, int]], int]:
  """(mode, stream bits E) after each scale but the last, with one slot per token (keep = 1), and the
  sink n: exact at fp16 while the tokens so far and the count fit; then the first scale's n = n_0
  tokens stay at fp16 (the sink) and the other T - n are coded at E = the widest multiple of 8 with
  16 + n 2D 16 + (T - n) E <= bits, never wider than the scale before, at most 16 bits per coordinate;
  with n = 0 where the sink's bits exceed 1/16 of the budget, or it would leave a scale with no bits
  that n = 0 codes (these cases: no empty stage)."""
  def plan(n):
    out, last = [], None
    for T in g.scale_starts[1:]:
      if last is None and T * 2 * g.head_dim * 16 + 16 <= bits:
        out.append(('exact', 2 * g.head_dim * 16))
        continue
      last = min((bits - 16 - n * 2 * g.head_dim * 16) // (T - n) // 8 * 8, 2 * g.head_dim * 16,
                 last or 1 << 30)
      out.append(('coded', last))
    return out
  n0 = g.scale_sizes[0]
  with_sink, without = plan(n0), plan(0)
  assert all(E > 0 for _, E in without), 'these cases code every scale'
  cheap = n0 * 2 * g.head_dim * 16 <= bits / 16
  return (with_sink, n0) if cheap and all(E > 0 for _, E in with_sink) else (without, 0)


def numpy_reference(comp, params, q, k, v):
  """The schedule in float64 numpy (keep = 1): tokens held at fp16 while they fit; at a coded scale the
  first scale's tokens stay at fp16 and the other entries held so far (the fp16 tokens, or the
  coefficients read back at the scale before) and the new tokens' coefficients are quantised at the
  scale's code and read back (tests/compander_reference.py); every scale attends to what the scale
  before left (the sink, then the entries) plus its own tokens."""
  p = {n: np.asarray(a[0], np.float64) for n, a in params.items()}
  f16 = lambda a: np.asarray(np.asarray(a, np.float16), np.float64)
  mean, basis = ({t: f16(p[f'{t}_{n}']) for t in 'kv'} for n in ('mean', 'basis'))
  project = lambda t, x: np.einsum('bhld,hdr->bhlr', x - mean[t][None, :, None], basis[t])
  rebuild = lambda t, c: np.einsum('bhlr,hdr->bhld', c, basis[t]) + mean[t][None, :, None]
  g = comp.geometry
  plan, n0 = numpy_schedule(g, comp.budget.bits)
  codes = sorted({E for mode, E in plan if mode == 'coded'}, reverse=True)
  x, held, out = {'k': k, 'v': v}, None, np.zeros(q.shape)
  for s, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    cache = {t: np.zeros(q.shape[:2] + (0, g.head_dim)) for t in 'kv'} if held is None else (
        held[1] if held[0] == 'exact' else
        {t: np.concatenate([held[2][t], rebuild(t, held[1][t])], 2) for t in 'kv'})
    keys, vals = (np.concatenate([cache[t], x[t][:, :, st:st + S]], 2) for t in 'kv')
    lg = np.einsum('bhsd,bhnd->bhsn', q[:, :, st:st + S], keys)
    a = np.exp(lg - lg.max(-1, keepdims=True))
    out[:, :, st:st + S] = np.einsum('bhsn,bhnd->bhsd', a / a.sum(-1, keepdims=True), vals)
    if s == len(plan):
      break
    mode, E = plan[s]
    if mode == 'exact':
      held = ('exact', {t: f16(x[t][:, :, :st + S]) for t in 'kv'})
      continue
    c, back = codes.index(E), {}
    sink = {t: held[1][t][:, :, :n0] for t in 'kv'} if held[0] == 'exact' else held[2]   # n0 = 0: none
    for t in 'kv':
      old = project(t, held[1][t][:, :, n0:]) if held[0] == 'exact' else held[1][t]
      coef = np.concatenate([old, project(t, x[t][:, :, st:st + S])], 2)
      step, w = f16(p[f'{t}_step'][:, c]), np.round(p[f'{t}_width'][:, c])          # (H, R)
      back[t] = np.stack([compander_reference.quantise_read_back(
          coef[:, h], step[h], w[h], compander.SPREAD[w[h].astype(int)]) for h in range(coef.shape[1])], 1)
    held = ('coded', back, sink)
  return out, plan, codes, n0


@pytest.mark.parametrize('budget, pn', [('10%', PN), ('30%', PN), ('60%', PN), ('60%', PN + (5,))])
def test_coding_path_equals_numpy_and_holds_the_budget(budget, pn):
  g = CacheGeometry(pn, D)
  comp = compress.make('composed', g, budget, keep=1.0)
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib(patch_nums=pn))
  x = calib(seed=3, patch_nums=pn)
  q, k, v = (np.asarray(x[t][0], np.float64) for t in 'qkv')
  out, states = run_scales_states(comp, jax.tree.map(lambda a: a[0], params),
                                  *(jnp.asarray(x[t][0]) for t in 'qkv'))
  want, plan, codes, n0 = numpy_reference(comp, params, q, k, v)
  assert n0 == (1 if len(pn) == 5 else 0)          # else the sink's 256 bits are over 1/16 of the budget
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
  assert [(s.mode, s.entry_bits) for s in comp.stages()] == plan
  for (mode, E), T, state in zip(plan, g.scale_starts[1:], states):
    bits = np.asarray(comp.bits(state))   # after the scale: T entries of E bits + count, or the sink + T - 1
    n = T if mode == 'exact' else T - n0
    sink = 0 if mode == 'exact' else n0 * 2 * D * 16
    assert state.capacity == n and np.all(bits == 16 + n * E + sink) and np.all(bits <= comp.budget.bits)
    assert tree_bits(state) == bits.sum()                    # the arrays are what is counted
  assert comp.shared_bits(params) == tree_bits(comp.shared_params(params))
  widths = np.concatenate([np.asarray(params['k_width'][0]), np.asarray(params['v_width'][0])], -1)
  assert widths.shape[1] == len(codes) and np.all(widths.sum(-1) <= np.array(codes))
  assert np.all(np.diff(widths, axis=1) <= 0)                # re-coded only ever narrower
  if budget == '60%' and pn == PN:                           # 9.7 bits per coordinate at the peak
    assert widths.max() > 8


def test_scales_whose_prefix_fits_are_exact():
  """At 40 % of (1, 2, 3, 4) x 8 dims the tokens of scales 0 and 1 fit at fp16: scales 1 and 2 see exactly
  what the fp16 full cache gives them; scale 3 (14 tokens, coded) does not."""
  g = CacheGeometry(PN, D)
  comp = compress.make('composed', g, '40%')
  assert [s.mode for s in comp.stages()] == ['exact', 'exact', 'coded']
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib())
  x = [jnp.asarray(calib(seed=4)[t][0]) for t in 'qkv']
  out, _ = run_scales(comp, jax.tree.map(lambda a: a[0], params), *x)
  full, _ = run_scales(compress.make('full', g, '100%'), None, *x)
  sl = slice(g.scale_starts[1], g.scale_starts[3])
  np.testing.assert_allclose(np.asarray(out)[:, :, sl], np.asarray(full)[:, :, sl], rtol=1e-6, atol=1e-7)
  assert np.abs(np.asarray(out - full)[:, :, g.scale_starts[3]:]).max() > 1e-4


def test_a_higher_budget_buys_a_lower_error():
  """Widths up to 16 bits: the error keeps falling up to the full cache (0.9 of it: 14.4 bits per
  coordinate at the peak; measured 0.061, 0.0026, 0.00026, 0.0001), where 8-bit codes would stop at
  the 50 % one. Calibrated on two sequences of the same draw as the two evaluated (another draw has
  other statistics: its steps would clip the coefficients)."""
  g = CacheGeometry(PN, D)
  x = calib(seed=5, B=4)
  cal, ev = ({t: a[:, half] for t, a in x.items()} for half in (slice(0, 2), slice(2, 4)))
  exact = compress.exact_outputs(*(jnp.asarray(ev[t]) for t in 'qkv'), g.patch_nums)
  errs = []
  for budget in ('25%', '50%', '70%', '90%'):
    comp = compress.make('composed', g, budget)
    params = comp.init_params(jax.random.key(0), 1, H, calibration=cal)
    out, _ = run_scales(comp, jax.tree.map(lambda a: a[0], params), *(jnp.asarray(ev[t][0]) for t in 'qkv'))
    errs.append(compress.errors(out[None], exact, g.patch_nums)['overall'])
    if budget in ('70%', '90%'):                            # 11 and 14 bits per coordinate at the peak
      assert float(params['k_width'][:, :, -1].max()) > 8, budget
  assert all(a > 2 * b for a, b in zip(errs, errs[1:])), errs
  assert errs[-1] < 1e-3, errs


@pytest.mark.parametrize('budget, plan, sink', [
    ('10%', [('exact', 1, False), ('coded', 5, False), ('coded', 12, True), ('coded', 12, True)], 0),
    ('60%', [('exact', 1, False), ('exact', 5, False), ('exact', 14, False), ('coded', 12, True)], 1)])
def test_fewer_slots_merge_and_count_their_sizes(budget, plan, sink):
  """keep 0.4 of 30 peak tokens: 12 slots. 10 %: scale 0 exact, scale 1's 5 tokens coded one per slot,
  then 14 and 30 tokens merged into 12 slots. 60 %: exact through scale 2, then the first token held
  exact (the sink, 256 bits: under 1/16 of the budget) beside the other 29 merged into 12 slots. Each
  state holds exactly its entries, sizes, count and sink."""
  g = CacheGeometry((1, 2, 3, 4, 5), D)
  comp = compress.make('composed', g, budget, keep=0.4)
  m, E = comp.plan()
  assert m == round(0.4 * g.prefix_tokens) == 12 and comp.merging
  assert [(s.mode, s.slots, s.sizes) for s in comp.stages()] == plan
  assert all(s.sink == (sink if s.mode == 'coded' else 0) for s in comp.stages())
  params = comp.init_params(jax.random.key(0), 1, H, calibration=calib(5, patch_nums=g.patch_nums))
  x = calib(6, patch_nums=g.patch_nums)
  out, states = run_scales_states(comp, jax.tree.map(lambda a: a[0], params),
                                  *(jnp.asarray(x[t][0]) for t in 'qkv'))
  assert np.all(np.isfinite(np.asarray(out)))
  for stage, state in zip(comp.stages(), states):
    if not stage.sizes:                       # exact, or coded one per slot
      continue
    count, size = np.asarray(state.count), np.asarray(state.extra['size'])
    assert state.capacity == 12 and np.all(count == 12)
    assert np.all(size >= 1) and np.all(size.sum(-1) <= stage.tokens - sink)  # dropped ones count nowhere
    if sink:
      assert state.header['sink_k'].shape == (2, H, 1, D) and state.header['sink_v'].dtype == jnp.float16
      np.testing.assert_array_equal(np.asarray(state.header['sink_k'], np.float32),
                                    np.asarray(jnp.asarray(x['k'][0][:, :, :1]).astype(jnp.float16), np.float32))
    else:
      assert not state.header
    assert stage.bits() == 16 + 12 * (stage.entry_bits + 16) + sink * 2 * D * 16
    assert np.all(np.asarray(comp.bits(state)) == stage.bits())
    assert stage.bits() <= comp.budget.bits and tree_bits(state) == 2 * H * stage.bits()


@pytest.mark.parametrize('budget, keep, merging', [('10%', 0.4, True), ('60%', 0.4, True), ('25%', 0.0, False),
                                                   ('10%', 0.0, True), ('60%', 1.0, False)])
def test_one_softmax_where_nothing_merges(budget, keep, merging, monkeypatch):
  """A scale that merges nothing needs no attention probabilities: the step attends with one softmax
  over held and new entries (as the full cache). `merges_at` names exactly the scales with more
  candidates than slots (from the schedule: coded, tokens less the sink > slots), and the two-part
  attention at every scale gives the same states, and the outputs to float rounding."""
  g = CacheGeometry((1, 2, 3, 4, 5), D)
  comp = compress.make('composed', g, budget, keep=keep)
  p0 = jax.tree.map(lambda a: a[0], comp.init_params(jax.random.key(0), 1, H,
                                                     calibration=calib(5, patch_nums=g.patch_nums)))
  x = {t: jnp.asarray(a[0]) for t, a in calib(6, patch_nums=g.patch_nums).items()}

  def steps():
    state, outs, states = comp.init_state(2, H), [], []
    for si, (start, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      out, state = comp.step(p0, state, *(x[t][:, :, start:start + S] for t in 'qkv'), si,
                             compress.StepContext())
      outs.append(np.asarray(out))
      states.append(state)
    return np.concatenate(outs, axis=2), states

  asked, merges_at = [], type(comp).merges_at
  monkeypatch.setattr(type(comp), 'merges_at', lambda self, *a: asked.append(merges_at(self, *a)) or asked[-1])
  out, states = steps()
  # asked at scales 1 .. K - 2 (scale 0 holds nothing before it, the last one stores nothing)
  want = [s.mode == 'coded' and s.tokens - s.sink > s.slots for s in comp.stages()]
  assert asked == want[1:] and any(want) == comp.merging == merging, (asked, want)
  monkeypatch.setattr(type(comp), 'merges_at', lambda self, *a: True)       # probabilities everywhere
  out2, states2 = steps()
  np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(states2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
  assert float(jnp.abs(grads['v_basis']).sum()) > 0
  assert grads['k_logstep'].shape[1] == 2 and np.all(np.abs(np.asarray(grads['k_logstep'])).sum((0, 2)) > 0)
  assert float(jnp.abs(grads['k_width']).sum()) == 0                              # widths are not trained


def test_parameters_of_another_schedule_are_refused():
  """Parameters with another number of codes (another budget, or trained before progressive precision:
  one width per component) are refused with the fix, not run at the wrong widths."""
  g = CacheGeometry(PN, D)
  a, b = compress.make('composed', g, '10%'), compress.make('composed', g, '40%')
  params = jax.tree.map(lambda x: x[0], a.init_params(jax.random.key(0), 1, H, calibration=calib()))
  x = [jnp.asarray(calib(seed=3)[t][0]) for t in 'qkv']
  with pytest.raises(ValueError, match='codes its entries at 1 widths.*retrain composed_learned'):
    run_scales(b, params, *x)
  old = {n: (p[:, 0] if n.endswith(('_width', '_step')) else p) for n, p in params.items()}   # (H, r)
  with pytest.raises(ValueError, match=r'k_width \(2, 8\).*before progressive precision'):
    run_scales(a, old, *x)


@pytest.mark.parametrize('N, M', [(40, 12), (300, 120)])            # one-hot matmul, then scatter-add
def test_group_means_equal_numpy(N, M):
  """A merge's group means and sizes (both implementations, chosen by N x M) against numpy loops."""
  from compress.composed.groups import SEGMENT_MIN, group_means
  assert (N * M >= SEGMENT_MIN) == (N == 300)
  rng = np.random.default_rng(N)
  rows = rng.permutation(N)[:M]
  target = np.where(rng.random(N) < 0.2, N, rows[rng.integers(0, M, N)])    # some in no group
  target[rows] = rows
  w, size, x = rng.random(N) + 0.1, rng.integers(1, 5, N).astype(np.float64), rng.normal(size=(N, 6))
  got, got_size = group_means(*(jnp.asarray(a, jnp.float32) if a.dtype.kind == 'f' else jnp.asarray(a)
                                for a in (rows, target, w, x, size)))
  for j, r in enumerate(rows):
    members = target == r
    np.testing.assert_allclose(np.asarray(got[j]), (w[members, None] * x[members]).sum(0) / w[members].sum(),
                               rtol=1e-5, atol=1e-6)
    assert float(got_size[j]) == size[members].sum()
