"""The built-in classifier of the built-in dataset's 12 classes: a small CNN that scores samples.

`eval.quality.samples` trains one per run to report sample accuracy; the closed loop of the frontier scores
generated images with the shipped one (`shipped()`, `eval/quality/assets/classifier_32px.npz`: the
classifier `train_classifier(32)` gives, exported by `python -m eval.quality.classifier --out
eval/quality/assets/classifier_32px.npz`), so that no run pays for training it, and measures FID / KID
in its penultimate-layer features (`features`, (n, 128); eval/quality/distribution.py).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from var_jax.data import CLASS_NAMES, builtin_dataset

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'classifier_32px.npz')
CLASSIFIER_SEED = 777       # built-in images for the classifier: not the VAR's data (seed 0) or eval set


class SmallCNN(nnx.Module):
  """Three conv stages (32, 64, 128 channels, 3x3, GELU, 2x2 mean pool), global mean pool, linear."""

  def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
    chans = (3, 32, 64, 128)
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans[:-1], chans[1:])])
    self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in chans[1:]])
    self.head = nnx.Linear(chans[-1], num_classes, rngs=rngs)

  def features(self, x_BHWC: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> the penultimate layer (B, 128): the last stage, mean pooled over space."""
    x = x_BHWC
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.gelu(norm(conv(x)))
      B, H, W, C = x.shape
      x = x.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))
    return x.mean((1, 2))

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> logits (B, classes)."""
    return self.head(self.features(x_BHWC))


def degrade(key: jax.Array, x_BHWC: jax.Array, max_sigma: float = 1.5, max_noise: float = 0.1) -> jax.Array:
  """Augmentation: Gaussian blur of random width (0 to `max_sigma` px, separable 7-tap) and Gaussian
  noise (std 0 to `max_noise`), per image, so that the classifier judges shapes, not the sharpness a
  32 px tokenizer cannot reproduce."""
  B = x_BHWC.shape[0]
  k_sig, k_amp, k_noise = jax.random.split(key, 3)
  sigma_B = jax.random.uniform(k_sig, (B,), maxval=max_sigma) + 1e-3
  taps = jnp.arange(-3, 4, dtype=jnp.float32)
  w_BT = jnp.exp(-0.5 * (taps[None] / sigma_B[:, None]) ** 2)
  w_BT = w_BT / w_BT.sum(1, keepdims=True)
  pad = jnp.pad(x_BHWC, ((0, 0), (3, 3), (3, 3), (0, 0)), mode='edge')
  H, W = x_BHWC.shape[1:3]
  rows = sum(w_BT[:, t, None, None, None] * pad[:, t:t + H] for t in range(7))          # (B, H, W+6, C)
  x = sum(w_BT[:, t, None, None, None] * rows[:, :, t:t + W] for t in range(7))
  amp_B = jax.random.uniform(k_amp, (B,), maxval=max_noise)
  return x + amp_B[:, None, None, None] * jax.random.normal(k_noise, x.shape)


@nnx.jit
def _train_step(model: SmallCNN, opt: nnx.Optimizer, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
  x = degrade(key, x)

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


@nnx.jit
def _predict(model: SmallCNN, x: jax.Array) -> jax.Array:
  return jnp.argmax(model(x), -1)


def predict(model: SmallCNN, images_BHWC: np.ndarray, batch: int = 256) -> np.ndarray:
  return np.concatenate([np.asarray(_predict(model, jnp.asarray(images_BHWC[i:i + batch])))
                         for i in range(0, len(images_BHWC), batch)])


@nnx.jit
def _features(model: SmallCNN, x: jax.Array) -> jax.Array:
  return model.features(x)


def features(images_BHWC: np.ndarray, model: SmallCNN | None = None, batch: int = 256) -> np.ndarray:
  """(n, 128) float64 penultimate-layer features of images in [-1, 1] under `model` (default: the
  shipped classifier, `load()`): the feature space of eval/quality/distribution.py's FID and KID."""
  model = shipped()[0] if model is None else model
  return np.concatenate([np.asarray(_features(model, jnp.asarray(images_BHWC[i:i + batch], jnp.float32)),
                                    np.float64) for i in range(0, len(images_BHWC), batch)])


