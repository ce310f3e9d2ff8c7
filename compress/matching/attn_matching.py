"""Attention Matching (Zweiger, Fu, Guo, Kim; arXiv 2602.16284): a compact cache fitted on queries.

The candidates (kept entries + the new scale) are replaced by m compact entries (key c_t, logit bias
beta_t, value u_t) chosen so that, on reference queries q_s, the compact block reproduces both the
block's attention mass and its local attention output:

  mass:    sum_j exp(q_s.k_j + b_j)  ~  sum_t exp(q_s.c_t + beta_t)
  output:  sum_j softmax_j(q_s.k + b) v_j  ~  sum_t softmax_t(q_s.c + beta) u_t

Matching both makes the compact block combine correctly with any other entries a later query sees.
Steps (the paper's "highest attention keys" variant):
  1. keys: the m candidates of highest RMS attention over the reference queries (c_t = their keys);
  2. bias: w_t = exp(beta_t - b_t) >= 0 by non-negative least squares on the mass, each query's row
     normalised by its true mass (relative mass error), solved by accelerated projected gradient
     (FISTA, fixed iterations, started at w = 1: the plain top-attention subset);
  3. values: ridge least squares on the local outputs, shrunk towards the selected tokens' own values
     (min ||X U - Y||^2 + lam ||U - V_sel||^2, lam = ridge * mean diag(X^T X)).
When m >= candidates every candidate is kept, w = 1 and U = V solve both problems exactly.

Reference queries: the current scale's queries, the only ones available when VAR compresses (after a
scale is processed, before the next one exists). Fitting on the later scales' queries instead is an
oracle (an upper reference, not a deployable compressor): `attn_matching_oracle`.

Memory per entry: key and value at the geometry dtype plus the bias (`bias_dtype`, float16 by
default), all counted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.core.attention import NEG_INF
from compress.core.registry import register
from compress.core.slot_compressor import Candidates, SlotCompressor
from compress.core.slots import pack
from compress.core.topk import topk_indices

_W_MIN = 1e-6          # smallest mass weight (bias floor log 1e-6 ~ -13.8 below the token's own)


def nnls_projected_gradient(A_SM: jax.Array, b_S: jax.Array, w0_M: jax.Array, mask_M: jax.Array,
                            iters: int) -> jax.Array:
  """min ||A w - b||^2 s.t. w >= 0 (w = 0 where ~mask), by FISTA projected gradient from w0.

  The step is 1 / L with L an upper bound on the largest eigenvalue of A^T A (power iteration from
  the all-ones vector, which is near the Perron vector of this non-negative matrix, capped by the
  ||A||_1 ||A||_inf bound and inflated by 10% for safety).
  """
  A = jnp.where(mask_M[None], A_SM, 0.0)
  G_MM = A.T @ A
  h_M = A.T @ b_S
  x = jnp.ones_like(w0_M)
  for _ in range(8):
    x = G_MM @ x
    x = x / jnp.maximum(jnp.linalg.norm(x), 1e-30)
  bound = jnp.abs(A).sum(0).max() * jnp.abs(A).sum(1).max()
  L = jnp.maximum(jnp.minimum(1.1 * x @ G_MM @ x, bound), 1e-30)

  def body(_, carry):
    w, z, t = carry
    w_next = jnp.where(mask_M, jnp.maximum(z - (G_MM @ z - h_M) / L, 0.0), 0.0)
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    z_next = w_next + ((t - 1.0) / t_next) * (w_next - w)
    return w_next, z_next, t_next

  w0 = jnp.where(mask_M, w0_M, 0.0)
  w, _, _ = jax.lax.fori_loop(0, iters, body, (w0, w0, jnp.float32(1.0)))
  return w


def match_block(p_SN: jax.Array, k_ND: jax.Array, v_ND: jax.Array, bias_N: jax.Array,
                valid_N: jax.Array, capacity: int, *, iters: int, ridge: float,
                bias_dtype: Any = jnp.float32):
  """Fits `capacity` compact entries to N candidates on S reference queries (one head).

  p_SN: the reference queries' attention probabilities on the candidates (rows sum to 1 over the
  block, zero on invalid candidates); bias_N: the candidates' current logit biases.
  Needs capacity <= N. Returns (keys (m, D), values (m, D), biases (m,) rounded to `bias_dtype`,
  keep (m,) bool).
  """
  f32 = jnp.float32
  p_SN = jnp.where(valid_N[None], p_SN.astype(f32), 0.0)
  rms_N = jnp.sqrt(jnp.mean(p_SN * p_SN, axis=0))
  idx_M, keep_M = topk_indices(rms_N, valid_N, capacity)
  mass_S = p_SN.sum(axis=1)                                  # 1 up to rounding (0: no valid entry)
  rows = mass_S > 0
  A_SM = jnp.where(rows[:, None], p_SN[:, idx_M] / jnp.maximum(mass_S, 1e-30)[:, None], 0.0)
  w_M = nnls_projected_gradient(A_SM, rows.astype(f32), keep_M.astype(f32), keep_M, iters)
  beta_M = bias_N[idx_M] + jnp.log(jnp.maximum(w_M, _W_MIN))
  beta_M = jnp.where(keep_M, beta_M, 0.0).astype(bias_dtype).astype(f32)
  w_M = jnp.where(keep_M, jnp.exp(beta_M - bias_N[idx_M]), 0.0)   # what the stored biases give
  X_SM = A_SM * w_M[None]
  X_SM = X_SM / jnp.maximum(X_SM.sum(axis=1, keepdims=True), 1e-30)
  Y_SD = (p_SN @ v_ND.astype(f32)) / jnp.maximum(mass_S, 1e-30)[:, None]
  v_sel = jnp.where(keep_M[:, None], v_ND[idx_M].astype(f32), 0.0)
  G_MM = X_SM.T @ X_SM
  lam = ridge * jnp.trace(G_MM) / jnp.maximum(keep_M.sum(), 1) + 1e-12
  rhs = X_SM.T @ Y_SD + lam * v_sel
  u_MD = jnp.linalg.solve(G_MM + lam * jnp.eye(capacity, dtype=f32), rhs)
  return k_ND[idx_M], jnp.where(keep_M[:, None], u_MD, 0.0), beta_M, keep_M


@register
@dataclasses.dataclass(frozen=True)
class AttentionMatching(SlotCompressor):
  """Top-RMS-attention keys, NNLS-fitted biases and ridge-fitted values on the scale's queries."""
  name = 'attn_matching'
  family = 'matching'
  iters: int = 100
  ridge: float = 1e-2
  bias_dtype: str = 'float16'

  def __post_init__(self):
    if self.iters < 0:
      raise ValueError(f'attn_matching: iters must be >= 0, got {self.iters}')
    if not self.ridge > 0:
      raise ValueError(f'attn_matching: ridge must be > 0 (it keeps the value fit well posed when '
                       f'there are fewer reference queries than entries), got {self.ridge}')
    if not jnp.issubdtype(jnp.dtype(self.bias_dtype), jnp.floating):
      raise ValueError(f'attn_matching: bias_dtype must be a float dtype such as "float16" or '
                       f'"float32", got {self.bias_dtype!r}')

  def extra_fields(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {'bias': ((), jnp.dtype(self.bias_dtype))}

  def bias(self, state) -> jax.Array | None:
    if 'bias' not in state.extra:      # capacity 0: an empty cache
      return None
    return state.extra['bias'].astype(jnp.float32)

  def select(self, params, state, cand: Candidates, scale: int, ctx):
    m = state.capacity
    if m == 0:
      return state
    dt = jnp.dtype(self.bias_dtype)
    fit = jax.vmap(jax.vmap(lambda p, k, v, b, ok: match_block(
        p, k, v, b, ok, m, iters=self.iters, ridge=self.ridge, bias_dtype=dt)))
    k, v, beta, keep = fit(cand.attn, cand.k, cand.v, cand.extra['bias'], cand.valid)
    return pack(k, v, keep, {'bias': beta}, state)


@register
@dataclasses.dataclass(frozen=True)
class AttentionMatchingOracle(AttentionMatching):
  """Oracle reference: the same fit on every later scale's queries (unknown when VAR compresses)."""
  name = 'attn_matching_oracle'
  family = 'matching'
  oracle = True

  def select(self, params, state, cand: Candidates, scale: int, ctx):
    if ctx.future_q is None:
      raise ValueError(f'{self.name} is an oracle: it needs the later scales\' queries in '
                       'StepContext(future_q=...) (run_teacher_forced passes them to oracles)')
    if state.capacity == 0:            # nothing fits: the empty cache stays empty
      return state
    f32 = jnp.float32
    logits = jnp.einsum('bhfd,bhnd->bhfn', ctx.future_q.astype(f32), cand.k)
    # a finite floor (not -inf) so that a row with no valid candidate gives zeros, never NaN
    logits = jnp.where(cand.valid[:, :, None], logits + cand.extra['bias'][:, :, None], NEG_INF)
    return super().select(params, state, cand.replace(attn=jax.nn.softmax(logits, axis=-1)), scale,
                          ctx)
