"""ORACLE eviction (an upper reference, not deployable): scores candidates by future attention.

It needs every later scale's queries (`StepContext.future_q`), which only a teacher-forced run over
captured tensors has (compress.run_teacher_forced passes them to compressors whose class
attribute `oracle` is True). It bounds what any attention-score eviction policy could achieve.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from compress.core.attention import NEG_INF
from compress.core.registry import register
from compress.core.slot_compressor import Candidates
from compress.eviction.base import EvictionCompressor


def future_mass(future_q_BHFD: jax.Array, k_BHND: jax.Array, valid_BHN: jax.Array) -> jax.Array:
  """(B, H, N): sum over the F future queries of each candidate's softmax probability among the
  valid candidates (future keys are unknown at selection time, so the softmax is over candidates)."""
  logits = jnp.einsum('bhfd,bhnd->bhfn', future_q_BHFD.astype(jnp.float32), k_BHND.astype(jnp.float32))
  logits = jnp.where(valid_BHN[:, :, None, :], logits, NEG_INF)
  p = jax.nn.softmax(logits, axis=-1) * valid_BHN[:, :, None, :]
  return p.sum(axis=2)


@register
@dataclasses.dataclass(frozen=True)
class OracleEviction(EvictionCompressor):
  """ORACLE (upper reference; uses the future): keeps the candidates ALL future queries attend to most.

  Score = `future_mass`: the attention every query of every later scale would put on the candidate,
  softmax-normalised over the candidates. Among all subsets of `capacity` candidates the kept one holds
  the most future attention mass (top-k of an additive score). It is a greedy per-scale choice, so it
  is not guaranteed to minimise the output error. Not deployable: generation has no future queries.
  """
  name = 'oracle'
  family = 'eviction'
  oracle = True

  def score(self, params, state, cand: Candidates, scale, ctx) -> jax.Array:
    fq = ctx.future_q
    if fq is None:
      raise ValueError('oracle needs every later scale\'s queries in StepContext(future_q=(B, H, F, D)): '
                       'run it teacher-forced with compress.run_teacher_forced; it cannot run '
                       'during generation')
    B, H, _, D = cand.k.shape
    if fq.ndim != 4 or fq.shape[:2] != (B, H) or fq.shape[3] != D:
      raise ValueError(f'oracle: future_q must be (B, H, F, D) = ({B}, {H}, F, {D}), got {fq.shape}')
    return future_mass(fq, cand.k, cand.valid)
