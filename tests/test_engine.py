"""The teacher-forced engine (compress.core.teacher_forced): one compiled program per compressor and
budget, the same outputs as stepping scale by scale, and compiles that do not grow with the scales.

- For every registered compressor, the whole-schedule program equals the per-scale jitted steps the
  engine replaced (outputs to fp32 rounding, bits exactly), and the fused error sums equal the sums of
  its outputs against the full cache.
- Evaluating a compressor at 4 budgets compiles at most 3 programs more than at 1 budget (counted with
  jax.monitoring's backend-compile events), and a second pass over the same budgets compiles nothing.
"""
import functools
import os

import jax
import numpy as np
import pytest

import compress
from compress.core import synthetic
from compress.core.budget import CacheGeometry
from compress.core.teacher_forced import fast_compile_options
from eval.engine import sweep

PN = (1, 2, 3)
D = 8
FAST = fast_compile_options()


@functools.partial(jax.jit, static_argnames=('comp', 'scale'), compiler_options=None if FAST is None else dict(FAST))
def _layers_step(comp, params, state, q, k, v, future_q, scale):
  """The engine before: one program per scale, vmapped over layers."""
  def one(p, s, q_, k_, v_, fq):
    out, s = comp.step(p, s, q_, k_, v_, scale, compress.StepContext(future_q=fq))
    return out, s, comp.bits(s)
  return jax.vmap(one, in_axes=(None if params is None else 0, 0, 0, 0, 0, 0 if comp.oracle else None))(
      params, state, q, k, v, future_q)


def per_scale(comp, params, q, k, v):
  g = comp.geometry
  N, B, H = q.shape[:3]
  state = jax.vmap(lambda _: comp.init_state(B, H))(np.arange(N))
  outs, bits = [], []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    fq = q[:, :, :, st + S:] if comp.oracle else None
    out, state, b = _layers_step(comp, params, state, q[:, :, :, sl], k[:, :, :, sl], v[:, :, :, sl], fq, si)
    outs.append(np.asarray(out))
    bits.append(np.asarray(b))
  return np.concatenate(outs, axis=3), np.stack(bits, -1)


@pytest.fixture(scope='module')
def qkv():
  return synthetic.var_like_qkv(jax.random.key(1), PN, layers=2, batch=2, heads=2, head_dim=D)


