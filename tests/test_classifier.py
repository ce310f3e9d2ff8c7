"""The shipped built-in classifier (eval/quality/assets/classifier_32px.npz) and the closed loop's use of it."""
import numpy as np
import pytest

from eval.quality import classifier, closed_loop
from var_jax.data import builtin_dataset


def test_shipped_classifier_names_real_images():
  model, meta = classifier.load()
  assert meta['image_size'] == 32 and meta['num_classes'] == 12
  x, y = builtin_dataset(240, 32, 31337)            # unseen seed: not its training images
  acc = float((classifier.predict(model, x) == y).mean())
  assert acc >= 0.9, acc                             # measured at export: meta['held_out_real_accuracy']
  assert abs(acc - meta['held_out_real_accuracy']) < 0.05


def test_class_hits_follow_labels_per_seed():
  x, y = builtin_dataset(240, 32, 4242)
  labels = list(range(12))
  order = np.concatenate([np.flatnonzero(y == c)[:1] for c in labels] * 2)   # 2 seeds x 12 labels
  if len(order) < 24:
    pytest.skip('the draw lacks a class')
  hits = closed_loop.class_hits((x[order] + 1) / 2, labels, seeds=[0, 1])
  assert hits.shape == (24,) and hits.mean() >= 0.8
  wrong = closed_loop.class_hits((x[order] + 1) / 2, labels[1:] + labels[:1], seeds=[0, 1])
  assert wrong.mean() < 0.3                          # shifted labels: it really compares classes
  assert closed_loop.class_hits(np.zeros((2, 16, 16, 3)), [0, 1], [0]) is None   # another image size


def test_missing_classifier_says_how_to_export(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m eval.quality.classifier'):
    classifier.load(str(tmp_path / 'none.npz'))
