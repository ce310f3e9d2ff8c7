r"""Sampling benchmark: images/s and tokens/s of `generate`, compile time apart, peak KV-cache bytes.

    python -m eval.bench.sampling --size=d16 --batch=1 --runs=3
    python -m eval.bench.sampling --var_ckpt=/path/var_d16.pth --vae_ckpt=/path/vae_ch160v4096z32.pth
    python -m eval.bench.sampling --size=d16 --policy=snapkv --budget=25%

With --size the weights are random (drawn directly into the abstract model, no slow eager init); the
speed of sampling does not depend on their values. Prints one JSON line of figures.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from compress.core.accounting import tree_bytes
from var_jax import sampling
from var_jax.config import SIZES
from var_jax.random_init import random_models

FLAGS = flags.FLAGS
flags.DEFINE_string('size', 'd16', f'model size with random weights: {", ".join(SIZES)}')
flags.DEFINE_string('var_ckpt', None, 'official var_d*.pth (overrides --size)')
flags.DEFINE_string('vae_ckpt', None, 'official vae_ch160v4096z32.pth (with --var_ckpt)')
flags.DEFINE_integer('batch', 1, 'images per generate call (2x sequences with CFG)')
flags.DEFINE_integer('runs', 3, 'timed steady-state calls (after one compile call)')
flags.DEFINE_float('cfg', 1.5, 'guidance')
flags.DEFINE_integer('top_k', 900, 'top-k')
flags.DEFINE_float('top_p', 0.96, 'top-p')
flags.DEFINE_string('policy', 'full', 'cache policy: full, or a registered compressor name')
flags.DEFINE_string('budget', '25%', 'compressor budget with its unit: 25% (of the fp16 cache), 2bpc '
                    '(bits per cached coordinate) or 100000bits (see compress.Budget.parse)')


def main(argv):
  del argv
  if FLAGS.var_ckpt:
    from var_jax.convert import load_official_models
    var, vae = load_official_models(FLAGS.var_ckpt, FLAGS.vae_ckpt)
    name = FLAGS.var_ckpt
  else:
    if FLAGS.size not in SIZES:
      raise app.UsageError(f'--size must be one of {", ".join(SIZES)}, got {FLAGS.size}')
    var, vae = random_models(FLAGS.size, 0)
    name = f'{FLAGS.size} (random weights)'
  cfg = var.cfg
  policy = None
  if FLAGS.policy != 'full':
    from compress.core.registry import make
    from compress.core.budget import Budget, CacheGeometry
    from compress.core.policy import CompressorPolicy
    geometry = CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim)
    try:
      budget = Budget.parse(FLAGS.budget, geometry)
    except ValueError as e:
      raise app.UsageError(f'--budget: {e}') from None
    policy = CompressorPolicy(make(FLAGS.policy, geometry, budget))
  labels = [i % cfg.num_classes for i in range(FLAGS.batch)]
  run = lambda seed: sampling.generate(var, vae, labels, key=jax.random.key(seed), cfg=FLAGS.cfg,
                                       top_k=FLAGS.top_k, top_p=FLAGS.top_p, policy=policy)
  t0 = time.perf_counter()
  out = run(0)
  jax.block_until_ready(out.images)
  first = time.perf_counter() - t0
  times = []
  for r in range(FLAGS.runs):
    t0 = time.perf_counter()
    out = run(r + 1)
    jax.block_until_ready(out.images)
    times.append(time.perf_counter() - t0)
  steady = statistics.median(times)
  tokens = FLAGS.batch * cfg.seq_len
  figures = {
      'model': name, 'policy': FLAGS.policy, 'budget': FLAGS.budget if policy else None,
      'batch': FLAGS.batch, 'device': str(jax.devices()[0].platform),
      'first_call_s': round(first, 2), 'compile_s_est': round(first - steady, 2),
      'steady_s_per_batch': round(steady, 3), 'steady_runs': [round(t, 3) for t in times],
      'images_per_s': round(FLAGS.batch / steady, 4), 'tokens_per_s': round(tokens / steady, 1),
      'kv_cache_bytes_allocated': tree_bytes(out.cache),
  }
  if policy is not None:
    figures['kv_cache_bits_counted'] = int(np.asarray(policy.bits(out.cache)).sum())
  print(json.dumps(figures))


if __name__ == '__main__':
  from var_jax import cli
  cli.run(main)
