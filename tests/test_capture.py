"""The captured-cache dataset (var_jax.capture) against the sampler's own q, k, v and KV cache."""
import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

import var_jax
from var_jax import capture as cap

FIX = pathlib.Path(__file__).parent / 'data' / 'var_official_tiny'
ARGS = dict(train_shards=2, val_shards=1, shard_size=2, seed=3, cfg=1.5, top_k=0, top_p=0.0,
            progress=False)


@pytest.fixture(scope='module')
def model():
  return var_jax.load_official(FIX / 'var.pth', FIX / 'vae.pth')


@pytest.fixture(scope='module')
def captured(model, tmp_path_factory):
  out = tmp_path_factory.mktemp('cap') / 'a'
  assert cap.capture(model, out, **ARGS) == str(out)
  return out


def digests(d: pathlib.Path) -> dict[str, str]:
  """Every file in `d` (hidden ones too) -> sha256."""
  return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def count_generate(monkeypatch, model, fail_on: int | None = None) -> list[int]:
  calls, real = [], model.generate
  def generate(*a, **kw):
    calls.append(1)
    if len(calls) == fail_on:
      raise KeyboardInterrupt('simulated interruption')
    return real(*a, **kw)
  monkeypatch.setattr(model, 'generate', generate)
  return calls


def test_stored_qkv_equal_the_samplers(model, captured):
  manifest = json.loads((captured / 'manifest.json').read_text())
  c, b = model.var.cfg, ARGS['shard_size']
  for split in ('train', 'val'):
    ds = cap.CaptureDataset(captured, split)
    assert (ds.num_layers, ds.num_heads, ds.head_dim, ds.patch_nums) == (2, 2, 64, (1, 2, 3, 4))
    for i, name in enumerate(manifest['splits'][split]):
      seed = ARGS['seed'] + i + (cap.VAL_SEED_OFFSET if split == 'val' else 0)
      labels = [int(x) for x in (i * b + np.arange(b) + (0 if split == 'train' else 5)) % 10]
      assert manifest['shards'][name]['seed'] == seed and manifest['shards'][name]['labels'] == labels
      g = model.generate(labels, seed=seed, cfg=1.5, top_k=0, top_p=0.0, return_qkv=True,
                         return_cache=True)
      rows = np.arange(2 * b * i, 2 * b * (i + 1))
      got = ds.get(rows)
      for kind, arr in got.items():
        assert arr.dtype == np.float32 and arr.shape == (2, 2 * b, 2, c.seq_len, 64)
      for layer in range(c.depth):
        for j, kind in enumerate('qkv'):
          want = np.concatenate([np.asarray(s[layer][j]) for s in g.qkv], axis=2)
          np.testing.assert_array_equal(got[kind][layer], want)
        for kind in 'kv':   # the full cache (conditional half first) holds the same keys / values
          np.testing.assert_array_equal(got[kind][layer],
                                        np.asarray(g.cache[layer][kind])[:, :, :c.seq_len])
      np.testing.assert_array_equal(ds.labels[rows], labels * 2)
      np.testing.assert_array_equal(ds.halves[rows], [0] * b + [1] * b)
      np.testing.assert_array_equal(ds.seeds[rows], seed)
      tokens = np.concatenate([np.asarray(t) for t in g.tokens], axis=1)
      np.testing.assert_array_equal(ds.tokens[rows], np.concatenate([tokens, tokens]))
  # any order, across shards, negative indices
  ds = cap.CaptureDataset(captured, 'train')
  assert ds.num_sequences == len(ds) == 8 and ds.tokens.shape == (8, c.seq_len)
  full, picked = ds.get(np.arange(8)), ds.get([5, -8, 2, 5])
  np.testing.assert_array_equal(picked['v'], full['v'][:, [5, 0, 2, 5]])
  ds.MAX_OPEN = 1   # shards closed and re-opened
  np.testing.assert_array_equal(ds.get([7, 0, 6])['q'], full['q'][:, [7, 0, 6]])
  with pytest.raises(IndexError, match='indices must be in'):
    ds.get([8])


def test_split_by_seed(captured):
  train, val = cap.CaptureDataset(captured, 'train'), cap.CaptureDataset(captured, 'val')
  assert set(train.seeds) == {3, 4} and set(val.seeds) == {3 + cap.VAL_SEED_OFFSET}
  assert not set(train.seeds) & set(val.seeds)


def test_rerun_is_identical_and_generates_nothing(model, captured, monkeypatch):
  before = digests(captured)
  calls = count_generate(monkeypatch, model)
  cap.capture(model, captured, **ARGS)
  assert not calls and digests(captured) == before
  assert not any(n.endswith('.partial') for n in before)


@pytest.mark.parametrize('where', ['generate', 'write'])
def test_interrupted_capture_resumes(model, captured, tmp_path, monkeypatch, where):
  out = tmp_path / 'b'
  with monkeypatch.context() as m:
    if where == 'generate':   # interrupted before the second shard is sampled
      count_generate(m, model, fail_on=2)
    else:                     # interrupted after the second shard's q file was written
      real, n = cap._stack, []
      def stack(*a):
        n.append(1)
        if len(n) == 5:
          raise KeyboardInterrupt('simulated interruption')
        return real(*a)
      m.setattr(cap, '_stack', stack)
    with pytest.raises(KeyboardInterrupt):
      cap.capture(model, out, **ARGS)
  assert len(json.loads((out / 'manifest.json').read_text())['shards']) == 1
  with pytest.raises(ValueError, match='unfinished capture'):
    cap.CaptureDataset(out, 'train')
  calls = count_generate(monkeypatch, model)
  cap.capture(model, out, **ARGS)
  assert len(calls) == 2   # only the unfinished shards
  assert digests(out) == digests(captured)


