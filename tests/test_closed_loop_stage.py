"""The frontier's closed-loop stage (eval/frontier/stages.py `closed_loop_stage`) on the built-in model:
FID / KID columns, the noise-floor row `full`, amortised bits from frontier.csv, the rank correlation,
and a resume that computes nothing again.

The frontier.csv here is a stub (only the columns the stage reads). Checks: every closed-loop row
holds the distribution columns with low <= estimate <= high and the amortised bits of its frontier.csv
row (empty where frontier.csv has none); the noise-floor row compares two full-cache draws (its FID
is the distance between the feature sets of two sets of generated images, recomputed here) and holds
no per-image columns; the real images have the generated images' labels (the shipped classifier names
them); with 1 compressed point the correlation prints 'n/a (needs >= 3 points)'; a re-run reads
everything back. Faults caught (checked by breaking the code): the amortised bits taken from another
method's row, the noise floor skipped on the built-in model, the real images of other labels.
"""
import os

import numpy as np
import pytest

import var_jax
from compress.core.budget import CacheGeometry
from compress.core.policy import CompressorPolicy
from configs import frontier as frontier_config
from eval.engine import sweep
from eval.engine.results import Paths, write_table
from eval.engine.sweep import COLUMNS as SWEEP_COLUMNS
from eval.frontier import stages
from eval.quality import classifier, closed_loop, distribution, metrics
from eval.report import tb
from eval.report.tb import read_table
from var_jax.kvcache import FullCache


@pytest.mark.slow
def test_closed_loop_stage_on_the_builtin_model(tmp_path, capsys, monkeypatch):
  model = var_jax.load_default()
  geometry = CacheGeometry(model.patch_nums, model.var.cfg.head_dim)
  c = frontier_config.get_config('default')
  c.closed_loop.update({'methods': ('window',), 'budgets': ('10%',), 'labels': tuple(range(12)), 'seeds': (0,),
                        'repeats': 1})
  paths = Paths(str(tmp_path))
  drawn, dispatch = {}, closed_loop.dispatch        # the images of every generation, by policy and seeds
  def recording(model, labels, seeds, gen, policy=None, program=None):
    outs = dispatch(model, labels, seeds, gen, policy, program)
    full = isinstance(program.policy, FullCache) if program is not None else policy is None
    drawn[full, tuple(seeds)] = np.asarray(outs[0].images, np.float32)
    return outs
  monkeypatch.setattr(closed_loop, 'dispatch', recording)
  stub = lambda m, b, x: {'dataset': 'val', 'method': m, 'setting': 'default', 'budget': b, 'rel_error': 0.1,
                          'amortised_bits_per_coordinate': x}
  write_table(paths.frontier, SWEEP_COLUMNS, [stub('window', '10%', 1.6), stub('window', '5%', 0.8),
                                               stub('kivi', '10%', 1.55), stub('full', 'full', 16.0)])
  rows, grids = stages.closed_loop_stage(c, paths, model, geometry, lambda spec, comp: None,
                                   stages.closed_jobs(c, []))
  by = {r['method']: r for r in rows}
  assert set(by) == {'window', 'full'} and set(grids) == {'val/window'}
  window, floor = by['window'], by['full']
  assert float(window['amortised_bits_per_coordinate']) == 1.6
  assert float(floor['amortised_bits_per_coordinate']) == 16.0 and floor['budget'] == 'full'
  for r in (window, floor):
    assert int(r['images']) == 12
    for col in ('fid_vs_full', 'kid_vs_full', 'fid_vs_real', 'kid_vs_real'):
      lo, est, hi = (float(r[f'{col}{s}']) for s in ('_ci_low', '', '_ci_high'))
      assert lo <= est <= hi, (r['method'], col)
  assert floor['token_agreement'] == floor['psnr'] == '' and window['token_agreement'] != ''
  assert float(floor['class_accuracy']) == float(window['full_class_accuracy'])
  # the noise floor: the full cache's images against those of the other seeds, recomputed here
  labels = c.closed_loop.labels
  assert set(drawn) == {(True, (0,)), (True, (closed_loop.NOISE_SEED_OFFSET,)), (False, (0,))}
  feats = [classifier.features(drawn[True, s] * 2 - 1) for s in ((0,), (closed_loop.NOISE_SEED_OFFSET,))]
  assert float(floor['fid_vs_full']) == pytest.approx(distribution.fid(feats[1], feats[0]), rel=1e-5)
  real = closed_loop.real_images(labels, (0,), 32)
  assert (classifier.predict(classifier.shipped()[0], real * 2 - 1) == np.array(labels)).mean() >= 0.9
  assert float(floor['fid_vs_real']) == pytest.approx(
      distribution.fid(feats[0], classifier.features(real * 2 - 1)), rel=1e-5)
  out = capsys.readouterr().out
  assert 'rank correlation' in out and 'n/a (needs >= 3 points)' in out
  corr = read_table(os.path.join(str(tmp_path), 'rank_correlation.csv'))
  assert [r['metric'] for r in corr] == ['token_agreement', 'kl', 'psnr', 'ssim', 'fid_vs_full']
  # a re-run computes nothing again
  boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError('a finished row was recomputed'))
  monkeypatch.setattr(closed_loop, 'evaluate_policy', boom)
  monkeypatch.setattr(closed_loop, 'noise_floor', boom)
  assert stages.closed_loop_stage(c, paths, model, geometry, lambda spec, comp: None,
                                   stages.closed_jobs(c, []))[0] == rows


