"""Helpers shared by the compressor tests: run a compressor scale by scale on one layer."""
import functools

import jax
import numpy as np

import compress


def random_qkv(seed: int, L: int, D: int, B: int = 1, H: int = 2, scale: float = 2.0):
  """Random (B, H, L, D) float32 q (times `scale`), unit-norm k, and v."""
  rng = np.random.default_rng(seed)
  q = scale * rng.standard_normal((B, H, L, D)).astype(np.float32)
  k = rng.standard_normal((B, H, L, D)).astype(np.float32)
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((B, H, L, D)).astype(np.float32)
  return q, k, v


def run_steps(comp, q, k, v, jit: bool = True):
  """Runs every scale; returns outputs (B, H, L, D), the final state and bits after every step."""
  g = comp.geometry
  state = comp.init_state(q.shape[0], q.shape[1])
  outs, bits = [], []
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    step = lambda s, a, b, c, si=si: comp.step(None, s, a, b, c, si)
    step = jax.jit(step) if jit else step
    sl = slice(st, st + S)
    out, state = step(state, q[:, :, sl], k[:, :, sl], v[:, :, sl])
    outs.append(np.asarray(out))
    bits.append(np.asarray(comp.bits(state)))
  return np.concatenate(outs, axis=2), state, bits


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced(comp, params, q_NBHLD, k_NBHLD, v_NBHLD):
  """compress.compress.run_teacher_forced as one compiled program (tests compile per compressor)."""
  return compress.run_teacher_forced(comp, params, q_NBHLD, k_NBHLD, v_NBHLD)


@functools.partial(jax.jit, static_argnums=0)
def train_outputs_all(comp, params, q_NBHLD, k_NBHLD, v_NBHLD):
  """comp.train_outputs over every layer (params with their layer axis)."""
  return jax.vmap(comp.train_outputs)(params, q_NBHLD, k_NBHLD, v_NBHLD)


def layer_params(params, n=0):
  """One layer's parameters (None stays None)."""
  return None if params is None else jax.tree_util.tree_map(lambda x: x[n], params)
