"""Helpers shared by the compressor tests: run a compressor scale by scale on one layer."""
import jax
import numpy as np


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