@pytest.mark.slow
def test_each_point_keeps_its_own_generation(tmp_path):
  """The stage computes a point's metrics while the next point generates: each row and image file must
  still be its own policy's (generated again here, alone). Fault caught (checked by breaking the
  code): the previous point's generation finished under the next point's name."""
  model = var_jax.load_default()
  geometry = CacheGeometry(model.patch_nums, model.var.cfg.head_dim)
  c = frontier_config.get_config('default')
  c.closed_loop.update({'methods': ('window',), 'budgets': ('10%', '5%'), 'labels': tuple(range(12)),
                        'seeds': (0,), 'repeats': 1})
  paths = Paths(str(tmp_path))
  stub = lambda b: {'dataset': 'val', 'method': 'window', 'setting': 'default', 'budget': b, 'rel_error': 0.1,
                    'amortised_bits_per_coordinate': 1.0}
  write_table(paths.frontier, SWEEP_COLUMNS, [stub('10%'), stub('5%')])
  jobs = stages.closed_jobs(c, [])
  rows, _ = stages.closed_loop_stage(c, paths, model, geometry, lambda spec, comp: None, jobs)
  cl = c.closed_loop
  gen = {'cfg': cl.cfg, 'top_k': cl.top_k, 'top_p': cl.top_p}
  ref = closed_loop.generate(model, cl.labels, cl.seeds, gen)
  by = {r['budget']: r for r in rows if r['method'] == 'window'}
  psnrs = []
  for spec, budget in jobs:
    policy = CompressorPolicy(sweep.fitted(spec, budget, geometry, None), None)
    want = closed_loop.generate(model, cl.labels, cl.seeds, gen, policy)['images']
    saved = np.load(os.path.join(paths.samples, f'{tb.tag(f"{spec}@{budget}").replace("/", "_")}.npy'))
    np.testing.assert_array_equal(saved, np.round(want * 255).astype(np.uint8))
    psnr = np.minimum(metrics.psnr(ref['images'], want), closed_loop.PSNR_CAP).mean()
    assert float(by[budget]['psnr']) == pytest.approx(psnr, rel=1e-6)
    psnrs.append(psnr)
  assert psnrs[0] != pytest.approx(psnrs[1], rel=1e-3)       # two different generations
