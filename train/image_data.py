"""The image data the model trainers read: the built-in dataset or an image folder, and its held-out set."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

from var_jax.data import BuiltinDataset, CLASS_NAMES, folder_classes, load_image_folder

EVAL_SEED_OFFSET = 1_000_003     # built-in evaluation images use data.seed + this


class ArrayDataset:
  """Images held in memory (an image folder): `ds[indices]` -> (n, H, W, 3) float32 in [-1, 1]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]):
    self.images, self.labels, self.class_names = images, labels, class_names
    self.num_classes = len(class_names)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, indices: Any) -> np.ndarray:
    return self.images[indices]


def open_dataset(data_config: ml_collections.ConfigDict, image_size: int) -> BuiltinDataset | ArrayDataset:
  """The dataset named by a config's `data` section, at `image_size` pixels."""
  if data_config.source == 'builtin':
    return BuiltinDataset(data_config.num_images, image_size, data_config.seed)
  if data_config.source == 'folder':
    if not data_config.folder:
      raise ValueError('data.source is "folder" but data.folder is empty; pass '
                       '--config.data.folder=/path/to/root')
    return ArrayDataset(*load_image_folder(data_config.folder, image_size))
  raise ValueError(f'unknown data.source {data_config.source!r}; use "builtin" or "folder"')


def dataset_class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Class names of the configured dataset without loading it."""
  if data_config.source == 'folder':
    return folder_classes(data_config.folder)
  return CLASS_NAMES


def eval_set(data_config: ml_collections.ConfigDict, dataset: BuiltinDataset | ArrayDataset,
             image_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(images (n, H, W, 3), labels (n,)) for evaluation: held out (another seed) for the built-in
  data, else the first n images of the dataset (an image folder has no held-out split here)."""
  if data_config.source == 'builtin':
    ds = BuiltinDataset(n, image_size, data_config.seed + EVAL_SEED_OFFSET)
    return ds[slice(None)], ds.labels
  idx = np.arange(min(n, len(dataset)))
  return dataset[idx], np.asarray(dataset.labels)[idx]


def write_dataset_info(workdir: str, num_images: int, class_names: tuple[str, ...]) -> None:
  with open(os.path.join(workdir, 'dataset.json'), 'w') as f:
    json.dump({'num_images': int(num_images), 'class_names': list(class_names)}, f, indent=2)
