"""Layer-grouped training of learned compressors (train/compressor_loss.py): the loss and gradient computed
a few layers at a time equal the all-layers-at-once ones, take less memory, and the group size follows a
closed-form byte count (1 layer at a time at d16, all 4 at once on the default model: its program is
unchanged)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.core.budget import CacheGeometry
from configs import compressor as configs
from train import compressor as tc
from train.compressor_loss import auto_group, grouped_sums, logit_bytes, loss_and_grad, squared_sums

LEARNED = ('lowrank_learned', 'merge_learned', 'evict_learned', 'composed_learned')
LAYERS = 4


def setup(name: str, patch_nums=(1, 2, 3, 4), budget: str = '10%'):
  """(compressor, params, q, k, v) on 4-layer synthetic caches, 4 sequences; parameters differ per layer
  (calibrated ones by their calibration, the others by a seeded perturbation)."""
  config = configs.get_config(f'tiny,{name}')
  config.data.layers, config.data.patch_nums = LAYERS, patch_nums
  train_split, _ = tc.load_data(config.data)
  comp = tc.build_compressor(name, CacheGeometry(train_split.patch_nums, train_split.head_dim, 'float16'),
                             budget, tc.settings_dict(config.settings))
  params = comp.init_params(jax.random.PRNGKey(0), LAYERS, train_split.num_heads,
                            calibration=train_split.get(np.arange(16)))
  if not comp.needs_calibration:
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), params)
  x = train_split.get(np.arange(4))
  return comp, params, x['q'], x['k'], x['v']


_grad = jax.jit(loss_and_grad, static_argnums=(0, 5))


@pytest.mark.parametrize('name', LEARNED)
def test_grouped_gradient_equals_all_at_once(name):
  """Loss and gradient of every leaf, 1 and 2 layers at a time, = all 4 layers in one program (fp32)."""
  comp, params, q, k, v = setup(name)
  loss0, grad0 = _grad(comp, params, q, k, v, 0)
  e2 = float(squared_sums(comp, params, q, k, v)[1])
  assert float(loss0) > 0.01
  for group in (1, 2):
    loss, grad = _grad(comp, params, q, k, v, group)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    d2, e2_grouped = grouped_sums(comp, params, q, k, v, group)
    np.testing.assert_allclose([float(d2), float(e2_grouped)], [float(loss0) ** 2 * e2, e2], rtol=2e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad0))
    for (path, a), b in zip(jax.tree.leaves_with_path(grad), jax.tree.leaves(grad0)):
      key, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
      assert a.shape == b.shape, key
      full_basis = name == 'composed_learned' and key.endswith("_mean']") and (
          params[key[2:3] + '_basis'].shape[-1] == params[key[2:3] + '_basis'].shape[-2])
      if full_basis:
        # x_hat = (x - mu) E E^T + mu with a full orthonormal basis E and straight-through rounding: the
        # means' gradient is 0 in exact arithmetic, float32 cancellation noise here (the all-at-once path
        # itself moves it by as much when its loss is written as loss^2 / (2 loss)); both must be noise.
        assert np.abs(a).max() < 1e-2 * scale and np.abs(b).max() < 1e-2 * scale, key
        continue
      if name == 'composed_learned' and key.endswith("_mean']"):
        # a truncated basis (components no head codes dropped) gives the means a real gradient, the
        # residual (I - E E^T) of terms that cancel in the basis' span: the paths agree to the float32
        # noise of those terms (up to 2.5e-4 of the gradient's scale, measured; the full-basis case
        # above allows 1e-2 of it)
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-4 * scale, err_msg=key)
        assert np.abs(b).max() > 1e-4 * scale, key
        continue
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * np.abs(b).max() + 1e-12 * scale, err_msg=key)
      if not key.endswith("_width']"):                    # composed's widths are not trained
        assert np.abs(b).max() > 1e-6 * scale, key


@pytest.mark.parametrize('name', ('lowrank_learned', 'merge_learned', 'composed_learned'))
def test_grouped_gradient_needs_less_memory(name):
  """XLA's temporary buffers of the gradient program, 1 layer at a time: under 60 % of all 4 at once
  (activations of 1 layer instead of 4, plus what every group shares)."""
  comp, params, q, k, v = setup(name, patch_nums=(1, 2, 3, 4, 6))
  temp = {}
  for group in (0, 1):
    analysis = _grad.lower(comp, params, q, k, v, group).compile().memory_analysis()
    if analysis is None:
      pytest.skip('this backend gives no memory analysis')
    temp[group] = analysis.temp_size_in_bytes
  assert temp[1] < 0.6 * temp[0], temp


def brute_logit_bytes(patch_nums, batch, heads):
  scale = np.repeat(np.arange(len(patch_nums)), [p * p for p in patch_nums])
  return 4 * batch * heads * int(np.sum(scale[:, None] >= scale[None, :]))    # block-causal pairs


def test_group_size_from_bytes():
  g = CacheGeometry((1, 2, 3), 16, 'float16')
  per = brute_logit_bytes((1, 2, 3), 3, 2)
  assert logit_bytes(g, 3, 2) == per == 4 * 3 * 2 * (1 * 1 + 4 * 5 + 9 * 14)
  for cap, want in ((per - 1, 1), (per, 1), (3 * per, 2), (5 * per, 4), (15 * per, 8), (16 * per, 16),
                    (0, 16), (-1, 16)):
    assert auto_group(16, 0, cap, g, 3, 2) == want, cap
  assert auto_group(16, 4, per, g, 3, 2) == 4                  # explicit: kept
  with pytest.raises(ValueError, match='grad_layers=3 does not divide the 16 layers'):
    auto_group(16, 3, 0, g, 3, 2)
  cap = configs.get_config('default').grad_bytes
  d16 = CacheGeometry((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 64, 'float16')
  assert logit_bytes(d16, 4, 16) == brute_logit_bytes(d16.patch_nums, 4, 16)
  assert auto_group(16, 0, cap, d16, 4, 16) == 1               # d16, the frontier's batch 4
  default = CacheGeometry((1, 2, 3, 4, 5, 6, 8), 64, 'float16')
  for batch in (4, 16):                                        # the default model: all layers at once
    assert auto_group(4, 0, cap, default, batch, 4) == 4


def test_training_one_layer_at_a_time_matches(tmp_path):
  """tiny (2 layers): 10 steps 1 layer at a time end at the parameters of 10 steps all at once; a run
  resumed with another grad_layers is accepted (it computes the same gradient)."""
  def config(grad_layers):
    c = configs.get_config('tiny')
    c.num_steps, c.grad_layers, c.eval_every = 10, grad_layers, 0
    c.eval_at_start = c.eval_at_end = False
    return c
  _, ref = tc.train(config(0), str(tmp_path / 'all'))
  _, one = tc.train(config(1), str(tmp_path / 'one'))
  tc.train(config(0), str(tmp_path / 'mixed'), stop_at_step=5)
  _, mixed = tc.train(config(1), str(tmp_path / 'mixed'))
  for a, b, c in zip(jax.tree.leaves(ref), jax.tree.leaves(one), jax.tree.leaves(mixed)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(c, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_bad_grad_layers_fails_before_work(tmp_path):
  c = configs.get_config('tiny')
  c.grad_layers = 3
  with pytest.raises(ValueError, match='grad_layers=3 does not divide the 2 layers'):
    tc.train(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
