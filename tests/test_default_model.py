"""The shipped default model: loads from the package, is trained (beats chance by far), clear errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import var_jax
from eval.quality import classifier, samples
from var_jax import default_model
from var_jax.data import CLASS_NAMES, builtin_dataset


@pytest.fixture(scope='module')
def model():
  return var_jax.load_default()


def test_default_model_config_and_size(model):
  assert model.vae.cfg.image_size == 32 and tuple(model.patch_nums) == (1, 2, 3, 4, 5, 6, 8)
  assert model.var.cfg.num_classes == len(CLASS_NAMES) and model.var.cfg.head_dim == 64
  total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(default_model.ASSETS) for f in fs)
  assert total < 20 * 2 ** 20, f'assets are {total / 2 ** 20:.1f} MiB; the package budget is 20 MiB'


def test_default_model_predicts_held_out_tokens(model):
  """Teacher-forced token accuracy on held-out built-in images is the shipped model's, within 2 points.

  Measured 38.25 % (0.38253) on these 24 images (3720 tokens); the model README's 36.97 % is on 256
  images of another seed. Chance is 1/V = 0.2 %. A regression (or a changed tokenizer / data) of more
  than 2 points fails; so does an unexplained jump.
  """
  x, y = builtin_dataset(24, 32, seed=98765)
  idx = model.img_to_idx(x)
  logits = model.logits(y, model.idx_to_var_input(idx))
  target = jnp.concatenate(idx, axis=1)
  acc = float((jnp.argmax(logits, -1) == target).mean())
  assert abs(acc - 0.3825) <= 0.02, acc


def test_default_model_samples_are_valid_images(model):
  out = model.generate([0, 5], seed=3, cfg=4.0, top_k=0, top_p=0.0)
  imgs = np.asarray(out.images)
  assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all() and imgs.min() >= 0 and imgs.max() <= 1
  again = model.generate([0, 5], seed=3, cfg=4.0, top_k=0, top_p=0.0)
  np.testing.assert_array_equal(np.asarray(again.images), imgs)


def test_missing_and_corrupt_assets_give_clear_errors(tmp_path):
  shutil.copytree(default_model.ASSETS, tmp_path / 'assets')
  os.remove(tmp_path / 'assets' / 'var_default' / 'var_fp16.npz')
  with pytest.raises(FileNotFoundError, match='var_fp16.npz.*re-create'):
    var_jax.load_default(tmp_path / 'assets')
  path = tmp_path / 'assets' / 'vqvae_default' / 'vqvae_fp16.npz'
  path.write_bytes(path.read_bytes()[:1000])
  shutil.copy(default_model.ASSETS / 'var_default' / 'var_fp16.npz', tmp_path / 'assets' / 'var_default')
  with pytest.raises(ValueError, match='unreadable'):
    var_jax.load_default(tmp_path / 'assets')


def test_degrade_keeps_flat_images_and_blurs_edges():
  key = jax.random.key(0)
  flat = jnp.full((4, 8, 8, 3), 0.3)
  out = classifier.degrade(key, flat, max_noise=0.0)
  np.testing.assert_allclose(np.asarray(out), 0.3, atol=1e-6)          # a blur of a constant is the constant
  edge = jnp.zeros((1, 8, 8, 3)).at[:, :, 4:].set(1.0)
  blurred = np.asarray(classifier.degrade(key, edge, max_sigma=1.5, max_noise=0.0))
  np.testing.assert_allclose(blurred.mean(), 0.5, atol=0.02)
  assert blurred[0, 4, 3, 0] > 0 and blurred[0, 4, 4, 0] < 1            # the step got softer


def test_save_grid_writes_png(tmp_path):
  imgs = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  samples.save_grid(imgs, 2, str(tmp_path / 'g.png'), row_names=['a', 'b'])
  assert (tmp_path / 'g.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
