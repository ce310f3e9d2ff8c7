r"""One layer's composed step against the full cache's, per scale, in its parts.

    python -m eval.bench.composed_step --size=d16 --batch=1 --budget=25% --runs=30

Random weights (--size), composed calibrated on the fly on --calibrate_images generated images (as
`eval.bench.sampling` does), q, k, v of layer --layer captured from a full-cache generation of --batch
images (2 sequences each under CFG). Per scale, each piece jitted alone and timed on the same inputs,
the calls alternated (median of --runs):
  full:      `FullCache.attend` (write the scale into the buffer, in place, then attend over the prefix);
  composed:  `composed.step`, the whole step: decode + attention + store;
  decode:    the held entries read back from the stream and rebuilt (`_view`);
  attention: the output's attention over the decoded entries plus the scale (`attend_output`);
  store:     the scale absorbed and the entries coded and packed (`absorb`, `_store`; where the scale
             merges, with the two-part attention whose probabilities the merge needs);
  quantize:  the compander alone (`compander.quantize`: erf, one edge comparison) on as many
             coefficients as the store codes (Gaussian at the code's scales), to uint16 codes.
and the coefficients the step codes and reads back (entries x components x sequence-heads), so the
cost per coefficient. The parts overlap in the whole step (XLA fuses across them), so they need not sum
to it. In a generate call the same work runs in a program of 16 layers, where XLA runs one layer's store
beside the next layer's matmuls: `eval.bench.sampling --profile` times it there.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from absl import flags
import jax
import jax.numpy as jnp

from compress.composed.compander import quantize
from compress.core.attention import attend_output
from compress.core.budget import CacheGeometry
from compress.core.registry import make
from eval.bench.sampling_params import policy_params
from eval.bench.sampling_profile import captured_qkv
from var_jax import cli
from var_jax.config import SIZES
from var_jax.kvcache import FullCache
from var_jax.random_init import random_models

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined when run as a program: `eval.bench.sampling` defines some of the
  same names, and tests import both)."""
  flags.DEFINE_string('size', 'd16', f'model size with random weights: {", ".join(SIZES)}')
  flags.DEFINE_integer('batch', 1, 'images (2x sequences with CFG)')
  flags.DEFINE_string('budget', '25%', "composed's budget")
  flags.DEFINE_integer('layer', None, 'the layer whose q, k, v and parameters are used (default 3, or '
                       "a shallower model's last)")
  flags.DEFINE_integer('runs', 30, 'timed calls per piece, alternated')
  flags.DEFINE_integer('calibrate_images', 2, 'images generated with the full cache to calibrate on')


def _alternated(pieces: dict[str, tuple[Callable, Callable[[], tuple]]], runs: int) -> dict[str, float]:
  """Median ms of each piece fn(*make_args()), the pieces called in turn `runs` times after a compile
  call each; arguments made outside the timed span."""
  times = {name: [] for name in pieces}
  for fn, make_args in pieces.values():
    jax.block_until_ready(fn(*make_args()))
  for _ in range(runs):
    for name, (fn, make_args) in pieces.items():
      args = jax.block_until_ready(make_args())
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def coded_coefficients(comp, scale: int, sequence_heads: int) -> tuple[int, int]:
  """(read back, coded) coefficients of composed's step at `scale`: the coded entries (a stage's slots,
  the exact sink apart) of the state it decodes and of the state it stores, x 2 x head_dim components
  (keys' and values', zero-width ones included: the step processes them), x sequence-heads."""
  plan = comp.stages()
  per_entry = 2 * comp.geometry.head_dim * sequence_heads
  entries = lambda stage: stage.slots if stage.mode == 'coded' else 0
  read = entries(plan[scale - 1]) if scale > 0 else 0
  coded = 0 if comp.is_last(scale) else entries(plan[scale])
  return read * per_entry, coded * per_entry


