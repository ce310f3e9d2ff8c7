"""The quality-memory frontier of the closed loop: image metrics against amortised bits (matplotlib Agg).

Panels: FID of each method's images against the full cache's (same labels and seeds) with the noise
floor (the full cache against itself drawn with other seeds: the distance below which a compressed
cache cannot be told from the full one) as a grey band; FID against real held-out images with the full
cache's own as a line; token agreement with the full cache. x: the amortised bits per coordinate of the
teacher-forced point with the same method, setting and budget (frontier.csv), as on frontier.png; error
bars: the intervals of closed_loop.csv. Written by the frontier job as WORKDIR/quality_frontier.png.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Mapping, Sequence

from matplotlib.ticker import NullFormatter

from eval.engine.results import as_float, x_of
from eval.report import pareto as pareto_lib
from eval.report.plots import MARKERS, _family_colours, plt

FID_FLOOR = 1e-3        # FID 0 (or a rounding-negative estimate) drawn here on the log axis
PANELS = (('fid_vs_full', 'FID vs the full cache (classifier features)', True),
          ('fid_vs_real', 'FID vs real held-out images (classifier features)', False),
          ('token_agreement', 'token agreement with the full cache', False))


def _x(r: Mapping[str, Any], x_tf: Mapping[tuple, float]) -> float:
  k = (r['method'], r['setting'], r['budget'])
  if k in x_tf:
    return x_tf[k]
  fp16 = as_float(r, 'fp16_cache_bytes')
  return 16 * as_float(r, 'cache_bytes_counted') / fp16 if fp16 > 0 else math.nan


def quality_figure(closed: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                   title: str = '') -> plt.Figure | None:
  """The figure (module docstring), or None when closed_loop.csv has no compressed point."""
  points = [r for r in closed if r['method'] != 'full']
  if not points:
    return None
  floor = next((r for r in closed if r['method'] == 'full'), None)
  val = [r for r in rows if r.get('dataset') == 'val']
  x_tf = {(r['method'], r['setting'], r['budget']): x_of(r) for r in val}
  curve = {(r['method'], r['setting'], r['budget']): pareto_lib.curve_setting(r) for r in val}
  colours = _family_colours({r['family'] for r in points})
  names = sorted({r['method'] for r in points})
  marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(names)}
  series = collections.defaultdict(list)
  for r in points:
    k = (r['method'], r['setting'], r['budget'])
    series[(r['family'], r['method'], curve.get(k, r['setting']))].append(r)
  panels = [p for p in PANELS if any(math.isfinite(as_float(r, p[0])) for r in points)]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5), squeeze=False)
  xs = [_x(r, x_tf) for r in points]
  for ax, (metric, label, log_y) in zip(axes[0], panels):
    for (fam, method, setting), pts in sorted(series.items()):
      pts = sorted(pts, key=lambda r: _x(r, x_tf))
      x = [_x(r, x_tf) for r in pts]
      y = [max(as_float(r, metric), FID_FLOOR) if log_y else as_float(r, metric) for r in pts]
      lo = [as_float(r, f'{metric}_ci_low') for r in pts]
      hi = [as_float(r, f'{metric}_ci_high') for r in pts]
      name = method if setting == 'default' else f'{method} (best on dev)' if setting == pareto_lib.BEST \
          else f'{method}({setting})'
      yerr = None
      if all(math.isfinite(v) for v in lo + hi):
        yerr = [[max(a - b, 0) for a, b in zip(y, lo)], [max(b - a, 0) for a, b in zip(y, hi)]]
      ax.errorbar(x, y, yerr=yerr, color=colours[fam], marker=marker[method], lw=1, capsize=2,
                  alpha=0.85, label=name)
    if floor is not None and math.isfinite(as_float(floor, metric)):
      f = as_float(floor, metric)
      lo, hi = as_float(floor, f'{metric}_ci_low'), as_float(floor, f'{metric}_ci_high')
      what = 'noise floor (full cache vs full cache, other seeds)' if metric.endswith('_vs_full') \
          else 'full cache'
      ax.axhline(f, color='0.3', ls='--', lw=1.5, label=what)
      if math.isfinite(lo) and math.isfinite(hi):
        ax.axhspan(max(lo, FID_FLOOR) if log_y else lo, hi, color='0.5', alpha=0.15)
    ax.set_xscale('log')
    if log_y:
      ax.set_yscale('log')
    finite = [x for x in xs if math.isfinite(x) and x > 0]
    if finite:
      ax.set_xlim(min(finite) / 1.3, max(finite) * 1.3)
      ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16) if min(finite) / 1.3 <= t <= max(finite) * 1.3]
      ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
      ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel('amortised bits per cached coordinate (16 = fp16 cache)')
    ax.set_ylabel(label)
    ax.set_title(f'{title}: {label}' if title else label, fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 5), fontsize=8)
  n = next((int(as_float(r, 'images')) for r in points if math.isfinite(as_float(r, 'images'))), 0)
  fig.suptitle(f'closed-loop generation, {n} images per point: quality against memory', fontsize=11)
  fig.tight_layout(rect=(0, 0.1, 1, 0.95))
  return fig
