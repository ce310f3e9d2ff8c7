"""FLOPs of one generate call (XLA's cost analysis of the compiled programs) and the measured fp32 peak.

`generate_flops` lowers and compiles (from jax.jit's cache once they have run) the programs `generate`
runs, with the same arguments: `_start`, every scale's `_scale_step` (VAR blocks + cache policy +
sampling + the VQ-VAE's f_hat update) and `_decode` (the VQ-VAE decoder), and sums each one's
`cost_analysis()['flops']` (XLA counts a multiply-add as 2 FLOPs; elementwise ops count too).
The decode's upsampling convolutions run as low-resolution phase convolutions
(`var_jax.vae_blocks.upsample_conv3x3`: 2.25x fewer FLOPs than convolving the upsampled map) and its
large 3 x 3 ones as Winograd's (`var_jax.winograd`: 4x fewer multiplies), so the compiled count is
below the official algorithm's; `decode_official` counts the decode as the official code computes it
(upsample, then a 3 x 3 conv; every conv direct), and `model_total` uses it: model FLOPs per second over the
peak is the model FLOPs utilisation (MFU), which does not rise by doing less arithmetic.
`peak_matmul_flops` times a 2048 x 2048 fp32 matmul in jax: the throughput this machine's XLA reaches
on the best-shaped dense work, the denominator of the achieved share.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax import sampling
from var_jax.vae_blocks import direct_clone


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):      # older jax: one dict per device program
    cost = cost[0]
  return float((cost or {}).get('flops', 0.0))


def peak_matmul_flops(n: int = 2048, runs: int = 5) -> dict[str, float]:
  """{'n', 'seconds' (median), 'flops_per_s'} of a jitted fp32 n x n matmul (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {'n': n, 'seconds': t, 'flops_per_s': 2.0 * n ** 3 / t}


def generate_flops(var, vae, policy, labels_B, *, cfg: float, top_k: int, top_p: float
                   ) -> dict[str, object]:
  """{'var_steps' (per scale), 'start', 'decode', 'total'} FLOPs of one generate call, by XLA's cost
  analysis of the compiled programs (runs one generation to get every scale's arguments), with
  'decode_official' / 'model_total' the same counts for the official decode (upsample, then conv)."""
  mcfg = var.cfg
  var_graph, var_state = nnx.split(var)
  vae_graph, vae_state = nnx.split(vae)
  labels = jnp.asarray(labels_B, jnp.int32)
  K = len(mcfg.patch_nums)
  keys = jax.random.split(jax.random.key(0), K)
  start_args = (var_graph, var_state, policy, labels)
  start = _flops(sampling._start.lower(*start_args).compile())
  cond, x, state, f_hat = sampling._start(*start_args)
  steps = []
  for scale in range(K):
    args = (var_graph, var_state, vae_graph, vae_state, policy, scale, int(top_k), float(top_p), False,
            False, state, x, cond, f_hat, sampling.guidance_weight(cfg, scale, K), keys[scale],
            sampling.policy_arrays(policy))
    steps.append(_flops(sampling._scale_step.lower(*args).compile()))
    _, f_hat, x, state, _, _ = sampling._scale_step(*args)
  decode = _flops(sampling._decode.lower(vae_graph, vae_state, f_hat).compile())
  off_graph, off_state = nnx.split(direct_clone(vae))
  decode_official = _flops(sampling._decode.lower(off_graph, off_state, f_hat).compile())
  return {'var_steps': steps, 'start': start, 'decode': decode, 'decode_official': decode_official,
          'total': start + sum(steps) + decode, 'model_total': start + sum(steps) + decode_official}
