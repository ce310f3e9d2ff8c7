r"""Sample quality of a class-conditional VAR: class accuracy under a classifier of the real data, grids.

A small CNN (flax.nnx) is trained on the built-in dataset (images of the model's resolution, a seed
apart from the VAR's training and evaluation images) and scored on held-out real images; then the
model samples `per_class` images of every class and the classifier's accuracy on them is reported,
beside a PNG grid (one row per class).

    python -m eval.quality.samples --out runs/samples                 # the built-in default model
    python -m eval.quality.samples --out runs/samples --per_class 16 --cfg 4.0

Prints (and writes to OUT/samples.json) the classifier's held-out accuracy on real images, on their
VQ-VAE reconstructions (the ceiling any sampler over this tokenizer can reach) and on the samples,
overall and per class. The classifier is trained with blur and noise augmentation (`degrade`) so that it
judges shapes rather than the sharpness the 32 px tokenizer cannot reproduce.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from eval.quality.classifier import predict, train_classifier
from var_jax.data import CLASS_NAMES, builtin_dataset

RECON_SEED = 4242           # held-out real images whose VQ-VAE reconstructions bound the sample accuracy


def sample_classes(model, per_class: int, *, seed: int = 0, cfg: float = 1.5, top_k: int = 0,
                   top_p: float = 0.0, batch: int = 48) -> tuple[np.ndarray, np.ndarray]:
  """(images (n, H, W, 3) in [-1, 1], labels (n,)) with `per_class` samples of every class."""
  num_classes = model.var.cfg.num_classes
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  out = []
  for i in range(0, len(labels), batch):
    lab = labels[i:i + batch]
    pad = batch - len(lab)       # one compiled shape
    gen = model.generate(np.concatenate([lab, np.full(pad, lab[-1], np.int32)]), seed=seed + i, cfg=cfg,
                         top_k=top_k, top_p=top_p)
    out.append(np.asarray(gen.images)[:len(lab)] * 2 - 1)
  return np.concatenate(out), labels


def save_grid(images_BHWC: np.ndarray, rows: int, path: str, upscale: int = 2,
              row_names: Sequence[str] | None = None) -> None:
  """A PNG grid (rows x (n / rows)) of images in [-1, 1], upscaled by pixel repetition."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  n, H, W, _ = images_BHWC.shape
  cols = n // rows
  img = ((np.clip(images_BHWC, -1, 1) + 1) * 127.5).astype(np.uint8)[:rows * cols]
  grid = img.reshape(rows, cols, H, W, 3).transpose(0, 2, 1, 3, 4).reshape(rows * H, cols * W, 3)
  grid = grid.repeat(upscale, 0).repeat(upscale, 1)
  fig, ax = plt.subplots(figsize=(grid.shape[1] / 100 + 1.6, grid.shape[0] / 100 + 0.2), dpi=100)
  ax.imshow(grid, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([(r + 0.5) * H * upscale for r in range(rows)])
  ax.set_yticklabels(list(row_names or range(rows)), fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def evaluate(model, out_dir: str, *, per_class: int = 16, seed: int = 0, cfg: float = 4.0, top_k: int = 0,
             top_p: float = 0.0, progress: bool = True) -> dict:
  """Trains the classifier, samples, scores; writes samples.json and samples.png into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  side = model.vae.cfg.image_size
  clf, real_acc = train_classifier(side, progress=progress)
  x_real, y_real = builtin_dataset(240, side, RECON_SEED)     # the tokenizer's ceiling: reconstructions
  recon = np.concatenate([np.asarray(model.decode_idx(model.img_to_idx(x_real[i:i + 48])))
                          for i in range(0, len(x_real), 48)])
  images, labels = sample_classes(model, per_class, seed=seed, cfg=cfg, top_k=top_k, top_p=top_p)
  pred = predict(clf, images)
  names = CLASS_NAMES[:model.var.cfg.num_classes]
  result = {
      'classifier_real_accuracy': real_acc,
      'classifier_reconstruction_accuracy': float((predict(clf, recon) == y_real).mean()),
      'sample_accuracy': float((pred == labels).mean()),
      'per_class': {n: float((pred[labels == c] == c).mean()) for c, n in enumerate(names)},
      'per_class_samples': per_class, 'seed': seed, 'cfg': cfg, 'top_k': top_k, 'top_p': top_p}
  with open(os.path.join(out_dir, 'samples.json'), 'w') as f:
    json.dump(result, f, indent=2)
  show = min(per_class, 8)
  grid = images.reshape(len(names), per_class, *images.shape[1:])[:, :show].reshape(-1, *images.shape[1:])
  save_grid(grid, len(names), os.path.join(out_dir, 'samples.png'), row_names=names)
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  from var_jax import load_default  # pylint: disable=g-import-not-at-top
  from var_jax.api import load_converted  # pylint: disable=g-import-not-at-top
  model = load_converted(FLAGS.converted) if FLAGS.converted else load_default()
  result = evaluate(model, FLAGS.out, per_class=FLAGS.per_class, seed=FLAGS.seed, cfg=FLAGS.cfg,
                    top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  print(json.dumps(result, indent=2))
  print(f'grid: {os.path.join(FLAGS.out, "samples.png")}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', 'runs/samples', 'output directory')
  flags.DEFINE_string('converted', '', 'a converted checkpoint dir (default: the built-in model)')
  flags.DEFINE_integer('per_class', 16, 'samples per class')
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  flags.DEFINE_float('cfg', 4.0, 'classifier-free guidance scale')
  flags.DEFINE_integer('top_k', 0, 'top-k filter (0: off)')
  flags.DEFINE_float('top_p', 0.0, 'top-p filter (0: off)')
  FLAGS = flags.FLAGS
  from var_jax import cli
  cli.run(main)
