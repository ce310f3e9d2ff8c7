"""Parameters of a compressor for the sampling benchmark: none, calibrated, or trained.

Two sources (`policy_params`):
  - a frontier run (`params_from=WORKDIR`): a learned compressor's trained parameters from
    WORKDIR/train/<name>-<setting>-<bits>bits (the folder `eval.engine.params.run_name` names, read by
    `train.compressor.load_trained`), a calibrated one calibrated as the frontier calibrates it, on the
    run's training split (WORKDIR/capture, `calibration_sequences` sequences);
  - on the fly: the caches of `images` images generated with the full cache by the benchmarked model
    (2 sequences each under CFG), as (layers, sequences, heads, L, head_dim) q, k, v.
Either way the source is returned as a sentence for the benchmark's output.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.interface import Compressor
from var_jax import sampling


_CALIBRATION: dict[tuple[int, int, int, int], dict[str, np.ndarray]] = {}


def generated_calibration(var, vae, images: int, seed: int = 10_000) -> dict[str, np.ndarray]:
  """{'q', 'k', 'v'} (layers, 2 * images, heads, L, head_dim) float32 of `images` full-cache
  generations (labels 0..images-1, key `seed`: apart from the benchmark's own seeds); generated once
  per model and shared by every compressor and budget of the process."""
  key = (id(var), id(vae), images, seed)
  if key not in _CALIBRATION:
    _CALIBRATION[key] = _generate_calibration(var, vae, images, seed)
  return _CALIBRATION[key]


def _generate_calibration(var, vae, images: int, seed: int) -> dict[str, np.ndarray]:
  cfg = var.cfg
  labels = [i % cfg.num_classes for i in range(images)]
  out = sampling.generate(var, vae, labels, key=jax.random.key(seed), capture_qkv=True)
  calib = {}
  for i, t in enumerate('qkv'):
    per_layer = [jnp.concatenate([out.qkv[s][layer][i] for s in range(len(cfg.patch_nums))], axis=2)
                 for layer in range(cfg.depth)]
    calib[t] = np.stack([np.asarray(x, np.float32) for x in per_layer])
  return calib


def _trained_folder(workdir: str, comp: Compressor) -> str:
  pattern = os.path.join(workdir, 'train', f'{comp.name}-*-{comp.budget.bits}bits')
  found = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
  if not found:
    raise FileNotFoundError(f'--params_from: no trained {comp.name} at {comp.budget.bits} bits in '
                            f'{workdir}/train (looked for {pattern}); run the frontier with {comp.name} at '
                            'this budget there, or leave --params_from out to calibrate on generated images')
  if len(found) > 1:
    raise ValueError(f'--params_from: several trained {comp.name} runs at {comp.budget.bits} bits: {found}; '
                     'keep one, or copy the one to use into a workdir of its own')
  return found[0]


def _capture_calibration(workdir: str, var, sequences: int) -> tuple[Any, str]:
  from var_jax.capture_data import CaptureDataset  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'capture')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--params_from: {workdir} has no capture/ to calibrate on; give a frontier '
                            'workdir, or leave --params_from out to calibrate on generated images')
  data = CaptureDataset(path, 'train')
  cfg = var.cfg
  got = (tuple(data.patch_nums), data.num_layers, data.num_heads, data.head_dim)
  want = (tuple(cfg.patch_nums), cfg.depth, cfg.num_heads, cfg.head_dim)
  if got != want:
    raise ValueError(f'--params_from: the capture in {path} is of another model (patch_nums, layers, '
                     f'heads, head_dim = {got}, this model {want}); give a run of this model size')
  n = min(sequences, data.num_sequences)
  return data.get(np.arange(n)), f'calibrated on {n} sequences of the training split of {path}'


def policy_params(comp: Compressor, var, vae, *, params_from: str | None, images: int,
                  sequences: int, seed: int = 0) -> tuple[Any, str]:
  """(parameters with leading axes (layers, heads), or None; where they came from)."""
  cfg = var.cfg
  if comp.passthrough or not (comp.learned or comp.needs_calibration):
    params = comp.init_params(jax.random.key(seed), cfg.depth, cfg.num_heads)
    return params, 'no parameters' if params is None else 'fixed parameters (init_params)'
  if params_from and comp.learned:
    from train import compressor as trainer  # pylint: disable=g-import-not-at-top
    folder = _trained_folder(params_from, comp)
    trained, params = trainer.load_trained(folder)
    if trained != comp:
      raise ValueError(f'--params_from: {folder} trained {trained}, not the benchmarked {comp}; '
                       'benchmark its settings or give another run')
    return params, f'trained parameters from {folder}'
  if params_from:
    calib, source = _capture_calibration(params_from, var, sequences)
  else:
    calib = generated_calibration(var, vae, images)
    source = f'calibrated on the fly on {images} generated images ({2 * images} sequences, full cache)'
  params = comp.init_params(jax.random.key(seed), cfg.depth, cfg.num_heads, calibration=calib)
  if comp.learned:
    source += ' (learned compressor at its initial, untrained parameters)'
  return params, source
