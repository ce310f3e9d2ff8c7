r"""TensorBoard view of a frontier run (tensorboardX), re-created from the result tables.

  tensorboard --logdir WORKDIR/tb        then open http://localhost:6006/?smoothing=0#timeseries
  python -m eval.report.tb WORKDIR [--force]    rebuilds WORKDIR/tb from the tables (e.g. a run of an older layout)

The first screen (Time Series) is the frontier: every method's error against memory on one chart. A run
is a curve (one colour on every chart); a tag is a chart overlaying every run that holds it. Guide with
the screenshot: docs/tensorboard.md.
x: TensorBoard steps are integers, so step = round(1000 x bits per cached coordinate), amortised as in
frontier.png and pareto.csv (`x_of`; 1500 = 1.5 bits, 16000 = the fp16 cache); one point per step.
Runs (directories of tb/):
  <family>/<method>[.<setting>]   a method (eviction/snapkv, reference/full, ...): its points on the
                                  frontier and family charts, its closed-loop metrics, its sample grid.
  pareto                          the Pareto frontier of the chart's deployable methods, a staircase (a
                                  corner 1 step before each next point): pareto.csv 'all' on
                                  frontier/<dataset>, 'family:<f>' on per_family/<dataset>/<f>.
  bound/<name>.<setting>          a bound (bounds.csv with the bound rows of frontier.csv), drawn only
  reference/<name>.<setting>      against the families in its `applies_to`; a reference (applies_to
                                  'reference', not a bound) against every method.
  figures                         the matplotlib figure (image `plots/frontier/<dataset>`).
Scalar tags (y = aggregate relative L2 error of attention outputs unless named), grouped by TensorBoard
by the text before the first '/' and ordered by name, so that the frontier comes first (Time Series
opens the first two groups; no group name is a prefix of another, which the Scalars tab misorders):
  frontier/<dataset>              every method, pareto and the curves that hold for every method.
  frontier/<dataset>/<bounds>     per set of families a bound is restricted to (the rank bound: caches of
                                  full-precision entries): those methods, their pareto, those bounds.
  generation/<metric>             closed loop (closed_loop.csv): token_agreement, kl, psnr, ssim against
                                  full-cache generation; x of the teacher-forced point with the same
                                  method, setting and budget (else 16 x cache_bytes_counted / fp16_cache_bytes).
  per_family/<dataset>/<family>   a family's methods, its pareto and the curves that apply to it.
Every tag carries a description (shown by the Scalars tab) of its x encoding.
Images: `plots/frontier/<dataset>` (run figures) and `samples/<dataset>` (full cache | each budget, in
the method's run). hparams: one session per point in the separate logdir WORKDIR/tb_hparams, out of the
main run list (tensorboard --logdir WORKDIR/tb_hparams).
Smoothing: TensorBoard's default 0.6 bends a 3-point curve and rounds the staircase; the URL parameter
`?smoothing=0` (Time Series, then kept by the browser) or `#scalars&_smoothingWeight=0` (Scalars) sets 0.
Tags and run names use only [-/\w.] (others become '_': `tag`). Both logdirs are derived data: rebuilt
in `*.partial/` and swapped in when the tables or LAYOUT changed (`digest`, in `.digest`), never
appended to; tb/.digest is written last.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import math
import os
import re
import shutil
import sys
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorboardX
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.types_pb2 import DT_FLOAT

from eval.report import pareto as pareto_lib
from eval.engine.results import as_float, Paths, x_of

DIGEST = '.digest'
LAYOUT = 2                     # part of the digest: a new layout rebuilds every run's tb/ once
STEPS_PER_BIT = 1000
CLOSED_LOOP_METRICS = ('fid_vs_full', 'kid_vs_full', 'fid_vs_real', 'token_agreement', 'kl', 'psnr', 'ssim',
                       'class_accuracy')
# the closed loop's distances to the full cache, drawn with the noise floor (two full-cache draws)
NOISE_FLOOR_METRICS = ('fid_vs_full', 'kid_vs_full')
NOISE_FLOOR_RUN = 'reference/noise_floor'
QUALITY_FIGURE = 'quality'     # the closed loop's quality_frontier.png: image plots/frontier/quality
FIGURES_RUN = 'figures'
PARETO_RUN = 'pareto'
EVERY_METHOD = ('', 'all', 'reference')   # bounds.csv applies_to of a curve drawn against every method
X = (f'x = step / {STEPS_PER_BIT} = amortised bits per cached coordinate (4000 = 4 bits, 16000 = the fp16 '
     'cache). Set smoothing to 0 (URL ?smoothing=0).')
DESCRIPTIONS = {
    'frontier': 'Aggregate relative L2 error of attention outputs: every method (a run each), the Pareto '
                'frontier of the deployable ones (run pareto, a staircase) and the bound or reference curves '
                'that hold for them (runs bound/..., reference/...). ' + X,
    'generation': 'Closed-loop generation against the full cache with the same labels and seeds '
                  '(closed_loop.csv), at the x of the teacher-forced point. ' + X,
    'per_family': 'One family: its methods, its Pareto frontier (run pareto) and the curves that apply to '
                  'it. ' + X,
}


def tag(*parts: str) -> str:
  return '/'.join(re.sub(r'[^-\w.]', '_', str(p)) for p in parts)


def step_of(bits_per_coordinate: float) -> int:
  """Integer TensorBoard step of an x value: bits per cached coordinate x 1000."""
  return int(round(STEPS_PER_BIT * float(bits_per_coordinate)))


def run_name(family: str, method: str, setting: str = 'default') -> str:
  """Run of a method: '<family>/<method>' or '<family>/<method>.<setting>'."""
  return tag(family, method if setting in ('', 'default') else f'{method}.{setting}')


def hparams_dir(tb_dir: str) -> str:
  """The separate hparams logdir next to `tb_dir` (WORKDIR/tb -> WORKDIR/tb_hparams)."""
  return f'{tb_dir.rstrip(os.sep)}_hparams'


def digest(paths: Sequence[str]) -> str:
  sha = hashlib.sha256(f'tb layout {LAYOUT}\n'.encode())
  for p in sorted(paths):
    sha.update(p.encode())
    if os.path.exists(p):
      with open(p, 'rb') as f:
        sha.update(f.read())
  return sha.hexdigest()


def up_to_date(tb_dir: str, key: str) -> bool:
  """Both logdirs were written from the tables with digest `key`."""
  def ok(d):
    path = os.path.join(d, DIGEST)
    return os.path.exists(path) and open(path).read().strip() == key
  return ok(tb_dir) and ok(hparams_dir(tb_dir))


def read_table(path: str) -> list[dict[str, str]]:
  """Rows of a CSV table ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _points(pts: Iterable[tuple[float, float]]) -> list[tuple[int, float]]:
  """(step, value) sorted by step, finite values only, one per step (TensorBoard drops a series' points
  at steps >= a step written again): the lowest value of the points within that 0.001 bit."""
  out: dict[int, float] = {}
  for x, y in pts:
    if math.isfinite(x) and math.isfinite(y):
      out[step_of(x)] = min(y, out.get(step_of(x), math.inf))
  return sorted(out.items())