def train_classifier(image_size: int, *, num_images: int = 6000, steps: int = 800, batch: int = 128,
                     lr: float = 2e-3, seed: int = CLASSIFIER_SEED, progress: bool = True
                     ) -> tuple[SmallCNN, float]:
  """A SmallCNN trained on built-in images (augmented with `degrade`); returns it and its accuracy on
  1200 held-out real images (not degraded)."""
  x, y = builtin_dataset(num_images + 1200, image_size, seed)
  x_tr, y_tr, x_te, y_te = x[:num_images], y[:num_images], x[num_images:], y[num_images:]
  model = SmallCNN(len(CLASS_NAMES), rngs=nnx.Rngs(seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr * 0.02)
  opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=1e-4), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for step in tqdm.trange(steps, desc='classifier', disable=not progress, dynamic_ncols=True):
    idx = rng.integers(0, num_images, batch)
    _train_step(model, opt, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]), jax.random.fold_in(key, step))
  return model, float((predict(model, x_te) == y_te).mean())


def _named_leaves(model: SmallCNN) -> dict[str, jax.Array]:
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {jax.tree_util.keystr(p): x for p, x in leaves}


def save(model: SmallCNN, path: str, meta: dict) -> None:
  """The classifier's parameters (float32) and `meta` (JSON) as one .npz."""
  arrays = {k: np.asarray(v, np.float32) for k, v in _named_leaves(model).items()}
  np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)


def load(path: str = ASSET) -> tuple[SmallCNN, dict]:
  """(classifier, meta) from `save`'s file; a missing or mismatched file raises with the fix."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no classifier at {path!r}; export one with python -m eval.quality.classifier --out {path}')
  with np.load(path) as f:
    meta = json.loads(str(f['__meta__']))
    arrays = {k: f[k] for k in f.files if k != '__meta__'}
  model = SmallCNN(int(meta['num_classes']), rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(state)
  names = [jax.tree_util.keystr(p) for p, _ in flat[0]]
  if sorted(names) != sorted(arrays):
    raise ValueError(f'{path!r} does not hold a SmallCNN of this version (parameters {sorted(arrays)[:3]}...); '
                     f're-export it with python -m eval.quality.classifier --out {path}')
  new = [jnp.asarray(arrays[n]).reshape(x.shape) for n, (_, x) in zip(names, flat[0])]
  nnx.update(model, jax.tree_util.tree_unflatten(flat[1], new))
  return model, meta


@functools.lru_cache(maxsize=1)
def shipped() -> tuple[SmallCNN, dict]:
  """`load()` of the shipped file, once per process."""
  return load()


def main(argv: Sequence[str]) -> None:
  del argv
  folder = os.path.dirname(os.path.abspath(FLAGS.out))
  if not os.path.isdir(folder):                   # before a minute of training
    raise NotADirectoryError(f'--out {FLAGS.out!r}: folder {folder!r} does not exist; create it or pick another')
  model, acc = train_classifier(FLAGS.image_size, progress=True)
  save(model, FLAGS.out, {'num_classes': len(CLASS_NAMES), 'image_size': FLAGS.image_size,
                          'seed': CLASSIFIER_SEED, 'held_out_real_accuracy': acc,
                          'command': f'python -m eval.quality.classifier --out {FLAGS.out} --image_size {FLAGS.image_size}'})
  print(f'held-out accuracy on real images {acc:.4f}; wrote {FLAGS.out}')


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', ASSET, 'output .npz')
  flags.DEFINE_integer('image_size', 32, 'image side in pixels')
  FLAGS = flags.FLAGS
  from var_jax import cli
  cli.run(main)
