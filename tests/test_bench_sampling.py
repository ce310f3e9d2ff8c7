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


@pytest.mark.parametrize('name', ['kivi', 'cam', 'composed'])
def test_profiled_attention_is_the_policys_attention(tiny, name):
  """The profile's attention piece (over the decoded held entries) gives the policy's own outputs."""
  import jax
  var, vae = tiny
  cfg = var.cfg
  comp = compress.make(name, CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), '25%')
  params, _ = policy_params(comp, var, vae, params_from=None, images=1, sequences=0)
  policy = CompressorPolicy(comp, params)
  assert not comp.passthrough
  qkv = prof.captured_qkv(var, vae, [1, 4], seed=0, cfg=1.5, top_k=0, top_p=0.0)
  state = policy.init(4, cfg.num_heads, cfg.head_dim, cfg.depth, patch_nums=tuple(cfg.patch_nums))
  for scale, qkv_s in enumerate(qkv):
    views = [prof.held_view(policy, state[l], scale,
                            None if params is None else jax.tree.map(lambda a: a[l], params))
             for l in range(cfg.depth)]
    got = []
    for view, (q, k, v) in zip(views, qkv_s):
      if view is None:
        z = q[:, :, :0]
        view = (z, z, np.zeros(z.shape[:3], bool), None)
      got.append(np.asarray(attend(q, *view, k, v)[0]))     # before the step donates the state
    outs, state = prof._policy_scale(policy, scale, state, qkv_s, params)
    for g, o in zip(got, outs):
      np.testing.assert_allclose(g, np.asarray(o), rtol=1e-5, atol=1e-6)


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