def _staircase(pts: list[tuple[int, float]]) -> list[tuple[int, float]]:
  """Pareto points with a corner one step before each next point (the error reachable with at most
  x bits is the last point's until the next point)."""
  out = []
  for i, (s, y) in enumerate(pts):
    if i and s - 1 > out[-1][0]:
      out.append((s - 1, out[-1][1]))
    out.append((s, y))
  return out


def curve_run(name: str, setting: str, applies_to: str = '') -> str:
  """Run of a bounds.csv curve: 'reference/<name>.<setting>' for a reference, else 'bound/...'."""
  return tag('reference' if applies_to == 'reference' else 'bound', f'{name}.{setting}')


def _families_of(applies_to: str) -> frozenset[str] | None:
  """The families a curve is drawn against; None: every method (a bound for all, or a reference)."""
  return None if applies_to in EVERY_METHOD else frozenset(applies_to.split())


def _pareto_of(rows: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
  """(x, error) of the Pareto frontier of `rows` (as pareto.csv's 'all', over these rows only)."""
  col = 'amortised_bits' if all(math.isfinite(as_float(r, 'amortised_bits')) for r in rows) else 'bits'
  return [(x_of(r), as_float(r, 'rel_error')) for r in pareto_lib.frontier_rows(rows, x=col)
          if r['frontier'] == 'all']


def series(rows: Sequence[Mapping[str, Any]], pareto: Sequence[Mapping[str, Any]],
           bounds: Sequence[Mapping[str, Any]], closed: Sequence[Mapping[str, Any]]
           ) -> dict[tuple[str, str], list[tuple[int, float]]]:
  """{(run, scalar tag): [(step, value), ...]} of the layout (see the module docstring)."""
  xy = lambda r: (x_of(r), as_float(r, 'rel_error'))
  curves: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)  # (dataset, run)
  applies: dict[tuple[str, str], frozenset[str] | None] = {}
  def add_curve(dataset, run, r, applies_to):
    curves[dataset, run].append(xy(r))
    applies.setdefault((dataset, run), _families_of(applies_to))
  for r in bounds:                                   # first: bounds.csv says where a curve applies
    applies_to = r.get('applies_to') or 'all'
    add_curve(r['dataset'], curve_run(r['bound'], r['setting'], applies_to), r, applies_to)
  methods = collections.defaultdict(list)            # (dataset, run) -> [(x, y)]
  family_of, rows_of = {}, collections.defaultdict(list)
  for r in rows:
    if r['family'] == 'bound':                       # frontier.csv's bound rows: the same curve, at the budgets
      add_curve(r['dataset'], curve_run(r['method'], r['setting']), r, 'all')
      continue
    run = run_name(r['family'], r['method'], pareto_lib.curve_setting(r))
    methods[r['dataset'], run].append(xy(r))
    family_of[run] = r['family']
    rows_of[r['dataset'], r['family']].append(r)
  out: dict[tuple[str, str], list[tuple[int, float]]] = {}
  def chart(t, dataset, families, front, curve_filter):
    for (d, run), pts in methods.items():
      if d == dataset and (families is None or family_of[run] in families):
        out[run, t] = _points(pts)
    out[PARETO_RUN, t] = _staircase(_points(front))
    for (d, run), pts in curves.items():
      if d == dataset and curve_filter(applies[d, run]):
        out[run, t] = _points(pts)
  datasets = sorted({r['dataset'] for r in rows} | {d for d, _ in curves})
  for d in datasets:
    chart(tag('frontier', d), d, None, [xy(p) for p in pareto if p['dataset'] == d and p['frontier'] == 'all'],
          lambda fams: fams is None)
    restricted = collections.defaultdict(set)        # families -> names of the curves that hold only there
    for (dd, run), fams in applies.items():
      if dd == d and fams is not None:
        restricted[fams].add(run.split('/', 1)[1].split('.', 1)[0])
    for fams, names in sorted(restricted.items(), key=lambda kv: sorted(kv[1])):
      mine = [r for f in fams for r in rows_of.get((d, f), [])]
      chart(tag('frontier', d, '+'.join(sorted(names))), d, fams, _pareto_of(mine),
            lambda f, fams=fams: f == fams)
    for family in sorted({f for dd, f in rows_of if dd == d} - {'reference'}):
      chart(tag('per_family', d, family), d, {family},
            [xy(p) for p in pareto if p['dataset'] == d and p['frontier'] == f'family:{family}'],
            lambda fams, family=family: fams is None or family in fams)
  out.update(generation_series(rows, closed))
  return {k: v for k, v in out.items() if v}


