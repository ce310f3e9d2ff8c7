"""Cached CFG sampling: official greedy outputs, cache contents, cached == uncached, filters, policies.

Truth: the official outputs in tests/data/var_official_tiny (greedy tokens, final KV cache, image),
the uncached teacher-forced forward on the sampled tokens, a brute-force numpy transcription of the
official `sample_with_top_k_top_p_`, and closed forms (norm of the pre-scaled queries).
"""
import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax.blocks import softmax_attention
from var_jax.config import SIZES
from var_jax.kvcache import CachePolicy, FullCache, KVCache
from var_jax.sampling import _scale_step, forward_cached, generate, sample_top_k_top_p
from var_jax.sampling import top_k_top_p_filter
from var_jax.torch_pickle import load_torch_state_dict
from var_jax.var import VAR, var_from_state_dict, var_state_dict
from var_jax.vqvae import VQVAE, infer_vqvae_config, load_vqvae_state_dict

DATA = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
PATCH_NUMS = (1, 2, 3, 4)
RTOL = 1e-5


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@nnx.jit
def forward(m: VAR, labels, var_input):
  return m(labels, var_input)


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(DATA / 'reference.npz'))


@pytest.fixture(scope='module')
def model():
  return var_from_state_dict(load_torch_state_dict(DATA / 'var.pth'), PATCH_NUMS)


@pytest.fixture(scope='module')
def vae():
  sd = load_torch_state_dict(DATA / 'vae.pth')
  v = nnx.eval_shape(lambda: VQVAE(infer_vqvae_config(sd, PATCH_NUMS), rngs=nnx.Rngs(0)))
  load_vqvae_state_dict(v, sd)
  return v


@pytest.fixture(scope='module')
def greedy(model, vae, ref):
  return generate(model, vae, ref['in/labels'], key=jax.random.key(0), cfg=1.5, top_k=1, top_p=0.0,
                  capture_qkv=True, capture_logits=True)


def teacher_forced(model, vae, labels, tokens):
  """Uncached logits on the sampled tokens: (conditional, unconditional), each (B, L, V)."""
  var_input = vae.idx_to_var_input(tokens)
  labels = jnp.asarray(labels, jnp.int32)
  return (forward(model, labels, var_input),
          forward(model, jnp.full_like(labels, model.cfg.num_classes), var_input))


# ------------------------------------------------------------------ official greedy outputs
def test_greedy_tokens_match_official(greedy, ref):
  for i, pn in enumerate(PATCH_NUMS):
    assert greedy.tokens[i].shape == (2, pn * pn) and greedy.tokens[i].dtype == jnp.int32
    np.testing.assert_array_equal(greedy.tokens[i], ref[f'out/greedy_idx_scale{i}'])


def test_final_cache_matches_official(greedy, ref):
  assert len(greedy.cache) == 2
  for i, layer in enumerate(greedy.cache):
    assert isinstance(layer, KVCache) and int(layer.length) == 30
    assert layer.k_BHLD.shape == (4, 2, 30, 64)
    assert rel_err(layer.k_BHLD, ref[f'out/kv_cache/block{i}/k']) < RTOL
    assert rel_err(layer.v_BHLD, ref[f'out/kv_cache/block{i}/v']) < RTOL


def test_image_matches_official(greedy, ref):
  want = ref['out/greedy_image'].transpose(0, 2, 3, 1)   # NCHW -> NHWC
  assert greedy.images.shape == (2, 64, 64, 3)
  assert rel_err(greedy.images, want) < RTOL


def test_greedy_is_argmax_of_guided_logits(greedy):
  """Closed form of CFG: t = cfg * k / (K - 1), logits (1 + t) cond - t uncond; top_k=1 is argmax."""
  for k, (lg, tok) in enumerate(zip(greedy.logits, greedy.tokens)):
    t = 1.5 * k / 3
    guided = (1 + t) * lg[:2] - t * lg[2:]
    np.testing.assert_array_equal(np.argmax(guided, -1), tok)


def test_cached_logits_equal_teacher_forcing(greedy, model, vae, ref):
  cond, uncond = teacher_forced(model, vae, ref['in/labels'], greedy.tokens)
  cached = jnp.concatenate(greedy.logits, axis=1)          # (2B, L, V)
  assert rel_err(cached[:2], cond) < RTOL
  assert rel_err(cached[2:], uncond) < RTOL
  assert rel_err(greedy.logits[-1][:2], cond[:, -16:]) < RTOL   # the last step alone


