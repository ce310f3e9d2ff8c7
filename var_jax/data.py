"""Image data for training: a built-in class-conditional shape dataset, and a user's image folder.

Built-in dataset: every image is one of `len(CLASS_NAMES)` classes of shapes / textures drawn with
random centre, size, rotation (within a class-specific range), colour and a background with a linear
colour gradient. Everything is rendered in numpy from signed distances (anti-aliased over one pixel),
vectorised over a batch. `BuiltinDataset(n, side, seed)` is fixed by its three arguments and renders
any subset `ds[idx]` identically to the full set, without drawing the rest. Images are NHWC float32
in [-1, 1], labels int32.

Image folder: an ImageNet-style tree `root/<class>/<image>` (classes sorted by folder name), resized
(shorter side, Lanczos) and centre-cropped to a square; needs Pillow (a dependency of matplotlib).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

__all__ = ['CLASS_NAMES', 'BuiltinDataset', 'builtin_dataset', 'folder_classes', 'load_image_folder',
           'IMAGE_EXTENSIONS']

CLASS_NAMES: tuple[str, ...] = (
    'disc', 'ring', 'square', 'diamond', 'triangle', 'plus', 'cross', 'blob_pair', 'crescent',
    'stripes_horizontal', 'stripes_vertical', 'checkerboard')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')

_DEG = np.pi / 180
# Rotation (degrees): base angle and half-width of the uniform jitter around it.
_ROTATION = {'disc': (0, 180), 'ring': (0, 180), 'square': (0, 10), 'diamond': (45, 10),
             'triangle': (0, 20), 'plus': (0, 10), 'cross': (45, 10), 'blob_pair': (0, 180),
             'crescent': (0, 180), 'stripes_horizontal': (0, 10), 'stripes_vertical': (90, 10),
             'checkerboard': (0, 10)}
_CHUNK = 512    # images rendered at once (bounds the (n, H, W) temporaries)


@dataclasses.dataclass(frozen=True)
class _Params:
  """Per-image drawing parameters, each an (N,) or (N, 3) array; lengths are in pixels."""
  cx: np.ndarray
  cy: np.ndarray
  radius: np.ndarray      # outer extent of the shape
  angle: np.ndarray       # radians
  aux: np.ndarray         # (N, 3) uniform [0, 1): class-specific shape parameters
  fg: np.ndarray          # (N, 3) RGB in [0, 1]
  bg: np.ndarray          # (N, 3) RGB in [0, 1] at the image centre
  grad: np.ndarray        # (N, 3) RGB change across the image along `grad_dir`
  grad_dir: np.ndarray    # radians


def _draw_params(labels_N: np.ndarray, side: int, rng: np.random.Generator) -> _Params:
  n = labels_N.shape[0]
  radius = rng.uniform(0.20, 0.34, n) * side
  margin = radius + 1.0
  cx = margin + rng.uniform(0, 1, n) * np.maximum(side - 2 * margin, 0)
  cy = margin + rng.uniform(0, 1, n) * np.maximum(side - 2 * margin, 0)
  base = np.array([_ROTATION[c][0] for c in CLASS_NAMES], np.float64)[labels_N]
  jitter = np.array([_ROTATION[c][1] for c in CLASS_NAMES], np.float64)[labels_N]
  angle = (base + rng.uniform(-1, 1, n) * jitter) * _DEG
  aux = rng.uniform(0, 1, (n, 3))
  bg = rng.uniform(0, 1, (n, 3))
  fg = rng.uniform(0, 1, (n, 3))
  # Guarantee contrast: when luminances are closer than 0.3, make fg dark on light bg or light on dark.
  lum = np.array([0.299, 0.587, 0.114])
  close = np.abs((fg - bg) @ lum) < 0.3
  light_bg = (bg @ lum) > 0.5
  fg = np.where((close & light_bg)[:, None], 0.3 * fg, np.where(close[:, None], 0.7 + 0.3 * fg, fg))
  grad = rng.uniform(-0.25, 0.25, (n, 3))
  grad_dir = rng.uniform(0, 2 * np.pi, n)
  return _Params(cx, cy, radius, angle, aux, fg, bg, grad, grad_dir)


def _coverage(sdf: np.ndarray) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] from a signed distance in pixels (negative inside)."""
  return np.clip(0.5 - sdf, 0.0, 1.0)