def generation_series(rows: Sequence[Mapping[str, Any]], closed: Sequence[Mapping[str, Any]]
                      ) -> dict[tuple[str, str], list[tuple[int, float]]]:
  """The `generation/<metric>` charts: each closed-loop point at the x of its teacher-forced point (a
  tuned method's points on one run, as on the frontier); on the charts of distances to the full cache
  the noise floor (closed_loop.csv's row `full`: two full-cache draws) as a flat run across the points' x range."""
  x_tf = {(r['method'], r['setting'], r['budget']): x_of(r) for r in rows if r['dataset'] == 'val'}
  row_tf = {(r['method'], r['setting'], r['budget']): r for r in rows if r['dataset'] == 'val'}
  points = [r for r in closed if r['method'] != 'full']
  floor = [r for r in closed if r['method'] == 'full']
  out: dict[tuple[str, str], list[tuple[int, float]]] = {}
  xs = []
  for m in CLOSED_LOOP_METRICS:
    cl = collections.defaultdict(list)
    for r in points:
      k = (r['method'], r['setting'], r['budget'])
      fp16 = as_float(r, 'fp16_cache_bytes')
      x = x_tf.get(k, 16 * as_float(r, 'cache_bytes_counted') / fp16 if fp16 > 0 else math.nan)
      setting = pareto_lib.curve_setting(row_tf[k]) if k in row_tf else r['setting']
      cl[run_name(r['family'], r['method'], setting)].append((x, as_float(r, m)))
      xs.append(x)
    for run, pts in cl.items():
      out[run, tag('generation', m)] = _points(pts)
  xs = [x for x in xs if math.isfinite(x) and x > 0]
  for m in NOISE_FLOOR_METRICS:
    for r in floor:
      if xs and math.isfinite(as_float(r, m)):
        out[NOISE_FLOOR_RUN, tag('generation', m)] = _points([(min(xs), as_float(r, m)), (max(xs), as_float(r, m))])
  return out


