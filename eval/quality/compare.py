r"""Paired comparison of two methods of a frontier run on the same held-out images, at equal memory.

Run (after `python -m eval.frontier ... --workdir runs/frontier`):
  python -m eval.quality.compare --workdir runs/frontier --a composed_learned --b merge_learned
  python -m eval.quality.compare --workdir runs/frontier --a merge_learned --b cam --budgets 10%,25%,50%

For every budget label, `a` runs at that budget; its amortised bits (per-head bits plus its shared
parameters spread over the served sequences, the frontier's x axis) are the memory both are compared
at. `b` is brought to that memory:
  - evaluated: when `b` can run at any budget (heuristics, calibrated methods, learned methods whose
    parameters serve every budget), it runs at the budget whose amortised bits equal `a`'s (its own
    shared bits taken off first); it may hold fewer bits than that budget allows;
  - interpolated: otherwise (learned per budget) `b` runs at the two budgets of the run whose amortised
    bits bracket `a`'s, and its error is read off that curve by log-log interpolation in amortised bits,
    per bootstrap draw (outside the measured range: no figure).
Per image the squared errors are summed; the ratio rel_error(a) / rel_error(b at a's memory) gets a
paired bootstrap interval over images (images resampled together for both), with the share of images
where `a` is better. The label-matched ratio (`b` at the same budget label, whatever memory it then
holds) is kept beside it, named so. A method the run tuned (tuning.grids) and named without a setting
runs as the run ran it: at every budget, its best candidate on the dev split (`setting_a`, `setting_b`:
the settings at the label). Prints a table and writes WORKDIR/compare_<a>_vs_<b>.csv.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Sequence

from absl import flags
import jax
import numpy as np

import compress
from compress.core.budget import CacheGeometry
from eval.engine import exact_store, sweep, tuning
from eval.engine import params as params_lib

COLUMNS = ('a', 'b', 'budget', 'setting_a', 'setting_b', 'bits_a', 'amortised_bits_a', 'rel_error_a', 'b_at_equal_memory',
           'amortised_bits_b', 'rel_error_b', 'ratio', 'ratio_ci_low', 'ratio_ci_high', 'a_better_share',
           'amortised_bits_b_label_matched', 'rel_error_b_label_matched', 'ratio_label_matched',
           'ratio_label_matched_ci_low', 'ratio_label_matched_ci_high', 'num_images')


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


def loglog(x: float, x0: float, x1: float, y0, y1):
  """log y at log x on the line through (log x0, log y0), (log x1, log y1); y0, y1 may be arrays."""
  if x1 == x0:
    return y0
  t = (np.log(x) - np.log(x0)) / (np.log(x1) - np.log(x0))
  return np.exp((1 - t) * np.log(y0) + t * np.log(y1))


def paired_ratio(d2_a: np.ndarray, b_of: Callable[[np.ndarray], np.ndarray], e2: np.ndarray,
                 level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
  """rel_error(a) / rel_error(b) and its paired bootstrap interval over images. `b_of(idx)` is b's
  relative error on the images `idx` (draws, n) -> (draws,) (an interpolation between two measured
  budgets, or one budget's sqrt(sum d2_b / sum e2))."""
  rel_a = lambda idx: np.sqrt(d2_a[idx].sum(-1) / np.maximum(e2[idx].sum(-1), 1e-300))
  every = np.arange(d2_a.size)[None]
  ratio = float(rel_a(every)[0] / b_of(every)[0])
  idx = np.random.default_rng(seed).integers(0, d2_a.size, (draws, d2_a.size))
  boot = rel_a(idx) / np.maximum(b_of(idx), 1e-300)
  lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
  return ratio, float(lo), float(hi)


def rel_of(d2: np.ndarray, e2: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """idx (draws, n) -> (draws,) relative error of the images idx."""
  return lambda idx: np.sqrt(d2[idx].sum(-1) / np.maximum(e2[idx].sum(-1), 1e-300))


class Runner:
  """Runs (spec, budget) points of one frontier run: per-image d2, e2 and amortised bits, memoised."""

  def __init__(self, workdir: str, batch: int):
    from compress.core.teacher_forced import fast_compile_options  # pylint: disable=g-import-not-at-top
    self.workdir, self.batch = workdir, batch
    self.config, self.geometry, self.data = load_run(workdir)
    self.options = fast_compile_options() if self.config.get('fast_compile', False) else None
    self.served = self.config.sweep.get('served_sequences', 0) or self.data.num_sequences
    self.heads = self.data.num_layers * self.data.num_heads
    self._memo: dict[tuple[str, str, Any], dict[str, Any]] = {}
    self._dev: sweep.CacheSet | None | bool = False   # False: not opened yet
    self.fit = None          # the run's sweep.fit_amortised: label budgets fitted as its points were
    if self.config.sweep.get('fit_amortised', False):
      from var_jax.capture import CaptureDataset  # pylint: disable=g-import-not-at-top
      train = CaptureDataset(os.path.join(workdir, 'capture'), 'train')
      n_cal = min(self.config.sweep.calibration_sequences or train.num_sequences, train.num_sequences)
      self.fit = params_lib.Params(self.config, workdir, os.path.join(workdir, 'capture'),
                                   lambda: train.get(np.arange(n_cal)), self.data.num_layers,
                                   self.data.num_heads).share(self.served)

  def free_budget(self, spec: sweep.MethodSpec) -> bool:
    """Whether `spec` can run at any budget (nothing to train per budget)."""
    if not spec.cls.learned:
      return True
    return bool(spec.cls.budget_free_params and self.config.learned.get('train_budget', ''))

  def shared(self, spec: sweep.MethodSpec, budget: Any) -> tuple[compress.Compressor, Any, float]:
    """(compressor, params, shared bits per (served sequence, layer, head)) of `spec` at `budget`."""
    if isinstance(budget, str):                    # a label: the compressor the run evaluated there
      comp = sweep.fitted(spec, budget, self.geometry, self.fit)
    else:
      comp = spec.make(self.geometry, budget)
    params = method_params(self.config, self.workdir, spec, comp, self.data)
    return comp, params, comp.shared_bits(params) / (self.heads * self.served)

  def dev(self) -> sweep.CacheSet | None:
    """The run's dev split (None when its capture has none)."""
    if self._dev is False:
      t = self.config.get('tuning') or {}
      self._dev = tuning.dev_set(os.path.join(self.workdir, 'capture'), t.get('dev_sequences', 0))
    return self._dev

  def best(self, spec: sweep.MethodSpec, budget: Any) -> sweep.MethodSpec:
    """`spec` as the run would evaluate it at `budget`: a method with a tuning grid and no explicit
    setting is its best candidate on dev at that budget (the frontier's rule); anything else as given."""
    grid = tuning.grids(self.config).get(spec.name)
    if spec.settings or not grid or self.dev() is None:
      return spec
    scored = []
    for i, c in enumerate(tuning.candidates(spec, grid)):
      p = self.point(c, budget, self.dev())
      scored.append((float(np.sqrt(p['d2'].sum() / p['e2'].sum())), i, c))
    return min(scored, key=lambda x: x[:2])[2]

  def point(self, spec: sweep.MethodSpec, budget: Any, data: sweep.CacheSet | None = None) -> dict[str, Any]:
    """Per-image d2, e2 and bits of `spec` at `budget` on `data` (default: val)."""
    data = self.data if data is None else data
    key = ('val' if data is self.data else 'dev', str(spec), budget if isinstance(budget, str) else budget.bits)
    if key not in self._memo:
      comp, params, share = self.shared(spec, budget)
      res = sweep.run_point(comp, params, data, self.batch, self.options)
      d2, e2 = per_image(res, data.units)
      bits = float(res['peak_bits'].max())
      self._memo[key] = {'d2': d2, 'e2': e2, 'bits': int(bits), 'amortised_bits': bits + share,
                         'budget_bits': comp.budget.bits}
      jax.clear_caches()
    return self._memo[key]

  def at_memory(self, spec: sweep.MethodSpec, target: float, labels: Sequence[str]
                ) -> tuple[str, float, Callable[[np.ndarray], np.ndarray] | None]:
    """`spec` brought to `target` amortised bits: (how, its amortised bits, idx -> rel error)."""
    if self.free_budget(spec):
      bits = int(np.floor(target))
      for _ in range(3):                         # shared bits may depend on the budget: settle them
        _, _, share = self.shared(spec, compress.Budget(max(bits, 0)))
        new = int(np.floor(target - share))
        if new == bits:
          break
        bits = new
      if bits < 1:
        return f'not evaluable: its shared bits alone exceed {target:.0f} bits', float('nan'), None
      best = self.best(spec, compress.Budget(bits))
      p = self.point(best, compress.Budget(bits))
      how = f'evaluated at {bits} bits per head' + (f' ({best.setting}, best on dev)' if best != spec else '')
      return how, p['amortised_bits'], rel_of(p['d2'], p['e2'])
    pts = sorted((self.point(self.best(spec, label), label) | {'label': label} for label in labels),
                 key=lambda p: p['amortised_bits'])
    lo = [p for p in pts if p['amortised_bits'] <= target]
    hi = [p for p in pts if p['amortised_bits'] >= target]
    if not lo or not hi:
      span = ', '.join(f"{p['label']} ({p['amortised_bits']:.0f})" for p in pts)
      return (f'not evaluable: {target:.0f} amortised bits lie outside its measured budgets [{span}]',
              float('nan'), None)
    p0, p1 = lo[-1], hi[0]
    f0, f1 = rel_of(p0['d2'], p0['e2']), rel_of(p1['d2'], p1['e2'])
    how = (f"measured at {p0['label']}" if p0 is p1 else
           f"log-log interpolated between {p0['label']} and {p1['label']} ({p0['amortised_bits']:.0f} and "
           f"{p1['amortised_bits']:.0f} amortised bits)")
    return how, target, lambda idx: loglog(target, p0['amortised_bits'], p1['amortised_bits'], f0(idx), f1(idx))


def trained_labels(config, spec: sweep.MethodSpec) -> tuple[str, ...]:
  """The budget labels the frontier run trained `spec` at (learned.method_budgets or learned.budgets)."""
  by_method = config.learned.get('method_budgets', {}) or {}
  return tuple(by_method.get(str(spec), config.learned.budgets))


def compare(workdir: str, a: str, b: str, budgets: Sequence[str] = (), batch: int = 16
            ) -> list[dict[str, Any]]:
  """Rows of COLUMNS for methods `a` vs `b` ('name' or 'name(key=value,...)') at each budget label
  (default: every label the run evaluated `a` at)."""
  run = Runner(workdir, batch)
  spec_a, spec_b = sweep.MethodSpec.parse(a), sweep.MethodSpec.parse(b)
  if not budgets:
    budgets = trained_labels(run.config, spec_a) if spec_a.cls.learned else tuple(run.config.sweep.budgets)
  level = run.config.confidence
  rows = []
  for budget in budgets:
    best_a, best_b = run.best(spec_a, budget), run.best(spec_b, budget)
    pa = run.point(best_a, budget)
    e2 = pa['e2']
    row = {'a': a, 'b': b, 'budget': budget, 'setting_a': best_a.setting, 'setting_b': best_b.setting,
           'bits_a': pa['bits'], 'amortised_bits_a': pa['amortised_bits'],
           'rel_error_a': float(np.sqrt(pa['d2'].sum() / e2.sum())), 'num_images': int(e2.size)}
    how, bits_b, b_of = run.at_memory(spec_b, pa['amortised_bits'], trained_labels(run.config, spec_b))
    row.update({'b_at_equal_memory': how, 'amortised_bits_b': bits_b})
    if b_of is None:
      row.update({k: float('nan') for k in ('rel_error_b', 'ratio', 'ratio_ci_low', 'ratio_ci_high',
                                            'a_better_share')})
    else:
      every = np.arange(e2.size)[None]
      row['rel_error_b'] = float(b_of(every)[0])
      row['ratio'], row['ratio_ci_low'], row['ratio_ci_high'] = paired_ratio(pa['d2'], b_of, e2, level)
      own = np.arange(e2.size)[:, None]          # each image alone: is a better on it?
      row['a_better_share'] = float(np.mean(rel_of(pa['d2'], e2)(own) < b_of(own)))
    try:
      pl = run.point(best_b, budget)
    except FileNotFoundError:                      # b was not trained at this label: no label-matched figure
      pl = None
    if pl is None:
      row.update({k: float('nan') for k in ('amortised_bits_b_label_matched', 'rel_error_b_label_matched',
                                            'ratio_label_matched', 'ratio_label_matched_ci_low',
                                            'ratio_label_matched_ci_high')})
    else:
      row['amortised_bits_b_label_matched'] = pl['amortised_bits']
      row['rel_error_b_label_matched'] = float(np.sqrt(pl['d2'].sum() / e2.sum()))
      (row['ratio_label_matched'], row['ratio_label_matched_ci_low'],
       row['ratio_label_matched_ci_high']) = paired_ratio(pa['d2'], rel_of(pl['d2'], e2), e2, level)
    rows.append(row)
  return rows


FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'a finished eval.frontier workdir', required=True)
flags.DEFINE_string('a', None, "method (e.g. merge_learned or 'cam(threshold=0.5)')", required=True)
flags.DEFINE_string('b', None, 'the method it is compared with', required=True)
flags.DEFINE_list('budgets', [], 'budget labels (Budget.parse forms); default: every label the run '
                  'evaluated --a at')


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
    print(f"{r['budget']:>6}: {r['a']} {r['rel_error_a']:.4f} at {r['amortised_bits_a']:.0f} amortised bits; "
          f"{r['b']} at equal memory ({r['b_at_equal_memory']}) {r['rel_error_b']:.4f}: ratio "
          f"{r['ratio']:.3f} [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}], {r['a']} better on "
          f"{100 * r['a_better_share']:.0f} % of {r['num_images']} images; label-matched ({r['b']} at "
          f"{r['budget']}, {r['amortised_bits_b_label_matched']:.0f} amortised bits): ratio "
          f"{r['ratio_label_matched']:.3f} [{r['ratio_label_matched_ci_low']:.3f}, "
          f"{r['ratio_label_matched_ci_high']:.3f}]")
  print(f'wrote {path}')


if __name__ == '__main__':
  from var_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
