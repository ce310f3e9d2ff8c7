"""Low-rank caches (`pca`, `pca_evict`): exact subspaces, exact attention, hand-counted bits."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.core import synthetic
from compress.core.attention import block_causal_attention, rel_error
from compress.core.budget import Budget, CacheGeometry
from compress.core.stable_slots import window_slot_positions
from compress.lowrank import pca

G = CacheGeometry((1, 2, 3, 4), head_dim=8)
T, D = G.prefix_tokens, G.head_dim


@functools.partial(jax.jit, static_argnums=(0, 6))
def _step(comp, params, state, q, k, v, scale):
  return comp.step(params, state, q, k, v, scale)


def _run(comp, params, q_BHLD, k_BHLD, v_BHLD):
  """One layer through every scale (params: that layer's): outputs (B, H, L, D), states after each."""
  state, outs, states = comp.init_state(*q_BHLD.shape[:2]), [], []
  for si, (s0, S) in enumerate(zip(G.scale_starts, G.scale_sizes)):
    sl = slice(s0, s0 + S)
    out, state = _step(comp, params, state, q_BHLD[:, :, sl], k_BHLD[:, :, sl], v_BHLD[:, :, sl], si)
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, 2), states


def _layer0(params):
  return jax.tree_util.tree_map(lambda x: x[0], params)


def _low_rank_qkv(subspace_key, sample_key, r, batch=2, heads=2):
  """(1, B, H, L, D) keys and values exactly in a rank-r affine subspace per head (fixed by
  `subspace_key`; samples drawn with `sample_key`); queries free."""
  kb, km = jax.random.split(subspace_key)
  bases = np.linalg.qr(np.asarray(jax.random.normal(kb, (2, heads, D, D))))[0][..., :r]   # (2, H, D, r)
  means = np.asarray(jax.random.normal(km, (2, heads, D))) * 0.3
  kq, kk, kv = jax.random.split(sample_key, 3)

  def sample(k_, which):
    c = np.asarray(jax.random.normal(k_, (1, batch, heads, G.num_tokens, r))) * np.linspace(1.5, 0.5, r)
    x = np.einsum('nbhlr,hdr->nbhld', c, bases[which]) + means[which][None, None, :, None]
    return jnp.asarray(x, jnp.float32)
  q = 3.0 * jax.random.normal(kq, (1, batch, heads, G.num_tokens, D))
  return q, sample(kk, 0), sample(kv, 1)


# ---- fitting -----------------------------------------------------------------------------------------
def test_fit_pca_matches_svd_subspace():
  x = np.asarray(synthetic.var_like_qkv(jax.random.key(0), G.patch_nums, layers=2, batch=3, heads=2,
                                        head_dim=D)[1], np.float64)
  mean, basis = pca.fit_pca(x, 3)
  assert mean.shape == (2, 2, D) and basis.shape == (2, 2, D, 3)
  for n in range(2):
    for h in range(2):
      rows = x[n, :, h].reshape(-1, D)
      np.testing.assert_allclose(mean[n, h], rows.mean(0), atol=1e-12)
      _, _, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
      P = basis[n, h]
      np.testing.assert_allclose(P.T @ P, np.eye(3), atol=1e-10)
      np.testing.assert_allclose(P @ P.T, vt[:3].T @ vt[:3], atol=1e-8)      # same subspace


def test_shared_bits_equal_hand_count():
  comp = compress.make('pca', G, Budget(T * 16 * 7 + 16), key_fraction=0.5)   # 7 dims (4 key, 3 value) + count
  assert comp.plan() == (T, 4, 3)
  q, k, v = synthetic.var_like_qkv(jax.random.key(1), G.patch_nums, layers=2, batch=2, heads=3, head_dim=D)
  params = comp.init_params(jax.random.key(0), 2, 3, calibration={'k': k, 'v': v})
  assert params['k_basis'].shape == (2, 3, D, 4) and params['v_basis'].shape == (2, 3, D, 3)
  # layers x heads x (key basis D x 4 + value basis D x 3 + two means of D) at fp16
  assert comp.shared_bits(params) == 2 * 3 * (D * 4 + D * 3 + 2 * D) * 16


# ---- exactness -----------------------------------------------------------------------------------------
class _NoPassthroughPCA(pca.PCA):
  """`pca` at the full budget without the base class's passthrough: rank = head_dim for k and v."""

  @property
  def passthrough(self) -> bool:
    return False


def _fp16_cache_error(q, k, v, exact):
  """Error of attention over fp16-rounded keys and values (the storage floor)."""
  r = lambda x: x.astype(jnp.float16).astype(jnp.float32)
  return float(rel_error(block_causal_attention(q, r(k), r(v), G.patch_nums), exact))


