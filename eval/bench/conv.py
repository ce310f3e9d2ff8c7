r"""The VQ-VAE decoder's 3x3 convolutions: XLA's against Winograd's F(4x4, 3x3) (`var_jax.winograd`).

    python -m eval.bench.conv --size=d16 --batch=2 --runs=5

Times, on this machine and for the decoder of `--size` (random weights): each ResnetBlock convolution
shape the decoder runs (after GroupNorm's SiLU, as in the block; compiled with the decode's XLA
options), XLA's convolution and Winograd's alternated, and the whole decode of `--batch` images with
every ResnetBlock direct (`ResnetBlock(direct=True)`) against the default (Winograd where
`winograd.applies`). Prints one JSON line: milliseconds per shape, seconds per decode (medians), the
ratios, and the largest difference of the two decodes' images (in [0, 1]).
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from var_jax import cli, random_init, sampling, winograd, xla_cpu
from var_jax.config import SIZES
from var_jax.vae_blocks import ResnetBlock, direct_clone

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The script's flags, defined when it runs (its names are eval.bench.sampling's too: a process may
  import both)."""
  flags.DEFINE_string('size', 'd16', f'model size (its VQ-VAE, random weights): {", ".join(SIZES)}')
  flags.DEFINE_integer('batch', 2, 'images per decode (d8 batch 2 decodes 2)')
  flags.DEFINE_integer('runs', 5, 'timed calls per variant, alternated')


def _timed(fns: dict, args: dict, runs: int) -> dict[str, float]:
  """Median seconds of each compiled fn(*args[name]), the variants alternated."""
  times = {n: [] for n in fns}
  for _ in range(runs):
    for n, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args[n]))
      times[n].append(time.perf_counter() - t0)
  return {n: statistics.median(t) for n, t in times.items()}


def _shapes(vae) -> list[tuple[int, int, int]]:
  """(side, c_in, c_out) of the decoder's ResnetBlock convolutions, each once."""
  side, shapes = vae.cfg.patch_nums[-1], []
  for level in reversed(vae.decoder.up):
    for block in level.block:
      for conv in (block.conv1, block.conv2):
        shapes.append((side, *conv.kernel.shape[2:]))
    side *= 2 if level.upsample is not None else 1
  return list(dict.fromkeys(shapes))


def main(argv):
  del argv
  if FLAGS.size not in SIZES or FLAGS.batch < 1 or FLAGS.runs < 1:
    raise cli.UserError(f'--size must be one of {", ".join(SIZES)} and --batch, --runs >= 1')
  _, vae = random_init.random_models(FLAGS.size)
  opts = xla_cpu.generation_options(None, decode=True)
  B, rng = FLAGS.batch, np.random.default_rng(0)
  convs = {}
  for side, c_in, c_out in _shapes(vae):
    x = jnp.asarray(rng.standard_normal((B, side, side, c_in)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in), jnp.float32)
    b = jnp.zeros((c_out,), jnp.float32)
    xla = lambda x, k, b: jax.lax.conv_general_dilated(jax.nn.silu(x), k, (1, 1), 'SAME',
                                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
    wino = lambda x, k, b: winograd.conv3x3(jax.nn.silu(x), k, b)
    fns = {n: jax.jit(f).lower(x, k, b).compile(compiler_options=opts)
           for n, f in (('xla', xla), ('winograd', wino))}
    t = _timed(fns, {n: (x, k, b) for n in fns}, FLAGS.runs)
    convs[f'{side}px {c_in}->{c_out}'] = {
        'xla_ms': round(1e3 * t['xla'], 2), 'winograd_ms': round(1e3 * t['winograd'], 2),
        'speedup': round(t['xla'] / t['winograd'], 3),
        'applies': winograd.applies((B, side, side, c_in), (3, 3, c_in, c_out))}
  direct = direct_clone(vae, (ResnetBlock,))
  f_hat = jax.random.normal(jax.random.key(0), (B, *vae.cfg.patch_nums[-1:] * 2, vae.cfg.z_channels))
  models = {'xla': nnx.split(direct), 'default': nnx.split(vae)}
  fns = {n: sampling.compiled_decode(g, s, f_hat) for n, (g, s) in models.items()}
  args = {n: (s, f_hat) for n, (_, s) in models.items()}
  images = {n: np.asarray(fns[n](*args[n])) for n in fns}
  t = _timed(fns, args, FLAGS.runs)
  print(json.dumps({
      'size': FLAGS.size, 'batch': B, 'runs': FLAGS.runs, 'jax': jax.__version__,
      'backend': jax.default_backend(), 'convs': convs,
      'decode_s': {n: round(v, 3) for n, v in t.items()},
      'decode_speedup': round(t['xla'] / t['default'], 3),
      'decode_max_abs_diff': float(np.abs(images['xla'] - images['default']).max())}))


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
