"""Teacher-forced evaluation: run a compressor over the whole scale schedule of captured q, k, v.

Captured tensors are (layers, B, H, L, D) over the whole pyramid (q pre-scaled by the softmax scale).
The schedule (every scale's step, vmapped over layers) is one compiled program per (compressor, batch
shape): evaluating a compressor at k budgets compiles k programs, never one per scale.
`teacher_forced_errors` also fuses the full-cache reference and the error sums into that program, so
only (B, N, K) sums leave it.

`compiler_options`: XLA options for these programs (`FAST_COMPILE` on CPU: the lowest backend
optimisation level, ~2x faster compiles for sweeps, whose points are compile-bound; None: XLA defaults).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.attention import block_causal_attention
from compress.core.interface import Compressor, StepContext

# XLA CPU options that trade generated-code speed for compile speed (same HLO, same outputs up to
# float rounding; what jax_disable_most_optimizations sets for the backend); options a jaxlib does not
# know are dropped. Not `xla_cpu_use_fusion_emitters=False`: with it, two of three main-job runs
# deadlocked in XLA's CPU runtime at the same point (attn_matching at 50 %, a while loop, 32 sequences).
_FAST_CPU = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.lru_cache(maxsize=None)
def fast_compile_options() -> tuple[tuple[str, Any], ...] | None:
  """The `_FAST_CPU` options this jaxlib accepts on the default backend (None off CPU)."""
  if jax.default_backend() != 'cpu':
    return None
  known = []
  for name, value in _FAST_CPU.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
      known.append((name, value))
    except Exception:  # noqa: BLE001  (an option this XLA does not have: compile without it)
      pass
  return tuple(known) or None


def _schedule(comp: Compressor, params: Any, q_NBHLD, k_NBHLD, v_NBHLD):
  """Traced body: outputs (N, B, H, L, D), bits (N, B, H, K), counts (N, B, H, K) or None."""
  g = comp.geometry
  N, B, H, L, D = q_NBHLD.shape

  def one_layer(p, q, k, v):
    state = comp.init_state(B, H)
    outs, bits, counts = [], [], []
    for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
      sl = slice(st, st + S)
      ctx = StepContext(future_q=q[:, :, st + S:] if comp.oracle else None)
      out, state = comp.step(p, state, q[:, :, sl], k[:, :, sl], v[:, :, sl], si, ctx)
      outs.append(out)
      bits.append(comp.bits(state))
      if hasattr(state, 'count'):
        counts.append(jnp.broadcast_to(state.count, (B, H)))
    return (jnp.concatenate(outs, axis=2), jnp.stack(bits, -1),
            jnp.stack(counts, -1) if counts else None)

  return jax.vmap(one_layer, in_axes=(None if params is None else 0, 0, 0, 0))(
      params, q_NBHLD, k_NBHLD, v_NBHLD)


def _program(fn, options):
  return jax.jit(fn, static_argnums=0, compiler_options=None if options is None else dict(options))


@functools.lru_cache(maxsize=None)
def _run_program(options):
  return _program(_schedule, options)


def _errors_body(comp: Compressor, params, q_NBHLD, k_NBHLD, v_NBHLD):
  out, bits, counts = _schedule(comp, params, q_NBHLD, k_NBHLD, v_NBHLD)
  exact = exact_outputs(q_NBHLD, k_NBHLD, v_NBHLD, comp.geometry.patch_nums)
  d2_NBL = jnp.sum((out.astype(jnp.float32) - exact) ** 2, axis=(2, 4))
  e2_NBL = jnp.sum(exact ** 2, axis=(2, 4))
  g = comp.geometry
  per_scale = lambda x: jnp.stack([x[..., a:a + s].sum(-1) for a, s in zip(g.scale_starts, g.scale_sizes)],
                                  -1).swapaxes(0, 1)                       # (B, N, K)
  return {'d2': per_scale(d2_NBL), 'e2': per_scale(e2_NBL), 'peak_bits': bits.max(-1),
          'peak_entries': None if counts is None else counts.max(-1)}


@functools.lru_cache(maxsize=None)
def _errors_program(options):
  return _program(_errors_body, options)


def _check(comp: Compressor, q_NBHLD) -> None:
  g = comp.geometry
  N, B, H, L, D = q_NBHLD.shape
  if L != g.num_tokens or D != g.head_dim:
    raise ValueError(f'captured q has L={L}, D={D} but the geometry expects L={g.num_tokens} '
                     f'(patch_nums {g.patch_nums}) and D={g.head_dim}')


def run_teacher_forced(comp: Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                       v_NBHLD: jax.Array, *, compiler_options=None) -> dict[str, Any]:
  """Runs `comp` over all scales (one compiled program). N = layers. Returns

  out: (N, B, H, L, D) float32 compressed attention outputs;
  bits: (N, B, H, K) bits held after each scale; peak_bits: max over scales;
  peak_entries: (N, B, H) most entries the state held after any scale (states with a `count`), or None.
  """
  _check(comp, q_NBHLD)
  out, bits, counts = _run_program(compiler_options)(comp, params, q_NBHLD, k_NBHLD, v_NBHLD)
  return {'out': out, 'bits': bits, 'peak_bits': bits.max(-1),
          'peak_entries': None if counts is None else counts.max(-1)}


def teacher_forced_errors(comp: Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                          v_NBHLD: jax.Array, *, compiler_options=None) -> dict[str, Any]:
  """`run_teacher_forced` reduced in the same program against the float32 full-cache outputs:

  d2, e2: (B, N, K) float32 sums over heads, dims and the scale's tokens of |out - exact|^2 and
  |exact|^2 per sequence, layer and scale; peak_bits (N, B, H); peak_entries (N, B, H) or None.
  """
  _check(comp, q_NBHLD)
  return _errors_program(compiler_options)(comp, params, q_NBHLD, k_NBHLD, v_NBHLD)


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
