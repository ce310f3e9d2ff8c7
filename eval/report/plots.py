"""Figures of the frontier run: error vs bits per coordinate (log-log) and image grids (matplotlib Agg)."""
from __future__ import annotations

import collections
import itertools
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from eval.report import pareto as pareto_lib  # noqa: E402
from eval.engine.results import as_float, x_of  # noqa: E402

MARKERS = 'osD^v<>pPX*h'
ERROR_FLOOR = 1e-6      # errors of exactly 0 (full cache in float32) are drawn here on log axes


def _family_colours(families: Sequence[str]) -> dict[str, Any]:
  cmap = plt.get_cmap('tab10')
  return {f: cmap(i % 10) for i, f in enumerate(sorted(families))}


def panels_of(rows: Sequence[Mapping[str, Any]], curves: Sequence[Mapping[str, Any]]) -> list[dict]:
  """One panel per dataset with every method and the curves that hold for all of them; plus, per
  dataset with a curve restricted to some families (`curve['families']`), a panel of those families
  with that curve. A bound is thus drawn only against the methods it bounds."""
  out = []
  for d in sorted({r['dataset'] for r in rows} | {c['dataset'] for c in curves}):
    mine = [c for c in curves if c['dataset'] == d]
    out.append({'dataset': d, 'families': None, 'title': 'every method',
                'curves': [c for c in mine if not c.get('families')]})
    for fams in sorted({tuple(c['families']) for c in mine if c.get('families')}):
      out.append({'dataset': d, 'families': fams, 'title': 'caches of full-precision entries',
                  'curves': [c for c in mine if tuple(c.get('families') or ()) == fams]})
  return out


def frontier_figure(rows: Sequence[Mapping[str, Any]], pareto: Sequence[Mapping[str, Any]],
                    curves: Sequence[Mapping[str, Any]] = (), title: str = '') -> plt.Figure:
  """Panels (`panels_of`): each method's points (colour = family, marker = method, hollow = oracle)
  joined in bits order against amortised bits per coordinate, the Pareto frontier of the panel's
  methods (black steps: pareto.csv 'all' on a panel of every method) and its curves (grey).

  curves: {'dataset', 'label', 'bits_per_coordinate', 'rel_error', optional 'families'} (bounds and
  references; 'families': the only families a bound holds for).
  """
  panels = panels_of(rows, curves)
  fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7.5 * max(len(panels), 1), 5.5), squeeze=False)
  points = [r for r in rows if r['family'] != 'bound']
  colours = _family_colours({r['family'] for r in points})
  methods = sorted({(r['family'], r['method']) for r in points})
  marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(m for _, m in methods)}
  y = lambda r: max(as_float(r, 'rel_error'), ERROR_FLOOR)
  for ax, panel in zip(axes[0], panels):
    dataset, fams = panel['dataset'], panel['families']
    mine = [r for r in points if r['dataset'] == dataset and (fams is None or r['family'] in fams)]
    series = collections.defaultdict(list)
    for r in mine:
      series[(r['family'], r['method'], pareto_lib.curve_setting(r))].append(r)
    for (fam, method, setting), pts in sorted(series.items()):
      pts = sorted(pts, key=x_of)
      oracle = str(pts[0]['oracle']).lower() == 'true'
      label = (method if setting == 'default' else f'{method} (best on dev)' if setting == pareto_lib.BEST
               else f'{method}({setting})')
      ax.plot([x_of(r) for r in pts], [y(r) for r in pts], '-',
              color=colours[fam], marker=marker[method], alpha=0.85, lw=1,
              mfc='none' if oracle else colours[fam], label=label + (' [oracle]' if oracle else ''))
    if fams is None:
      front = [r for r in pareto if r['dataset'] == dataset and r['frontier'] == 'all']
    else:
      front = pareto_lib.frontier_rows([r for r in mine if r.get('deployable') is not None])
      front = [r for r in front if r['frontier'] == 'all']
    front = sorted(front, key=x_of)
    if front:
      ax.step([x_of(r) for r in front], [y(r) for r in front], 'k-',
              where='post', lw=2.5, alpha=0.5, label='Pareto frontier')
    xs = [x_of(r) for r in mine]
    x_min = min([x for x in xs if x > 0], default=1e-3) / 30    # curves drawn over the points' range
    y_min = min([y(r) for r in mine], default=ERROR_FLOOR) / 100
    for c, style in zip(panel['curves'], itertools.cycle(['--', ':', '-.'])):
      bpc, err = np.asarray(c['bits_per_coordinate'], float), np.asarray(c['rel_error'], float)
      ok = (bpc >= x_min) & np.isfinite(err) & (err >= y_min)   # zero has no place on log axes
      ax.plot(bpc[ok], err[ok], style, color='0.35', lw=1.8, label=c['label'])
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('amortised bits per cached coordinate (16 = fp16 cache)')
    ax.set_ylabel('aggregate relative L2 error of attention outputs')
    name = f'{dataset}: {panel["title"]}'
    ax.set_title(f'{title} [{name}]' if title else name)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc='lower left')
  fig.tight_layout()
  return fig


def image_grid(columns: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """uint8 (H', W', 3) grid: column j = `columns[j]` (B, H, W, 3) in [0, 1], one row per image."""
  cols = [np.clip(np.asarray(c, np.float32), 0, 1) for c in columns]
  B, H, W, _ = cols[0].shape
  grid = np.ones((B * (H + pad) + pad, len(cols) * (W + pad) + pad, 3), np.float32)
  for j, c in enumerate(cols):
    for i in range(B):
      grid[pad + i * (H + pad):pad + i * (H + pad) + H, pad + j * (W + pad):pad + j * (W + pad) + W] = c[i]
  return np.round(grid * 255).astype(np.uint8)


def save_png(image_HWC: np.ndarray, path: str, scale: int = 1) -> None:
  img = Image.fromarray(image_HWC)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)
