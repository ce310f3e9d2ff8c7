"""Teacher-forced evaluation: run a compressor over the whole scale schedule of captured q, k, v.

Captured tensors are (layers, B, H, L, D) over the whole pyramid (q pre-scaled by the softmax scale).
The schedule (every scale's step, over every layer) is one compiled program per (compressor, batch
shape): evaluating a compressor at k budgets compiles k programs, never one per scale.
`teacher_forced_errors` also fuses the error sums (and the full-cache reference, unless it is given)
into that program, so only (B, N, K) sums leave it. Layers are vmapped together while their (L, L)
logits fit `LOGIT_BYTES`, else looped over in groups (`layers_per_step`): at d16 (680 tokens, batch
4) that is 2 layers a step, 2x faster on 2 CPU cores and a third of the memory of one 16-layer vmap.

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
from var_jax.xla_cpu import cpu_accepted

# XLA CPU options that trade generated-code speed for compile speed (same HLO, same outputs up to
# float rounding; what jax_disable_most_optimizations sets for the backend); options a jaxlib does not
# know are dropped. Not `xla_cpu_use_fusion_emitters=False`: with it, two of three main-job runs
# deadlocked in XLA's CPU runtime at the same point (attn_matching at 50 %, a while loop, 32 sequences).
# The layer loop vmaps over at most this many bytes of float32 (L, L) logits (see layers_per_step).
LOGIT_BYTES = 2 ** 28
_FAST_CPU = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@functools.lru_cache(maxsize=None)
def fast_compile_options() -> tuple[tuple[str, Any], ...] | None:
  """The `_FAST_CPU` options this jaxlib accepts on the default backend (None off CPU)."""
  return cpu_accepted(_FAST_CPU) or None


def _layer_schedule(comp: Compressor, p: Any, q_BHLD, k_BHLD, v_BHLD):
  """One layer over every scale: outputs (B, H, L, D), bits (B, H, K), counts (B, H, K) or None."""
  g = comp.geometry
  B, H = q_BHLD.shape[:2]
  state = comp.init_state(B, H)
  outs, bits, counts = [], [], []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    ctx = StepContext(future_q=q_BHLD[:, :, st + S:] if comp.oracle else None)
    out, state = comp.step(p, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si, ctx)
    outs.append(out)
    bits.append(comp.bits(state))
    if hasattr(state, 'count'):
      counts.append(jnp.broadcast_to(state.count, (B, H)))
  return (jnp.concatenate(outs, axis=2), jnp.stack(bits, -1),
          jnp.stack(counts, -1) if counts else None)


def layers_per_step(q_NBHLD) -> int:
  """Layers the layer loop holds at once: all of them (one vmap) while a float32 (L, L) logit tensor
  per sequence, head and layer fits `LOGIT_BYTES`, else fewer (a loop over groups of layers: less
  memory, and faster on CPU where the whole-model tensors would stream through memory)."""
  N, B, H, L, _ = q_NBHLD.shape
  return int(max(1, min(N, LOGIT_BYTES // (4 * B * H * L * L))))


def over_layers(fn, params: Any, *xs_NBHLD):
  """`fn(params_layer, *xs_layer)` for every layer (leading axis N of params and xs), outputs stacked."""
  chunk = layers_per_step(xs_NBHLD[0])
  if chunk >= xs_NBHLD[0].shape[0]:
    return jax.vmap(fn, in_axes=(None if params is None else 0,) + (0,) * len(xs_NBHLD))(params, *xs_NBHLD)
  return jax.lax.map(lambda a: fn(*a), (params,) + xs_NBHLD, batch_size=chunk)


def _schedule(comp: Compressor, params: Any, q_NBHLD, k_NBHLD, v_NBHLD):
  """Traced body: outputs (N, B, H, L, D), bits (N, B, H, K), counts (N, B, H, K) or None."""
  return over_layers(functools.partial(_layer_schedule, comp), params, q_NBHLD, k_NBHLD, v_NBHLD)


def _program(fn, options):
  return jax.jit(fn, static_argnums=0, compiler_options=None if options is None else dict(options))


@functools.lru_cache(maxsize=None)
def _run_program(options):
  return _program(_schedule, options)


def _sums(g, out_BHLD, exact_BHLD):
  """(B, K) sums over heads, dims and each scale's tokens of |out - exact|^2 and of |exact|^2."""
  d2_BL = jnp.sum((out_BHLD.astype(jnp.float32) - exact_BHLD) ** 2, axis=(1, 3))
  e2_BL = jnp.sum(exact_BHLD ** 2, axis=(1, 3))
  per_scale = lambda x: jnp.stack([x[:, a:a + s].sum(-1) for a, s in zip(g.scale_starts, g.scale_sizes)], -1)
  return per_scale(d2_BL), per_scale(e2_BL)


