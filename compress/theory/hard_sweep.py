"""Every compressor on the hard instance, against the rate-distortion bound: one CSV row per
(method, budget), and the bound's curve.

  python -m compress.theory.hard_sweep --out runs/hard --n 256 --d 64 --budgets 5%,10%,25%,50%
  python -m compress.theory.hard_sweep --out runs/hard_var --var --patch_nums 1,2,3,4,5,6,8
"""
from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np

from compress.core.budget import Budget
from compress.core.registry import available, make, REGISTRY
from compress.core.teacher_forced import run_teacher_forced
from compress.theory import bounds
from compress.theory.hard_instance import HardInstance, make_instance, redraw, VALUE_KINDS, VAR_256PX


# ---- evaluation -------------------------------------------------------------------------------
def evaluate_method(inst: HardInstance, name: str, budget: Budget | str | float,
                    calibration: HardInstance | None = None, key: jax.Array | None = None
                    ) -> dict[str, Any]:
  """Runs compressor `name` at `budget` (a `Budget.parse` form) on `inst`; returns one result row (see
  `CSV_COLUMNS`)."""
  g = inst.geometry
  comp = make(name, g, budget)
  calib = None
  if comp.needs_calibration:
    if calibration is None:
      raise ValueError(f'{name} needs calibration: pass an independent draw (redraw(inst, seed))')
    calib = calibration.calibration()
  key = jax.random.key(inst.seed) if key is None else key
  t0 = time.perf_counter()
  params = comp.init_params(key, 1, 1, calibration=calib)
  res = run_teacher_forced(comp, params, inst.q, inst.k, inst.v)
  bits = int(np.asarray(res['peak_bits']).max())
  err = inst.rel_error(res['out'])
  if not np.isfinite(err):
    raise FloatingPointError(f'{name} at budget {budget}: non-finite outputs on the hard instance')
  cls = type(comp)
  return {
      'method': name, 'family': cls.family, 'oracle': cls.oracle, 'respects_budget': cls.respects_budget,
      'budget': budget, 'budget_bits': comp.budget.bits, 'bits': bits,
      'bits_per_coordinate': bits / g.coordinates, 'fraction_of_fp16': bits / g.fp16_bits,
      'bits_per_token_dim': bits / (inst.T * inst.d), 'shared_bits': comp.shared_bits(params),
      'rel_error': err, 'lower_bound_bits': float(inst.lower_bound_bits(err)),
      'min_error_at_bits': float(inst.min_error(bits)), 'seconds': time.perf_counter() - t0,
      **inst.params()}


# bits: peak bits per head held (keys, values and every code, scale or index); bits_per_coordinate:
# per cached k+v coordinate (project convention); bits_per_token_dim: per (cached token, dim), the unit
# of the bound (T d log2(1/eps)); lower_bound_bits: rate-distortion bits at the row's rel_error (values
# only, keys free); min_error_at_bits: the smallest error any cache of `bits` bits can reach.
CSV_COLUMNS = ('method', 'family', 'oracle', 'respects_budget', 'budget', 'budget_bits', 'bits',
               'bits_per_coordinate', 'fraction_of_fp16', 'bits_per_token_dim', 'shared_bits',
               'rel_error', 'lower_bound_bits', 'min_error_at_bits', 'seconds', 'instance', 'patch_nums',
               'T', 'probes', 'd', 'beta', 'xi', 'mu', 'leak', 'cond', 'values', 'seed', 'kv_dtype')


