"""TensorBoard view of a frontier run (tensorboardX), re-created from the result tables.

Layout of `tb/` (open with `tensorboard --logdir WORKDIR/tb`):
  <dataset>/     run per dataset ('val' = held-out captured caches; 'flat', 'var' = hard instances):
                 scalars `frontier/<method>/<setting>` = rel_error and `bits_per_coordinate/<method>/
                 <setting>` = bits actually kept, with step = budget_step (the requested budget in
                 bits per cached coordinate x 1000, so 16000 = the fp16 cache), `pareto/all` (step =
                 kept bits per coordinate x 1000), the figure `frontier` and images `samples/<method>`.
  closed_loop/   scalars `closed_loop/<metric>/<method>/<setting>` (step = budget_step).
  hparams/<point>/  one hparams session per point (method, setting, budget, ...; metrics rel_error,
                 bits_per_coordinate, fraction_of_fp16).
Tags use only [-/\\w.] (others become '_': `tag`). The directory is derived data: it is rebuilt in
`tb.partial/` and swapped in when the tables changed (digest in `tb/.digest`), never appended to.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
import tensorboardX

from eval.results import as_float

DIGEST = '.digest'
CLOSED_LOOP_METRICS = ('token_agreement', 'kl', 'psnr', 'ssim', 'cache_bytes_counted')


def tag(*parts: str) -> str:
  return '/'.join(re.sub(r'[^-\w.]', '_', str(p)) for p in parts)


def budget_step(budget_bits: float, coordinates: int) -> int:
  """Integer TensorBoard step of a budget: bits per cached coordinate x 1000."""
  return int(round(1000 * float(budget_bits) / coordinates))


def digest(paths: Sequence[str]) -> str:
  sha = hashlib.sha256()
  for p in sorted(paths):
    sha.update(p.encode())
    if os.path.exists(p):
      with open(p, 'rb') as f:
        sha.update(f.read())
  return sha.hexdigest()


def up_to_date(tb_dir: str, key: str) -> bool:
  path = os.path.join(tb_dir, DIGEST)
  return os.path.exists(path) and open(path).read().strip() == key


def write(tb_dir: str, key: str, rows: Sequence[Mapping[str, Any]], pareto: Sequence[Mapping[str, Any]],
          figures: Mapping[str, Any], images: Mapping[str, np.ndarray],
          closed: Sequence[Mapping[str, Any]], coordinates: Mapping[str, int]) -> None:
  """Rebuilds `tb_dir` from the tables. figures: dataset -> matplotlib figure; images: dataset/name ->
  uint8 HWC grid; coordinates: dataset -> `CacheGeometry.coordinates` (closed loop: 'val')."""
  tmp = f'{tb_dir.rstrip(os.sep)}.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  for dataset in sorted({r['dataset'] for r in rows} | set(figures)):
    w = tensorboardX.SummaryWriter(os.path.join(tmp, dataset))
    pts = sorted((r for r in rows if r['dataset'] == dataset), key=lambda r: as_float(r, 'budget_bits'))
    for r in pts:
      step = budget_step(as_float(r, 'budget_bits'), coordinates[dataset])
      w.add_scalar(tag('frontier', r['method'], r['setting']), as_float(r, 'rel_error'), step)
      w.add_scalar(tag('bits_per_coordinate', r['method'], r['setting']),
                   as_float(r, 'bits_per_coordinate'), step)
    for r in (p for p in pareto if p['dataset'] == dataset and p['frontier'] == 'all'):
      w.add_scalar('pareto/all', as_float(r, 'rel_error'),
                   int(round(1000 * as_float(r, 'bits_per_coordinate'))))
    if dataset in figures:
      w.add_figure('frontier', figures[dataset], 0, close=False)
    for name, img in sorted(images.items()):
      if name.split('/', 1)[0] == dataset:
        w.add_image(tag('samples', name.split('/', 1)[1]), img, 0, dataformats='HWC')
    w.close()
  if closed:
    w = tensorboardX.SummaryWriter(os.path.join(tmp, 'closed_loop'))
    for r in sorted(closed, key=lambda r: as_float(r, 'budget_bits')):
      step = budget_step(as_float(r, 'budget_bits'), coordinates['val'])
      for m in CLOSED_LOOP_METRICS:
        w.add_scalar(tag('closed_loop', m, r['method'], r['setting']), as_float(r, m), step)
    w.close()
  hp = tensorboardX.SummaryWriter(os.path.join(tmp, 'hparams'))
  for r in rows:
    name = tag('_'.join([r['dataset'], r['method'], r['setting'], r['budget']]))
    hparams = {k: str(r[k]) for k in ('dataset', 'method', 'family', 'setting', 'budget', 'oracle')}
    metrics = {k: as_float(r, k) for k in ('rel_error', 'bits_per_coordinate', 'fraction_of_fp16')}
    hp.add_hparams(hparams, metrics, name=name)
  hp.close()
  with open(os.path.join(tmp, DIGEST), 'w') as f:
    f.write(key + '\n')
  if os.path.exists(tb_dir):
    stale = f'{tb_dir.rstrip(os.sep)}.stale'
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(tb_dir, stale)
    shutil.rmtree(stale)
  os.replace(tmp, tb_dir)