def _layer_errors(comp: Compressor, p: Any, q_BHLD, k_BHLD, v_BHLD, exact_BHLD=None):
  """One layer's (B, K) error sums per scale (exact: computed here when not given), bits, counts."""
  out, bits, counts = _layer_schedule(comp, p, q_BHLD, k_BHLD, v_BHLD)
  if exact_BHLD is None:
    exact_BHLD = block_causal_attention(q_BHLD, k_BHLD, v_BHLD, comp.geometry.patch_nums)
  return (*_sums(comp.geometry, out, exact_BHLD), bits, counts)


def _errors_body(comp: Compressor, params, q_NBHLD, k_NBHLD, v_NBHLD, exact_NBHLD=None):
  xs = (q_NBHLD, k_NBHLD, v_NBHLD) + (() if exact_NBHLD is None else (exact_NBHLD,))
  d2_NBK, e2_NBK, bits, counts = over_layers(functools.partial(_layer_errors, comp), params, *xs)
  return {'d2': d2_NBK.swapaxes(0, 1), 'e2': e2_NBK.swapaxes(0, 1), 'peak_bits': bits.max(-1),
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
                          v_NBHLD: jax.Array, *, exact_NBHLD: jax.Array | None = None,
                          compiler_options=None) -> dict[str, Any]:
  """`run_teacher_forced` reduced in the same program against the float32 full-cache outputs
  (`exact_NBHLD`, as `exact_outputs` returns them; computed in the program when not given):

  d2, e2: (B, N, K) float32 sums over heads, dims and the scale's tokens of |out - exact|^2 and
  |exact|^2 per sequence, layer and scale; peak_bits (N, B, H); peak_entries (N, B, H) or None.
  """
  _check(comp, q_NBHLD)
  if exact_NBHLD is not None and exact_NBHLD.shape != q_NBHLD.shape:
    raise ValueError(f'exact outputs have shape {exact_NBHLD.shape}, q has {q_NBHLD.shape}: pass the '
                     'exact_outputs of the same sequences')
  return _errors_program(compiler_options)(comp, params, q_NBHLD, k_NBHLD, v_NBHLD, exact_NBHLD)


def compile_errors(comp: Compressor, params: Any, shape_NBHLD: tuple[int, ...], *, with_exact: bool,
                   compiler_options=None) -> None:
  """Compiles, without running, the program `teacher_forced_errors` runs on float32 q, k, v (and
  `exact_NBHLD` when `with_exact`) of `shape_NBHLD`: the later call finds it in jax's compile cache.
  A sweep compiles its next point this way (on another thread) while the current one runs."""
  sds = jax.ShapeDtypeStruct(tuple(shape_NBHLD), jnp.float32)
  _check(comp, sds)
  _errors_program(compiler_options).lower(comp, params, sds, sds, sds, sds if with_exact else None).compile()


def _exact_body(patch_nums, q_NBHLD, k_NBHLD, v_NBHLD):
  return over_layers(lambda _, q, k, v: block_causal_attention(q, k, v, patch_nums), None,
                     q_NBHLD, k_NBHLD, v_NBHLD)


_exact_program = jax.jit(_exact_body, static_argnums=0)


def exact_outputs(q_NBHLD, k_NBHLD, v_NBHLD, patch_nums) -> jax.Array:
  """Full-cache float32 attention outputs (N, B, H, L, D) (one compiled program per shape)."""
  return _exact_program(tuple(int(p) for p in patch_nums), q_NBHLD, k_NBHLD, v_NBHLD)


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
