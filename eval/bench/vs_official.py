r"""Sampling speed of `var_jax` beside the official PyTorch VAR, same random weights, same process.

The official code is not part of this repository: clone it yourself (FoundationVision/VAR, commit
78b9539), install torch and huggingface_hub (its models import it), then

    python -m eval.bench.vs_official --official_repo /path/to/VAR --depth 16 --batch 1 --runs 3 --threads 2

It builds the official d<depth> VAR and VQ-VAE with their own initialisation (seeded; the VQ-VAE's
convolutions, which the official builder leaves as `torch.empty` memory, get torch's default one:
`init_vae_convs`), saves both state dicts as .pth into --workdir, loads those files into var_jax (`var_jax.convert`, so both sides hold the
same weights), and times `autoregressive_infer_cfg` against `var_jax.sampling.generate` at the same batch,
cfg, top-k and top-p: one warm-up call each (our compile; torch's first-call overheads), then --runs
timed calls each, alternating sides so that background load hits both alike. Thread counts: torch
`set_num_threads(threads)`; XLA's CPU thread pools are sized by `--threads` through XLA_FLAGS, set
before jax starts. Prints one JSON line with both sides' seconds per image and their ratio.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import flags

from var_jax import cli
from var_jax.cli import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('official_repo', None, 'a checkout of the official VAR code (FoundationVision/VAR)')
flags.DEFINE_integer('depth', 16, 'VAR depth (16, 20, 24, 30)')
flags.DEFINE_integer('batch', 1, 'images per call (2x sequences with CFG)')
flags.DEFINE_integer('runs', 3, 'timed calls per side after one warm-up call')
flags.DEFINE_integer('threads', 2, 'CPU threads for each side')
flags.DEFINE_float('cfg', 1.5, 'guidance')
flags.DEFINE_integer('top_k', 900, 'top-k')
flags.DEFINE_float('top_p', 0.96, 'top-p')
flags.DEFINE_string('workdir', '/tmp/bench_vs_official', 'where the shared .pth weights are written')
flags.mark_flags_as_required(['official_repo'])


def official_models(repo: str, depth: int, workdir: str):
  """The official (vae, var) at depth `depth`, seeded, in eval mode; their state dicts saved as .pth."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency of this script only)
  sys.path.insert(0, os.path.abspath(repo))
  from models import build_vae_var  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vae, var = build_vae_var(device='cpu', depth=depth, flash_if_available=False, fused_if_available=False)
  init_vae_convs(vae)
  vae.eval()
  var.eval()
  os.makedirs(workdir, exist_ok=True)
  paths = {n: os.path.join(workdir, f'{n}_d{depth}.pth') for n in ('vae', 'var')}
  torch.save(vae.state_dict(), paths['vae'])
  torch.save(var.state_dict(), paths['var'])
  return vae, var, paths


def init_vae_convs(vae) -> int:
  """Gives the VQ-VAE's convolutions torch's default initialisation, seeded; returns how many.

  `build_vae_var` switches torch's built-in initialisation off for speed (it expects a checkpoint) and
  `init_weights` re-initialises the VAR only, so the VQ-VAE's convolution weights and biases are whatever
  memory `torch.empty` returned: on this machine some were NaN (73 values at d8, seed 0), which made the
  official sampler fail (`probability tensor contains either inf, nan`) and left both sides timing
  arithmetic on garbage (denormals included). `_ConvNd.reset_parameters` is torch's own default, which the
  official patch shadows on `nn.Conv2d` only.
  """
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency of this script only)
  convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
  torch.manual_seed(1)
  for m in convs:
    torch.nn.modules.conv._ConvNd.reset_parameters(m)  # pylint: disable=protected-access
  bad = [n for n, p in vae.named_parameters() if not bool(torch.isfinite(p).all())]
  if bad:
    raise RuntimeError(f'the official VQ-VAE still holds non-finite parameters after initialisation: {bad}')
  return len(convs)


def timed(fn, runs: int) -> tuple[float, list[float]]:
  t0 = time.perf_counter()
  fn(0)
  first = time.perf_counter() - t0
  times = []
  for r in range(runs):
    t0 = time.perf_counter()
    fn(r + 1)
    times.append(time.perf_counter() - t0)
  return first, times


def main(argv):
  del argv
  threads = FLAGS.threads
  if not os.path.isfile(os.path.join(FLAGS.official_repo, 'models', 'var.py')):
    raise UserError(f'--official_repo {FLAGS.official_repo!r} is not a checkout of FoundationVision/VAR (no '
                    'models/var.py): git clone https://github.com/FoundationVision/VAR and pass its path')
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=true '
                             f'intra_op_parallelism_threads={threads}').strip()
  try:
    import torch  # pylint: disable=g-import-not-at-top  (this script's own dependency)
  except ImportError:
    raise UserError('this benchmark runs the official PyTorch code: pip install torch huggingface_hub') from None
  torch.set_num_threads(threads)
  vae_t, var_t, paths = official_models(FLAGS.official_repo, FLAGS.depth, FLAGS.workdir)
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)
  from var_jax import sampling  # pylint: disable=g-import-not-at-top
  from var_jax.convert import load_official_models  # pylint: disable=g-import-not-at-top
  var_j, vae_j = load_official_models(paths['var'], paths['vae'])
  B = FLAGS.batch
  labels = [i % 1000 for i in range(B)]

  def ours(seed: int):
    out = sampling.generate(var_j, vae_j, labels, key=jax.random.key(seed), cfg=FLAGS.cfg,
                            top_k=FLAGS.top_k, top_p=FLAGS.top_p)
    jax.block_until_ready(out.images)

  def official(seed: int):
    with torch.inference_mode():
      var_t.autoregressive_infer_cfg(B, torch.tensor(labels), g_seed=seed, cfg=FLAGS.cfg,
                                     top_k=FLAGS.top_k, top_p=FLAGS.top_p)

  first = {'ours': timed(ours, 0)[0], 'official': timed(official, 0)[0]}
  times = {'ours': [], 'official': []}
  for r in range(FLAGS.runs):                       # alternate: load hits both sides alike
    for name, fn in (('ours', ours), ('official', official)):
      t0 = time.perf_counter()
      fn(r + 1)
      times[name].append(time.perf_counter() - t0)
  per_image = {n: statistics.median(t) / B for n, t in times.items()}
  print(json.dumps({
      'depth': FLAGS.depth, 'batch': B, 'runs': FLAGS.runs, 'threads': threads,
      'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), 'jax': jax.__version__,
      'xla_flags': os.environ['XLA_FLAGS'], 'cpu_count': os.cpu_count(),
      'first_call_s': {n: round(v, 2) for n, v in first.items()},
      'steady_s': {n: [round(x, 3) for x in t] for n, t in times.items()},
      's_per_image': {n: round(v, 3) for n, v in per_image.items()},
      'speedup_ours_vs_official': round(per_image['official'] / per_image['ours'], 3)}))


if __name__ == '__main__':
  cli.run(main)
