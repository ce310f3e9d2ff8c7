"""The rate-distortion bound binding on every compressor: a hard-instance setting (eval/bounds/hard.py,
compress/theory) where every non-learned registered compressor's error is below 1, so the bound asks
a positive number of bits of each, and each one's counted bits and measured error respect it.

At 75 % of the fp16 cache on the flat (n = 16) and the VAR-schedule ((1, 2, 3)) instance, d = 8, every
method (eviction, merging, quantisation, low rank, composed, oracles) ends between 0.003 and 0.91 (at
50 % knorm, window and random reach >= 1: a 0-bit bound, which nothing can violate). Asserted per
method: 0 <= error < 1, lower_bound_bits > 0, bits >= lower_bound_bits and error >= the smallest error
any code of its bits reaches, on every seed. An under-counted state (bits / 8) fails it.
"""
import pytest

import compress
from compress.core.teacher_forced import fast_compile_options
from eval.bounds import hard
from eval.engine.sweep import MethodSpec
from compress.theory.hard_instance import make_instance, redraw

METHODS = [n for n in compress.available() if not compress.REGISTRY[n].learned and n != 'full']
BUDGET = '75%'


@pytest.mark.slow
@pytest.mark.parametrize('size', [{'n': 16}, {'patch_nums': (1, 2, 3)}], ids=['flat', 'var'])
def test_every_method_is_under_error_1_and_respects_a_positive_bound(size):
  draws = [(inst, redraw(inst, seed + hard.CALIBRATION_SEED_OFFSET))
           for seed in (0,) for inst in [make_instance(**size, d=8, seed=seed)]]
  options = fast_compile_options()
  assert len(METHODS) >= 15                               # every family is in
  for name in METHODS:
    row = hard.evaluate_spec('flat' if 'n' in size else 'var', draws, MethodSpec.parse(name), BUDGET, 0.95,
                             compiler_options=options)
    err, bits = row['rel_error'], row['bits']
    assert 0 <= err < 1, (name, err)                      # the bound is positive only below error 1
    assert row['lower_bound_bits'] > 0, name
    assert bits >= row['lower_bound_bits'] * (1 - 1e-6), (name, bits, row['lower_bound_bits'])
    assert err >= row['min_error_at_bits'] * (1 - 1e-6), (name, err, row['min_error_at_bits'])
    assert row['seeds_below_bound'] == 0, name
    if not row['oracle']:
      assert bits <= row['budget_bits'], name
