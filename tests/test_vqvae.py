"""Multi-scale VQ-VAE: parity with the official PyTorch outputs, interpolation matrices, checkpoint I/O."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import winograd
from var_jax.config import VQVAEConfig
from var_jax.interp import area_matrix, bicubic_matrix, resize_area, resize_bicubic
from var_jax.quant import VectorQuantizer, phi_index
from var_jax.torch_pickle import load_torch_state_dict
from var_jax.vae_blocks import conv3x3_narrow, Decoder, GroupNorm, Upsample2x, upsample_conv3x3
from var_jax.vqvae import VQVAE, infer_vqvae_config, load_vqvae_state_dict, vqvae_to_torch_state_dict

DATA = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
SMALL = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                    patch_nums=(1, 2, 4))  # downsample 4, 16x16 images
TINY = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, using_sa=False,
                   patch_nums=(1, 2, 4))  # downsample 2, 8x8 images: cheap to differentiate


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.fixture(scope='module')
def ref() -> dict[str, np.ndarray]:
  with np.load(DATA / 'reference.npz') as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def sd() -> dict[str, np.ndarray]:
  return load_torch_state_dict(DATA / 'vae.pth')


@pytest.fixture(scope='module')
def official(ref, sd) -> VQVAE:
  cfg = infer_vqvae_config(sd, json.loads(str(ref['config']))['patch_nums'])
  vae = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))  # no random init: every value is loaded
  load_vqvae_state_dict(vae, sd)
  return vae


def ref_idx(ref, n: int = 4) -> list[jax.Array]:
  return [jnp.asarray(ref[f'out/idx_scale{i}'], jnp.int32) for i in range(n)]


# ------------------------------------------------------------------ official parity
def test_infer_config_matches_fixture_build_args(official):
  cfg = official.cfg
  assert (cfg.vocab_size, cfg.z_channels, cfg.ch) == (64, 8, 32)
  assert cfg.ch_mult == (1, 1, 2, 2, 4) and cfg.num_res_blocks == 2
  assert cfg.using_sa and cfg.using_mid_sa and cfg.share_quant_resi == 4 and cfg.quant_conv_ks == 3
  assert cfg.patch_nums == (1, 2, 3, 4) and cfg.image_size == 64


def test_img_to_idx_equals_official(official, ref):
  idx = nnx.jit(lambda m, x: m.img_to_idx(x))(official, jnp.asarray(nchw_to_nhwc(ref['in/image'])))
  assert len(idx) == 4
  for i, got in enumerate(idx):
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref[f'out/idx_scale{i}'], err_msg=f'scale {i}')


def test_idx_to_var_input_matches_official(official, ref):
  got = nnx.jit(lambda m, i: m.idx_to_var_input(i))(official, ref_idx(ref))
  assert got.shape == (2, 1 + 4 + 9 + 16 - 1, 8)
  np.testing.assert_allclose(np.asarray(got), ref['out/var_input'], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('conv_path', ['xla', 'winograd'])
def test_idx_to_img_matches_official(official, ref, conv_path, monkeypatch):
  """Within the official tolerance with every 3x3 ResnetBlock convolution as XLA's, or as Winograd's
  (var_jax/winograd.py; by default only where it is faster: here the 64 px level)."""
  monkeypatch.setattr(winograd, 'MIN_SIDE', 10 ** 9 if conv_path == 'xla' else 4)
  monkeypatch.setattr(winograd, 'MIN_CHANNELS', 1)
  got = np.asarray(nnx.jit(lambda m, i: m.idx_to_img(i))(official, ref_idx(ref)))
  want = nchw_to_nhwc(ref['out/reconstruction'])
  assert got.shape == (2, 64, 64, 3) and got.min() >= -1 and got.max() <= 1
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  np.testing.assert_allclose(got, want, rtol=0, atol=3e-5)


def test_next_autoregressive_input_replays_official_teacher_forcing(official, ref):
  """Feeding the official codes scale by scale yields the official var_input and idx_to_img's f_hat."""
  pns = official.cfg.patch_nums

  @nnx.jit
  def replay(vae, idx):
    f_hat = jnp.zeros((2, pns[-1], pns[-1], 8), jnp.float32)
    nexts = []
    for si, pn in enumerate(pns):
      f_hat, nxt = vae.next_autoregressive_input(si, f_hat, vae.embed_idx(idx[si]).reshape(2, pn, pn, 8))
      nexts.append(nxt)
    return f_hat, nexts

  f_hat, nexts = replay(official, ref_idx(ref))
  assert [n.shape for n in nexts] == [(2, p, p, 8) for p in pns[1:] + pns[-1:]]
  np.testing.assert_array_equal(np.asarray(nexts[-1]), np.asarray(f_hat))  # after the last scale: f_hat
  var_input = np.concatenate([np.asarray(n).reshape(2, -1, 8) for n in nexts[:-1]], axis=1)
  np.testing.assert_allclose(var_input, ref['out/var_input'], rtol=1e-5, atol=1e-6)
  want = nnx.jit(lambda m, i: m.quantize.idx_to_fhat(i))(official, ref_idx(ref))
  np.testing.assert_allclose(np.asarray(f_hat), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 5, 7, 8), (1, 1, 1, 4), (1, 4, 4, 16)])
