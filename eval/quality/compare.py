r"""Paired comparison of two methods of a frontier run on the same held-out images.

Run (after `python -m eval.frontier ... --workdir runs/frontier`):
  python -m eval.quality.compare --workdir runs/frontier --a merge_learned --b cam --budgets 10%,25%,50%

For every budget both methods run teacher forced on the run's validation caches (learned methods with
the parameters the frontier trained, from WORKDIR/train/); per image the squared errors are summed,
and the ratio rel_error(a) / rel_error(b) gets a paired bootstrap confidence interval over images
(images resampled together for both methods), plus the share of images where `a` is better. Prints a
table and writes WORKDIR/compare_<a>_vs_<b>.csv.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

from absl import flags
import jax
import numpy as np

import compress
from compress.core.budget import CacheGeometry
from eval.engine import exact_store, sweep
from eval.engine import params as params_lib

COLUMNS = ('a', 'b', 'budget', 'bits_a', 'bits_b', 'amortised_bits_a', 'amortised_bits_b', 'rel_error_a',
           'rel_error_b', 'ratio', 'ratio_ci_low',
           'ratio_ci_high', 'a_better_share', 'num_images')


def load_run(workdir: str) -> tuple[Any, CacheGeometry, sweep.CacheSet]:
  """The frontier run's config, cache geometry and validation caches."""
  from var_jax.capture import CaptureDataset  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path) or not os.path.isdir(os.path.join(workdir, 'capture')):
    raise FileNotFoundError(f'{workdir!r} is not a finished eval.frontier workdir (no config.json or '
                            'capture/); run python -m eval.frontier --workdir there first')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  val = CaptureDataset(os.path.join(workdir, 'capture'), 'val')
  data = sweep.CacheSet.from_dataset(val, config.sweep.val_sequences)
  data.exact_store = exact_store.for_run(workdir, os.path.join(workdir, 'capture'), data.num_sequences)
  return config, CacheGeometry(tuple(val.patch_nums), val.head_dim, config.kv_dtype), data


def method_params(config, workdir: str, spec: sweep.MethodSpec, comp: compress.Compressor,
                  data: sweep.CacheSet) -> Any:
  """Trained parameters from WORKDIR/train (learned), else init_params (calibrated on the train split)."""
  if comp.learned and not comp.passthrough:
    from train import compressor as trainer  # pylint: disable=g-import-not-at-top
    # the run the frontier trained these parameters in (learned.train_budget: once, for every budget)
    comp = params_lib.trained_compressor(config, spec, comp)
    folder = os.path.join(workdir, 'train', params_lib.run_name(spec, comp))
    if not os.path.isdir(folder):
      raise FileNotFoundError(f'no trained run {folder!r}: the frontier did not train {spec} at '
                              f'{comp.budget.bits} bits (add it to learned.methods / learned.budgets)')
    from var_jax.provenance import fingerprint  # pylint: disable=g-import-not-at-top
    from train.common import CorruptCheckpoint  # pylint: disable=g-import-not-at-top
    try:
      return trainer.load_trained(folder, expect=fingerprint(os.path.join(workdir, 'capture')))[1]
    except CorruptCheckpoint as e:
      raise CorruptCheckpoint(f'{e}; or re-run the frontier on {workdir!r} with '
                              '--config.learned.retrain_corrupt=True to retrain it', e.run) from e
  calib = None
  if comp.needs_calibration:
    from var_jax.capture import CaptureDataset  # pylint: disable=g-import-not-at-top
    train = CaptureDataset(os.path.join(workdir, 'capture'), 'train')
    calib = train.get(np.arange(min(config.sweep.calibration_sequences or train.num_sequences,
                                    train.num_sequences)))
  return comp.init_params(jax.random.key(config.seed), data.num_layers, data.num_heads, calibration=calib)


