"""Shared parameters counted by hand, and the frontier's amortised bits from that count.

Per (layer, head), from the shapes and stored dtypes the compressors' docstrings give (written out
here, never `tree_bits` of the same parameters):
  composed, composed_learned  means (D) and bases (D x r) of keys and values at float16, and per code
                              (one, or one per distinct entry width) steps (r) at float16 and widths (r)
                              at uint8; r = 1 + the last component any head codes
  pca                         bases (D x r) and means (D) at float16, r from the budget
  lowrank_learned             encoders (D x r), decoders (r x D) and means (D) at float16
  merge_learned               9 float32 (score (5), value_sim, threshold, weight_pow, calib)
  evict_learned               float32 w_lin (F + 2D), w1 ((F + 2D) x hidden), b1 and w2 (hidden), F = 8
The tiny frontier's amortised_bits = bits + shared / (layers x heads x served sequences) from that count
(and amortised_bits_per_coordinate = that / coordinates). Fault caught: composed's shared parameters
keeping only its widths (bases, means and steps left out).
"""
import math

import jax
import numpy as np
import pytest

import compress
from compress.core.budget import Budget, CacheGeometry
import tiny_frontier

PN, D, LAYERS, HEADS = (1, 2, 3, 4), 8, 2, 3
F16, U8, F32 = 16, 8, 32


def calibration():
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(1), PN, layers=LAYERS, batch=2, heads=HEADS,
                                            head_dim=D)
  return {'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}


def lowrank_ranks(g, budget, key_fraction=0.5):
  """pca's ranks (docstring): R = floor((budget - 16) / (peak tokens x 16)), split by key_fraction."""
  R = min((Budget.parse(budget, g).bits - 16) // (g.prefix_tokens * F16), 2 * g.head_dim)
  rk = min(g.head_dim, math.floor(R * key_fraction + 0.5))
  return rk, R - rk


def coded_rank(width_NHR):
  """1 + the last component any (layer, head) codes with > 0 bits (at least 1)."""
  coded = np.nonzero((np.asarray(width_NHR) > 0).reshape(-1, width_NHR.shape[-1]).any(0))[0]
  return int(coded.max()) + 1 if coded.size else 1


def by_hand(name, comp, params):
  """Shared bits of all (layer, head)s, from shapes and dtypes."""
  per_head = None
  if name in ('composed', 'composed_learned'):
    rk, rv = coded_rank(params['k_width']), coded_rank(params['v_width'])
    codes = params['k_width'].shape[2] if params['k_width'].ndim == 4 else 1   # widths per code, if several
    per_head = sum(F16 * (D + D * r) + codes * (F16 * r + U8 * r) for r in (rk, rv))
  elif name == 'pca':
    rk, rv = lowrank_ranks(comp.geometry, comp.budget)
    per_head = F16 * (D * rk + D + D * rv + D)
  elif name == 'lowrank_learned':
    rk, rv = lowrank_ranks(comp.geometry, comp.budget)
    per_head = F16 * (2 * D * rk + D + 2 * D * rv + D)
  elif name == 'merge_learned':
    per_head = F32 * 9
  elif name == 'evict_learned':
    X, J = 8 + 2 * D, comp.hidden
    per_head = F32 * (X + X * J + J + J)
  return LAYERS * HEADS * per_head


@pytest.mark.parametrize('name', ['composed', 'composed_learned', 'pca', 'lowrank_learned', 'merge_learned',
                                  'evict_learned'])
@pytest.mark.parametrize('budget', ['10%', '25%'])
def test_shared_bits_counted_by_hand(name, budget):
  g = CacheGeometry(PN, D)
  comp = compress.make(name, g, budget)
  params = comp.init_params(jax.random.key(0), LAYERS, HEADS,
                            calibration=calibration() if comp.needs_calibration else None)
  assert comp.shared_bits(params) == by_hand(name, comp, params) > 0
  if name in ('composed', 'composed_learned'):      # the basis kept is the one the widths need
    assert params['k_basis'].shape[-1] == coded_rank(params['k_width'])
  if name in ('pca', 'lowrank_learned'):
    assert compress.make(name, g, '100%').shared_bits(None) == 0      # the full cache needs none


def test_tiny_frontier_amortises_the_counted_shared_bits(tiny_frontier_run):
  g = CacheGeometry((1, 2, 3, 4), tiny_frontier.HEAD_DIM)
  rows = tiny_frontier.rows(tiny_frontier_run)
  assert {r['method'] for r in rows} == {'full', 'window', 'pca', 'lowrank_learned'}
  rk, rv = lowrank_ranks(g, '25%')
  hand = {'full': 0, 'window': 0,
          'pca': F16 * (tiny_frontier.HEAD_DIM * (rk + rv) + 2 * tiny_frontier.HEAD_DIM),
          'lowrank_learned': F16 * (2 * tiny_frontier.HEAD_DIM * (rk + rv) + 2 * tiny_frontier.HEAD_DIM)}
  heads = tiny_frontier.LAYERS * tiny_frontier.HEADS
  for r in rows:
    shared = heads * hand[r['method']]
    served = int(r['served_sequences'])
    assert served == int(r['num_sequences']) == tiny_frontier.SERVED        # served_sequences 0: held-out
    assert int(r['shared_bits']) == shared, r['method']
    want = int(r['bits']) + shared / (heads * served)
    assert float(r['amortised_bits']) == pytest.approx(want, rel=1e-12), r['method']
    assert float(r['amortised_bits_per_coordinate']) == pytest.approx(want / g.coordinates, rel=1e-12)