def test_upsample_conv_equals_upsampling_then_convolving(shape):
  """The phase form (four low-resolution 2x2 convs) against its definition: nearest x2, then a SAME 3x3
  conv (lax), with a bias; odd and one-pixel maps included (the edges read zero padding)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 6)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(6), jnp.float32)
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  want = jax.lax.conv_general_dilated(up, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  got = upsample_conv3x3(x, k, b)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  layer = Upsample2x(shape[-1], rngs=nnx.Rngs(0))
  fast = layer(x)
  layer.direct = True
  np.testing.assert_allclose(np.asarray(fast), np.asarray(layer(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 5, 7, 8), (1, 1, 1, 3), (3, 4, 4, 16)])
def test_narrow_conv_equals_lax_conv(shape):
  """`conv3x3_narrow` (one matmul to the nine taps' outputs, shifted and summed) against lax's SAME 3x3
  conv with a bias: odd and one-pixel maps (the edges read zero padding), and through the decoder."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 3)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(3), jnp.float32)
  want = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  got = conv3x3_narrow(x, k, b)
  assert got.shape == shape[:3] + (3,)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_decoder_output_conv_is_the_conv():
  """The decoder's RGB conv_out (run as `conv3x3_narrow`) against the same decoder with it as nnx.Conv."""
  dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, using_sa=False, using_mid_sa=False,
                rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
  got = dec(z)
  h = dec.mid(dec.conv_in(z))
  for level in reversed(dec.up):
    h = level(h)
  want = dec.conv_out(jax.nn.silu(dec.norm_out(h)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 6, 5, 64), (3, 10, 96), (1, 1, 1, 32)])