def per_image(res: dict[str, np.ndarray], units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(d2, e2) summed per image (units), each (images,)."""
  _, inverse = np.unique(units, return_inverse=True)
  return np.bincount(inverse, res['d2'].sum((1, 2))), np.bincount(inverse, res['e2'].sum((1, 2)))


def paired_ratio(d2_a: np.ndarray, d2_b: np.ndarray, e2: np.ndarray, level: float = 0.95,
                 draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
  """rel_error(a) / rel_error(b) = sqrt(sum d2_a / sum d2_b) and its paired bootstrap interval."""
  del e2                                                   # same exact outputs: it cancels
  ratio = float(np.sqrt(d2_a.sum() / d2_b.sum()))
  idx = np.random.default_rng(seed).integers(0, d2_a.size, (draws, d2_a.size))
  boot = np.sqrt(d2_a[idx].sum(1) / np.maximum(d2_b[idx].sum(1), 1e-300))
  lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
  return ratio, float(lo), float(hi)


def compare(workdir: str, a: str, b: str, budgets: Sequence[str], batch: int = 16
            ) -> list[dict[str, Any]]:
  """Rows of COLUMNS for methods `a` vs `b` ('name' or 'name(key=value,...)') at each budget."""
  from compress.core.teacher_forced import fast_compile_options  # pylint: disable=g-import-not-at-top
  config, geometry, data = load_run(workdir)
  options = fast_compile_options() if config.get('fast_compile', False) else None
  rows = []
  for budget in budgets:
    row = {'a': a, 'b': b, 'budget': budget}
    d2, e2 = {}, None
    for tag, name in (('a', a), ('b', b)):
      spec = sweep.MethodSpec.parse(name)
      comp = spec.make(geometry, budget)
      params = method_params(config, workdir, spec, comp, data)
      res = sweep.run_point(comp, params, data, batch, options)
      d2[tag], e2 = per_image(res, data.units)
      row[f'bits_{tag}'] = int(res['peak_bits'].max())
      served = config.sweep.get('served_sequences', 0) or data.num_sequences
      row[f'amortised_bits_{tag}'] = sweep.bits_columns(
          row[f'bits_{tag}'], geometry, comp.shared_bits(params), data.num_layers * data.num_heads,
          served)['amortised_bits']
      row[f'rel_error_{tag}'] = float(np.sqrt(d2[tag].sum() / e2.sum()))
      jax.clear_caches()
    row['ratio'], row['ratio_ci_low'], row['ratio_ci_high'] = paired_ratio(
        d2['a'], d2['b'], e2, config.confidence)
    row['a_better_share'] = float(np.mean(d2['a'] < d2['b']))
    row['num_images'] = int(e2.size)
    rows.append(row)
  return rows


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'a finished eval.frontier workdir', required=True)
flags.DEFINE_string('a', None, "method (e.g. merge_learned or 'cam(threshold=0.5)')", required=True)
flags.DEFINE_string('b', None, 'the method it is compared with', required=True)
flags.DEFINE_list('budgets', ['10%', '25%', '50%'], 'budgets (Budget.parse forms)')


def main(argv):
  del argv
  from train import workdir_lock  # pylint: disable=g-import-not-at-top
  with workdir_lock.hold(FLAGS.workdir):      # a run in progress there: WorkdirBusy, one line
    rows = compare(FLAGS.workdir, FLAGS.a, FLAGS.b, FLAGS.budgets)
  path = os.path.join(FLAGS.workdir, f'compare_{FLAGS.a}_vs_{FLAGS.b}.csv'.replace('(', '_').replace(')', ''))
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, COLUMNS)
    w.writeheader()
    w.writerows(rows)
  for r in rows:
    print(f"{r['budget']:>6}: {r['a']} {r['rel_error_a']:.4f} at {r['amortised_bits_a']:.0f} bits vs {r['b']} "
          f"{r['rel_error_b']:.4f} at {r['amortised_bits_b']:.0f} bits (amortised); ratio "
          f"{r['ratio']:.3f} [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]; {r['a']} better on "
          f"{100 * r['a_better_share']:.0f} % of {r['num_images']} images")
  print(f'wrote {path}')


if __name__ == '__main__':
  from var_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