def _box_sdf(x: np.ndarray, y: np.ndarray, hw: np.ndarray, hh: np.ndarray) -> np.ndarray:
  """Signed distance to an axis-aligned box of half sizes (hw, hh) centred at 0 (exact)."""
  qx, qy = np.abs(x) - hw, np.abs(y) - hh
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _square_wave(u: np.ndarray, period: np.ndarray) -> np.ndarray:
  """Signed distance (pixels) to the nearest edge of a square wave of `period`, positive on its first half."""
  t = u / period - np.floor(u / period) - 0.5          # in [-0.5, 0.5): negative on the first half
  return -np.sign(t) * period * np.minimum(np.abs(t), 0.5 - np.abs(t))


def _alpha(name: str, x: np.ndarray, y: np.ndarray, r: np.ndarray, aux: np.ndarray) -> np.ndarray:
  """Foreground coverage (n, H, W) of class `name`; x, y are rotated coordinates about the centre."""
  a0, a1, a2 = (aux[:, i, None, None] for i in range(3))
  rho = np.hypot(x, y)
  if name == 'disc':
    return _coverage(rho - r)
  if name == 'ring':
    width = r * (0.18 + 0.17 * a0)
    return _coverage(np.abs(rho - (r - width)) - width)
  if name in ('square', 'diamond'):
    half = r * 0.75
    return _coverage(_box_sdf(x, y, half, half))
  if name == 'triangle':   # equilateral, circumradius r, apex up (y grows downwards)
    normals = [(np.sin(t), np.cos(t)) for t in (0.0, 2 * np.pi / 3, 4 * np.pi / 3)]
    sdf = np.max(np.stack([nx * x + ny * y for nx, ny in normals]), axis=0) - r / 2
    return _coverage(sdf)
  if name in ('plus', 'cross'):
    bar = r * (0.18 + 0.12 * a0)
    return _coverage(np.minimum(_box_sdf(x, y, r, bar), _box_sdf(x, y, bar, r)))
  if name == 'blob_pair':
    offset, small = r * (0.58 + 0.12 * a0), r * (0.36 + 0.06 * a1)
    return _coverage(np.minimum(np.hypot(x - offset, y), np.hypot(x + offset, y)) - small)
  if name == 'crescent':
    bite = r * (0.35 + 0.2 * a0)
    return _coverage(np.maximum(rho - r, r * 0.85 - np.hypot(x - bite, y)))
  # textures inside a square patch of half size r
  patch = _coverage(_box_sdf(x, y, r, r))
  period = r * (0.35 + 0.3 * a0)
  if name in ('stripes_horizontal', 'stripes_vertical'):   # bands along x, i.e. varying with y
    return patch * _coverage(-_square_wave(y + a1 * period, period))
  if name == 'checkerboard':
    cx = _coverage(-_square_wave(x + a1 * period, period))
    cy = _coverage(-_square_wave(y + a2 * period, period))
    return patch * (cx * cy + (1 - cx) * (1 - cy))
  raise ValueError(f'unknown class {name!r}; known: {CLASS_NAMES}')


def _render(labels_N: np.ndarray, p: _Params, side: int) -> np.ndarray:
  """(N, side, side, 3) float32 in [0, 1]; renders one class at a time in chunks of `_CHUNK`."""
  out = np.empty((labels_N.shape[0], side, side, 3), np.float32)
  grid = np.arange(side, dtype=np.float32) + 0.5
  gx, gy = grid[None, None, :], grid[None, :, None]
  f32 = lambda a: np.asarray(a, np.float32)[:, None, None]
  for c in np.unique(labels_N):
    idx_c = np.flatnonzero(labels_N == c)
    for s in range(0, idx_c.size, _CHUNK):
      i = idx_c[s:s + _CHUNK]
      dx, dy = gx - f32(p.cx[i]), gy - f32(p.cy[i])
      cos, sin = f32(np.cos(p.angle[i])), f32(np.sin(p.angle[i]))
      x, y = cos * dx + sin * dy, cos * dy - sin * dx                  # rotate by -angle
      alpha = _alpha(CLASS_NAMES[c], x, y, f32(p.radius[i]), p.aux[i].astype(np.float32))
      along = (f32(np.cos(p.grad_dir[i])) * (gx - side / 2)
               + f32(np.sin(p.grad_dir[i])) * (gy - side / 2)) / side      # in [-0.71, 0.71]
      bg = np.clip(p.bg[i, None, None, :].astype(np.float32)
                   + p.grad[i, None, None, :].astype(np.float32) * along[..., None], 0, 1)
      out[i] = bg + (p.fg[i, None, None, :].astype(np.float32) - bg) * alpha[..., None]
  return out