def bench(var, vae, *, budget: str, batch: int, layer: int, runs: int, calibrate_images: int
          ) -> list[dict[str, Any]]:
  """Per scale: ms of the full cache's attend, composed's step and its parts, coefficients coded."""
  cfg = var.cfg
  comp = make('composed', CacheGeometry(tuple(cfg.patch_nums), cfg.head_dim), budget)
  if comp.passthrough or not any(st.mode == 'coded' for st in comp.stages()):
    raise ValueError(f'composed at {budget} codes nothing (it keeps every token exact): its step is the '
                     'full cache\'s, so there is nothing to compare; pass a smaller budget, e.g. 25%')
  params, _ = policy_params(comp, var, vae, params_from=None, images=calibrate_images, sequences=0)
  p = jax.tree.map(lambda a: jnp.asarray(a[layer]), params)
  qkv = [s[layer] for s in captured_qkv(var, vae, list(range(batch)), seed=0, cfg=1.5, top_k=900,
                                        top_p=0.96)]
  B, H = qkv[0][1].shape[:2]
  full = FullCache(tuple(cfg.patch_nums))
  full_state = full.init(B, H, cfg.head_dim, 1, patch_nums=tuple(cfg.patch_nums))[0]
  state, plan, rows = comp.init_state(B, H), comp.stages(), []
  for scale, (q, k, v) in enumerate(qkv):
    prev = plan[scale - 1] if scale > 0 else None
    reads = prev is not None and prev.mode == 'coded'
    codes = not comp.is_last(scale) and plan[scale].mode == 'coded'
    full_fn = jax.jit(lambda st, q, k, v, s=scale: full.attend(st, 0, s, q, k, v), donate_argnums=0)
    step_fn = jax.jit(lambda p, st, q, k, v, s=scale: comp.step(p, st, q, k, v, s))
    if reads or codes:                     # the scales where composed's step differs from the full cache's
      pieces = {'full': (full_fn, lambda: (jax.tree.map(jnp.copy, full_state), q, k, v)),
                'composed': (step_fn, lambda: (p, state, q, k, v))}
      view = comp._view(p, state, prev)
      if reads:
        decode_fn = jax.jit(lambda p, st, prev=prev: comp._view(p, st, prev))
        attend_fn = jax.jit(lambda view, q, k, v: attend_output(q, *comp.held_entries(view), k, v))
        pieces['decode'] = (decode_fn, lambda: (p, state))
        pieces['attention'] = (attend_fn, lambda: (view, q, k, v))
      if codes:
        def store(p, view, q, k, v, s=scale):
          probs = (None, None)
          if comp.merges_at(plan[s], view, k.shape[2]):
            probs = comp.attend_view(view, q, k, v)[1:]
          return comp._store(p, plan[s], comp.absorb(p, plan[s], view, k, v, *probs), B, H)
        pieces['store'] = (jax.jit(store), lambda: (p, view, q, k, v))
        scale_HR, width_HR = comp.scales_widths(p, plan[scale].code)
        x_HRBM = scale_HR[:, :, None, None] * jax.random.normal(
            jax.random.key(scale), scale_HR.shape + (B, plan[scale].slots))
        quantize_fn = jax.jit(lambda x, s, w: quantize(x, s[..., None, None], w[..., None, None]
                                                       ).astype(jnp.uint16))
        pieces['quantize'] = (quantize_fn, lambda: (x_HRBM, scale_HR, width_HR))
      read, coded = coded_coefficients(comp, scale, B * H)
      rows.append({'scale': scale, 'read_back': read, 'coded': coded, **_alternated(pieces, runs)})
    _, full_state = full_fn(jax.tree.map(jnp.copy, full_state), q, k, v)
    _, state = step_fn(p, state, q, k, v)
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  """A row per scale where composed codes or reads back, and their total: ms of each piece,
  composed's extra over the full cache, and that extra per coefficient read back or coded (ns)."""
  cols = ['full', 'composed', 'decode', 'attention', 'store', 'quantize']
  lines = ['| scale | ' + ' | '.join(f'{c} ms' for c in cols) + ' | extra ms | coefficients read back / '
           'coded | extra ns per coefficient |', '|' + '---|' * (len(cols) + 4)]
  total = {c: sum(r.get(c, 0.0) for r in rows) for c in cols + ['read_back', 'coded']}
  for r in [*rows, {**total, 'scale': 'all'}]:
    extra, n = r['composed'] - r['full'], r['read_back'] + r['coded']
    cells = ' | '.join(f'{r[c]:.2f}' if c in r else '-' for c in cols)
    per = f'{1e6 * extra / n:.2f}' if n else '-'
    lines.append(f"| {r['scale']} | {cells} | {extra:+.2f} | {r['read_back']:,} / {r['coded']:,} | {per} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.size not in SIZES:
    raise cli.UserError(f'--size must be one of {", ".join(SIZES)}, got {FLAGS.size}')
  if FLAGS.batch < 1 or FLAGS.runs < 1 or FLAGS.calibrate_images < 1:
    raise cli.UserError(f'--batch={FLAGS.batch}, --runs={FLAGS.runs}, --calibrate_images='
                        f'{FLAGS.calibrate_images}: each must be at least 1')
  var, vae = random_models(FLAGS.size, 0)
  layer = min(3, var.cfg.depth - 1) if FLAGS.layer is None else FLAGS.layer
  if not 0 <= layer < var.cfg.depth:
    raise cli.UserError(f'--layer={layer}: the {FLAGS.size} model has layers 0..{var.cfg.depth - 1}')
  rows = bench(var, vae, budget=FLAGS.budget, batch=FLAGS.batch, layer=layer, runs=FLAGS.runs,
               calibrate_images=FLAGS.calibrate_images)
  print(f'composed {FLAGS.budget}, {FLAGS.size} layer {layer}, batch {FLAGS.batch} '
        f'({2 * FLAGS.batch} sequences x {var.cfg.num_heads} heads), median of {FLAGS.runs} alternated calls')
  print(markdown(rows))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
