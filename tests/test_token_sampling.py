"""The sort-free top-k / top-p sampler (var_jax/token_sampling.py) against brute force.

The official masking itself is checked against a numpy transcription in test_sampling.py (small
vocabularies, every top-k / top-p combination) together with draw frequencies; here: the key order,
the thresholds at the real vocabulary (4096 codes, k = 900) against `lax.top_k` and a sort, greedy
top_k = 1, frequencies at a larger vocabulary, and that one key draws the same codes from slightly
perturbed logits (what the closed loop's token agreement relies on).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import token_sampling as ts


def test_sortable_keys_order_like_the_floats():
  """Normal floats of every exponent, +-0, +-inf and the extremes (XLA CPU flushes subnormals to zero,
  so they are left out)."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-37, 38, 500),
                      [0.0, -0.0, np.inf, -np.inf, 1.2e-38, -1.2e-38, 3.4e38, -3.4e38]]).astype(np.float32)
  k = np.asarray(ts.sortable_keys(jnp.asarray(x)))
  i, j = rng.integers(0, x.size, (2, 20000))
  np.testing.assert_array_equal(k[i] < k[j], x[i] < x[j])
  np.testing.assert_array_equal(k[i] == k[j], x[i] == x[j])          # -0.0 == 0.0 share a key


@pytest.mark.parametrize('top_k,top_p', [(900, 0.0), (900, 0.96), (0, 0.96), (1, 0.5), (4095, 0.2)])
def test_thresholds_at_the_real_vocabulary_match_top_k_and_a_sort(top_k, top_p):
  rng = np.random.default_rng(top_k)
  x = (rng.standard_normal((3, 40, 4096)) * 3).astype(np.float32)
  keep = np.asarray(ts.top_k_top_p_filter(jnp.asarray(x), top_k, top_p)) > -np.inf
  want = np.ones_like(keep)
  if top_k:
    want &= x >= np.sort(x, axis=-1)[..., -top_k][..., None]
  if top_p:
    z = np.where(want, x, -np.inf).astype(np.float64)
    order = np.argsort(z, axis=-1)
    p = np.exp(np.take_along_axis(z, order, -1) - z.max(-1, keepdims=True))
    cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
    removed = cum <= 1 - top_p
    removed[..., -1] = False
    gone = np.zeros_like(removed)
    np.put_along_axis(gone, order, removed, -1)
    want &= ~gone
  np.testing.assert_array_equal(keep, want)
  if top_k and not top_p:
    np.testing.assert_array_equal(keep.sum(-1), top_k)


def test_greedy_is_the_argmax():
  x = jax.random.normal(jax.random.key(0), (2, 64, 4096))
  got = ts.sample_top_k_top_p(jax.random.key(1), x, top_k=1)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, -1)))


def test_frequencies_follow_the_kept_softmax_at_a_large_vocabulary():
  """V = 150, top-k 40 and top-p 0.9: frequencies within 4.5 standard errors of the kept softmax at
  60000 draws, and never a removed code."""
  rng = np.random.default_rng(5)
  logits = rng.standard_normal(150).astype(np.float32)
  logits[[3, 70, 140, 149]] += 3.0
  n = 60000
  idx = np.asarray(ts.sample_top_k_top_p(jax.random.key(2), jnp.broadcast_to(jnp.asarray(logits), (n, 150)),
                                         top_k=40, top_p=0.9))
  keep = np.asarray(ts.top_k_top_p_filter(jnp.asarray(logits)[None], 40, 0.9))[0] > -np.inf
  p = np.where(keep, np.exp(logits - logits.max()), 0.0)
  p /= p.sum()
  freq = np.bincount(idx, minlength=150) / n
  assert np.all(freq[~keep] == 0)
  np.testing.assert_array_less(np.abs(freq - p), 4.5 * np.sqrt(p * (1 - p) / n) + 1e-12)


def test_draws_under_one_key_follow_the_codes_not_their_neighbours():
  """The closed loop compares a compressed cache's images with the full cache's under the same key:
  logits perturbed by 1e-3 (std 3, 4096 codes, top-k 900, top-p 0.96) must draw the same code almost
  always (the Gumbel-max moves only when the winner's margin is that small: ~0.1 % of 2048 tokens
  here; an inverse-CDF draw, whose choice moves with every weight before it, agreed on ~95 %)."""
  x = jax.random.normal(jax.random.key(0), (2048, 4096)) * 3.0
  noisy = x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape)
  a, b = (np.asarray(ts.sample_top_k_top_p(jax.random.key(7), y, 900, 0.96)) for y in (x, noisy))
  assert np.mean(a == b) > 0.99
