"""The logit-scale clamp of VAR's attention (official `SelfAttention`: q is L2-normalised and multiplied
by exp(min(scale_mul_1H11, log 100)); var_jax/blocks.py MAX_SCALE_MUL), which the official fixture's
weights never reach (their scale_mul <= 1.73 < log 100 = 4.61).

No new official fixture could be made here (no PyTorch, no official code on this machine), so the case
is built from the official tiny weights (tests/data/var_official_tiny) with the attention scales of
both blocks moved across the clamp (one head above it, one below, per block), and checked against the
float64 numpy transcription of the official forward in tests/test_var.py (itself checked against the
official outputs there), whose clamp is the official one. Also: every scale above the clamp gives the
logits of the clamp itself, bit for bit, and a scale just below it does not.
Fault caught (checked by breaking var_jax/blocks.py in a scratch copy): the clamp removed.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from test_var import DATA, PATCH_NUMS, forward, numpy_official_forward, rel_err
from var_jax.torch_pickle import load_torch_state_dict
from var_jax.var import infer_var_config, var_from_state_dict

LOG100 = math.log(100.0)
# per block, per head: one scale above the clamp (exp > 100) and one below
SCALES = {0: (LOG100 + 2.0, LOG100 - 1.0), 1: (1.2, LOG100 + 0.5)}
RTOL = 1e-5          # as tests/test_var.py's parity (measured here: 3.2e-7; unclamped scales: 2.7e-7)


@pytest.fixture(scope='module')
def inputs():
  ref = dict(np.load(DATA / 'reference.npz'))
  return load_torch_state_dict(DATA / 'var.pth'), ref['in/labels'], ref['out/var_input']


def with_scales(sd, scales):
  out = dict(sd)
  for block, heads in scales.items():
    key = f'blocks.{block}.attn.scale_mul_1H11'
    out[key] = np.asarray(heads, np.float32).reshape(np.shape(sd[key]))
  return out


def port_logits(sd, labels, var_input):
  return np.asarray(forward(var_from_state_dict(sd, PATCH_NUMS), jnp.asarray(labels), jnp.asarray(var_input)))


def test_scales_above_the_clamp_match_the_official_forward(inputs):
  sd, labels, var_input = inputs
  assert max(float(np.max(sd[f'blocks.{i}.attn.scale_mul_1H11'])) for i in range(2)) < LOG100  # never clamped
  clamped = with_scales(sd, SCALES)
  assert all(max(h) > LOG100 > min(h) for h in SCALES.values())
  got = port_logits(clamped, labels, var_input)
  want = numpy_official_forward(clamped, infer_var_config(clamped, PATCH_NUMS), labels, var_input)
  assert rel_err(got, want) < RTOL
  assert rel_err(got, port_logits(sd, labels, var_input)) > 1e-2        # the scales matter


def test_every_scale_above_the_clamp_gives_the_clamps_logits(inputs):
  sd, labels, var_input = inputs
  at = port_logits(with_scales(sd, {0: (LOG100, LOG100), 1: (LOG100, LOG100)}), labels, var_input)
  above = port_logits(with_scales(sd, {0: (LOG100 + 3.0, LOG100 + 0.01), 1: (LOG100 + 1.0, 9.0)}), labels,
                      var_input)
  below = port_logits(with_scales(sd, {0: (LOG100 - 0.3, LOG100), 1: (LOG100, LOG100)}), labels, var_input)
  np.testing.assert_array_equal(above, at)
  assert rel_err(below, at) > 1e-3
