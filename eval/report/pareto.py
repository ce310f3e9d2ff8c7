"""Pareto frontier: the lower envelope of error against amortised bits (per-head bits plus the point's
share of its shared parameters), over all deployable points and per family.

A point is on the frontier of a set when no other point of the set has at most its bits and at most
its error with one of them strictly smaller. Sorted by bits the frontier's errors strictly decrease.
Oracles (future queries), bounds and failed points are not deployable and never on a frontier.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from eval.engine.results import as_float

COLUMNS = ('frontier', 'dataset', 'method', 'family', 'setting', 'budget', 'bits', 'bits_per_coordinate',
           'fraction_of_fp16', 'shared_bits', 'amortised_bits', 'amortised_bits_per_coordinate', 'rel_error',
           'rel_error_ci_low', 'rel_error_ci_high')
X = 'amortised_bits'       # a point's memory: per-head bits plus its share of the shared parameters
BEST = 'best'              # the curve setting of a method whose setting was chosen per budget on dev


def curve_setting(row: Mapping[str, Any]) -> str:
  """The setting a row's curve is drawn under: its own, or BEST when the tuning stage chose it per
  budget (frontier.csv `selection`): one curve per method, whatever it picked at each budget."""
  return BEST if row.get('selection') else row['setting']


def lower_envelope(bits: Sequence[float], err: Sequence[float]) -> list[int]:
  """Indices of the Pareto-optimal points (min bits, min error), ordered by increasing bits."""
  bits, err = np.asarray(bits, np.float64), np.asarray(err, np.float64)
  ok = np.nonzero(np.isfinite(bits) & np.isfinite(err))[0]
  order = ok[np.lexsort((err[ok], bits[ok]))]          # by bits, then by error
  out, best = [], np.inf
  for i in order:
    if err[i] < best:
      out.append(int(i))
      best = err[i]
  return out


def x_value(r: Mapping[str, Any], x: str = X) -> float:
  """A row's memory: column `x`, or its per-head `bits` where `x` is missing (tables written before
  amortised bits, bound rows)."""
  v = as_float(r, x)
  return v if np.isfinite(v) else as_float(r, 'bits')


def _truthy(v: Any) -> bool:
  return str(v).lower() in ('true', '1')


def frontier_rows(rows: Sequence[Mapping[str, Any]], x: str = X, y: str = 'rel_error'
                  ) -> list[dict[str, Any]]:
  """pareto.csv rows: per dataset, the envelope of all deployable rows ('all') and of each family."""
  out = []
  for dataset in sorted({r['dataset'] for r in rows}):
    pts = [r for r in rows if r['dataset'] == dataset and _truthy(r['deployable'])]
    groups = [('all', pts)] + [(f'family:{f}', [r for r in pts if r['family'] == f])
                               for f in sorted({r['family'] for r in pts})]
    for name, group in groups:
      idx = lower_envelope([x_value(r, x) for r in group], [as_float(r, y) for r in group])
      out += [{'frontier': name, **{c: group[i].get(c) for c in COLUMNS if c != 'frontier'}} for i in idx]
  return out
