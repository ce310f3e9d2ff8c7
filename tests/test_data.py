"""Built-in shape dataset and image-folder loader (var_jax.data)."""
import os

import numpy as np
import pytest

from var_jax import data

C = len(data.CLASS_NAMES)


def test_deterministic_and_seed_dependent():
  x1, y1 = data.builtin_dataset(48, 16, seed=3)
  x2, y2 = data.builtin_dataset(48, 16, seed=3)
  x3, _ = data.builtin_dataset(48, 16, seed=4)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.allclose(x1, x3)


def test_shapes_range_and_balanced_classes():
  x, y = data.builtin_dataset(5 * C, 24, seed=0)
  assert x.shape == (5 * C, 24, 24, 3) and x.dtype == np.float32
  assert y.shape == (5 * C,) and y.dtype == np.int32
  assert x.min() >= -1 and x.max() <= 1
  np.testing.assert_array_equal(np.bincount(y, minlength=C), np.full(C, 5))
  assert C >= 10 and len(set(data.CLASS_NAMES)) == C
  # every image has a visible foreground: a sizeable spread of pixel values, not a flat background
  assert np.all(x.reshape(len(x), -1).std(axis=1) > 0.05)


def test_subsets_render_identically():
  ds = data.BuiltinDataset(40, 16, seed=7)
  full = ds[slice(None)]
  idx = np.array([39, 3, 17, 3])
  np.testing.assert_array_equal(ds[idx], full[idx])
  with pytest.raises(IndexError, match='within'):
    ds[np.array([40])]


def _invariant_features(x_NHWC: np.ndarray) -> np.ndarray:
  """Translation- and colour-robust features: log |FFT| of the normalised gradient magnitude."""
  g = x_NHWC.mean(-1)
  gm = np.hypot(np.diff(g, axis=1)[:, :, :-1], np.diff(g, axis=2)[:, :-1, :])
  gm = gm / (gm.reshape(len(gm), -1).std(axis=1)[:, None, None] + 1e-6)
  return np.log1p(np.abs(np.fft.fft2(gm))).reshape(len(g), -1)


def test_classes_are_distinguishable():
  """A nearest-class-mean classifier on fixed pixel features beats chance (1/C) by far on held-out images."""
  x_tr, y_tr = data.builtin_dataset(100 * C, 32, seed=1)
  x_te, y_te = data.builtin_dataset(50 * C, 32, seed=2)
  f_tr, f_te = _invariant_features(x_tr), _invariant_features(x_te)
  mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
  f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
  means = np.stack([f_tr[y_tr == c].mean(0) for c in range(C)])
  pred = np.argmin(((f_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  acc = np.mean(pred == y_te)
  per_class = np.array([np.mean(pred[y_te == c] == c) for c in range(C)])
  assert acc > 0.75, acc
  assert per_class.min() > 3 / C, dict(zip(data.CLASS_NAMES, per_class.round(2)))


def test_image_folder(tmp_path):
  pil = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(0)
  for name, n in (('cats', 2), ('dogs', 3)):
    os.makedirs(tmp_path / name)
    for i in range(n):
      arr = rng.integers(0, 256, (20 + 4 * i, 30, 3), dtype=np.uint8)
      pil.fromarray(arr).save(tmp_path / name / f'{i}.png')
  (tmp_path / 'dogs' / 'notes.txt').write_text('not an image')   # skipped: not an image extension
  x, y, names = data.load_image_folder(tmp_path, 16)
  assert names == ('cats', 'dogs')
  np.testing.assert_array_equal(y, [0, 0, 1, 1, 1])
  assert x.shape == (5, 16, 16, 3) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
  # a uniform image stays uniform with the same value
  os.makedirs(tmp_path / 'flat' / 'grey')
  pil.fromarray(np.full((10, 40, 3), 51, np.uint8)).save(tmp_path / 'flat' / 'grey' / 'a.png')
  x, _, _ = data.load_image_folder(tmp_path / 'flat', 8)
  np.testing.assert_allclose(x, 51 / 127.5 - 1, atol=1e-6)


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load_image_folder(tmp_path / 'missing', 8)
  with pytest.raises(ValueError, match='no class sub-folders'):
    data.load_image_folder(tmp_path, 8)
  os.makedirs(tmp_path / 'a')
  with pytest.raises(ValueError, match='holds no images'):
    data.load_image_folder(tmp_path, 8)
  (tmp_path / 'a' / 'broken.jpg').write_bytes(b'this is not a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    data.load_image_folder(tmp_path, 8)
