"""Parameters of the compressors a frontier run evaluates: calibrated on the training split of the
capture, or trained on demand (`train.compressor`) / loaded from a checkpoint directory when learned.

Learned compressor `name` with settings `setting` at a budget of `bits` bits lives in
`<root>/<name>-<setting>-<bits>bits` (root = WORKDIR/train, or `learned.checkpoint_root` to load runs
trained elsewhere; a missing one there is an error, never trained silently into someone else's folder).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from compress.core.interface import Compressor
from eval.engine.sweep import MethodSpec


def run_name(spec: MethodSpec, comp: Compressor) -> str:
  return f'{spec.name}-{spec.setting}-{comp.budget.bits}bits'.replace('=', '_').replace(',', '_')


def train_config(config: ml_collections.ConfigDict, spec: MethodSpec, comp: Compressor,
                 capture_dir: str) -> ml_collections.ConfigDict:
  """configs/compressor.py:<learned.variant>,<name> on this run's capture, at the point's budget."""
  from configs import compressor as compressor_config  # pylint: disable=g-import-not-at-top
  c = compressor_config.get_config(f'{config.learned.variant},{spec.name}')
  c.data.source, c.data.path = 'capture', os.path.abspath(capture_dir)
  c.budget = f'{comp.budget.bits}bits'
  c.kv_dtype = config.kv_dtype
  c.seed = config.seed
  for k, v in spec.settings:
    c.settings[k] = v
  for k, v in config.learned.train.items():
    if k not in c:
      raise ValueError(f'learned.train.{k} is not a field of configs/compressor.py; its fields are '
                       f'{sorted(c.keys())}')
    c[k] = v
  c.progress = config.progress
  return c


def trained_compressor(config: ml_collections.ConfigDict, spec: MethodSpec, comp: Compressor) -> Compressor:
  """The compressor whose trained parameters `comp` uses: itself, or the same method at
  `learned.train_budget` when set and its parameters do not depend on the budget."""
  at = config.learned.get('train_budget', '')
  if not (at and comp.learned and type(comp).budget_free_params):
    return comp
  target = spec.make(comp.geometry, at)
  if target.passthrough:
    raise ValueError(f'learned.train_budget {at!r} holds the whole cache: nothing to train; choose a '
                     'smaller budget (e.g. "10%") or "" to train at every budget')
  return target


class Params:
  """`params(spec, comp)` -> the compressor's parameters (None when it has none), memoised."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, capture_dir: str,
               calibration: Any, num_layers: int, num_heads: int):
    self.config, self.workdir, self.capture_dir = config, workdir, capture_dir
    self._calibration = calibration          # callable -> {'q','k','v'} (N, b, H, L, D), or the dict
    self.num_layers, self.num_heads = num_layers, num_heads
    self._cache: dict[Compressor, Any] = {}
    self._shared_bits: dict[Compressor, int] = {}

  def provenance(self) -> dict[str, str]:
    """Fingerprints of this run's capture (trained compressors loaded from elsewhere must match)."""
    if not hasattr(self, '_provenance'):
      from var_jax.provenance import fingerprint  # pylint: disable=g-import-not-at-top
      self._provenance = fingerprint(self.capture_dir)
    return self._provenance

  def calibration(self) -> Any:
    if callable(self._calibration):
      self._calibration = self._calibration()
    return self._calibration

  def __call__(self, spec: MethodSpec, comp: Compressor) -> Any:
    if comp not in self._cache:
      if comp.learned and not comp.passthrough:
        self._cache[comp] = self._learned(spec, comp)
      else:
        calib = self.calibration() if comp.needs_calibration else None
        self._cache[comp] = comp.init_params(jax.random.key(self.config.seed), self.num_layers,
                                             self.num_heads, calibration=calib)
    return self._cache[comp]

  def trained_compressor(self, spec: MethodSpec, comp: Compressor) -> Compressor:
    return trained_compressor(self.config, spec, comp)

  def share(self, served_sequences: int):
    """`share(spec, comp)`: bits of `comp`'s shared parameters per (served sequence, layer, head), for
    `eval.engine.sweep.fitted`. Learned compressors are counted from their initial parameters (training
    keeps their shapes and dtypes), so nothing is trained at a budget the fit then abandons."""
    heads = self.num_layers * self.num_heads * served_sequences
    shared = self._shared_bits                       # shared bits per compressor, computed once

    def share(spec: MethodSpec, comp: Compressor) -> float:
      if comp not in shared:
        if comp.learned and not comp.passthrough:
          calib = self.calibration() if comp.needs_calibration else None
          p = comp.init_params(jax.random.key(self.config.seed), self.num_layers, self.num_heads,
                               calibration=calib)
        else:
          p = self(spec, comp)
        shared[comp] = comp.shared_bits(p)
      return shared[comp] / heads
    return share

  def trained_bits(self, spec: MethodSpec, comp: Compressor) -> int:
    """Budget (bits per head) the parameters of `comp` were trained at (0: no trained parameters)."""
    if not comp.learned or comp.passthrough:
      return 0
    return self.trained_compressor(spec, comp).budget.bits

  def _learned(self, spec: MethodSpec, comp: Compressor) -> Any:
    target = self.trained_compressor(spec, comp)
    if target != comp:
      if target not in self._cache:
        logging.info('%s at %d bits uses the parameters trained at %d bits (learned.train_budget)',
                     spec, comp.budget.bits, target.budget.bits)
        self._cache[target] = self._train_or_load(spec, target)
      return self._cache[target]
    return self._train_or_load(spec, comp)

  def _train_or_load(self, spec: MethodSpec, comp: Compressor) -> Any:
    from train import compressor as trainer  # pylint: disable=g-import-not-at-top
    root = self.config.learned.checkpoint_root
    if root:
      folder = os.path.join(root, run_name(spec, comp))
      if not os.path.isdir(folder):
        raise FileNotFoundError(f'learned.checkpoint_root has no run {folder!r} for {spec} at '
                                f'{comp.budget.bits} bits; train it with python -m train.compressor '
                                f'--workdir {folder} ..., or leave checkpoint_root empty to train here')
      trained, params = trainer.load_trained(folder, expect=self.provenance())
    else:
      folder = os.path.join(self.workdir, 'train', run_name(spec, comp))
      if os.path.exists(os.path.join(folder, 'config.json')):
        logging.info('%s at %d bits: reusing the trained run %s (resumed if unfinished)', spec,
                     comp.budget.bits, folder)
      trained, params = self._train(spec, comp, folder)
    if trained != comp:
      diff = {f.name: (getattr(trained, f.name), getattr(comp, f.name))
              for f in dataclasses.fields(comp) if getattr(trained, f.name) != getattr(comp, f.name)}
      raise ValueError(f'the compressor trained in {folder!r} differs from the one evaluated: '
                       f'{diff} (trained, wanted); use a matching run or retrain')
    return params

  def _train(self, spec: MethodSpec, comp: Compressor, folder: str) -> tuple[Compressor, Any]:
    """train.compressor into `folder` (resumed, or loaded when finished). A run whose checkpoint cannot
    be read is refused with the fix, or with learned.retrain_corrupt moved aside and trained again."""
    from train import compressor as trainer  # pylint: disable=g-import-not-at-top
    from train.common import CorruptCheckpoint  # pylint: disable=g-import-not-at-top
    config = train_config(self.config, spec, comp, self.capture_dir)
    try:
      return trainer.train(config, folder)
    except CorruptCheckpoint as e:
      if not self.config.learned.get('retrain_corrupt', False):
        raise CorruptCheckpoint(f'{e}; or re-run with --config.learned.retrain_corrupt=True to move it aside '
                                f'and train {spec} at {comp.budget.bits} bits (only it) again', e.run) from e
      aside = f'{folder}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}'
      logging.warning('%s at %d bits: %s. learned.retrain_corrupt: moving %s to %s and training it again',
                      spec, comp.budget.bits, e, folder, aside)
      shutil.move(folder, aside)
      return trainer.train(config, folder)