def _method_runs(rows: Sequence[Mapping[str, Any]], closed: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """{method spec as in the sample grids' names ('m' or 'm(setting)'): run}."""
  out = {}
  for r in list(rows) + list(closed):
    spec = r['method'] if r['setting'] in ('', 'default') else f"{r['method']}({r['setting']})"
    out[spec] = run_name(r['family'], r['method'], r['setting'])
  for r in rows:          # a method's own name (the closed loop's grids): the run of its frontier curve
    out.setdefault(r['method'], run_name(r['family'], r['method'], pareto_lib.curve_setting(r)))
  for r in closed:
    out.setdefault(r['method'], run_name(r['family'], r['method'], r['setting']))
  return out


def _swap(tmp: str, dst: str) -> None:
  if os.path.exists(dst):
    stale = f'{dst.rstrip(os.sep)}.stale'
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(dst, stale)
    shutil.rmtree(stale)
  os.replace(tmp, dst)


def write(tb_dir: str, key: str, rows: Sequence[Mapping[str, Any]], pareto: Sequence[Mapping[str, Any]],
          bounds: Sequence[Mapping[str, Any]], closed: Sequence[Mapping[str, Any]],
          figures: Mapping[str, Any], images: Mapping[str, np.ndarray]) -> None:
  """Rebuilds `tb_dir` and `hparams_dir(tb_dir)` from the tables (rows of frontier.csv, pareto.csv,
  bounds.csv, closed_loop.csv). figures: dataset -> matplotlib figure or uint8 HWC image; images:
  '<dataset>/<method spec>' -> uint8 HWC sample grid."""
  tmp = f'{tb_dir.rstrip(os.sep)}.partial'
  hp_dir = hparams_dir(tb_dir)
  hp_tmp = f'{hp_dir}.partial'
  for d in (tmp, hp_tmp):
    shutil.rmtree(d, ignore_errors=True)
  writers: dict[str, tensorboardX.SummaryWriter] = {}
  def writer(run):
    if run not in writers:
      writers[run] = tensorboardX.SummaryWriter(os.path.join(tmp, *run.split('/')))
    return writers[run]
  for (run, t), pts in sorted(series(rows, pareto, bounds, closed).items()):
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name='scalars'),
                           summary_description=DESCRIPTIONS[t.split('/', 1)[0]])
    for i, (step, value) in enumerate(pts):      # the first event's metadata names plugin and description
      v = Summary.Value(tag=t, tensor=TensorProto(dtype=DT_FLOAT, float_val=[value], tensor_shape={}),
                        metadata=None if i else meta)      # float tensor: both data loaders read it
      writer(run)._get_file_writer().add_summary(Summary(value=[v]), step)  # pylint: disable=protected-access
  for name, fig in sorted(figures.items()):
    if isinstance(fig, np.ndarray):
      writer(FIGURES_RUN).add_image(tag('plots', 'frontier', name), fig, 0, dataformats='HWC')
    else:
      writer(FIGURES_RUN).add_figure(tag('plots', 'frontier', name), fig, 0, close=False)
  runs = _method_runs(rows, closed)
  for name, img in sorted(images.items()):
    dataset, spec = name.split('/', 1)
    writer(runs.get(spec, tag('other', spec))).add_image(tag('samples', dataset), img, 0, dataformats='HWC')
  for w in writers.values():
    w.close()
  os.makedirs(tmp, exist_ok=True)
  hp = tensorboardX.SummaryWriter(hp_tmp)
  for r in rows:
    name = tag('_'.join([r['dataset'], r['method'], r['setting'], r['budget']]))
    hparams = {k: str(r[k]) for k in ('dataset', 'method', 'family', 'setting', 'budget', 'oracle')}
    metrics = {k: as_float(r, k) for k in ('rel_error', 'bits_per_coordinate', 'amortised_bits_per_coordinate',
                                           'fraction_of_fp16') if r.get(k) not in (None, '')}
    hp.add_hparams(hparams, metrics, name=name)
  hp.close()
  for d in (tmp, hp_tmp):
    with open(os.path.join(d, DIGEST), 'w') as f:
      f.write(key + '\n')
  _swap(hp_tmp, hp_dir)
  _swap(tmp, tb_dir)            # last: tb/.digest marks the pair complete


