"""composed and composed_learned WITH merging (keep < 1) against a float64 numpy reference written from
their docstrings (compress/composed/transform_code.py, docs/composed.md), not from their code:

- read back: a stored coefficient c reads back as c @ basis^T + mean (basis, mean at the geometry
  dtype); a slot of size s > 1 adds log(s) to its logit;
- merge: each scale's candidates (kept slots, then the new tokens) are ranked by the attention the
  scale's queries give them (summed over queries); the top m stay, in that order; every other valid one
  joins the kept one of highest key cosine if that cosine is >= `threshold`, else it is dropped; a slot
  stores the mean of its members' coefficients weighted by their attention mass (mean over queries,
  + 1e-6 per token a member stands for), its size is the members' total size, the count the kept ones.

The reference does not follow the bit-width schedule: before every scale it takes the read-back
coefficients the state holds (`read_back`), and after it it checks that the state stores its merged
coefficients (`stored`: the midrise quantiser of the docstring at the widths and steps in force). Those
two helpers are the only places that know how coefficients are coded. Checked per scale: outputs,
stored coefficients, sizes and counts; at keep = 0.5 and at the automatic keep of 5 / 10 / 25 %.
Faults caught (checked by breaking transform_code.py in a scratch copy): the log(size) bias dropped,
the threshold ignored, size weights instead of attention mass.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compress
from compress.core.budget import CacheGeometry
from fast_jit import FAST

PN, D, H, B = (1, 2, 3, 4), 8, 2, 2
T = sum(p * p for p in PN[:-1])            # 14 peak tokens
SIZE_FLOOR = 1e-6                           # merge weight per token an entry stands for (docstring)


def qkv(seed):
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(seed), PN, layers=1, batch=B, heads=H, head_dim=D)
  return {'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}


def f16(a):
  return np.asarray(np.asarray(a, np.float16), np.float64)


def stored_params(comp, p):
  """Per tensor: mean (H, D), basis (H, D, R), step (H, R), width (H, R) as a deployment stores them."""
  out = {}
  for t in 'kv':
    step = np.exp(np.asarray(p[f'{t}_logstep'])) if comp.learned else np.asarray(p[f'{t}_step'])
    out[t] = (f16(p[f'{t}_mean']), f16(p[f'{t}_basis']), f16(step), np.round(np.asarray(p[f'{t}_width'], np.float64)))
  return out


# ---- the two places that know how coefficients are coded ----------------------------------------
def read_back(comp, p, state):
  """{'k', 'v'}: (B, H, m, R) float64 coefficients the state holds (as its step reads them)."""
  return {t: np.asarray(c, np.float64) for t, c in comp.decode(p, state.k).items()}


def stored(x, step, width):
  """What the state holds for coefficients x (B, H, m, R): the docstring's midrise quantiser."""
  levels = 2.0 ** width[None, :, None]
  code = np.clip(np.floor(x / step[None, :, None] + levels / 2), 0, levels - 1)
  return (code + 0.5 - levels / 2) * step[None, :, None]


