r"""Sampling benchmark: time, cache memory, process memory and FLOPs of `generate` per cache policy.

    python -m eval.bench.sampling --size=d16 --batch=1 --runs=3
    python -m eval.bench.sampling --size=d16 --batch=1 --runs=2 --policy=full,kivi,cam,composed --budget=25%
    python -m eval.bench.sampling --size=d16 --batch=1,8 --policy=full,kivi --budget=10%,25% --memory_gib=8
    python -m eval.bench.sampling --size=d16 --policy=full,kivi --profile --flops
    python -m eval.bench.sampling --size=d8 --batch=2 --runs=3 --flops
    python -m eval.bench.sampling --var_ckpt=/path/var_d16.pth --vae_ckpt=/path/vae_ch160v4096z32.pth

With --size the weights are random (drawn directly into the abstract model, no slow eager init); the
speed of sampling does not depend on their values. Every (policy, budget) is compiled by one first call,
then the timed calls alternate between them (A B C A B C ...), so that background load hits all alike.
Compressors that need parameters get them from a frontier run (--params_from=WORKDIR: trained ones
from WORKDIR/train, calibrated ones on its capture's training split) or, without it, calibrated on the
fly on --calibrate_images images generated with the full cache (eval/bench/sampling_params.py).

Prints one JSON line per (policy, budget, batch), then a markdown table. Memory figures:
  cache_bits_counted: `Compressor.bits` of the final state (the full cache: its arrays' bits);
  cache_bytes_allocated: bytes of the state's arrays as allocated;
  rss_peak_bytes: the process's peak resident memory (VmHWM, reset before each timed call) during the
    timed calls; rss_before_bytes: resident memory before them (weights, buffers held);
  with --memory_gib and two or more batches: max_batch_at_memory, the largest batch whose predicted
    peak fits, from a least-squares line through the measured (batch, rss_peak) points, and
    max_batch_cache_only, memory / cache bytes allocated per image (the cache alone).
With --flops, one more JSON line per (policy, budget): XLA's FLOP count of one call as compiled
(`gflop_per_call`) and as the official algorithm computes it (`model_gflop_per_call`: the VQ-VAE's
upsampling convolutions upsample-then-convolve, which this port runs as 2.25x cheaper phase convolutions),
and `share_of_peak`: model FLOPs per second over a 2048^2 fp32 matmul timed in the same process (the
model FLOPs utilisation; `share_of_peak_compiled` uses the compiled count). `--size=d8` is the official
recipe at depth 8, the size `eval.bench.vs_official --depth 8` builds.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from compress.core.accounting import tree_bits, tree_bytes
from eval.bench import flops as flops_lib
from eval.bench import sampling_profile
from eval.bench.sampling_params import policy_params
from var_jax import sampling
from var_jax.config import SIZES
from var_jax.kvcache import FullCache
from var_jax.random_init import random_models

FLAGS = flags.FLAGS
flags.DEFINE_string('size', 'd16', f'model size with random weights: {", ".join(SIZES)}')
flags.DEFINE_string('var_ckpt', None, 'official var_d*.pth (overrides --size)')
flags.DEFINE_string('vae_ckpt', None, 'official vae_ch160v4096z32.pth (with --var_ckpt)')
flags.DEFINE_list('batch', ['1'], 'images per generate call (2x sequences with CFG); a list: 1,8,32')
flags.DEFINE_integer('runs', 3, 'timed steady-state calls per (policy, budget, batch), alternated')
flags.DEFINE_float('cfg', 1.5, 'guidance')
flags.DEFINE_integer('top_k', 900, 'top-k')
flags.DEFINE_float('top_p', 0.96, 'top-p')
flags.DEFINE_list('policy', ['full'], 'cache policies: full, or registered compressor names (a list)')
flags.DEFINE_list('budget', ['25%'], 'compressor budgets with their unit: 25% (of the fp16 cache), 2bpc '
                  '(bits per cached coordinate) or 100000bits (see compress.Budget.parse); a list')
flags.DEFINE_string('params_from', None, 'frontier WORKDIR: trained parameters from WORKDIR/train, '
                    'calibration on its capture; default: calibrate on generated images')
flags.DEFINE_integer('calibrate_images', 2, 'images generated (full cache) to calibrate on, without '
                     '--params_from')
flags.DEFINE_integer('calibration_sequences', 64, 'capture sequences to calibrate on, with --params_from')
flags.DEFINE_bool('profile', False, 'per-scale profile: step, policy, attention, compress, model seconds')
flags.DEFINE_bool('flops', False, 'FLOPs of one generate call (XLA cost analysis) and the measured '
                  'fp32 peak (2048^2 matmul); share_of_peak counts the official decode (MFU)')
flags.DEFINE_string('compile_cache', None, "directory of JAX's persistent compilation cache (a second "
                    'run with the same programs loads them instead of compiling); default: none')
flags.DEFINE_float('memory_gib', 0.0, 'report the largest batch whose peak memory fits this many GiB '
                   '(needs two or more --batch values)')


def _rss(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  return 0


def _reset_peak_rss() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _models():
  if FLAGS.var_ckpt:
    from var_jax.convert import load_official_models  # pylint: disable=g-import-not-at-top
    var, vae = load_official_models(FLAGS.var_ckpt, FLAGS.vae_ckpt)
    return var, vae, FLAGS.var_ckpt
  if FLAGS.size not in SIZES:
    raise app.UsageError(f'--size must be one of {", ".join(SIZES)}, got {FLAGS.size}')
  var, vae = random_models(FLAGS.size, 0)
  return var, vae, f'{FLAGS.size} (random weights)'


def _policies(var, vae) -> list[tuple[str, str | None, Any, str]]:
  """(policy name, budget or None, policy or None for the full cache, parameter source)."""
  from compress.core.budget import Budget, CacheGeometry  # pylint: disable=g-import-not-at-top
  from compress.core.policy import CompressorPolicy  # pylint: disable=g-import-not-at-top
  from compress.core.registry import make, REGISTRY  # pylint: disable=g-import-not-at-top
  cfg = var.cfg
  geometry = CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim)
  out = []
  for name in FLAGS.policy:
    if name == 'full':
      out.append(('full', None, None, 'no parameters'))
      continue
    if name not in REGISTRY:
      raise app.UsageError(f'--policy: no compressor named {name!r}; registered: {", ".join(sorted(REGISTRY))}')
    for b in FLAGS.budget:
      try:
        budget = Budget.parse(b, geometry)
      except ValueError as e:
        raise app.UsageError(f'--budget: {e}') from None
      comp = make(name, geometry, budget)
      params, source = policy_params(comp, var, vae, params_from=FLAGS.params_from,
                                     images=FLAGS.calibrate_images, sequences=FLAGS.calibration_sequences)
      out.append((name, b, CompressorPolicy(comp, params), source))
  return out


def _run(var, vae, policy, labels, seed: int):
  out = sampling.generate(var, vae, labels, key=jax.random.key(seed), cfg=FLAGS.cfg, top_k=FLAGS.top_k,
                          top_p=FLAGS.top_p, policy=policy)
  jax.block_until_ready(out.images)
  return out


def _cache_figures(policy, cache) -> dict[str, int]:
  counted = tree_bits(cache) if policy is None else int(np.asarray(policy.bits(cache)).sum())
  return {'cache_bits_counted': counted, 'cache_bytes_allocated': tree_bytes(cache)}


def bench_batch(var, vae, entries, batch: int) -> list[dict[str, Any]]:
  """Every entry at one batch: a compile call each, then `runs` timed calls alternating between them."""
  cfg = var.cfg
  labels = [i % cfg.num_classes for i in range(batch)]
  rows = []
  for name, budget, policy, source in entries:
    t0 = time.perf_counter()
    out = _run(var, vae, policy, labels, 0)
    logging.info('batch %d: %s %s first call %.1f s', batch, name, budget or '', time.perf_counter() - t0)
    rows.append({'policy': name, 'budget': budget, 'batch': batch, 'params': source,
                 'first_call_s': time.perf_counter() - t0, 'times': [], 'rss_peak_bytes': 0,
                 'rss_before_bytes': 0, **_cache_figures(policy, out.cache)})
    del out
  for r in range(FLAGS.runs):
    for row, (_, _, policy, _) in zip(rows, entries):
      row['rss_before_bytes'] = max(row['rss_before_bytes'], _rss('VmRSS'))
      _reset_peak_rss()
      t0 = time.perf_counter()
      out = _run(var, vae, policy, labels, r + 1)
      row['times'].append(time.perf_counter() - t0)
      row['rss_peak_bytes'] = max(row['rss_peak_bytes'], _rss('VmHWM'))
      logging.info('batch %d run %d: %s %s %.2f s, peak RSS %.2f GiB', batch, r, row['policy'],
                   row['budget'] or '', row['times'][-1], row['rss_peak_bytes'] / 2**30)
      del out
  full = next((row for row in rows if row['policy'] == 'full'), None)
  for row in rows:
    steady = statistics.median(row['times']) if row['times'] else float('nan')
    row.update(steady_s_per_batch=steady, s_per_image=steady / batch, images_per_s=batch / steady,
               tokens_per_s=batch * cfg.seq_len / steady, compile_s_est=row['first_call_s'] - steady)
    if full is not None and row['times']:
      # ratio of alternated calls (run r of this policy against run r of the full cache), median
      row['vs_full'] = statistics.median(t / f for t, f in zip(row['times'], full['times']))
  return rows


def max_batches(rows: list[dict[str, Any]], memory_bytes: float) -> None:
  """Adds max_batch_at_memory (least-squares line of rss_peak over batch) and max_batch_cache_only."""
  by_key: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    by_key.setdefault((row['policy'], row['budget']), []).append(row)
  for group in by_key.values():
    b = np.array([r['batch'] for r in group], np.float64)
    rss = np.array([r['rss_peak_bytes'] for r in group], np.float64)
    per_image = group[0]['cache_bytes_allocated'] / group[0]['batch']
    for r in group:
      r['max_batch_cache_only'] = int(memory_bytes // per_image)
    if len(set(b.tolist())) < 2:
      continue
    slope, base = np.polyfit(b, rss, 1)
    fit = int((memory_bytes - base) // slope) if slope > 0 else None
    for r in group:
      r.update(rss_fit_base_bytes=float(base), rss_fit_bytes_per_image=float(slope),
               max_batch_at_memory=fit)


def markdown(rows: list[dict[str, Any]]) -> str:
  head = ('| policy | budget | batch | s / image (runs) | vs full | first call (compile) | cache bits '
          'counted | cache bytes allocated | peak RSS (GiB) | max batch at memory |')
  lines = [head, '|' + '---|' * 10]
  for r in rows:
    runs = ', '.join(f'{t / r["batch"]:.2f}' for t in r['times'])
    vs = f'{r["vs_full"]:.2f}x' if 'vs_full' in r else '-'
    fit = r.get('max_batch_at_memory', '-')
    lines.append(f'| {r["policy"]} | {r["budget"] or "-"} | {r["batch"]} | {r["s_per_image"]:.2f} ({runs}) | '
                 f'{vs} | {r["first_call_s"]:.1f} s ({r["compile_s_est"]:.1f} s) | '
                 f'{r["cache_bits_counted"]:,} | {r["cache_bytes_allocated"]:,} | '
                 f'{r["rss_peak_bytes"] / 2**30:.2f} | {fit} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    batches = [int(b) for b in FLAGS.batch]
  except ValueError:
    raise app.UsageError(f'--batch must be a list of integers, got {FLAGS.batch}') from None
  if min(batches) < 1:
    raise app.UsageError(f'--batch must be >= 1, got {FLAGS.batch}')
  if FLAGS.compile_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compile_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  var, vae, name = _models()
  entries = _policies(var, vae)
  for n, b, _, source in entries:
    logging.info('%s %s: %s', n, b or '', source)
  rows = []
  for batch in batches:
    for row in bench_batch(var, vae, entries, batch):
      rows.append({'model': name, 'device': jax.devices()[0].platform, **row})
  if FLAGS.memory_gib:
    max_batches(rows, FLAGS.memory_gib * 2**30)
  for row in rows:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
  print(markdown(rows))
  labels = [i % var.cfg.num_classes for i in range(batches[0])]
  kw = dict(cfg=FLAGS.cfg, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  if FLAGS.flops:
    peak = flops_lib.peak_matmul_flops()
    for n, b, policy, _ in entries:
      f = flops_lib.generate_flops(var, vae, policy or FullCache(tuple(var.cfg.patch_nums)),
                                   labels, **kw)
      steady = next(r['steady_s_per_batch'] for r in rows
                    if (r['policy'], r['budget'], r['batch']) == (n, b, batches[0]))
      print(json.dumps({'flops': n, 'budget': b, 'batch': batches[0], 'gflop_per_call': f['total'] / 1e9,
                        'gflop_var_steps': sum(f['var_steps']) / 1e9, 'gflop_vae_decode': f['decode'] / 1e9,
                        'gflop_vae_decode_official': f['decode_official'] / 1e9,
                        'model_gflop_per_call': f['model_total'] / 1e9,
                        'gflop_per_scale': [round(x / 1e9, 3) for x in f['var_steps']],
                        'achieved_gflop_per_s': f['total'] / steady / 1e9,
                        'model_gflop_per_s': f['model_total'] / steady / 1e9,
                        'peak_gflop_per_s_matmul2048': peak['flops_per_s'] / 1e9,
                        'share_of_peak': f['model_total'] / steady / peak['flops_per_s'],
                        'share_of_peak_compiled': f['total'] / steady / peak['flops_per_s']}))
  if FLAGS.profile:
    policies = {f'{n} {b}' if b else n: p for n, b, p, _ in entries}
    result = sampling_profile.profile(var, vae, policies, labels, runs=max(FLAGS.runs, 1), **kw)
    print(sampling_profile.markdown(result))


if __name__ == '__main__':
  from var_jax import cli
  cli.run(main)
