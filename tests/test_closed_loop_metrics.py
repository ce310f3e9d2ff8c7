"""Closed-loop metrics (eval/quality/closed_loop.py `compare`, `evaluate_policy`; eval/quality/metrics.py)
on hand-built tokens, logits and images with known answers, and a compressed generation that must
differ from the full cache's.

- `compare`: agreement per scale and its mean weighted by tokens per scale, KL(full || compressed) per
  scale (closed form for two-way distributions) and its weighted mean, PSNR (20 dB for a 0.1 offset,
  the 100 dB cap for identical images), SSIM (the luminance closed form of flat images; 1 if identical).
- `evaluate_policy` on the official tiny model: the full cache (budget 100 %) reproduces the reference
  exactly (agreement 1, KL 0, PSNR at its cap, SSIM 1); a window cache of one token (10 %) agrees on
  scale 0 (it sees no cache) and not after it (agreement < 1, KL > 0, PSNR below the cap, SSIM < 1);
  the counted bytes are the policy state's bits / 8 and the fp16 yardstick is its closed form.
- FID / KID (`full_reference(..., distribution_metrics=True)`): 0 at 100 % (identical images), and at
  10 % the values distribution.py gives on features recomputed here, against the full cache and
  against `real_images`; `noise_floor`: the full cache against its draw with other seeds.
Fault caught (checked by breaking closed_loop.py in a scratch copy): any metric computed on the
reference against itself; the noise floor drawn with the same seeds.
"""
import pathlib

import jax
import numpy as np
import pytest

import compress
import var_jax
from compress.core.budget import CacheGeometry
from eval.quality import classifier, closed_loop, distribution

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'


def two_way_logits(p_first, n, tokens):
  """(n, tokens, 2) logits of the distribution (p, 1 - p), shifted by a constant per row."""
  shift = np.arange(n * tokens, dtype=np.float64).reshape(n, tokens, 1)
  return np.log(np.broadcast_to([p_first, 1 - p_first], (n, tokens, 2))) + shift


def kl_two_way(p, q):
  return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def test_compare_gives_the_known_answers():
  n, sizes = 2, (1, 4, 9)
  ref_tokens = [np.arange(n * s).reshape(n, s) for s in sizes]
  got_tokens = [t.copy() for t in ref_tokens]
  got_tokens[1][0, :2] += 100                     # scale 1: 2 of 8 differ
  got_tokens[2][1, :6] += 100                     # scale 2: 6 of 18 differ
  agree = [1.0, 6 / 8, 12 / 18]
  p_ref, p_got = (0.5, 0.5, 0.5), (0.5, 0.7, 0.9)  # scale 0: the same distribution
  ref = {'tokens': ref_tokens, 'logits': [two_way_logits(p, n, s) for p, s in zip(p_ref, sizes)]}
  got = {'tokens': got_tokens, 'logits': [two_way_logits(p, n, s) for p, s in zip(p_got, sizes)]}
  kl = [kl_two_way(a, b) for a, b in zip(p_ref, p_got)]
  # image 0: flat 0.2 against flat 0.3 (MSE 0.01: 20 dB); image 1 identical (capped at 100 dB)
  ref['images'] = np.stack([np.full((12, 12, 3), 0.2), np.full((12, 12, 3), 0.6)])
  got['images'] = np.stack([np.full((12, 12, 3), 0.3), np.full((12, 12, 3), 0.6)])
  ssim0 = (2 * 0.2 * 0.3 + 1e-4) / (0.2 ** 2 + 0.3 ** 2 + 1e-4)       # flat images: luminance term only
  row = closed_loop.compare(ref, got, 0.95)
  w = np.array(sizes, np.float64) / sum(sizes)
  assert row['images'] == 2
  np.testing.assert_allclose(row['token_agreement_per_scale'], agree, rtol=1e-12)
  assert row['token_agreement'] == pytest.approx(float(np.dot(agree, w)), rel=1e-12)
  np.testing.assert_allclose(row['kl_per_scale'], kl, rtol=1e-9, atol=1e-15)
  assert row['kl_per_scale'][0] == pytest.approx(0.0, abs=1e-15) and row['kl_per_scale'][2] > row['kl_per_scale'][1]
  assert row['kl'] == pytest.approx(float(np.dot(kl, w)), rel=1e-9)
  assert row['psnr'] == pytest.approx((20.0 + closed_loop.PSNR_CAP) / 2, rel=1e-9)
  assert 20.0 - 1e-9 <= row['psnr_ci_low'] <= row['psnr'] <= row['psnr_ci_high'] <= closed_loop.PSNR_CAP
  assert row['ssim'] == pytest.approx((ssim0 + 1.0) / 2, rel=1e-9)
  assert ssim0 - 1e-12 <= row['ssim_ci_low'] <= row['ssim_ci_high'] <= 1.0
  # KL is taken from the full cache to the compressed one, not the other way round
  flipped = closed_loop.compare(got, ref, 0.95)
  np.testing.assert_allclose(flipped['kl_per_scale'], [kl_two_way(b, a) for a, b in zip(p_ref, p_got)], rtol=1e-9)
  assert flipped['kl'] != pytest.approx(row['kl'], rel=1e-3)