def test_captured_qkv_is_what_the_cache_holds(greedy, model):
  scale_mul = [np.exp(np.minimum(np.asarray(b.attn.scale_mul_1H11[...]), math.log(100))).reshape(-1)
               for b in model.blocks]
  begin = 0
  for k, pn in enumerate(PATCH_NUMS):
    for layer, (q, kk, v) in enumerate(greedy.qkv[k]):
      assert q.shape == kk.shape == v.shape == (4, 2, pn * pn, 64)
      cache = greedy.cache[layer]
      np.testing.assert_array_equal(kk, cache.k_BHLD[:, :, begin:begin + pn * pn])
      np.testing.assert_array_equal(v, cache.v_BHLD[:, :, begin:begin + pn * pn])
      # L2-normalised queries times exp(min(scale_mul, log 100)): the norm is that factor per head
      np.testing.assert_allclose(np.linalg.norm(q, axis=-1), np.broadcast_to(
          scale_mul[layer][None, :, None], q.shape[:3]), rtol=1e-5)
    begin += pn * pn


def test_no_recompile_on_second_call(greedy, model, vae):
  before = _scale_step._cache_size()
  out = generate(model, vae, [7, 10], key=jax.random.key(5), cfg=3.0, top_k=1, top_p=0.0,
                 capture_qkv=True, capture_logits=True)
  jax.block_until_ready(out.images)
  assert _scale_step._cache_size() == before


# ------------------------------------------------------------------ top-k / top-p filtering
def numpy_official_filter(logits, top_k, top_p):
  """Brute-force transcription of the official `sample_with_top_k_top_p_` masking (fp32)."""
  logits = np.array(logits, np.float32)
  if top_k > 0:
    kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
    logits[logits < kth] = -np.inf
  if top_p > 0:
    idx = np.argsort(logits, axis=-1, kind='stable')
    srt = np.take_along_axis(logits, idx, -1)
    p = np.exp(srt - srt.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    remove_sorted = np.cumsum(p, axis=-1, dtype=np.float32) <= np.float32(1 - top_p)
    remove_sorted[..., -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, idx, remove_sorted, -1)
    logits[remove] = -np.inf
  return logits


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (1, 0.0), (5, 0.0), (0, 0.5), (5, 0.9),
                                         (40, 0.96), (64, 0.3), (0, 0.999), (20, 1.0), (0, 1e-9)])
def test_top_k_top_p_filter_matches_brute_force(top_k, top_p):
  logits = np.random.default_rng(top_k + int(100 * top_p)).standard_normal((3, 7, 64)).astype(np.float32) * 3
  got = np.asarray(top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
  want = numpy_official_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  np.testing.assert_array_equal(got[~np.isneginf(got)], logits[~np.isneginf(want)])


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (4, 0.0), (0, 0.8), (5, 0.8)])
def test_sampling_frequencies_follow_filtered_softmax(top_k, top_p):
  logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -3.0], np.float32)
  idx = np.asarray(sample_top_k_top_p(jax.random.key(3), jnp.broadcast_to(logits, (4, 5000, 6)),
                                      top_k=top_k, top_p=top_p))
  freq = np.bincount(idx.ravel(), minlength=6) / idx.size
  p = np.exp(numpy_official_filter(logits[None], top_k, top_p)[0])
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.01)   # ~4 standard errors at 20000 draws
  assert np.all(freq[p == 0] == 0)


# ------------------------------------------------------------------ variants and policies
def randomized_model(**variant) -> VAR:
  cfg = dataclasses.replace(SIZES['d2-tiny'], **variant)   # same V, Cvae, schedule as the fixture VAE
  rng = np.random.default_rng(7)
  sd = {k: (rng.standard_normal(v.shape) * (1 / math.sqrt(v.shape[-1]) if len(v.shape) == 2 else 0.3)
            ).astype(np.float32)
        for k, v in var_state_dict(nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))).items()}
  return var_from_state_dict(sd, cfg.patch_nums)


def test_variant_cached_equals_uncached(vae):
  """No L2 norm (softmax scale 0.25/sqrt(hd)) and shared AdaLN together; each alone is checked
  against a numpy transcription of the official forward in test_var.py."""
  m = randomized_model(attn_l2_norm=False, shared_aln=True)
  assert not m.cfg.attn_l2_norm and m.cfg.shared_aln
  labels = [4, 10]
  out = generate(m, vae, labels, key=jax.random.key(1), cfg=2.0, top_k=8, top_p=0.9, capture_logits=True)
  cond, uncond = teacher_forced(m, vae, labels, out.tokens)
  cached = jnp.concatenate(out.logits, axis=1)
  assert rel_err(cached[:2], cond) < RTOL
  assert rel_err(cached[2:], uncond) < RTOL
  assert out.images.shape == (2, 64, 64, 3)
  assert float(out.images.min()) >= 0.0 and float(out.images.max()) <= 1.0


