"""Cheap compiles for the registry-wide tests, and the one-layer driver they share.

Those tests run each compressor once on a tiny geometry: compiling dominates (XLA's CPU defaults spend
~5x longer on it than the run needs). `FAST` asks for XLA's lowest backend optimisation level without
the fusion emitters on CPU: the same HLO, compiled ~5x faster, same outputs (checked bit for bit on the
builtin compressors). Options this jaxlib does not know are left out, so the tests never depend on them.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

import compress

_CPU_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True,
                'xla_cpu_use_fusion_emitters': False}


def _known_options() -> dict[str, Any] | None:
  if jax.default_backend() != 'cpu':
    return None
  known = {}
  for name, value in _CPU_OPTIONS.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
      known[name] = value
    except Exception:  # noqa: BLE001 (an option this XLA does not have: compile without it)
      pass
  return known or None


FAST = _known_options()


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def run_scales(comp: compress.Compressor, params: Any, q_BHLD: jax.Array, k_BHLD: jax.Array,
               v_BHLD: jax.Array) -> tuple[jax.Array, Any]:
  """Every scale through `comp.step` on one layer (params of that layer): outputs (B, H, L, D) and the
  final state. The loop of `compress.run_teacher_forced`, compiled as one program."""
  g = comp.geometry
  state = comp.init_state(q_BHLD.shape[0], q_BHLD.shape[1])
  outs = []
  for si, (start, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(start, start + S)
    ctx = compress.StepContext(future_q=q_BHLD[:, :, start + S:] if comp.oracle else None)
    out, state = comp.step(params, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si, ctx)
    outs.append(out)
  return jnp.concatenate(outs, axis=2), state


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
def run_scales_states(comp: compress.Compressor, params: Any, q_BHLD: jax.Array, k_BHLD: jax.Array,
                      v_BHLD: jax.Array) -> tuple[jax.Array, list[Any]]:
  """`run_scales`, returning the state after every scale (a list; their shapes may differ by scale)."""
  g = comp.geometry
  state = comp.init_state(q_BHLD.shape[0], q_BHLD.shape[1])
  outs, states = [], []
  for si, (start, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(start, start + S)
    ctx = compress.StepContext(future_q=q_BHLD[:, :, start + S:] if comp.oracle else None)
    out, state = comp.step(params, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si, ctx)
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, axis=2), states
