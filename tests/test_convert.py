"""Tests for `var_jax.convert`: official torch pair -> orbax checkpoint -> models identical to a direct load."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var_jax import convert as convert_lib
from var_jax.config import VARConfig, VQVAEConfig
from var_jax.torch_pickle import load_torch_state_dict

FIXTURE = Path(__file__).parent / 'data' / 'var_official_tiny'
VAR_PTH, VAE_PTH = FIXTURE / 'var.pth', FIXTURE / 'vae.pth'


@pytest.fixture(scope='module')
def converted(tmp_path_factory) -> Path:
  """One end-to-end CLI conversion, into a non-empty directory (so --overwrite is exercised too)."""
  out = tmp_path_factory.mktemp('conv') / 'tiny'
  out.mkdir()
  (out / 'stale.txt').write_text('replaced by --overwrite')
  argv = ['--var', str(VAR_PTH), '--vae', str(VAE_PTH), '--out', str(out), '--overwrite']
  assert convert_lib.main(argv) == out
  return out


def _leaves_with_paths(state: nnx.State) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _assert_states_identical(got: nnx.State, want: nnx.State) -> None:
  got, want = _leaves_with_paths(got), _leaves_with_paths(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_configs_match_fixture(converted):
  meta = json.loads((converted / 'config.json').read_text())
  assert meta['format'] == convert_lib.FORMAT
  var_cfg, vae_cfg = convert_lib.read_converted_configs(converted)
  # The fixture README's build arguments.
  assert isinstance(var_cfg, VARConfig) and isinstance(vae_cfg, VQVAEConfig)
  assert (var_cfg.depth, var_cfg.width, var_cfg.num_heads) == (2, 128, 2)
  assert var_cfg.patch_nums == vae_cfg.patch_nums == (1, 2, 3, 4)    # read from lvl_1L
  assert (var_cfg.vocab_size, var_cfg.z_channels, var_cfg.num_classes) == (64, 8, 10)
  assert var_cfg.attn_l2_norm and not var_cfg.shared_aln
  assert (vae_cfg.vocab_size, vae_cfg.z_channels, vae_cfg.ch, vae_cfg.share_quant_resi) == (64, 8, 32, 4)


def test_reload_is_identical_to_direct_load(converted):
  direct_var, direct_vae = convert_lib.load_official_models(VAR_PTH, VAE_PTH)
  var_model, vae_model = convert_lib.load_converted_models(converted)   # via load_converted
  assert (var_model.cfg, vae_model.cfg) == (direct_var.cfg, direct_vae.cfg)
  _assert_states_identical(nnx.state(var_model), nnx.state(direct_var))
  _assert_states_identical(nnx.state(vae_model), nnx.state(direct_vae))
  # the restored modules hold the torch tensors themselves (checked without the loaders' name maps)
  var_sd, vae_sd = load_torch_state_dict(VAR_PTH), load_torch_state_dict(VAE_PTH)
  np.testing.assert_array_equal(np.asarray(var_model.class_emb.embedding[...]), var_sd['class_emb.weight'])
  np.testing.assert_array_equal(np.asarray(var_model.blocks[1].attn.mat_qkv.kernel[...]),
                                var_sd['blocks.1.attn.mat_qkv.weight'].T)      # torch (out, in) -> (in, out)
  np.testing.assert_array_equal(np.asarray(vae_model.encoder.conv_in.kernel[...]),
                                vae_sd['encoder.conv_in.weight'].transpose(2, 3, 1, 0))  # OIHW -> HWIO


def test_overwrite_replaced_the_directory_atomically(converted):
  assert not (converted / 'stale.txt').exists()
  assert sorted(p.name for p in converted.iterdir()) == ['config.json', 'vae', 'var']
  assert [p.name for p in converted.parent.iterdir()] == ['tiny']   # no temporary sibling left


def test_refuses_non_empty_out_dir(converted):
  before = sorted(p.name for p in converted.iterdir())
  with pytest.raises(FileExistsError, match='not empty; pass --overwrite'):
    convert_lib.main(['--var', str(VAR_PTH), '--vae', str(VAE_PTH), '--out', str(converted)])
  assert sorted(p.name for p in converted.iterdir()) == before


def test_patch_nums_flag_is_checked(tmp_path):
  with pytest.raises(ValueError, match=r'disagree with the checkpoint.*\(1, 2, 3, 4\)'):
    convert_lib.main(['--var', str(VAR_PTH), '--vae', str(VAE_PTH), '--out', str(tmp_path / 'x'),
                      '--patch_nums', '1,2,3,5'])
  assert not (tmp_path / 'x').exists()


def test_infer_patch_nums():
  lvl = np.repeat(np.arange(10), np.square([1, 2, 3, 4, 5, 6, 8, 10, 13, 16]))[None]
  assert convert_lib.infer_patch_nums({'lvl_1L': lvl}) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  with pytest.raises(ValueError, match='not squares'):
    convert_lib.infer_patch_nums({'lvl_1L': np.array([[0, 1, 1]])})
  with pytest.raises(ValueError, match='pass --patch_nums'):
    convert_lib.infer_patch_nums({})


def test_missing_converted_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a converted checkpoint.*var_jax.convert'):
    convert_lib.load_converted(tmp_path)


class _Toy(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(3, 4, rngs=rngs)
    self.count = nnx.BatchStat(jnp.full((2,), 7, jnp.int32))


def test_build_loaded_keeps_buffers_and_refuses_unset_params():
  sd = {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4), 'bias': np.ones(4, np.float32)}

  def load_all(m, sd):
    m.lin.kernel[...], m.lin.bias[...] = jnp.asarray(sd['kernel']), jnp.asarray(sd['bias'])

  def load_kernel_only(m, sd):
    m.lin.kernel[...] = jnp.asarray(sd['kernel'])

  m = convert_lib.build_loaded(lambda: _Toy(nnx.Rngs(0)), load_all, sd)
  np.testing.assert_array_equal(m.lin.kernel[...], sd['kernel'])
  np.testing.assert_array_equal(m.count[...], [7, 7])          # true initial value of a non-parameter
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(m)))
  with pytest.raises(ValueError, match=r"load_kernel_only left parameters \[\"\['lin'\]\['bias'\]"):
    convert_lib.build_loaded(lambda: _Toy(nnx.Rngs(0)), load_kernel_only, sd)
