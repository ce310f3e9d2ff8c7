"""Teacher-forced evaluation: run a compressor scale by scale over captured q, k, v of every layer.

Captured tensors are (layers, B, H, L, D) over the whole pyramid (q pre-scaled by the softmax scale).
Each scale's step is jitted once per (compressor, scale) and vmapped over layers.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.attention import block_causal_attention
from compress.core.interface import Compressor, StepContext


@functools.partial(jax.jit, static_argnames=('comp', 'scale', 'oracle'))
def _layers_step(comp: Compressor, params, state, q, k, v, future_q, scale: int, oracle: bool):
  def one(p, s, q_, k_, v_, fq):
    ctx = StepContext(future_q=fq if oracle else None)
    out, s = comp.step(p, s, q_, k_, v_, scale, ctx)
    return out, s, comp.bits(s)
  p_axis = None if params is None else 0
  return jax.vmap(one, in_axes=(p_axis, 0, 0, 0, 0, 0 if oracle else None))(
      params, state, q, k, v, future_q)


def run_teacher_forced(comp: Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                       v_NBHLD: jax.Array) -> dict[str, Any]:
  """Runs `comp` over all scales. N = layers. Returns

  out: (N, B, H, L, D) float32 compressed attention outputs;
  bits: (N, B, H, K) bits held after each scale; peak_bits: max over scales;
  peak_entries: (N, B, H) most entries the state held after any scale (states with a `count`), or None.
  """
  g = comp.geometry
  N, B, H, L, D = q_NBHLD.shape
  if L != g.num_tokens or D != g.head_dim:
    raise ValueError(f'captured q has L={L}, D={D} but the geometry expects L={g.num_tokens} '
                     f'(patch_nums {g.patch_nums}) and D={g.head_dim}')
  state = jax.vmap(lambda _: comp.init_state(B, H))(jnp.arange(N))
  outs, bits, counts = [], [], []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    fq = q_NBHLD[:, :, :, st + S:] if comp.oracle else None
    out, state, b = _layers_step(comp, params, state, q_NBHLD[:, :, :, sl], k_NBHLD[:, :, :, sl],
                                 v_NBHLD[:, :, :, sl], fq, si, comp.oracle)
    outs.append(out)
    bits.append(b)
    if hasattr(state, 'count'):
      counts.append(state.count)
  bits = jnp.stack(bits, -1)
  peak_entries = jnp.stack(counts, -1).max(-1) if counts else None
  return {'out': jnp.concatenate(outs, axis=3), 'bits': bits, 'peak_bits': bits.max(-1),
          'peak_entries': peak_entries}


def exact_outputs(q_NBHLD, k_NBHLD, v_NBHLD, patch_nums) -> jax.Array:
  """Full-cache float32 attention outputs (N, B, H, L, D)."""
  return jax.vmap(lambda q, k, v: block_causal_attention(q, k, v, patch_nums))(q_NBHLD, k_NBHLD, v_NBHLD)


def errors(out: jax.Array, exact: jax.Array, patch_nums: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Aggregate relative L2 errors: overall, per layer (N,), per scale (K,), per layer x scale (N, K)."""
  sizes = [p * p for p in patch_nums]
  d2 = np.asarray(jnp.sum((out.astype(jnp.float32) - exact) ** 2, axis=(1, 2, 4)))  # (N, L)
  e2 = np.asarray(jnp.sum(exact.astype(jnp.float32) ** 2, axis=(1, 2, 4)))
  bounds = np.cumsum([0] + sizes)
  d2_NK = np.stack([d2[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
  e2_NK = np.stack([e2[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], 1)
  safe = lambda a, b: np.sqrt(a / np.maximum(b, 1e-30))
  return {'overall': float(safe(d2_NK.sum(), e2_NK.sum())), 'per_layer': safe(d2_NK.sum(1), e2_NK.sum(1)),
          'per_scale': safe(d2_NK.sum(0), e2_NK.sum(0)), 'per_layer_scale': safe(d2_NK, e2_NK)}