@pytest.mark.parametrize('name', compress.available())
def test_whole_schedule_equals_per_scale_steps(name, qkv):
  g = CacheGeometry(PN, D)
  comp = compress.make(name, g, '30%')
  q, k, v = qkv
  calib = None
  if comp.needs_calibration:
    cq, ck, cv = synthetic.var_like_qkv(jax.random.key(2), PN, layers=2, batch=2, heads=2, head_dim=D)
    calib = {'q': cq, 'k': ck, 'v': cv}
  params = comp.init_params(jax.random.key(0), 2, 2, calibration=calib)
  want_out, want_bits = per_scale(comp, params, q, k, v)
  res = compress.run_teacher_forced(comp, params, q, k, v, compiler_options=FAST)
  np.testing.assert_allclose(np.asarray(res['out']), want_out, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(np.asarray(res['bits']), want_bits, err_msg=name)
  fused = compress.teacher_forced_errors(comp, params, q, k, v, compiler_options=FAST)
  exact = np.asarray(compress.exact_outputs(q, k, v, PN), np.float64)
  d2_NBL = ((want_out - exact) ** 2).sum(axis=(2, 4))
  starts = np.cumsum((0,) + g.scale_sizes[:-1])
  want_d2 = np.moveaxis(np.add.reduceat(d2_NBL, starts, axis=2), 0, 1)          # (B, N, K)
  np.testing.assert_allclose(np.asarray(fused['d2']), want_d2, rtol=1e-4, atol=1e-9, err_msg=name)
  np.testing.assert_array_equal(np.asarray(fused['peak_bits']), want_bits.max(-1), err_msg=name)


@pytest.mark.parametrize('budget,keep', [('40%', 0.0), ('25%', 0.4)])
def test_composed_stages_in_the_whole_schedule(budget, keep):
  """composed's state changes shape by scale (exact, coded, merged: compress/composed/schedule.py): the
  whole-schedule program holds, after every scale, the planned stage's bits (within the budget), as
  the per-scale steps do, with the same outputs."""
  g = CacheGeometry((1, 2, 3, 4), D)
  q, k, v = synthetic.var_like_qkv(jax.random.key(3), g.patch_nums, layers=2, batch=2, heads=2, head_dim=D)
  comp = compress.make('composed', g, budget, keep=keep)
  params = comp.init_params(jax.random.key(0), 2, 2, calibration={'q': q, 'k': k, 'v': v})
  plan = comp.stages()
  assert len({(s.mode, s.slots, s.entry_bits) for s in plan}) == len(plan)      # every scale its own layout
  want_out, want_bits = per_scale(comp, params, q, k, v)
  res = compress.run_teacher_forced(comp, params, q, k, v, compiler_options=FAST)
  np.testing.assert_allclose(np.asarray(res['out']), want_out, rtol=1e-5, atol=1e-6)
  planned = np.array([s.bits() for s in plan + plan[-1:]])                      # the last scale keeps it
  np.testing.assert_array_equal(np.asarray(res['bits']), np.broadcast_to(planned, want_bits.shape))
  np.testing.assert_array_equal(want_bits, np.asarray(res['bits']))
  assert planned.max() <= comp.budget.bits


class CompileCounter:
  """Counts XLA backend compiles (jax.monitoring events) while active."""

  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1

  def measure(self, fn):
    self.count, self.active = 0, True
    try:
      fn()
    finally:
      self.active = False
    return self.count


def test_compiles_per_budget_not_per_scale(qkv):
  g = CacheGeometry((1, 2, 3, 4), D)
  q, k, v = synthetic.var_like_qkv(jax.random.key(3), g.patch_nums, layers=2, batch=4, heads=2, head_dim=D)
  data = sweep.CacheSet({'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)},
                        np.array([0, 0, 1, 1]), g.patch_nums)
  counter = CompileCounter()
  point = lambda b: sweep.run_point(compress.make('cam', g, b), None, data, batch=4, compiler_options=FAST)
  one = counter.measure(lambda: point('10%'))
  four = counter.measure(lambda: [point(b) for b in ('12.5%', '25%', '40%', '50%')])
  again = counter.measure(lambda: [point(b) for b in ('12.5%', '25%', '40%', '50%')])
  assert one >= 1 and four <= one + 3, (one, four)           # one program per budget, not per scale
  assert again == 0


def test_random_official_architecture_and_bench_figures(tmp_path):
  """model.source='random' builds the official architecture of model.size with random weights; the
  benchmark's compile log counts backend compiles and its disk figure sums the files."""
  import ml_collections
  from eval.bench import frontier as bench_frontier
  from eval.frontier import job as frontier
  model = frontier.load_model(ml_collections.ConfigDict({'source': 'random', 'size': 'd2-tiny',
                                                         'patch_nums': ()}))
  from var_jax.config import SIZES
  assert model.patch_nums == tuple(SIZES['d2-tiny'].patch_nums)
  with pytest.raises(ValueError, match='model size'):
    frontier.load_model(ml_collections.ConfigDict({'source': 'random', 'size': 'd99', 'patch_nums': ()}))
  log = bench_frontier.CompileLog()
  jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
  assert log.compiles >= 1 and log.total_seconds > 0
  (tmp_path / 'a').write_bytes(b'x' * 10)
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'c').write_bytes(b'y' * 5)
  assert bench_frontier.disk_bytes(str(tmp_path)) == 15


@pytest.mark.parametrize('name', ['cam', 'pca', 'composed', 'attn_matching_oracle'])
def test_layer_loop_and_stored_reference_change_nothing(name, monkeypatch):
  """The layer loop in groups (lax.map, what large models get) and errors against a given reference
  (what the sweep's exact store passes) equal the one-vmap program that computes its own reference."""
  from compress.core import teacher_forced as tf
  g = CacheGeometry(PN, D)
  comp = compress.make(name, g, '30%')
  q, k, v = synthetic.var_like_qkv(jax.random.key(4), PN, layers=3, batch=2, heads=2, head_dim=D)
  calib = {'q': q, 'k': k, 'v': v} if comp.needs_calibration else None
  params = comp.init_params(jax.random.key(0), 3, 2, calibration=calib)
  program = lambda: jax.jit(tf._errors_body, static_argnums=0)   # a fresh trace: reads LOGIT_BYTES
  whole = program()(comp, params, q, k, v)
  assert tf.layers_per_step(q) == 3
  monkeypatch.setattr(tf, 'LOGIT_BYTES', 2 * 2 * 4 * g.num_tokens ** 2 * 2)   # 2 of the 3 layers a step
  assert tf.layers_per_step(q) == 2
  grouped = program()(comp, params, q, k, v)
  exact = compress.exact_outputs(q, k, v, PN)                   # also grouped now
  given = program()(comp, params, q, k, v, exact)
  monkeypatch.undo()
  np.testing.assert_allclose(np.asarray(exact), np.asarray(compress.exact_outputs(q, k, v, PN)), rtol=1e-6,
                             atol=1e-7)
  for res in (grouped, given):
    for key in ('d2', 'e2'):
      np.testing.assert_allclose(np.asarray(res[key]), np.asarray(whole[key]), rtol=1e-4, atol=1e-9,
                                 err_msg=f'{name} {key}')
    np.testing.assert_array_equal(np.asarray(res['peak_bits']), np.asarray(whole['peak_bits']))
  with pytest.raises(ValueError, match='exact outputs have shape'):
    compress.teacher_forced_errors(comp, params, q, k, v, exact_NBHLD=exact[:, :1])


def test_exact_store_computes_once_and_drops_another_captures_files(tmp_path):
  from eval.engine.exact_store import ExactStore
  calls = []
  compute = lambda: calls.append(1) or np.arange(6.0).reshape(1, 2, 3)
  store = ExactStore(str(tmp_path / 'exact'), {'capture': 'a', 'sequences': 2})
  np.testing.assert_array_equal(store.get(0, 2, compute), compute())
  calls.clear()
  again = ExactStore(str(tmp_path / 'exact'), {'capture': 'a', 'sequences': 2}).get(0, 2, compute)
  assert not calls and again.dtype == np.float32
  np.testing.assert_array_equal(again, np.arange(6.0).reshape(1, 2, 3))
  with open(store.path(0, 2), 'wb') as f:                       # a torn write: recomputed, not read
    f.write(b'\x93NUMPY')
  store.get(0, 2, compute)
  assert len(calls) == 1
  other = ExactStore(str(tmp_path / 'exact'), {'capture': 'b', 'sequences': 2})    # a new capture
  assert not (tmp_path / 'exact' / '0000000-0000002.npy').exists()
  other.get(0, 2, compute)
  assert len(calls) == 2


def test_sweep_with_exact_store_equals_sweep_without(tmp_path):
  from eval.engine.exact_store import ExactStore
  g = CacheGeometry((1, 2, 3, 4), D)
  q, k, v = synthetic.var_like_qkv(jax.random.key(5), g.patch_nums, layers=2, batch=4, heads=2, head_dim=D)
  data = sweep.CacheSet({'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)},
                        np.array([0, 0, 1, 1]), g.patch_nums)
  comp = compress.make('cam', g, '25%')
  plain = sweep.run_point(comp, None, data, batch=3, compiler_options=FAST)
  data.exact_store = ExactStore(str(tmp_path / 'exact'), {'capture': 'x'})
  stored = [sweep.run_point(comp, None, data, batch=3, compiler_options=FAST) for _ in range(2)]
  assert sorted(os.listdir(tmp_path / 'exact')) == ['0000000-0000003.npy', '0000003-0000004.npy',
                                                    'manifest.json']
  for res in stored:
    np.testing.assert_allclose(res['d2'], plain['d2'], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(res['e2'], plain['e2'], rtol=1e-5)
    np.testing.assert_array_equal(res['peak_bits'], plain['peak_bits'])
