"""Winograd F(4x4, 3x3) convolutions (var_jax/winograd.py) against float64 brute force."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import winograd


def correlate64(x_BHWC: np.ndarray, k_33IO: np.ndarray, b_O: np.ndarray) -> np.ndarray:
  """SAME 3x3 cross-correlation (the convolution of torch and lax) + bias in float64, by its sum."""
  H, W = x_BHWC.shape[1:3]
  pad = np.pad(x_BHWC.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(np.einsum('bhwi,io->bhwo', pad[:, y:y + H, x:x + W], k_33IO[y, x].astype(np.float64))
             for y in range(3) for x in range(3)) + b_O


@pytest.mark.parametrize('points', [winograd.POINTS, (0.0, 1.0, -1.0, 2.0, -2.0),
                                    (0.0, 0.5, -0.5, 3.0, -1.5)])
def test_matrices_compute_the_correlation(points):
  """A^T [(G g) * (B^T d)] is the 1-D correlation of a 6-sample input with a 3-tap filter, exactly."""
  a_t, g, b_t = winograd.matrices(points)
  rng = np.random.default_rng(0)
  for _ in range(20):
    d, taps = rng.standard_normal(6), rng.standard_normal(3)
    want = [sum(taps[k] * d[i + k] for k in range(3)) for i in range(4)]
    np.testing.assert_allclose(a_t @ ((g @ taps) * (b_t @ d)), want, rtol=0, atol=1e-12)


def test_repeated_points_are_refused():
  with pytest.raises(ValueError, match='distinct'):
    winograd.matrices((0.0, 1.0, -1.0, 2.0, 2.0))


@pytest.mark.parametrize('shape,rows', [((2, 16, 24, 40, 24), None), ((1, 32, 8, 64, 64), 1),
                                        ((3, 8, 8, 32, 16), 2), ((1, 16, 16, 160, 160), 4)])
def test_conv3x3_equals_float64_correlation(shape, rows):
  """Against float64: rms error <= 4e-6 of the output's rms, max <= 2e-5 of its largest (the direct fp32
  sum measures ~2.4e-7; these points 1.7e-6 rms): the tiles, strips, padding and bias all in place."""
  B, H, W, C, O = shape
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, H, W, C)).astype(np.float32)
  k = (rng.standard_normal((3, 3, C, O)) / np.sqrt(9 * C)).astype(np.float32)
  b = rng.standard_normal(O).astype(np.float32) * 0.1
  got = np.asarray(jax.jit(winograd.conv3x3, static_argnums=3)(x, k, b, rows), np.float64)
  want = correlate64(x, k, b)
  assert got.shape == want.shape
  assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)) < 4e-6
  assert np.abs(got - want).max() < 2e-5 * np.abs(want).max()


def test_every_output_pixel_sees_its_own_window():
  """A single nonzero input pixel at every position of a tile and at the borders: the output is the
  flipped kernel around it, nothing elsewhere (tile strides, strip offsets and padding)."""
  k = np.arange(1, 10, dtype=np.float32).reshape(3, 3, 1, 1) * np.ones((1, 1, 32, 1), np.float32)
  for i, j in [(0, 0), (1, 2), (3, 3), (4, 5), (7, 0), (15, 15), (8, 11)]:
    x = np.zeros((1, 16, 16, 32), np.float32)
    x[0, i, j, :] = 1.0
    got = np.asarray(winograd.conv3x3(x, k, np.zeros(1, np.float32), rows=2))[0, ..., 0]
    want = correlate64(x, k, np.zeros(1))[0, ..., 0]                  # 32 k[y, x] around (i, j)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_bad_shapes_are_named():
  k, b = np.zeros((3, 3, 4, 4), np.float32), np.zeros(4, np.float32)
  with pytest.raises(ValueError, match='divisible by 4'):
    winograd.conv3x3(np.zeros((1, 10, 8, 4), np.float32), k, b)
  with pytest.raises(ValueError, match='must divide'):
    winograd.conv3x3(np.zeros((1, 12, 8, 4), np.float32), k, b, rows=2)


def test_applies_only_where_it_pays():
  on_cpu = jax.default_backend() == 'cpu'
  assert winograd.applies((2, 256, 256, 160), (3, 3, 160, 160), 1) == on_cpu
  assert winograd.applies((2, 128, 64, 160), (3, 3, 160, 160), (1, 1)) == on_cpu
  assert not winograd.applies((2, 256, 256, 160), (3, 3, 160, 160), 2)          # strided
  assert not winograd.applies((2, 256, 256, 160), (1, 1, 160, 160), 1)          # 1x1
  assert not winograd.applies((2, 32, 32, 320), (3, 3, 320, 320), 1)            # small map
  assert not winograd.applies((2, 256, 256, 3), (3, 3, 3, 160), 1)              # RGB input
  assert not winograd.applies((2, 130, 128, 160), (3, 3, 160, 160), 1)          # side not 4k
  assert not winograd.applies((2, 256, 256, 160), (3, 3, 160, 160), 1, jnp.bfloat16)


def test_strip_rows_divides_and_targets_the_step_size():
  for H, W in [(256, 256), (128, 128), (64, 64), (64, 256), (16, 16), (12, 400)]:
    r = winograd.strip_rows(H, W)
    assert (H // 4) % r == 0
  assert winograd.strip_rows(256, 256) * 64 == winograd.TILES_PER_STEP


def test_gradient_matches_the_direct_convolution():
  """The decoder is differentiable through it (VQ-VAE training): gradients as lax's convolution's."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 8, 4)) / 8, jnp.float32)
  b = jnp.zeros(4, jnp.float32)
  direct = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  got = jax.grad(loss(lambda x, k: winograd.conv3x3(x, k, b)), argnums=(0, 1))(x, k)
  want = jax.grad(loss(direct), argnums=(0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_conv_benchmark_times_every_resnet_convolution_of_the_d16_decoder():
  """eval/bench/conv.py's shapes: the official d16 decoder (ch 160, ch_mult 1, 1, 2, 2, 4, three
  ResnetBlocks a level) from 16 px up, each (side, c_in, c_out) once."""
  from flax import nnx
  from eval.bench.conv import _shapes
  from var_jax.config import VQVAEConfig
  from var_jax.vqvae import VQVAE
  vae = nnx.eval_shape(lambda: VQVAE(VQVAEConfig(), rngs=nnx.Rngs(0)))
  assert _shapes(vae) == [(16, 640, 640), (32, 640, 320), (32, 320, 320), (64, 320, 320),
                          (128, 320, 160), (128, 160, 160), (256, 160, 160)]


def test_conv_benchmark_runs_and_its_two_decodes_agree():
  """`python -m eval.bench.conv` on the smallest model: every shape timed both ways, the decode with
  XLA's convolutions and the default one give the same images (to Winograd's rounding)."""
  import json
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'eval.bench.conv', '--size=d2-tiny', '--batch=1', '--runs=1'],
                       capture_output=True, text=True, check=True, timeout=300)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(row['convs']) == 7
  assert all(c['xla_ms'] > 0 and c['winograd_ms'] > 0 for c in row['convs'].values())
  assert row['convs']['64px 32->32']['applies'] and not row['convs']['32px 32->32']['applies']
  assert 0 < row['decode_max_abs_diff'] < 1e-5 and set(row['decode_s']) == {'xla', 'default'}
