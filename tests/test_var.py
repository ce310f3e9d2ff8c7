"""VAR transformer port: teacher forcing against the official outputs, loader, config inference.

Truth: the official PyTorch outputs in tests/data/var_official_tiny (see its README), the official
parameter count of d16, and an independent numpy transcription of the official forward (checked on
the fixture first) for the variants the fixture does not cover (no L2 norm, shared AdaLN).
"""
import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax.config import SIZES, VARConfig
from var_jax.torch_pickle import load_torch_state_dict
from var_jax.var import VAR, block_causal_mask, infer_var_config, load_var_state_dict, scale_ids
from var_jax.var import var_from_state_dict, var_state_dict

DATA = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
PATCH_NUMS = (1, 2, 3, 4)
RTOL = 1e-5


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(DATA / 'reference.npz'))


@pytest.fixture(scope='module')
def var_sd():
  return load_torch_state_dict(DATA / 'var.pth')


@pytest.fixture(scope='module')
def model(var_sd):
  return var_from_state_dict(var_sd, PATCH_NUMS)


@nnx.jit
def forward(m: VAR, labels, var_input, cond_drop_key=None):
  return m(labels, var_input, cond_drop_key=cond_drop_key)


def randomized_sd(cfg: VARConfig, seed: int) -> dict[str, np.ndarray]:
  """An official-format state dict with every parameter redrawn (so no block is near identity)."""
  sd = var_state_dict(nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in sd.items():
    std = 0.5 if k.endswith('scale_mul_1H11') else 1.0 / math.sqrt(v.shape[-1]) if len(v.shape) == 2 else 0.3
    out[k] = (rng.standard_normal(v.shape) * std).astype(np.float32)
  return out


# ------------------------------------------------------------------ independent numpy reference
def _np_ln(x, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _np_silu(x):
  return x / (1 + np.exp(-x))


def _np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def numpy_official_forward(sd, cfg: VARConfig, labels, var_input):
  """Transcription of the official `VAR.forward` (fp64 numpy, official tensor layouts)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  lin = lambda x, n: x @ sd[f'{n}.weight'].T + (sd[f'{n}.bias'] if f'{n}.bias' in sd else 0)
  B, C, H = len(labels), cfg.width, cfg.num_heads
  hd, L = C // H, cfg.seq_len
  cond = sd['class_emb.weight'][labels]
  x = np.concatenate([cond[:, None] + sd['pos_start'], lin(var_input, 'word_embed')], axis=1)
  lvl = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(cfg.patch_nums)])
  x = x + sd['lvl_embed.weight'][lvl][None] + sd['pos_1LC']
  bias = np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf)
  if cfg.shared_aln:
    shared = lin(_np_silu(cond), 'shared_ada_lin.1').reshape(B, 1, 6, C)
  for i in range(cfg.depth):
    p = f'blocks.{i}'
    if cfg.shared_aln:
      g = sd[f'{p}.ada_gss'] + shared
    else:
      g = lin(_np_silu(cond), f'{p}.ada_lin.1').reshape(B, 1, 6, C)
    g1, g2, s1, s2, sh1, sh2 = (g[:, :, j] for j in range(6))
    h = _np_ln(x, cfg.norm_eps) * (1 + s1) + sh1
    qkv = h @ sd[f'{p}.attn.mat_qkv.weight'].T + np.concatenate(
        [sd[f'{p}.attn.q_bias'], np.zeros(C), sd[f'{p}.attn.v_bias']])
    q, k, v = qkv.reshape(B, L, 3, H, hd).transpose(2, 0, 3, 1, 4)
    if cfg.attn_l2_norm:
      q = q / np.linalg.norm(q, axis=-1, keepdims=True)
      k = k / np.linalg.norm(k, axis=-1, keepdims=True)
      q = q * np.exp(np.minimum(sd[f'{p}.attn.scale_mul_1H11'], np.log(100)))
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(hd)
    att = q * scale @ k.transpose(0, 1, 3, 2) + bias
    att = np.exp(att - att.max(-1, keepdims=True))
    o = (att / att.sum(-1, keepdims=True)) @ v
    x = x + lin(o.transpose(0, 2, 1, 3).reshape(B, L, C), f'{p}.attn.proj') * g1
    h = _np_ln(x, cfg.norm_eps) * (1 + s2) + sh2
    x = x + lin(_np_gelu_tanh(lin(h, f'{p}.ffn.fc1')), f'{p}.ffn.fc2') * g2
  sc, sh = lin(_np_silu(cond), 'head_nm.ada_lin.1').reshape(B, 1, 2, C).transpose(2, 0, 1, 3)
  return lin(_np_ln(x, cfg.norm_eps) * (1 + sc) + sh, 'head')


# ------------------------------------------------------------------ teacher forcing
def test_teacher_forced_logits_match_official(model, ref):
  logits = forward(model, jnp.asarray(ref['in/labels']), jnp.asarray(ref['out/var_input']))
  assert logits.shape == (2, 30, 64) and logits.dtype == jnp.float32
  assert rel_err(logits, ref['out/teacher_forced_logits']) < RTOL


def test_numpy_reference_matches_official(var_sd, ref):
  cfg = infer_var_config(var_sd, PATCH_NUMS)
  out = numpy_official_forward(var_sd, cfg, ref['in/labels'], ref['out/var_input'])
  assert rel_err(out, ref['out/teacher_forced_logits']) < RTOL


@pytest.mark.parametrize('variant', [dict(attn_l2_norm=False), dict(shared_aln=True),
                                     dict(attn_l2_norm=False, shared_aln=True)])
def test_variants_match_numpy_reference(variant):
  cfg = dataclasses.replace(SIZES['d2-tiny'], **variant)
  sd = randomized_sd(cfg, seed=1)
  m = var_from_state_dict(sd, cfg.patch_nums)
  assert m.cfg == cfg
  rng = np.random.default_rng(2)
  labels = np.array([3, cfg.num_classes])
  var_input = rng.standard_normal((2, cfg.seq_len - 1, cfg.z_channels)).astype(np.float32)
  out = forward(m, jnp.asarray(labels), jnp.asarray(var_input))
  assert rel_err(out, numpy_official_forward(sd, cfg, labels, var_input)) < RTOL


def test_block_causal_mask_and_scale_ids_match_official_buffers(var_sd):
  np.testing.assert_array_equal(block_causal_mask(PATCH_NUMS), var_sd['attn_bias_for_masking'][0, 0] == 0)
  np.testing.assert_array_equal(scale_ids(PATCH_NUMS), var_sd['lvl_1L'][0])


def test_label_dropout(model, ref):
  """With a key, labels become the null class where uniform(key) < cond_drop_rate; without, never."""
  m = nnx.clone(model)
  m.cfg = dataclasses.replace(model.cfg, cond_drop_rate=0.5)
  key, null = jax.random.key(0), model.cfg.num_classes
  labels = jnp.arange(8) % null
  var_input = jnp.tile(jnp.asarray(ref['out/var_input'][:1]), (8, 1, 1))
  drop = np.asarray(jax.random.uniform(key, (8,)) < 0.5)
  assert 0 < drop.sum() < 8
  dropped = forward(m, labels, var_input, key)
  np.testing.assert_array_equal(dropped, forward(m, jnp.where(drop, null, labels), var_input))
  kept = forward(m, labels, var_input)
  assert not np.allclose(dropped, kept)
  np.testing.assert_array_equal(np.asarray(dropped)[~drop], np.asarray(kept)[~drop])


def test_wrong_var_input_shape_is_explained(model):
  with pytest.raises(ValueError, match=r'expected \(2, 29, 8\)'):
    forward(model, jnp.zeros((2,), jnp.int32), jnp.zeros((2, 30, 8)))


# ------------------------------------------------------------------ config inference, loader
def test_infer_config_reads_fixture(var_sd):
  cfg = infer_var_config(var_sd, PATCH_NUMS)
  assert (cfg.depth, cfg.width, cfg.num_heads, cfg.vocab_size, cfg.z_channels, cfg.num_classes) == (
      2, 128, 2, 64, 8, 10)
  assert cfg.attn_l2_norm and not cfg.shared_aln and cfg.mlp_ratio == 4.0 and cfg.patch_nums == PATCH_NUMS


def test_infer_config_detects_variants():
  for variant in (dict(attn_l2_norm=False), dict(shared_aln=True)):
    cfg = dataclasses.replace(SIZES['d2-tiny'], **variant)
    assert infer_var_config(randomized_sd(cfg, 0), cfg.patch_nums) == cfg


def test_infer_config_rejects_wrong_patch_nums(var_sd):
  with pytest.raises(ValueError, match=r'patch_nums \(1, 2, 3, 4, 5\) do not fit.*30 positions'):
    infer_var_config(var_sd, (1, 2, 3, 4, 5))


def test_state_dict_round_trip(model, var_sd):
  exported = var_state_dict(model)
  assert set(exported) == {k for k in var_sd if k not in ('lvl_1L', 'attn_bias_for_masking')
                           and not k.endswith('zero_k_bias')}
  for k, v in exported.items():
    np.testing.assert_array_equal(v, var_sd[k])


def test_loader_ignores_buffers_and_names_bad_keys(var_sd):
  m = nnx.eval_shape(lambda: VAR(infer_var_config(var_sd, PATCH_NUMS), rngs=nnx.Rngs(0)))
  bad = dict(var_sd)
  del bad['blocks.1.ffn.fc2.bias']
  bad['blocks.0.attn.proj.weight'] = np.zeros((128, 64), np.float32)
  bad['extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    load_var_state_dict(m, bad)
  msg = str(e.value)
  assert "missing keys ['blocks.1.ffn.fc2.bias']" in msg
  assert "unexpected keys ['extra.weight']" in msg
  assert 'blocks.0.attn.proj.weight: expected (128, 128), got (128, 64)' in msg
  nonzero = dict(var_sd, **{'blocks.0.attn.zero_k_bias': np.ones(128, np.float32)})
  with pytest.raises(ValueError, match='non-zero key biases'):
    load_var_state_dict(m, nonzero)


def test_loader_rejects_other_variant(var_sd):
  cfg = dataclasses.replace(infer_var_config(var_sd, PATCH_NUMS), shared_aln=True)
  m = nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"missing keys \['blocks.0.ada_gss'"):
    load_var_state_dict(m, var_sd)


def test_d16_has_official_parameter_count():
  m = nnx.eval_shape(lambda: VAR(SIZES['d16'], rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n == 310_283_520


def test_random_init_follows_official_recipe():
  """Official init_weights defaults: std sqrt(1/3C); head x0.02; AdaLN gammas x1e-5, rest x0.5."""
  cfg = SIZES['d2-tiny']
  m = VAR(cfg, rngs=nnx.Rngs(0))
  std = math.sqrt(1 / (3 * cfg.width))
  sd = var_state_dict(m)
  np.testing.assert_allclose(sd['class_emb.weight'].std(), std, rtol=0.15)
  np.testing.assert_allclose(sd['head.weight'].std(), 0.02 * std, rtol=0.15)
  ada = sd['blocks.0.ada_lin.1.weight']   # (6C, C): gamma1, gamma2 rows first
  np.testing.assert_allclose(ada[:2 * cfg.width].std(), 1e-5 * std, rtol=0.15)
  np.testing.assert_allclose(ada[2 * cfg.width:].std(), 0.5 * std, rtol=0.15)
  assert not np.any(sd['blocks.0.attn.q_bias']) and not np.any(sd['head.bias'])
  np.testing.assert_allclose(sd['blocks.0.attn.scale_mul_1H11'], math.log(4.0))
  out = forward(m, jnp.array([1, cfg.num_classes]), jnp.zeros((2, cfg.seq_len - 1, cfg.z_channels)))
  assert np.all(np.isfinite(out))