def test_group_norm_equals_float64_two_pass(shape):
  """`GroupNorm` against numpy's two-pass group statistics in float64 (32 groups, eps 1e-6, affine) on
  maps whose mean is 100x their spread (a one-pass E[x^2] - E[x]^2 in float32 loses it); (B, H, W, C)
  and (B, L, C) inputs; a one-element group normalises to the bias."""
  rng = np.random.default_rng(2)
  C = shape[-1]
  x = (rng.standard_normal(shape) + 100.0 * rng.standard_normal(C)).astype(np.float32)
  gn = GroupNorm(C)
  scale, bias = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
  gn.scale.set_value(jnp.asarray(scale))
  gn.bias.set_value(jnp.asarray(bias))
  g = x.astype(np.float64).reshape(shape[0], -1, 32, C // 32)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(shape) * scale + bias
  np.testing.assert_allclose(np.asarray(gn(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='divisible by 32'):
    GroupNorm(48)


def test_phi_choice_follows_official_ticks():
  assert [phi_index(si, 4, 4) for si in range(4)] == [0, 1, 2, 3]  # the fixture's schedule
  # 256px schedule (10 scales, 4 Phi). si=2 and si=7 are exact ties in real arithmetic (2/9 and 7/9 sit
  # midway between two ticks); the official float64 numpy expression breaks them upwards.
  assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  assert [phi_index(si, 3, 4) for si in range(3)] == [0, 2, 3]


# ------------------------------------------------------------------ interpolation matrices
def keys_cubic(x: float, a: float = -0.75) -> float:
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0


def torch_bicubic_1d(x: np.ndarray, n_out: int) -> np.ndarray:
  """Direct scalar form of torch's bicubic (align_corners=False, clamped taps), float64."""
  n_in, out = len(x), np.zeros(n_out)
  for d in range(n_out):
    src = (d + 0.5) * n_in / n_out - 0.5
    i0 = math.floor(src)
    out[d] = sum(keys_cubic(i0 + k - src) * x[min(max(i0 + k, 0), n_in - 1)] for k in range(-1, 3))
  return out


@pytest.mark.parametrize('n_in,n_out', [(1, 4), (2, 4), (3, 16), (5, 16), (13, 16), (16, 16), (8, 5)])
def test_bicubic_matrix_matches_scalar_formula(n_in, n_out):
  mat = bicubic_matrix(n_in, n_out)
  assert mat.shape == (n_out, n_in) and mat.dtype == np.float32
  want = np.stack([torch_bicubic_1d(e, n_out) for e in np.eye(n_in)], axis=1)
  np.testing.assert_allclose(mat, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(mat.sum(1), 1, atol=1e-6)  # a constant stays that constant


def test_bicubic_of_a_ramp_has_the_closed_form_a075_bias():
  """Keys' kernel reproduces linear functions only for A = -0.5. For torch's A = -0.75, interpolating the
  ramp x_i = i at source position s = i0 + t (all four taps inside) gives s + (2A+1) t (1-t) (2t-1)."""
  n_in, n_out = 6, 16
  y = bicubic_matrix(n_in, n_out).astype(np.float64) @ np.arange(n_in, dtype=np.float64)
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  t = src - np.floor(src)
  interior = (np.floor(src) - 1 >= 0) & (np.floor(src) + 2 <= n_in - 1)
  assert interior.sum() >= 6 and np.ptp(t[interior]) > 0.4
  want = src + (2 * -0.75 + 1) * t * (1 - t) * (2 * t - 1)
  np.testing.assert_allclose(y[interior], want[interior], atol=1e-5)
  np.testing.assert_allclose((bicubic_matrix(8, 4) @ np.arange(8.0))[1:3], [2.5, 4.5], atol=1e-5)  # t = 1/2
  assert np.array_equal(bicubic_matrix(7, 7), np.eye(7, dtype=np.float32))


def test_area_matrix_block_means_and_adaptive_bins():
  x = np.arange(12.0)
  np.testing.assert_allclose(area_matrix(12, 4) @ x, x.reshape(4, 3).mean(1), atol=1e-6)
  # torch adaptive_avg_pool1d bins [floor(i*in/out), ceil((i+1)*in/out)): 5 -> 3 and 2 -> 3
  np.testing.assert_allclose(area_matrix(5, 3) @ np.arange(5.0), [0.5, 2.0, 3.5], atol=1e-6)
  np.testing.assert_allclose(area_matrix(2, 3) @ np.array([1.0, 3.0]), [1.0, 2.0, 3.0], atol=1e-6)
  assert np.array_equal(area_matrix(4, 4), np.eye(4, dtype=np.float32))


def test_resize_is_separable_over_h_and_w():
  x = np.random.default_rng(0).normal(size=(2, 4, 3, 5)).astype(np.float32)
  out = np.asarray(resize_area(jnp.asarray(x), (2, 3)))
  np.testing.assert_allclose(out, x.reshape(2, 2, 2, 3, 5).mean(2), atol=1e-6)
  up = np.asarray(resize_bicubic(jnp.asarray(x), 7))
  want = np.einsum('Hh,Ww,bhwc->bHWc', bicubic_matrix(4, 7).astype(np.float64),
                   bicubic_matrix(3, 7).astype(np.float64), x)
  np.testing.assert_allclose(up, want, atol=1e-5)


# ------------------------------------------------------------------ checkpoint loading
def test_mis_shaped_key_is_named(official, sd):
  bad = dict(sd)
  bad['decoder.conv_in.weight'] = np.zeros((128, 8, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r'decoder\.conv_in\.weight: expected \(128, 8, 3, 3\).*got \(128, 8, 1, 1\)'):
    load_vqvae_state_dict(official, bad)


def test_missing_and_unexpected_keys_are_named(official, sd):
  missing = {k: v for k, v in sd.items() if k != 'quantize.quant_resi.qresi_ls.2.bias'}
  with pytest.raises(ValueError, match=r'missing keys: quantize\.quant_resi\.qresi_ls\.2\.bias'):
    load_vqvae_state_dict(official, missing)
  extra = dict(sd, **{'encoder.down.9.block.0.conv1.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r'unexpected keys: encoder\.down\.9\.block\.0\.conv1\.weight'):
    load_vqvae_state_dict(official, extra)


def numpy_filled_vqvae(cfg: VQVAEConfig, seed: int) -> VQVAE:
  """A VQVAE whose parameters are N(0, 0.2) numpy draws (abstract build: no XLA compile per init shape)."""
  vae = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for _, var in nnx.iter_graph(vae):
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      shape, dtype = var.get_value().shape, var.get_value().dtype
      var.set_value(jnp.asarray(rng.normal(scale=0.2, size=shape) if isinstance(var, nnx.Param)
                                else np.zeros(shape), dtype))
  return vae


@pytest.mark.parametrize('cfg', [
    SMALL,
    dataclasses.replace(SMALL, share_quant_resi=1, using_sa=False, using_mid_sa=False, quant_conv_ks=1,
                        ch_mult=(1, 2), num_res_blocks=2, patch_nums=(1, 3, 8)),
    dataclasses.replace(SMALL, share_quant_resi=0),
    dataclasses.replace(SMALL, quant_resi=0.0),
], ids=['partial4', 'shared-noattn', 'nonshared', 'no-phi'])
def test_export_infer_load_round_trip(cfg):
  sd = vqvae_to_torch_state_dict(numpy_filled_vqvae(cfg, seed=0))
  assert sd['encoder.conv_in.weight'].shape == (cfg.ch, 3, 3, 3)  # torch OIHW
  assert infer_vqvae_config(sd, cfg.patch_nums) == cfg
  other = nnx.eval_shape(lambda: VQVAE(infer_vqvae_config(sd, cfg.patch_nums), rngs=nnx.Rngs(0)))
  load_vqvae_state_dict(other, sd)
  back = vqvae_to_torch_state_dict(other)
  assert back.keys() == sd.keys()
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_failed_load_assigns_nothing_and_ema_buffer_is_optional():
  sd = vqvae_to_torch_state_dict(numpy_filled_vqvae(SMALL, seed=1))
  vae = nnx.eval_shape(lambda: VQVAE(SMALL, rngs=nnx.Rngs(1)))
  bad = dict(sd, **{'quant_conv.bias': np.zeros(9, np.float32)})
  with pytest.raises(ValueError, match=r'quant_conv\.bias: expected \(8,\)'):
    load_vqvae_state_dict(vae, bad)
  assert isinstance(vae.encoder.conv_in.kernel.get_value(), jax.ShapeDtypeStruct)  # nothing assigned
  load_vqvae_state_dict(vae, {k: v for k, v in sd.items() if k != 'quantize.ema_vocab_hit_SV'})
  np.testing.assert_array_equal(np.asarray(vae.encoder.conv_in.kernel.get_value()),
                                sd['encoder.conv_in.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(vae.quantize.ema_vocab_hit_SV.get_value()), np.zeros((3, 32)))
  assert int(vae.quantize.record_hit.get_value()) == 0


# ------------------------------------------------------------------ small model: shapes and training forward
@pytest.fixture(scope='module')
def small_vae() -> VQVAE:
  return numpy_filled_vqvae(SMALL, seed=2)


def test_init_follows_torch_defaults():
  quant = VectorQuantizer(SMALL, rngs=nnx.Rngs(0))  # a part of the model: each init shape costs a compile
  kernel = np.asarray(quant.quant_resi.qresi_ls[0].kernel.get_value())
  assert kernel.shape == (3, 3, 8, 8) and 0.8 / math.sqrt(72) < np.abs(kernel).max() <= 1 / math.sqrt(72)
  codebook = np.asarray(quant.embedding.embedding.get_value())
  assert codebook.shape == (32, 8) and np.abs(codebook).max() <= 1 / 32  # taming's U(+-1/V)
  assert np.all(np.asarray(quant.ema_vocab_hit_SV.get_value()) == 0)


def test_small_downsample4_model_round_trips_shapes(small_vae):
  assert SMALL.downsample == 4 and SMALL.image_size == 16
  img = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)

  @nnx.jit
  def run(m, x):
    idx = m.img_to_idx(x)
    return idx, m.embed_idx(idx[1]), m.idx_to_var_input(idx), m.idx_to_img(idx)

  idx, emb, var_input, rec = run(small_vae, img)
  assert [i.shape for i in idx] == [(3, 1), (3, 4), (3, 16)]
  assert all(int(i.min()) >= 0 and int(i.max()) < SMALL.vocab_size for i in idx)
  assert emb.shape == (3, 4, 8) and var_input.shape == (3, 1 + 4 + 16 - 1, 8)
  assert rec.shape == (3, 16, 16, 3) and np.abs(np.asarray(rec)).max() <= 1
  with pytest.raises(ValueError, match=r'\(B, 16, 16, 3\)'):
    small_vae.img_to_idx(np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match='scale 2'):
    small_vae.idx_to_img([idx[0], idx[1], idx[2][:, :4]])


def test_training_forward_loss_usage_and_straight_through():
  vae = numpy_filled_vqvae(TINY, seed=3)
  img = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)

  @nnx.jit
  def forward(m, x):
    f = m.encode(x)
    idx, f_hats = m.quantize.quantize_scales(f)
    return f, idx, f_hats, m.quantize(f), m(x, update_usage=False)

  f, idx, f_hats, q, out = jax.tree.map(np.asarray, forward(vae, img))
  assert out.rec_BHWC.shape == (2, 8, 8, 3) and out.usages_S.shape == (3,)
  np.testing.assert_allclose(np.asarray(q.f_hat_BhwC), np.asarray(f_hats[-1]), atol=1e-6)  # forward value
  # the value of beta*|sg(fh)-f|^2 + |fh-sg(f)|^2 is (1+beta)*|fh-f|^2, averaged over the scales
  want = np.mean([(1 + TINY.beta) * np.mean((fh - f) ** 2) for fh in f_hats])
  np.testing.assert_allclose(float(q.vq_loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(out.vq_loss), want, rtol=1e-5)
  # official EMA quirk: the counter advances once per scale, so only scale 0 copies its first hits
  hits = [np.bincount(np.asarray(i).ravel(), minlength=TINY.vocab_size) for i in idx]
  ema = np.asarray(vae.quantize.ema_vocab_hit_SV.get_value())
  np.testing.assert_allclose(ema, np.stack([hits[0], 0.1 * hits[1], 0.1 * hits[2]]), rtol=1e-6)
  assert int(vae.quantize.record_hit.get_value()) == 3  # m(x, update_usage=False) left it alone
  margin = 2 * 4 * 4 / TINY.vocab_size * 0.08
  np.testing.assert_allclose(np.asarray(q.usages_S), (ema >= margin).mean(1) * 100, rtol=1e-6)

  # gradients: straight-through for f plus the commitment term, codebook and Phi through |fh - sg(f)|^2
  w = np.random.default_rng(3).normal(size=f.shape).astype(np.float32)

  @nnx.jit
  def grads(quant, f):
    def loss(quant, f):
      o = quant(f, update_usage=False)
      return jnp.sum(w * o.f_hat_BhwC) + o.vq_loss
    return nnx.grad(loss, argnums=(0, 1))(quant, f)

  g_quant, g_f = grads(vae.quantize, f)
  want_g_f = w + sum(2 * TINY.beta * (f - fh) / f.size for fh in f_hats) / len(f_hats)
  np.testing.assert_allclose(np.asarray(g_f), np.asarray(want_g_f), rtol=1e-5, atol=1e-7)
  for name, g in [('codebook', g_quant.embedding.embedding), ('phi', g_quant.quant_resi.qresi_ls[0].kernel)]:
    assert np.abs(np.asarray(g.get_value())).max() > 0, f'no gradient reaches the {name}'