def rebuild(workdir: str, force: bool = False) -> bool:
  """Rebuilds WORKDIR/tb (and tb_hparams) from the run's tables, frontier.png and samples_*.png as
  `eval.frontier` would; returns False when they were up to date (and not `force`). Holds the workdir's
  lock (train/workdir_lock.py): while a run holds it, `WorkdirBusy` (the run rebuilds tb/ when it ends)."""
  from train import workdir_lock  # pylint: disable=g-import-not-at-top
  paths = Paths(workdir)
  if not os.path.exists(paths.frontier):
    raise FileNotFoundError(f'{paths.frontier} does not exist: not a finished eval.frontier run')
  with workdir_lock.hold(workdir):
    return _rebuild(paths, workdir, force)


def _rebuild(paths: Paths, workdir: str, force: bool) -> bool:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  key = digest([paths.frontier, paths.closed, paths.bounds])
  if not force and up_to_date(paths.tb, key):
    return False
  rows, closed = read_table(paths.frontier), read_table(paths.closed)
  datasets = sorted({r['dataset'] for r in rows})
  figures = {}
  if os.path.exists(paths.png):
    png = np.asarray(Image.open(paths.png).convert('RGB'))
    figures = {datasets[0] if len(datasets) == 1 else 'all': png}
  if os.path.exists(paths.quality_png):
    figures[QUALITY_FIGURE] = np.asarray(Image.open(paths.quality_png).convert('RGB'))
  grids = {}
  for spec in _method_runs(rows, closed):
    path = os.path.join(workdir, f'samples_{tag(spec).replace("/", "_")}.png')
    if os.path.exists(path):                            # saved at scale 2 (nearest)
      grids[f'val/{spec}'] = np.asarray(Image.open(path).convert('RGB'))[::2, ::2]
  write(paths.tb, key, rows, read_table(paths.pareto), read_table(paths.bounds), closed, figures, grids)
  return True


def main(argv: Sequence[str]) -> None:
  from var_jax import cli  # pylint: disable=g-import-not-at-top
  ap = cli.ArgumentParser(prog='python -m eval.report.tb',
                               description='Rebuilds WORKDIR/tb (and tb_hparams) from a frontier run\'s tables.')
  ap.add_argument('workdir', help='a finished eval.frontier run directory')
  ap.add_argument('--force', action='store_true', help='rebuild even when the logs are up to date')
  args = ap.parse_args(argv)
  tb_dir = os.path.join(args.workdir, 'tb')
  done = rebuild(args.workdir, force=args.force)
  print(f'{"rebuilt" if done else "up to date:"} {tb_dir}\nTensorBoard: tensorboard --logdir {tb_dir}  '
        '(open http://localhost:6006/?smoothing=0#timeseries)')


if __name__ == '__main__':
  from var_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run_main(lambda: main(sys.argv[1:]))