def write_csv(rows: Sequence[dict[str, Any]], path: str, columns: Sequence[str], overwrite: bool) -> None:
  """Writes rows atomically (temp file + rename); refuses to replace `path` unless `overwrite`."""
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it or choose another --out')
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.csv.tmp')
  with os.fdopen(fd, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    w.writeheader()
    for r in rows:
      w.writerow({c: ('' if r.get(c) is None else r.get(c)) for c in columns})
  os.replace(tmp, path)


# ---- CLI ----------------------------------------------------------------------------------------
def define_flags(fv=None) -> None:
  from absl import flags
  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_string('out', None, 'output folder (gets hard_instance.csv and hard_instance_bound.csv)',
                      flag_values=fv)
  flags.DEFINE_integer('n', None, 'flat instance: cached tokens (default 256 without --var)', flag_values=fv)
  flags.DEFINE_list('patch_nums', None, 'VAR block instance schedule (with --var; default the 256px '
                    'schedule)', flag_values=fv)
  flags.DEFINE_bool('var', False, 'VAR block instance: the prefix scales are cached, the last probes',
                    flag_values=fv)
  flags.DEFINE_integer('d', 64, 'head dim', flag_values=fv)
  flags.DEFINE_float('beta', None, 'max logit (default ln(T/xi)/(1-mu))', flag_values=fv)
  flags.DEFINE_float('xi', 0.01, 'off-target attention mass the default beta allows', flag_values=fv)
  flags.DEFINE_enum('values', 'gaussian', list(VALUE_KINDS), 'value distribution', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'seed of the instance (calibration uses an independent draw, seed+1)',
                       flag_values=fv)
  flags.DEFINE_string('kv_dtype', 'float16', 'dtype of kept keys/values (the geometry)', flag_values=fv)
  flags.DEFINE_list('budgets', ['5%', '10%', '25%', '50%', '100%'],
                    'comma-separated budgets, each with its unit: "25%" (of the fp16 cache at its peak, '
                    'at most 100%), a fraction in (0, 1] ("0.25" = 25%), "2bpc" (bits per cached '
                    'coordinate) or "100000bits" (per sequence, layer and head)', flag_values=fv)
  flags.DEFINE_list('methods', None, 'compressors to run (default: every non-learned one)', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'replace existing CSVs in --out', flag_values=fv)
  flags.mark_flag_as_required('out', flag_values=fv)


def _int_list(name: str, items: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in items)
  except ValueError:
    raise ValueError(f'--{name} takes comma-separated whole numbers, e.g. 1,2,3,4; got {",".join(items)}'
                     ) from None


def _budget_spec(s: str) -> str | float:
  """One --budgets entry: '25%', '2bpc', '100000bits' as given (`Budget.parse` checks them); a bare number
  is a fraction of the fp16 cache in (0, 1] (returned as a float: '0.25' = 25%)."""
  s = s.strip()
  try:
    x = float(s)
  except ValueError:
    return s
  if not 0 < x <= 1:
    raise ValueError(f'--budgets {s}: a bare number is a fraction of the fp16 cache in (0, 1] (0.25 = 25%); '
                     'give each budget as "25%", 0.25, "2bpc" or "100000bits"')
  return x


def main(argv: Sequence[str]) -> int:
  from absl import app, flags, logging
  from tqdm import tqdm
  F = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    if F.patch_nums is not None and not F.var:
      raise ValueError('--patch_nums describes the VAR block instance: add --var (or use --n N for the '
                       'flat stream)')
    if F.var and F.n is not None:
      raise ValueError('--n is the flat instance and --var the block one: give one of them')
    size = ({'patch_nums': _int_list('patch_nums', F.patch_nums) if F.patch_nums else VAR_256PX}
            if F.var else {'n': 256 if F.n is None else F.n})
    inst = make_instance(**size, d=F.d, beta=F.beta, xi=F.xi, values=F.values, seed=F.seed,
                         kv_dtype=F.kv_dtype)
    specs = [_budget_spec(s) for s in F.budgets]
    if not specs:
      raise ValueError('--budgets is empty: give e.g. 5%,10%,25%')
    for s in specs:
      Budget.parse(s, inst.geometry)
    methods = list(F.methods) if F.methods else available(learned=False)
    unknown = sorted(set(methods) - set(available()))
    if unknown:
      raise ValueError(f'unknown --methods {unknown}; registered: {", ".join(available())}')
  except (ValueError, TypeError) as e:
    raise app.UsageError(str(e)) from None
  path = os.path.join(F.out, 'hard_instance.csv')
  curve_path = os.path.join(F.out, 'hard_instance_bound.csv')
  for p in (path, curve_path):
    if os.path.exists(p) and not F.overwrite:
      raise app.UsageError(f'{p} exists; pass --overwrite to replace it or choose another --out')

  print('hard instance: ' + ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in inst.params().items()))
  calib = redraw(inst, F.seed + 1) if any(
      REGISTRY[m].needs_calibration for m in methods) else None
  rows, failed = [], []
  jobs = [(m, b) for m in methods for b in specs]
  for m, b in tqdm(jobs, desc='hard instance', unit='row'):
    try:
      rows.append(evaluate_method(inst, m, b, calib))
    except Exception as e:  # one broken compressor must not lose the other rows
      failed.append(f'{m}@{b}: {type(e).__name__}: {e}')
      logging.error('%s at budget %s failed: %s', m, b, e)
  write_csv(rows, path, CSV_COLUMNS, F.overwrite)
  if inst.bound_applies:
    curve = bounds.rd_curve(inst.eigenvalues, inst.d)
    write_csv([{'eps': e, 'bits': b, 'bits_per_coordinate': b / inst.geometry.coordinates}
               for e, b in zip(curve['eps'], curve['bits'])], curve_path,
              ('eps', 'bits', 'bits_per_coordinate'), F.overwrite)
  print(f'wrote {len(rows)} rows to {path}')
  if failed:
    print('FAILED:\n  ' + '\n  '.join(failed), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  from var_jax import cli
  define_flags()
  cli.run(main)
