r"""VAR training (next-scale prediction) on the tokens of a trained multi-scale VQ-VAE.

Run (from the repository root), after train.vqvae:
  python -m train.var --config configs/var.py:default --workdir runs/var_default \
      --config.vqvae_workdir=runs/vqvae_default
  python -m train.var --config configs/var.py:tiny --workdir /tmp/var_tiny \
      --config.vqvae_workdir=/tmp/vqvae_tiny      # < 1 min on CPU

The vocabulary, Cvae and scale schedule come from the VQ-VAE run; the number of classes from the
dataset. Override any field with `--config.<field>=<value>`. Variants: `tiny` (depth 2, 4 scales;
tests), `default` (depth 4, width 256, 4 heads of 64, 7 scales; the shipped model).
"""
import ml_collections

from configs.vqvae import data_config

VARIANTS = ('tiny', 'default')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is the variant name (default 'default')."""
  variant = arg or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/var.py; choose one of {VARIANTS}')
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.vqvae_workdir = ''          # required: workdir of a train.vqvae run
  c.vqvae_step = -1             # its checkpoint step; -1: the latest (recorded at the first start)
  # VARConfig fields not taken from the VQ-VAE / dataset; width 0 -> 64 * depth, num_heads 0 -> depth.
  c.model = ml_collections.ConfigDict({
      'depth': 4, 'width': 0, 'num_heads': 0, 'mlp_ratio': 4.0, 'attn_l2_norm': True, 'shared_aln': False,
      'cond_drop_rate': 0.1})
  c.data = data_config(num_images=20_000)
  c.label_smoothing = 0.0
  # optimisation (official VAR: AdamW betas (0.9, 0.95), wd 0.05, clip 2; warm-up then decay)
  c.batch_size = 32
  c.num_steps = 2000
  c.lr = 1e-3
  c.end_lr_ratio = 0.02
  c.warmup_steps = 100
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 2.0
  # evaluation: held-out teacher-forced loss / accuracy, and samples (one per class) with CFG
  c.eval_images = 256
  c.samples_per_class = 1
  c.sample_cfg = 1.5
  c.sample_top_k = 0            # 0: no top-k filter
  c.sample_top_p = 0.0          # 0: no top-p filter
  # bookkeeping (runtime keys: may change when resuming)
  c.log_every = 25
  c.eval_every = 500
  c.ckpt_every = 500
  c.keep_ckpts = 3
  c.progress = True
  c.overwrite = False
  if variant == 'tiny':
    c.model.depth = 2
    c.data.num_images = 256
    c.batch_size = 8
    c.num_steps = 12
    c.lr = 3e-3
    c.warmup_steps = 2
    c.eval_images = 16
    c.log_every = 2
    c.eval_every = 12
    c.ckpt_every = 6
    c.progress = False
  return c