class BuiltinDataset:
  """The built-in dataset as an indexable collection: `ds[indices]` renders those images.

  Labels are balanced (image i has class `perm[i] % num_classes` for a seeded permutation) and each
  image's drawing parameters are drawn once up front, so any subset renders identically.
  """

  class_names = CLASS_NAMES
  num_classes = len(CLASS_NAMES)

  def __init__(self, num_images: int, image_size: int, seed: int = 0):
    if num_images < 1 or image_size < 4:
      raise ValueError(f'need num_images >= 1 and image_size >= 4, got {num_images} and {image_size}')
    self.num_images, self.image_size, self.seed = int(num_images), int(image_size), int(seed)
    rng = np.random.default_rng([self.seed, self.image_size, 0x5A7E])
    self.labels = (rng.permutation(self.num_images) % self.num_classes).astype(np.int32)
    self._params = _draw_params(self.labels, self.image_size, rng)

  def __len__(self) -> int:
    return self.num_images

  def __getitem__(self, indices: Sequence[int] | np.ndarray | slice) -> np.ndarray:
    """Images (n, H, W, 3) float32 in [-1, 1] for the given indices (or slice)."""
    idx = np.arange(self.num_images)[indices] if isinstance(indices, slice) else np.asarray(indices)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.num_images)):
      raise IndexError(f'indices must be a 1-D array within [0, {self.num_images}), got {idx!r}')
    p = _Params(**{f.name: getattr(self._params, f.name)[idx] for f in dataclasses.fields(_Params)})
    img = _render(self.labels[idx], p, self.image_size)
    img *= 2
    img -= 1
    return img


def builtin_dataset(num_images: int, image_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, S, S, 3) float32 in [-1, 1], labels (N,) int32 in [0, len(CLASS_NAMES))), deterministic."""
  ds = BuiltinDataset(num_images, image_size, seed)
  return ds[slice(None)], ds.labels.copy()


# ----------------------------------------------------------------------------- image folder
def _load_one(path: str, image_size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert('RGB')
      w, h = im.size
      scale = image_size / min(w, h)
      nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
      im = im.resize((nw, nh), Image.Resampling.LANCZOS)
      left, top = (nw - image_size) // 2, (nh - image_size) // 2
      im = im.crop((left, top, left + image_size, top + image_size))
      return np.asarray(im, np.float32) / 127.5 - 1
  except Exception as e:  # PIL raises many types for corrupt / non-image files
    raise ValueError(f'cannot read image file {path!r} ({type(e).__name__}: {e}); remove or replace it') from e


def folder_classes(root: str | os.PathLike) -> tuple[str, ...]:
  """Class names of an ImageNet-style folder: its non-hidden sub-folders, sorted."""
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist or is not a directory; expected '
                            'root/<class_name>/<image files>')
  classes = sorted(d for d in os.listdir(root)
                   if not d.startswith('.') and os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise ValueError(f'image folder {root!r} has no class sub-folders; put the images of each class in '
                     'their own sub-folder (root/<class_name>/<image files>)')
  return tuple(classes)


def load_image_folder(root: str | os.PathLike,
                      image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """Loads `root/<class>/<image>` (ImageNet layout) as (images (N, S, S, 3) in [-1, 1], labels (N,), names).

  Classes are the sub-folders of `root` in sorted order; files with other extensions than
  `IMAGE_EXTENSIONS` and hidden files are skipped. Each image is resized so that its shorter side is
  `image_size` (Lanczos) and centre-cropped.
  """
  try:
    import PIL  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError('load_image_folder needs Pillow: pip install pillow') from e
  root = os.fspath(root)
  classes = folder_classes(root)
  images, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder)
                   if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f'class folder {folder!r} holds no images (extensions {IMAGE_EXTENSIONS}); '
                       'add images or remove the folder')
    for f in files:
      images.append(_load_one(os.path.join(folder, f), image_size))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32), tuple(classes)
