"""The sampling benchmark's instruments (eval/bench): what each figure is computed from.

Truth: closed forms (a least-squares line through exact points, the bytes of the full cache's arrays, the
FLOPs of a model's linear layers), exact attention recomputed from the decoded cache, and the kernel's
own peak-memory counter against an allocation of known size.
"""
import numpy as np
import pytest

import compress
from compress.core.attention import attend
from compress.core.budget import CacheGeometry
from compress.core.policy import CompressorPolicy
from eval.bench import flops as flops_lib
from eval.bench import sampling as bench
from eval.bench import sampling_profile as prof
from eval.bench.sampling_params import generated_calibration, policy_params
from var_jax import sampling
from var_jax.kvcache import FullCache
from var_jax.random_init import random_models


@pytest.fixture(scope='module')
def tiny():
  return random_models('d2-tiny', 0)


def test_max_batch_from_a_line_through_measured_peaks():
  base, per_image, gib = 1.5 * 2**30, 0.25 * 2**30, 8 * 2**30
  rows = [{'policy': 'kivi', 'budget': '10%', 'batch': b, 'rss_peak_bytes': base + per_image * b,
           'cache_bytes_allocated': 1000 * b} for b in (1, 8, 32)]
  bench.max_batches(rows, gib)
  want = int((gib - base) // per_image)               # 26 images: 1.5 + 26 x 0.25 = 8.0 GiB
  assert [r['max_batch_at_memory'] for r in rows] == [want] * 3 and want == 26
  assert rows[0]['rss_fit_bytes_per_image'] == pytest.approx(per_image)
  assert rows[0]['max_batch_cache_only'] == gib // 1000
  single = [{'policy': 'full', 'budget': None, 'batch': 1, 'rss_peak_bytes': 5.0,
             'cache_bytes_allocated': 10}]
  bench.max_batches(single, 100)
  assert 'max_batch_at_memory' not in single[0] and single[0]['max_batch_cache_only'] == 10


def test_peak_rss_reset_sees_a_new_allocation():
  if not bench._reset_peak_rss():
    pytest.skip('/proc/self/clear_refs not writable here')
  before = bench._rss('VmHWM')
  x = np.ones(64 * 2**20 // 8)                         # 64 MiB, touched
  x[::512] = 2.0
  assert bench._rss('VmHWM') >= before + 60 * 2**20
  del x


def test_full_cache_bytes_are_its_arrays(tiny):
  var, vae = tiny
  cfg = var.cfg
  out = sampling.generate(var, vae, [1, 2], key=__import__('jax').random.key(0))
  fig = bench._cache_figures(None, out.cache)
  per_layer = 2 * (4 * cfg.num_heads * cfg.seq_len * cfg.head_dim * 4) + 4   # k, v fp32 + int32 length
  assert fig['cache_bytes_allocated'] == cfg.depth * per_layer
  assert fig['cache_bits_counted'] == 8 * fig['cache_bytes_allocated']


def test_generate_flops_cover_the_linear_layers(tiny):
  from flax import nnx
  from var_jax.vae_blocks import ResnetBlock, Upsample2x, direct_clone
  var, vae = tiny
  cfg = var.cfg
  # the ResnetBlocks' convolutions direct (no Winograd) for the closed form below; Winograd's at the end
  direct = direct_clone(vae, (ResnetBlock,))
  policy = FullCache(tuple(cfg.patch_nums))
  f = flops_lib.generate_flops(var, direct, policy, [3], cfg=1.5, top_k=0, top_p=0.0)
  C = cfg.width
  for s, pn in enumerate(cfg.patch_nums):
    tokens = 2 * pn * pn                                   # the CFG pair
    linear = 2 * tokens * cfg.depth * 12 * C * C          # qkv 3C^2, proj C^2, fc1 4C^2, fc2 4C^2
    head = 2 * tokens * C * cfg.vocab_size
    assert linear + head <= f['var_steps'][s] <= 1.6 * (linear + head) + 2e6, (s, f['var_steps'][s])
  assert f['total'] == pytest.approx(f['start'] + sum(f['var_steps']) + f['decode'])
  assert f['decode'] > 0
  # the official decode convolves each upsampled map (9 taps per output pixel and channel pair) where
  # the port runs four phase convolutions (4 taps): XLA counts 2 C^2 FLOPs per tap that lands inside the
  # map, so along an axis of low-resolution length h the direct conv has 3 (2h) - 2 valid taps and the
  # two phases 2 (2h - 1); the phase form adds 14 C^2 FLOPs summing the kernel's taps
  h = cfg.patch_nums[-1]
  extra = 0
  for _, m in reversed(list(nnx.iter_modules(direct.decoder))):    # lowest resolution first
    if isinstance(m, Upsample2x):
      c = m.conv.kernel.shape[-1]
      extra += 2 * c * c * ((6 * h - 2) ** 2 - (4 * h - 2) ** 2) - 14 * c * c
      h *= 2
  assert extra > 0
  assert f['decode_official'] - f['decode'] == extra
  assert f['model_total'] - f['total'] == extra
  # with Winograd's convolutions (this decoder's 64 px level) the port computes less; the official
  # count, and so the model FLOPs, stay the same
  w = flops_lib.generate_flops(var, vae, policy, [3], cfg=1.5, top_k=0, top_p=0.0)
  assert w['decode_official'] == f['decode_official'] and w['model_total'] == f['model_total']
  assert w['decode'] < f['decode'] - 0.1 * extra


@pytest.mark.parametrize('name', ['full', 'kivi', 'cam', 'composed'])
def test_profiled_attention_is_the_policys_attention(tiny, name):
  """The profile's attention piece (one softmax over the decoded held entries and the new scale; the
  full cache: over its written prefix) gives the policy's own outputs at every scale, and so does the
  two-part softmax (`attend`) on the same views."""
  import jax
  var, vae = tiny
  cfg = var.cfg
  if name == 'full':
    policy, params = FullCache(tuple(cfg.patch_nums)), None
  else:
    comp = compress.make(name, CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '25%')
    params, _ = policy_params(comp, var, vae, params_from=None, images=1, sequences=0)
    policy = CompressorPolicy(comp, params)
    assert not comp.passthrough
  qkv = prof.captured_qkv(var, vae, [1, 4], seed=0, cfg=1.5, top_k=0, top_p=0.0)
  state = policy.init(4, cfg.num_heads, cfg.head_dim, cfg.depth, patch_nums=tuple(cfg.patch_nums))
  offsets = prof.scale_offsets(cfg.patch_nums)
  for scale, qkv_s in enumerate(qkv):
    if name == 'full':
      written = [s.write(offsets[scale], k, v) for s, (_, k, v) in zip(state, qkv_s)]
      got = [np.asarray(o) for o in prof._full_attention_only(written, qkv_s, end=offsets[scale + 1])]
      two_part = got
    else:
      views = [prof.held_view(policy, state[l], scale,
                              None if params is None else jax.tree.map(lambda a: a[l], params))
               for l in range(cfg.depth)]
      got = [np.asarray(o) for o in prof._attention_only(views, qkv_s)]   # before the step donates
      two_part = []
      for view, (q, k, v) in zip(views, qkv_s):
        if view is None:
          z = q[:, :, :0]
          view = (z, z, np.zeros(z.shape[:3], bool), None)
        two_part.append(np.asarray(attend(q, *view, k, v)[0]))
    outs, state = prof._policy_scale(policy, scale, state, qkv_s, params)
    for g, t, o in zip(got, two_part, outs):
      np.testing.assert_allclose(g, np.asarray(o), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(t, np.asarray(o), rtol=1e-5, atol=1e-6)


def test_composed_runs_with_parameters_calibrated_on_generated_images(tiny):
  var, vae = tiny
  cfg = var.cfg
  calib = generated_calibration(var, vae, 2)
  assert calib['k'].shape == (cfg.depth, 4, cfg.num_heads, cfg.seq_len, cfg.head_dim)
  comp = compress.make('composed', CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '25%')
  with pytest.raises(ValueError, match='needs calibrated parameters'):
    CompressorPolicy(comp)
  params, source = policy_params(comp, var, vae, params_from=None, images=2, sequences=0)
  assert 'calibrated on the fly on 2 generated images' in source
  want = comp.init_params(None, cfg.depth, cfg.num_heads, calibration=calib)
  np.testing.assert_array_equal(np.asarray(params['k_basis']), np.asarray(want['k_basis']))
  out = sampling.generate(var, vae, [5], key=__import__('jax').random.key(1),
                          policy=CompressorPolicy(comp, params))
  bits = np.asarray(CompressorPolicy(comp, params).bits(out.cache))
  assert bits.max() <= comp.budget.bits


def test_params_from_a_workdir_without_the_run_says_what_to_do(tiny, tmp_path):
  var, vae = tiny
  cfg = var.cfg
  geometry = CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim)
  with pytest.raises(FileNotFoundError, match='no trained composed_learned'):
    policy_params(compress.make('composed_learned', geometry, '10%'), var, vae,
                  params_from=str(tmp_path), images=1, sequences=4)
  with pytest.raises(FileNotFoundError, match='has no capture/'):
    policy_params(compress.make('composed', geometry, '10%'), var, vae, params_from=str(tmp_path),
                  images=1, sequences=4)


def _coded_entries_per_scale(comp, params_layer, qkv_per_scale):
  """{scale: (entries read back, entries coded)} from the coded states composed's steps actually hold
  (their streams' entry axis: (B, H, entries, bytes)), for the scales that read or code any."""
  plan, state, before, out = comp.stages(), None, 0, {}
  for scale, (q, k, v) in enumerate(qkv_per_scale):
    state = comp.init_state(*k.shape[:2]) if state is None else state
    _, state = comp.step(params_layer, state, q, k, v, scale)
    coded = state.k.shape[2] if not comp.is_last(scale) and plan[scale].mode == 'coded' else 0
    if before or coded:
      out[scale] = (before, coded)
    before = coded
  return out


def test_composed_step_bench_counts_the_coefficients_its_states_hold(tiny):
  """eval.bench.composed_step: a row for every scale whose step reads back or codes entries, and the
  coefficients it counts there equal the entries of the coded states the step actually reads and writes
  x 2 x head_dim x sequence-heads; at d16's geometry too, whose 25 % keeps the start token exact beside
  the coded entries (the sink, not in the stream)."""
  import jax
  from eval.bench import composed_step
  from var_jax.config import SIZES
  var, vae = tiny
  cfg = var.cfg
  comp = compress.make('composed', CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '25%')
  rows = composed_step.bench(var, vae, budget='25%', batch=1, layer=0, runs=1, calibrate_images=1)
  params, _ = policy_params(comp, var, vae, params_from=None, images=1, sequences=0)
  qkv = [s[0] for s in prof.captured_qkv(var, vae, [0], seed=0, cfg=1.5, top_k=900, top_p=0.96)]
  BH = qkv[0][1].shape[0] * qkv[0][1].shape[1]
  want = _coded_entries_per_scale(comp, jax.tree.map(lambda a: a[0], params), qkv)
  assert want, 'the tiny model at 25 % codes nothing: pick a budget that does'
  per = 2 * cfg.head_dim * BH
  assert {r['scale']: (r['read_back'], r['coded']) for r in rows} == {
      s: (a * per, b * per) for s, (a, b) in want.items()}
  for r in rows:
    assert r['full'] > 0 and r['composed'] > 0 and ('decode' in r) == (r['read_back'] > 0)
  table = composed_step.markdown(rows).splitlines()
  assert len(table) == 2 + len(rows) + 1 and table[-1].startswith('| all |')
  assert f"{sum(r['composed'] - r['full'] for r in rows):+.2f}" in table[-1]
  # d16's schedule (a sink at 25 %) on random caches of its geometry: 1 sequence, 2 heads
  d16 = SIZES['d16']
  g = CacheGeometry(tuple(d16.patch_nums), d16.head_dim)
  comp = compress.make('composed', g, '25%')
  assert any(st.sink for st in comp.stages())
  rng = np.random.default_rng(0)
  L = sum(p * p for p in d16.patch_nums)
  cal = {t: rng.normal(size=(1, 2, 2, L, d16.head_dim)).astype(np.float32) for t in 'qkv'}
  p = jax.tree.map(lambda a: a[0], comp.init_params(None, 1, 2, calibration=cal))
  qkv = [tuple(cal[t][0, :1, :, st:st + n] for t in 'qkv') for st, n in zip(g.scale_starts, g.scale_sizes)]
  want = _coded_entries_per_scale(comp, p, qkv)
  per = 2 * d16.head_dim * 2
  assert {s: composed_step.coded_coefficients(comp, s, 2) for s in want} == {
      s: (a * per, b * per) for s, (a, b) in want.items()}


def test_composed_step_bench_refuses_a_budget_that_codes_nothing(tiny):
  from eval.bench import composed_step
  var, vae = tiny
  with pytest.raises(ValueError, match='codes nothing'):
    composed_step.bench(var, vae, budget='100%', batch=1, layer=0, runs=1, calibrate_images=1)
