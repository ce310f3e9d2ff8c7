"""Which points the closed loop generates (eval/frontier/stages.py `closed_jobs`) and how its results are
drawn (eval/report/tb.py `generation_series`, eval/report/quality_plot.py).

Checks: a tuned method runs at the setting chosen on dev for each budget (read from the tuned sweep
jobs, not its default); a learned method only at the budgets it is trained at
(learned.method_budgets); 'all' is every registered compressor but the oracles; the TensorBoard
charts put a tuned method's points on one run and draw the noise floor flat across the x range;
the quality figure has one panel per metric present. Faults caught (checked by breaking the code):
the default setting of a tuned method used, composed_learned generated at a budget it was not
trained at, an oracle in 'all'.
"""
import compress
from configs import frontier as frontier_config
from eval.engine.sweep import MethodSpec
from eval.frontier import stages
from eval.report import quality_plot, tb


def test_closed_jobs_follow_dev_choices_and_trained_budgets():
  c = frontier_config.get_config('default')
  c.closed_loop.methods = ('kivi', 'composed_learned', 'scalekv')
  c.closed_loop.budgets = ('5%', '25%')
  tuned = [(MethodSpec.parse('kivi(bit_width=2)'), '5%'), (MethodSpec.parse('kivi(bit_width=4)'), '25%'),
           (MethodSpec.parse('scalekv'), '5%')]
  jobs = [(str(s), b) for s, b in stages.closed_jobs(c, tuned)]
  assert jobs == [('kivi(bit_width=2)', '5%'), ('kivi(bit_width=4)', '25%'), ('composed_learned', '5%'),
                  ('scalekv', '5%'), ('scalekv', '25%')]
  assert '25%' not in c.learned.method_budgets['composed_learned']
  c.closed_loop.methods = ('all',)
  names = {s.name for s in stages.closed_specs(c)}
  assert names == {n for n in compress.available() if not compress.REGISTRY[n].oracle}
  assert 'oracle' in compress.available() and 'oracle' not in names


def _closed(method, family, setting, budget, fid, acc=0.5):
  return {'method': method, 'family': family, 'setting': setting, 'budget': budget, 'images': '240',
          'fid_vs_full': fid, 'fid_vs_full_ci_low': fid * 0.5, 'fid_vs_full_ci_high': fid * 1.5,
          'token_agreement': acc, 'fp16_cache_bytes': 100.0, 'cache_bytes_counted': 10.0}


def _row(method, family, setting, budget, x, selection=''):
  return {'dataset': 'val', 'method': method, 'family': family, 'setting': setting, 'budget': budget,
          'amortised_bits_per_coordinate': x, 'rel_error': 0.1, 'selection': selection, 'oracle': 'False'}


def test_generation_charts_and_quality_figure():
  rows = [_row('kivi', 'quantization', 'bit_width=2', '5%', 0.8, 'best on dev'),
          _row('kivi', 'quantization', 'bit_width=4', '25%', 4.0, 'best on dev'),
          _row('full', 'reference', 'default', 'full', 16.0)]
  closed = [_closed('kivi', 'quantization', 'bit_width=2', '5%', 3.0),
            _closed('kivi', 'quantization', 'bit_width=4', '25%', 0.5),
            _closed('full', 'reference', 'default', 'full', 1.0, acc='')]
  series = tb.generation_series(rows, closed)
  kivi = [run for run, t in series if t == 'generation/fid_vs_full' and 'kivi' in run]
  assert len(kivi) == 1                         # both settings on the run of "kivi (best on dev)"
  assert [v for _, v in series[kivi[0], 'generation/fid_vs_full']] == [3.0, 0.5]
  floor = series[tb.NOISE_FLOOR_RUN, 'generation/fid_vs_full']
  assert [v for _, v in floor] == [1.0, 1.0] and floor[0][0] == tb.step_of(0.8) and floor[1][0] == tb.step_of(4.0)
  fig = quality_plot.quality_figure(closed, rows, 'test')
  assert [ax.get_ylabel() for ax in fig.axes] == ['FID vs the full cache (classifier features)',
                                                 'token agreement with the full cache']
  assert quality_plot.quality_figure(closed[2:], rows) is None
