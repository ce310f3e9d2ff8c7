"""A small frontier run shared by tests (the session fixture `tiny_frontier_run`, tests/conftest.py):
configs/frontier.py:tiny on the in-repo official tiny model (tests/data/var_official_tiny), three
heuristics with shared or no parameters (full, window, pca) and one learned compressor (lowrank_learned,
trained STEPS steps with a checkpoint every 10), no closed loop or bounds: the same run as
`python -m eval.frontier <flags(workdir)>`."""
import csv
import os
import pathlib

REPO = pathlib.Path(__file__).parent.parent
FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
STEPS = 60
POINTS = 4                     # full, window, pca, lowrank_learned at 25 %
SERVED = 8                     # held-out sequences: 2 shards x 2 images x 2 CFG halves
LAYERS, HEADS, HEAD_DIM = 2, 2, 64   # the official tiny model (depth 2, 2 heads of 64)
TRAIN_RUN = 'lowrank_learned-default-7168bits'    # 25 % of 14 peak tokens x 128 coordinates x 16 bits

_FLAGS = {
    'model.source': 'official', 'model.var_ckpt': str(FIX / 'var.pth'), 'model.vae_ckpt': str(FIX / 'vae.pth'),
    'model.patch_nums': (1, 2, 3, 4), 'capture.train_shards': 1, 'capture.val_shards': 2,
    'capture.shard_size': 2, 'sweep.methods': ('full', 'window', 'pca'), 'sweep.budgets': ('25%',),
    'sweep.calibration_sequences': 4, 'sweep.batch': 4, 'learned.methods': ('lowrank_learned',),
    'learned.budgets': ('25%',), 'learned.train.num_steps': STEPS, 'learned.train.ckpt_every': 10,
    'learned.train.eval_every': 0, 'learned.train.batch_size': 4, 'learned.train.eval_sequences': 4,
    'learned.train.calibration_sequences': 4, 'closed_loop.methods': (), 'gaussian_reference': False,
    'rank_bound.settings': (), 'progress': False}
# set only where the config has them: per-head budgets as given (shared parameters reported apart)
_IF_PRESENT = {'sweep.fit_amortised': False, 'tuning.grids.pca': ()}   # pca at its given setting


def _has(c, name):
  *path, leaf = name.split('.')
  for p in path:
    if p not in c:
      return False
    c = c[p]
  return leaf in c


def _settings():
  from configs import frontier as frontier_config  # pylint: disable=g-import-not-at-top
  c = frontier_config.get_config('tiny')
  return c, {**_FLAGS, **{n: v for n, v in _IF_PRESENT.items() if _has(c, n)}}


def config():
  c, settings = _settings()
  for name, value in settings.items():
    *path, leaf = name.split('.')
    node = c
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def flags(workdir):
  """The command-line flags of the same run."""
  text = lambda v: '(' + ''.join(f'{x!r},' for x in v) + ')' if isinstance(v, tuple) else str(v)
  return ['--config=configs/frontier.py:tiny', f'--workdir={workdir}'] + [
      f'--config.{n}={text(v)}' for n, v in _settings()[1].items()]


def rows(workdir):
  with open(os.path.join(workdir, 'frontier.csv'), newline='') as f:
    return list(csv.DictReader(f))


def key(row):
  return row['method'], row['setting'], row['budget']