def test_forward_cached_matches_teacher_forcing(model, ref):
  labels, var_input = jnp.asarray(ref['in/labels']), jnp.asarray(ref['out/var_input'])
  logits, state, _ = forward_cached(model, labels, var_input)
  assert rel_err(logits, ref['out/teacher_forced_logits']) < RTOL
  assert all(int(s.length) == 30 for s in state)


@dataclasses.dataclass(frozen=True)
class CurrentScaleOnly:
  """A toy policy that keeps nothing: each scale attends only to itself."""

  def init(self, batch, num_heads, head_dim, num_layers, *, patch_nums):
    return tuple(jnp.zeros((), jnp.int32) for _ in range(num_layers))   # counts scales seen

  def attend(self, state_layer, layer, scale, q_BHSD, k_BHSD, v_BHSD):
    return softmax_attention(q_BHSD, k_BHSD, v_BHSD), state_layer + 1


def test_custom_policy_sees_the_protocol(model, ref):
  """A policy's attend defines what queries see: here block-diagonal attention, checked densely."""
  policy = CurrentScaleOnly()
  assert isinstance(policy, CachePolicy) and isinstance(FullCache(PATCH_NUMS), CachePolicy)
  labels, var_input = jnp.asarray(ref['in/labels']), jnp.asarray(ref['out/var_input'])
  logits, state, _ = forward_cached(model, labels, var_input, policy=policy)
  assert [int(s) for s in state] == [4, 4]

  @nnx.jit
  def block_diagonal(m: VAR, labels, var_input):
    cond = m.cond(labels)
    xs = [m.embed_first(cond)] + [m.embed_next(k, var_input[:, b - 1:e - 1])
                                  for k, (b, e) in enumerate(m.cfg.begin_ends) if k > 0]
    ids = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(PATCH_NUMS)])
    mask = jnp.asarray(ids[:, None] == ids[None, :])
    dense = lambda layer, q, k, v: (softmax_attention(q, k, v, mask), None)
    h, _ = m.backbone(jnp.concatenate(xs, 1), cond, dense)
    return m.logits(h, cond)

  assert rel_err(logits, block_diagonal(model, labels, var_input)) < RTOL
  assert rel_err(logits, ref['out/teacher_forced_logits']) > 1e-2   # it really changed something


def test_errors_are_explained(model, vae):
  with pytest.raises(ValueError, match=r'labels must be .* in \[0, 10\]'):
    generate(model, vae, [11], key=jax.random.key(0))
  with pytest.raises(ValueError, match='scale 1 of patch_nums'):
    forward_cached(model, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 29, 8)),
                   policy=FullCache((1, 3, 3, 4)))


# ------------------------------------------------------------------ class conditioning, once per call
def test_adaln_modulation_computed_once_per_generate_call(greedy, model, vae):
  """The blocks' and the head's AdaLN modulations (a third of the weights) are computed in `_start`,
  once per generate call, and every scale's step reads them: no step multiplies by an `ada_lin`
  kernel; with them precomputed the backbone and logits are those of the per-block computation."""
  from var_jax import sampling  # pylint: disable=g-import-not-at-top
  c = model.cfg.width
  graph, state = nnx.split(model)
  vae_graph, vae_state = nnx.split(vae)
  policy = FullCache(PATCH_NUMS)
  labels = jnp.asarray([3, 7], jnp.int32)
  cond, x, cache, f_hat = sampling._start(graph, state, policy, labels)
  assert len(cond['blocks']) == model.cfg.depth and cond['head'].shape == (4, 1, 2, c)
  step = sampling._scale_step.lower(graph, state, vae_graph, vae_state, policy, 0, 0, 0.0, False, False,
                                    cache, x, cond, f_hat, jnp.float32(1.0), jax.random.key(0), None)
  dots = [ln for ln in step.as_text().splitlines() if 'dot_general' in ln]
  ada = lambda ln, n: f'tensor<{c}x{n * c}xf32>' in ln and f'tensor<4x{c}xf32>' in ln
  assert dots and not any(ada(ln, 6) or ada(ln, 2) for ln in dots), 'a scale step recomputes AdaLN'
  start = sampling._start.lower(graph, state, policy, labels).as_text()
  assert sum(ada(ln, 6) for ln in start.splitlines() if 'dot_general' in ln) == model.cfg.depth

  h = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5, c)), jnp.float32)
  dense = lambda layer, q, k, v: (softmax_attention(q, k, v), None)
  per_block = model.logits(model.backbone(h, cond['cond'], dense)[0], cond['cond'])
  hoisted = model.logits(model.backbone(h, cond['cond'], dense, mods=cond['blocks'])[0], cond['cond'],
                         cond['head'])
  np.testing.assert_array_equal(np.asarray(hoisted), np.asarray(per_block))