def test_full_rank_reproduces_exact_attention():
  comp = _NoPassthroughPCA(geometry=G, budget=Budget(G.full_bits + 16))   # + the count
  assert comp.plan() == (T, D, D)
  q, k, v = synthetic.var_like_qkv(jax.random.key(2), G.patch_nums, layers=1, batch=2, heads=2, head_dim=D)
  _, ck, cv = synthetic.var_like_qkv(jax.random.key(3), G.patch_nums, layers=1, batch=2, heads=2, head_dim=D)
  params = comp.init_params(jax.random.key(0), 1, 2, calibration={'k': ck, 'v': cv})
  out, states = _run(comp, _layer0(params), q[0], k[0], v[0])
  exact = block_causal_attention(q[0], k[0], v[0], G.patch_nums)
  err, floor = float(rel_error(out, exact)), _fp16_cache_error(q[0], k[0], v[0], exact)
  assert err < 3 * floor + 1e-4, (err, floor)                    # fp16 coefficients and bases
  assert int(comp.bits(states[-2]).max()) == T * 2 * D * 16 + 16   # + the stored count


@pytest.mark.parametrize('r', [3])
def test_rank_r_data_is_exact_at_rank_r(r):
  q, k, v = _low_rank_qkv(jax.random.key(4), jax.random.key(5), r)
  _, ck, cv = _low_rank_qkv(jax.random.key(4), jax.random.key(6), r)   # same subspaces, other samples
  exact = block_causal_attention(q[0], k[0], v[0], G.patch_nums)
  errs = {}
  for rank in (r, r - 1):
    comp = compress.make('pca', G, Budget(T * 2 * rank * 16 + 16))
    assert comp.plan() == (T, rank, rank)
    params = comp.init_params(jax.random.key(0), 1, 2, calibration={'k': ck, 'v': cv})
    out, states = _run(comp, _layer0(params), q[0], k[0], v[0])
    errs[rank] = float(rel_error(out, exact))
    for s in states:
      assert int(comp.bits(s).max()) == int(s.count.max()) * 2 * rank * 16 + 16 <= comp.budget.bits
  assert errs[r] < 3 * _fp16_cache_error(q[0], k[0], v[0], exact) + 1e-4, errs
  assert errs[r - 1] > 10 * errs[r], errs


# ---- pca_evict ---------------------------------------------------------------------------------------
def test_pca_evict_plan_uses_the_budget():
  budget = Budget(1500)
  comp = compress.make('pca_evict', G, budget, keep_fraction=0.5, evict='h2o')
  m, rk, rv = comp.plan()
  assert m == T // 2
  per = lambda rank: m * (rank * 16 + 16) + 16                # coefficients + fp16 score, + count
  assert per(rk + rv) <= budget.bits < per(rk + rv + 1)
  assert compress.make('pca_evict', G, Budget(16 + 3 * 16), keep_fraction=0.5).plan()[0] == 3   # rank 1, fewer
  assert compress.make('pca_evict', G, Budget(15), keep_fraction=0.5).plan() == (0, 0, 0)


def test_pca_evict_window_keeps_recent_tokens_within_budget():
  comp = compress.make('pca_evict', G, Budget(16 + 7 * 2 * D * 16), keep_fraction=0.5, evict='window')
  m, rk, rv = comp.plan()
  assert (m, rk, rv) == (7, D, D)                          # full rank fits for half: m = 7 tokens
  q, k, v = synthetic.var_like_qkv(jax.random.key(6), G.patch_nums, layers=1, batch=1, heads=2, head_dim=D)
  params = comp.init_params(jax.random.key(0), 1, 2, calibration={'k': k, 'v': v})
  out, states = _run(comp, _layer0(params), q[0], k[0], v[0])
  assert np.all(np.isfinite(np.asarray(out)))
  p0 = _layer0(params)
  for si, s in enumerate(states[:-1]):
    assert int(comp.bits(s).max()) == int(s.count.max()) * 2 * D * 16 + 16 <= comp.budget.bits
    n = int(s.count[0, 0])
    pos = window_slot_positions(G.scale_sizes, m, si + 1)[:n]
    assert sorted(pos.tolist()) == list(range(G.scale_starts[si] + G.scale_sizes[si] - n,
                                               G.scale_starts[si] + G.scale_sizes[si]))
    k_hat = comp.reconstruct(p0, 'k', s.k)[:, :, :n]
    np.testing.assert_allclose(k_hat, k[0][:, :, pos], atol=5e-3)     # full rank: keys come back


def test_calibration_errors_name_the_fix():
  comp = compress.make('pca', G, 0.25)
  with pytest.raises(ValueError, match='calibration='):
    comp.init_params(jax.random.key(0), 1, 2)
  with pytest.raises(ValueError, match=r"calibration\['k'\] must be"):
    comp.init_params(jax.random.key(0), 1, 2, calibration={'k': jnp.zeros((1, 2, 3, 14, D)),
                                                          'v': jnp.zeros((1, 2, 2, 14, D))})
  with pytest.raises(ValueError, match='keep_fraction'):
    compress.make('pca_evict', G, 0.25, keep_fraction=0.0)