def test_dev_split_has_its_own_seeds_and_old_captures_keep_their_identity(model, captured, tmp_path):
  """Three splits, apart by seed: train seed+i, val seed+1e6+j, dev seed+2e6+j. A capture made without
  dev (the fixture's) resumes unchanged when asked again without it; asking for dev is another capture."""
  plan = cap.shard_plan(2, 1, 2, 3, 10, dev_shards=2)
  seeds = {s: [p['seed'] for p in plan if p['split'] == s] for s in cap.SPLITS}
  assert seeds == {'train': [3, 4], 'val': [3 + 1_000_000], 'dev': [3 + 2_000_000, 4 + 2_000_000]}
  assert cap.shard_plan(2, 1, 2, 3, 10)[:3] == plan[:3]          # train and val unchanged by a dev split
  before = digests(captured)
  cap.capture(model, captured, **ARGS)
  assert digests(captured) == before and 'dev' not in json.loads((captured / 'manifest.json').read_text())['splits']
  with pytest.raises(ValueError, match=r'dev_shards'):
    cap.capture(model, captured, **ARGS, dev_shards=1)
  out = tmp_path / 'with_dev'
  cap.capture(model, out, **{**ARGS, 'train_shards': 1, 'val_shards': 0}, dev_shards=1)
  dev = cap.CaptureDataset(out, 'dev')
  assert set(dev.seeds) == {3 + cap.DEV_SEED_OFFSET} and dev.num_sequences == 4


def test_trainer_checks_on_dev_never_on_val(tmp_path):
  """The trainer's held-out split is `data.eval_split` ('dev'); a capture without one is refused with
  the fix, never silently replaced by the test split."""
  from configs import compressor as compressor_config
  from train import compressor_data
  (tmp_path / 'manifest.json').write_text(json.dumps({'splits': {'train': ['t'], 'val': ['v']}}))
  data = compressor_config.get_config('default').data
  data.path = str(tmp_path)
  assert data.eval_split == 'dev'
  with pytest.raises(ValueError, match=r'no dev sequences; capture with --dev_shards >= 1.*eval_split=val'):
    compressor_data.load_data(data)


def test_other_arguments_are_refused(model, captured):
  before = digests(captured)
  with pytest.raises(ValueError, match=r'sampling\.cfg \(1\.5 -> 2\.0\).*new --out'):
    cap.capture(model, captured, **{**ARGS, 'cfg': 2.0})
  with pytest.raises(ValueError, match=r'splits\.train.*train_shards \(2 -> 3\)'):
    cap.capture(model, captured, **{**ARGS, 'train_shards': 3})
  graph, state = nnx.split(model.var)
  other = var_jax.VARModel(nnx.merge(graph, jax.tree.map(lambda x: x * 1.5, state)), model.vae)
  with pytest.raises(ValueError, match='weights_sha256'):
    cap.capture(other, captured, **ARGS)
  assert digests(captured) == before
  (captured.parent / 'junk').mkdir()
  (captured.parent / 'junk' / 'x.txt').write_text('x')
  with pytest.raises(ValueError, match='no manifest.json'):
    cap.capture(model, captured.parent / 'junk', **ARGS)


def test_missing_or_corrupt_shard(model, captured, tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match='python -m var_jax.capture'):
    cap.CaptureDataset(tmp_path, 'train')
  out = tmp_path / 'c'
  shutil.copytree(captured, out)
  k_file = out / 'train-0000004.k.npy'
  data = bytearray(k_file.read_bytes())
  data[len(data) // 2] ^= 0xFF
  k_file.write_bytes(bytes(data))
  ds = cap.CaptureDataset(out, 'train')
  ds.get([0])   # shard 0 is intact
  with pytest.raises(ValueError, match=r'train-0000004\.k\.npy is corrupt.*same arguments'):
    ds.get([4])
  (out / 'val-1000003.q.npy').unlink()
  with pytest.raises(FileNotFoundError, match=r'val-1000003\.q\.npy is missing.*re-creates'):
    cap.CaptureDataset(out, 'val')
  calls = count_generate(monkeypatch, model)
  cap.capture(model, out, **ARGS)   # the fix the errors name
  assert len(calls) == 2 and digests(out) == digests(captured)


def test_cli_end_to_end_float16(captured, tmp_path, capsys):
  out = tmp_path / 'cli'
  fv = flags.FlagValues()
  cap.define_flags(fv)
  fv(['capture', f'--out={out}', f'--var_ckpt={FIX / "var.pth"}', f'--vae_ckpt={FIX / "vae.pth"}',
      '--train_shards=1', '--val_shards=1', '--shard_size=2', '--seed=3', '--dtype=float16',
      '--noprogress'])
  assert cap.main(['capture'], fv) == str(out)
  assert 'wrote' in capsys.readouterr().out
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['model']['source']['kind'] == 'official' and manifest['dtype'] == 'float16'
  assert np.load(out / 'train-0000003.q.npy', mmap_mode='r').dtype == np.float16
  got, ref = cap.CaptureDataset(out, 'train').get([1, 2]), cap.CaptureDataset(captured, 'train').get([1, 2])
  for kind in 'qkv':
    assert got[kind].dtype == np.float32
    np.testing.assert_array_equal(got[kind], ref[kind].astype(np.float16).astype(np.float32))
  fv2 = flags.FlagValues()
  cap.define_flags(fv2)
  fv2(['capture', f'--out={tmp_path / "x"}', f'--var_ckpt={FIX / "var.pth"}', '--model=default'])
  with pytest.raises(ValueError, match='exactly one model source'):
    cap.main(['capture'], fv2)