@pytest.fixture(scope='module')
def model():
  return var_jax.load_official(FIX / 'var.pth', FIX / 'vae.pth', patch_nums=(1, 2, 3, 4))


@pytest.mark.slow
def test_evaluate_policy_full_cache_is_exact_and_a_tiny_budget_is_not(model):
  cfg = model.var.cfg
  g = CacheGeometry(model.patch_nums, cfg.head_dim)
  labels, seeds = (1, 2), (0,)
  gen = {'cfg': 1.5, 'top_k': 0, 'top_p': 0.0}
  ref = closed_loop.full_reference(model, labels, seeds, gen, distribution_metrics=True)
  fp16 = g.fp16_bits * cfg.depth * 2 * len(labels) * cfg.num_heads // 8       # CFG doubles the rows
  rows = {}
  for budget in ('100%', '10%'):
    comp = compress.make('window', g, budget)
    rows[budget], images = closed_loop.evaluate_policy(model, comp, None, 'default', budget, ref, labels,
                                                       seeds, gen, 0.95)
    assert images.shape == ref['images'].shape and rows[budget]['fp16_cache_bytes'] == fp16
    assert rows[budget]['images'] == 2 and rows[budget]['budget_bits'] == comp.budget.bits
  full, small = rows['100%'], rows['10%']
  assert full['token_agreement'] == 1.0 and full['token_agreement_per_scale'] == [1.0] * 4
  assert full['kl'] == pytest.approx(0.0, abs=1e-6) and full['psnr'] == closed_loop.PSNR_CAP
  assert full['ssim'] == pytest.approx(1.0, abs=1e-9)
  # one token of cache: the first scale sees no cache and agrees; the later ones must not
  assert small['token_agreement_per_scale'][0] == 1.0 and small['kl_per_scale'][0] == pytest.approx(0.0, abs=1e-6)
  assert small['token_agreement'] < 1.0 and min(small['token_agreement_per_scale'][1:]) < 1.0
  assert small['kl'] > 1e-3 and min(small['kl_per_scale'][1:]) > 0
  assert small['psnr'] < closed_loop.PSNR_CAP and small['ssim'] < 1.0
  # memory: the full cache holds the fp16 yardstick; the window at most 10 % of it
  assert full['cache_bytes_counted'] == pytest.approx(fp16, rel=1e-9)
  assert 0 < small['cache_bytes_counted'] <= 0.1 * fp16
  assert small['bits_max'] <= compress.make('window', g, '10%').budget.bits
  # FID / KID in the classifier's features: the same images are at distance 0 (up to rounding:
  # KID's pairs cancel); against the real images the row holds what distribution.py gives on recomputed features
  assert abs(full['fid_vs_full']) < 1e-9 and abs(full['kid_vs_full']) < 1e-12
  assert -1e-12 < full['kid_vs_full_ci_low'] <= full['kid_vs_full_ci_high'] < 1e-12
  real = classifier.features(closed_loop.real_images(labels, seeds, ref['images'].shape[1]) * 2 - 1)
  got = classifier.features(images * 2 - 1)                          # the 10 % window's images
  assert small['fid_vs_full'] > 1e-6
  assert small['fid_vs_full'] == pytest.approx(distribution.fid(got, ref['features']), rel=1e-6)
  assert small['fid_vs_real'] == pytest.approx(distribution.fid(got, real), rel=1e-6)
  assert small['kid_vs_real'] == pytest.approx(distribution.kid(got, real, paired=True), rel=1e-6, abs=1e-9)
  for r in (full, small):
    for c in ('fid_vs_full', 'kid_vs_full', 'fid_vs_real', 'kid_vs_real'):
      assert r[f'{c}_ci_low'] <= r[c] <= r[f'{c}_ci_high'], c
  floor, other = closed_loop.noise_floor(model, ref, labels, seeds, gen, 0.95, g.fp16_bits)
  assert floor['method'] == 'full' and floor['budget'] == 'full' and other.shape == images.shape
  assert np.abs(other - ref['images']).max() > 0.01                   # other seeds: other images
  assert floor['fid_vs_full'] == pytest.approx(
      distribution.fid(classifier.features(other * 2 - 1), ref['features']), rel=1e-6)
  assert floor['fid_vs_real'] == pytest.approx(distribution.fid(ref['features'], real), rel=1e-6)
  assert 'token_agreement' not in floor and 'psnr' not in floor      # unrelated image by image
  assert floor['cache_bytes_counted'] == fp16
