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

from eval.results import as_float  # noqa: E402

MARKERS = 'osD^v<>pPX*h'
ERROR_FLOOR = 1e-6      # errors of exactly 0 (full cache in float32) are drawn here on log axes


def _family_colours(families: Sequence[str]) -> dict[str, Any]:
  cmap = plt.get_cmap('tab10')
  return {f: cmap(i % 10) for i, f in enumerate(sorted(families))}


def frontier_figure(rows: Sequence[Mapping[str, Any]], pareto: Sequence[Mapping[str, Any]],
                    curves: Sequence[Mapping[str, Any]] = (), title: str = '') -> plt.Figure:
  """One panel per dataset: every method's points (colour = family, marker = method, hollow = oracle)
  joined in bits order, the all-methods Pareto frontier (black steps) and bound curves (grey).

  curves: {'dataset', 'label', 'bits_per_coordinate', 'rel_error'} arrays (e.g. rank / RD bounds).
  """
  datasets = sorted({r['dataset'] for r in rows} | {c['dataset'] for c in curves})
  fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(7.5 * max(len(datasets), 1), 5.5),
                           squeeze=False)
  points = [r for r in rows if r['family'] != 'bound']
  colours = _family_colours({r['family'] for r in points})
  methods = sorted({(r['family'], r['method']) for r in points})
  marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(m for _, m in methods)}
  y = lambda r: max(as_float(r, 'rel_error'), ERROR_FLOOR)
  for ax, dataset in zip(axes[0], datasets):
    series = collections.defaultdict(list)
    for r in points:
      if r['dataset'] == dataset:
        series[(r['family'], r['method'], r['setting'])].append(r)
    for (fam, method, setting), pts in sorted(series.items()):
      pts = sorted(pts, key=lambda r: as_float(r, 'bits'))
      oracle = str(pts[0]['oracle']).lower() == 'true'
      label = method if setting == 'default' else f'{method}({setting})'
      ax.plot([as_float(r, 'bits_per_coordinate') for r in pts], [y(r) for r in pts], '-',
              color=colours[fam], marker=marker[method], alpha=0.85, lw=1,
              mfc='none' if oracle else colours[fam], label=label + (' [oracle]' if oracle else ''))
    front = sorted((r for r in pareto if r['dataset'] == dataset and r['frontier'] == 'all'),
                   key=lambda r: as_float(r, 'bits'))
    if front:
      ax.step([as_float(r, 'bits_per_coordinate') for r in front], [y(r) for r in front], 'k-',
              where='post', lw=2.5, alpha=0.5, label='Pareto frontier')
    xs = [as_float(r, 'bits_per_coordinate') for r in points if r['dataset'] == dataset]
    x_min = min([x for x in xs if x > 0], default=1e-3) / 30    # bounds drawn over the points' range
    for c, style in zip((c for c in curves if c['dataset'] == dataset), itertools.cycle(['--', ':', '-.'])):
      bpc, err = np.asarray(c['bits_per_coordinate'], float), np.asarray(c['rel_error'], float)
      ok = (bpc >= x_min) & np.isfinite(err) & (err > 0)    # a zero bound has no place on log axes
      ax.plot(bpc[ok], err[ok], style, color='0.35', lw=1.8, label=c['label'])
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('bits per cached coordinate (16 = fp16 cache)')
    ax.set_ylabel('aggregate relative L2 error of attention outputs')
    ax.set_title(f'{title} [{dataset}]' if title else dataset)
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
