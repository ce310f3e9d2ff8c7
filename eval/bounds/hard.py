"""The hard-instance frontier: every compressor on the flat and the VAR-schedule hard instance
(`compress.theory.hard_instance`) against the rate-distortion lower bound.

Per (instance, method, setting, budget) the compressor runs on `seeds` independent draws (calibrated
ones on an independent draw each); the row holds the means over seeds (error with a t-interval),
`lower_bound_bits` = the fewest bits any code needs for the measured error and `min_error_at_bits` =
the smallest error any code of the measured bits can reach (both rate-distortion, means over seeds).
The theorem says rel_error >= min_error_at_bits and bits >= lower_bound_bits for every seed;
`seeds_below_bound` counts violations (a violation is a bug in bit accounting or error measurement).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

import compress
from compress.theory import bounds
from compress.theory.hard_instance import HardInstance, make_instance, redraw
from eval.engine.stats import mean_ci
from eval.engine.sweep import bits_columns, FULL_BUDGET, MethodSpec

COLUMNS = ('instance', 'patch_nums', 'T', 'probes', 'd', 'beta', 'mu', 'leak', 'cond', 'values', 'seeds',
           'seeds_below_bound')
CALIBRATION_SEED_OFFSET = 1000      # calibration draw of seed s: seed s + this
_TOL = 1e-6                         # relative slack of the bound check (float32 outputs)


def instances(hcfg: Any) -> dict[str, list[tuple[HardInstance, HardInstance]]]:
  """{'flat' | 'var': [(instance, calibration draw) per seed]} of the hard config section."""
  out = {}
  for kind in hcfg.instances:
    if kind not in ('flat', 'var'):
      raise ValueError(f'hard.instances takes "flat" and/or "var", got {kind!r}')
    size = {'n': int(hcfg.n)} if kind == 'flat' else {'patch_nums': tuple(hcfg.patch_nums)}
    draws = []
    for seed in hcfg.seeds:
      inst = make_instance(**size, d=int(hcfg.d), xi=float(hcfg.xi), values=hcfg.value_dist, seed=int(seed),
                           kv_dtype=hcfg.kv_dtype)
      draws.append((inst, redraw(inst, int(seed) + CALIBRATION_SEED_OFFSET)))
    out[kind] = draws
  return out


def evaluate_spec(kind: str, draws: Sequence[tuple[HardInstance, HardInstance]], spec: MethodSpec,
                  budget: Any, level: float, compiler_options=None) -> dict[str, Any]:
  """One frontier.csv row of the hard instance `kind`: `spec` at `budget` over every seed's draw."""
  t0 = time.perf_counter()
  g = draws[0][0].geometry
  comp = spec.make(g, compress.Budget(g.full_bits) if budget == FULL_BUDGET else budget)
  errs, bits, lbb, minerr, shared = [], [], [], [], 0
  for inst, calib in draws:
    params = comp.init_params(jax.random.key(inst.seed), 1, 1,
                              calibration=calib.calibration() if comp.needs_calibration else None)
    res = compress.run_teacher_forced(comp, params, inst.q, inst.k, inst.v, compiler_options=compiler_options)
    b = int(np.asarray(res['peak_bits']).max())
    e = inst.rel_error(res['out'])
    if not np.isfinite(e):
      raise FloatingPointError(f'{spec} at budget {budget}: non-finite outputs on the {kind} instance')
    errs.append(e)
    bits.append(b)
    lbb.append(float(inst.lower_bound_bits(e)))
    minerr.append(float(inst.min_error(b)))
    shared = comp.shared_bits(params)
  errs, minerr = np.array(errs), np.array(minerr)
  err, low, high = mean_ci(errs, level)
  low = max(low, 0.0)                 # an error is >= 0
  inst = draws[0][0]
  cls = type(comp)
  p = inst.params()
  return {'dataset': kind, 'method': spec.name, 'family': cls.family, 'setting': spec.setting,
          'budget': budget, 'oracle': cls.oracle, 'learned': cls.learned, 'deployable': not cls.oracle,
          'budget_bits': comp.budget.bits, 'bits': int(max(bits)), 'bits_mean': float(np.mean(bits)),
          **bits_columns(max(bits), g, shared), 'rel_error': err, 'rel_error_ci_low': low,
          'rel_error_ci_high': high, 'num_sequences': len(draws), 'num_units': len(draws),
          'lower_bound_bits': float(np.mean(lbb)), 'min_error_at_bits': float(minerr.mean()),
          'seconds': time.perf_counter() - t0,
          **{k: p[k] for k in ('instance', 'patch_nums', 'T', 'probes', 'd', 'beta', 'values')},
          **{k: float(np.mean([i.params()[k] for i, _ in draws])) for k in ('mu', 'leak', 'cond')},
          'seeds': ' '.join(str(i.seed) for i, _ in draws),
          'seeds_below_bound': int(np.sum(errs < minerr * (1 - _TOL)))}


def rd_curve(kind: str, draws: Sequence[tuple[HardInstance, HardInstance]]) -> dict[str, Any]:
  """The rate-distortion bound of the first draw as a plot curve (bits per coordinate vs error)."""
  inst = draws[0][0]
  curve = bounds.rd_curve(inst.eigenvalues, inst.d)
  return {'dataset': kind, 'label': 'rate-distortion bound (keys free)', 'rel_error': curve['eps'],
          'bits': curve['bits'], 'bits_per_coordinate': curve['bits'] / inst.geometry.coordinates}
