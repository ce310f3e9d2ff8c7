"""Does attention error rank methods the way image quality does? Rank correlations over a run's points.

Over the closed-loop points of a run (closed_loop.csv rows, one per (method, setting, budget), the
noise-floor row `full` left out), the teacher-forced `rel_error` of the same point in frontier.csv
(dataset val) against each image metric of METRICS: Spearman's rho (Pearson correlation of average
ranks) and Kendall's tau-b (ties in either variable left out of its pair counts, as scipy's
`kendalltau`), each with a percentile-bootstrap interval over points (points resampled with
replacement; draws where a variable is constant have no correlation and are left out). Signs:
token agreement, PSNR and SSIM grow with quality (agreement with the error shows as a negative
correlation), KL and FID shrink with it (positive). A metric with fewer than 3 points gets no figure:
'n/a (needs >= 3 points)'. Printed by the frontier job (eval/frontier/stages.py) and written to
WORKDIR/rank_correlation.csv.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from eval.engine.results import as_float
from eval.engine.sweep import FULL_BUDGET

METRICS = ('token_agreement', 'kl', 'psnr', 'ssim', 'fid_vs_full')
COLUMNS = ('metric', 'points', 'spearman', 'spearman_ci_low', 'spearman_ci_high', 'kendall',
           'kendall_ci_low', 'kendall_ci_high')
MIN_POINTS = 3
DRAWS = 1000


def spearman(x_XP: np.ndarray, y_XP: np.ndarray) -> np.ndarray:
  """Spearman's rho over the last axis (average ranks for ties; nan where a variable is constant)."""
  rx, ry = scipy_stats.rankdata(x_XP, axis=-1), scipy_stats.rankdata(y_XP, axis=-1)
  rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
  den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def kendall(x_XP: np.ndarray, y_XP: np.ndarray) -> np.ndarray:
  """Kendall's tau-b over the last axis: sum_{i<j} s_x s_y / sqrt(sum s_x^2 sum s_y^2), s = sign of
  the pair's difference (nan where a variable is constant)."""
  sx = np.sign(x_XP[..., :, None] - x_XP[..., None, :])
  sy = np.sign(y_XP[..., :, None] - y_XP[..., None, :])
  den = np.sqrt((sx * sx).sum((-2, -1)) * (sy * sy).sum((-2, -1)))     # both count each pair twice
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(den > 0, (sx * sy).sum((-2, -1)) / np.where(den > 0, den, 1), np.nan)


def correlation(x_P, y_P, level: float = 0.95, draws: int = DRAWS, seed: int = 0) -> dict[str, Any]:
  """{points, spearman, kendall (+ _ci_low, _ci_high)}; None figures below MIN_POINTS points."""
  x, y = np.asarray(x_P, np.float64), np.asarray(y_P, np.float64)
  row: dict[str, Any] = {'points': int(x.size)}
  if x.size < MIN_POINTS:
    return row
  idx = np.random.default_rng(seed).integers(0, x.size, (draws, x.size))
  for name, fn in (('spearman', spearman), ('kendall', kendall)):
    boot = fn(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]) if boot.size else (np.nan, np.nan)
    row.update({name: float(fn(x, y)), f'{name}_ci_low': float(lo), f'{name}_ci_high': float(hi)})
  return row


def points(frontier_rows: Sequence[Mapping[str, Any]], closed_rows: Sequence[Mapping[str, Any]]
           ) -> list[tuple[Mapping[str, Any], float]]:
  """(closed-loop row, teacher-forced rel_error of its point) of every compressed closed-loop point
  with a frontier.csv row of the same method, setting and budget (dataset val)."""
  err = {(r['method'], r['setting'], r['budget']): as_float(r, 'rel_error')
         for r in frontier_rows if r.get('dataset') == 'val'}
  return [(r, err[k]) for r in closed_rows
          if r['budget'] != FULL_BUDGET and (k := (r['method'], r['setting'], r['budget'])) in err
          and np.isfinite(err[k])]


def table(frontier_rows, closed_rows, level: float = 0.95, metrics: Sequence[str] = METRICS,
          draws: int = DRAWS) -> list[dict[str, Any]]:
  """One row (COLUMNS) per metric: rel_error against it over the points where both are known."""
  out = []
  for m in metrics:
    xy = [(e, as_float(r, m)) for r, e in points(frontier_rows, closed_rows)]
    xy = np.array([p for p in xy if np.isfinite(p[1])], np.float64).reshape(-1, 2)
    out.append({'metric': m, **correlation(xy[:, 0], xy[:, 1], level, draws)})
  return out


def text(rows: Sequence[Mapping[str, Any]], level: float = 0.95) -> str:
  """The table as lines for the log."""
  lines = [f'rank correlation of the teacher-forced rel_error with image quality over closed-loop points '
           f'({level:.0%} bootstrap intervals over points; agreement, PSNR, SSIM: higher is better)']
  for r in rows:
    if r.get('spearman') is None:
      lines.append(f"  {r['metric']:16s} n/a (needs >= {MIN_POINTS} points): {r['points']} here")
      continue
    ci = lambda k: f"{r[k]:+.2f} [{r[k + '_ci_low']:+.2f}, {r[k + '_ci_high']:+.2f}]"
    lines.append(f"  {r['metric']:16s} {r['points']:3d} points  Spearman {ci('spearman')}  Kendall {ci('kendall')}")
  return '\n'.join(lines)