# ---- the reference step -----------------------------------------------------------------------
def softmax_rows(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_step(sp, coef, size, valid, q, k, v, m, threshold, last):
  """One scale per (b, h): outputs (B, H, S, D), and unless `last` the merged coefficients before
  storage {'k', 'v'} (B, H, m, R), sizes (B, H, m), counts (B, H) and what happened (merges, drops)."""
  Bn, Hn, S, _ = q.shape
  out = np.zeros((Bn, Hn, S, D))
  new = {'k': None, 'v': None}
  x_out = {t: np.zeros((Bn, Hn, m, coef[t].shape[-1])) for t in 'kv'}
  size_out, count_out = np.zeros((Bn, Hn, m)), np.zeros((Bn, Hn), int)
  events = {'merged': 0, 'dropped': 0}
  for b in range(Bn):
    for h in range(Hn):
      rebuilt = {}
      for t in 'kv':
        mean, basis = sp[t][0][h], sp[t][1][h]
        rebuilt[t] = coef[t][b, h] @ basis.T + mean                        # (m, D)
      bias = np.log(np.maximum(size[b, h], 1.0))
      lc = np.where(valid[b, h], q[b, h] @ rebuilt['k'].T + bias, -np.inf)  # (S, m)
      p = softmax_rows(np.concatenate([lc, q[b, h] @ k[b, h].T], 1))       # (S, m + S)
      out[b, h] = p @ np.concatenate([rebuilt['v'], v[b, h]])
      if last:
        continue
      newc = {t: (x[b, h] - sp[t][0][h]) @ sp[t][1][h] for t, x in (('k', k), ('v', v))}
      keys = np.concatenate([rebuilt['k'], k[b, h]])
      pay = np.concatenate([np.concatenate([coef['k'][b, h], coef['v'][b, h]], 1),
                            np.concatenate([newc['k'], newc['v']], 1)])
      ok = np.concatenate([valid[b, h], np.ones(S, bool)])
      sz = np.concatenate([size[b, h], np.ones(S)])
      score, mass = p.sum(0), p.mean(0)
      order = sorted(np.nonzero(ok)[0], key=lambda i: (-score[i], i))[:m]   # best first, ties: lower index
      unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
      members = {j: [j] for j in order}
      for i in np.nonzero(ok)[0]:
        if i in members:
          continue
        sims = [unit[i] @ unit[j] for j in order]
        if max(sims) >= threshold:
          members[order[int(np.argmax(sims))]].append(i)
          events['merged'] += 1
        else:
          events['dropped'] += 1
      rk = coef['k'].shape[-1]
      for slot, j in enumerate(order):
        w = np.array([mass[i] + SIZE_FLOOR * sz[i] for i in members[j]])
        x = (w[:, None] * pay[members[j]]).sum(0) / w.sum()
        x_out['k'][b, h, slot], x_out['v'][b, h, slot] = x[:rk], x[rk:]
        size_out[b, h, slot] = sz[members[j]].sum()
      count_out[b, h] = len(order)
  return out, x_out, size_out, count_out, events


@functools.lru_cache(maxsize=None)
def jitted_step(comp, scale):
  return jax.jit(lambda p, s, q, k, v: comp.step(p, s, q, k, v, scale), compiler_options=FAST)


def trained_like(comp, params, seed=7):
  """composed_learned's parameters moved off their initialisation as training would (bases no longer
  orthonormal, means and steps changed); widths stay the allocation's."""
  rng = np.random.default_rng(seed)
  out = dict(params)
  for t in 'kv':
    for n, s in ((f'{t}_basis', 0.1), (f'{t}_mean', 0.05), (f'{t}_logstep', 0.2)):
      out[n] = params[n] + s * jnp.asarray(rng.standard_normal(params[n].shape), jnp.float32)
  return out


def check_against_reference(name, budget, keep, seed=3):
  g = CacheGeometry(PN, D)
  comp = compress.make(name, g, budget, keep=keep)
  params = comp.init_params(jax.random.key(0), 1, H, calibration=qkv(1))
  if comp.learned:
    params = trained_like(comp, params)
  p0 = jax.tree.map(lambda a: a[0], params)
  m = comp.plan()[0]
  want_keep = keep or min(1.0, np.sqrt(comp.budget.bits / g.coordinates / 8.0))   # the docstring's rule
  assert m == max(1, round(want_keep * T)) < T and comp.merging
  sp = stored_params(comp, p0)
  x = qkv(seed)
  q, k, v = (x[t][0] for t in 'qkv')
  state = comp.init_state(B, H)
  events = {'merged': 0, 'dropped': 0}
  outs, max_size = [], 0
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    coef = read_back(comp, p0, state)
    size = np.asarray(state.extra['size'], np.float64)
    valid = np.asarray(state.valid)
    last = si == len(PN) - 1
    ref_out, ref_x, ref_size, ref_count, ev = reference_step(
        sp, coef, size, valid, *(a[:, :, sl].astype(np.float64) for a in (q, k, v)), m, comp.threshold, last)
    out, state = jitted_step(comp, si)(p0, state, *(jnp.asarray(a[:, :, sl]) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=2e-4, atol=2e-5, err_msg=f'{name} scale {si}')
    outs.append(np.asarray(out))
    if last:
      break
    events = {e: events[e] + ev[e] for e in events}
    np.testing.assert_array_equal(np.asarray(state.count), ref_count, err_msg=f'{name} counts, scale {si}')
    np.testing.assert_array_equal(np.asarray(state.extra['size'], np.float64), ref_size,
                                  err_msg=f'{name} sizes, scale {si}')
    got = read_back(comp, p0, state)
    for t in 'kv':
      want = stored(ref_x[t], sp[t][2], sp[t][3])
      filled = np.arange(m)[None, None, :] < ref_count[..., None]
      np.testing.assert_allclose(got[t][filled], want[filled], rtol=1e-5, atol=1e-6,
                                 err_msg=f'{name} stored {t} coefficients, scale {si}')
    max_size = max(max_size, int(ref_size.max()))
  assert np.asarray(state.extra['size'], np.float64).sum(-1).max() <= T
  # the case exercises every rule: merges (sizes > 1, so the bias), drops (so the threshold)
  assert events['merged'] > 0 and events['dropped'] > 0 and max_size > 1, events
  return comp, p0, x, np.concatenate(outs, 2)


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
def test_merging_at_half_the_slots_equals_the_numpy_reference(name):
  comp, p0, x, outs = check_against_reference(name, '25%', 0.5)
  if comp.learned:            # the relaxation the trainer differentiates computes the same outputs
    relaxed = comp.train_outputs(p0, *(jnp.asarray(x[t][0]) for t in 'qkv'))
    np.testing.assert_allclose(np.asarray(relaxed), outs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
@pytest.mark.parametrize('budget', ['5%', '10%', '25%'])
def test_automatic_keep_merges_as_the_numpy_reference(name, budget):
  check_against_reference(name, budget, 0.0, seed=4)
