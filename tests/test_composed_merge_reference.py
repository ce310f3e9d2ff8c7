"""composed and composed_learned WITH merging (keep < 1) against a float64 numpy reference written from
their docstrings (compress/composed/transform_code.py, docs/composed.md), not from their code:

- read back: a stored coefficient c reads back as c @ basis^T + mean (basis, mean at the geometry
  dtype); a slot of size s > 1 adds log(s) to its logit;
- sink: once entries are coded, the first scale's tokens are held apart at the geometry dtype (attended
  first, with no bias); they are never candidates, never merged, never coded;
- merge: when a scale's candidates (kept slots, then the new tokens) exceed the m slots, they are ranked
  by the attention the scale's queries give them (summed over queries); the top m stay; every other one
  joins the kept one of highest key cosine if that cosine is >= `threshold`, else it is dropped; a slot
  stores the mean of its members' coefficients weighted by their attention mass (mean over queries,
  + 1e-6 per token a member stands for), its size is the members' total size, the count the kept ones.

The reference does not follow the bit-width schedule (how many slots and bits each scale's state
has): before every scale it takes what the state holds as its step reads it (`read_back`: entries
held exactly at the geometry dtype, or coded coefficients read back through the basis), takes the
slots from the state after the step, and checks that state against its own entries in any slot order
(attention does not see the order): counts and sizes equal, exact entries at fp16 precision, coded
coefficients read back as the state's quantiser reads back the reference's merged coefficients, up
to a neighbouring cell (`coded_like`, with the docstring's compander: tests/compander_reference.py).
`read_back`, `quantiser`, `coded_like` and `_coded_stage` are the only places that know how entries
are coded. Checked
per scale: outputs, stored entries, sizes and counts; at keep = 0.5 and at the automatic keep of
5 / 10 / 25 %. Faults caught (checked by breaking transform_code.py in a scratch copy): the log(size)
bias dropped, the threshold ignored, size weights instead of attention mass (each fails all 8 cases).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compander_reference
import compress
from compress.composed import compander
from compress.core.budget import CacheGeometry
from fast_jit import FAST

PN, D, H, B = (1, 2, 3, 4), 8, 2, 2
T = sum(p * p for p in PN[:-1])            # 14 peak tokens
SIZE_FLOOR = 1e-6                           # merge weight per token an entry stands for (docstring)


def qkv(seed, pn=PN):
  q, k, v = compress.synthetic.var_like_qkv(jax.random.key(seed), pn, layers=1, batch=B, heads=H, head_dim=D)
  return {'q': np.asarray(q), 'k': np.asarray(k), 'v': np.asarray(v)}


def f16(a):
  return np.asarray(np.asarray(a, np.float16), np.float64)


def tensors(comp, p):
  """Per tensor: mean (H, D) and basis (H, D, R) as a deployment stores them (float16)."""
  return {t: (f16(p[f'{t}_mean']), f16(p[f'{t}_basis'])) for t in 'kv'}


# ---- the only places that know how the state codes its entries -----------------------------------
def _coded_stage(comp, scale):
  """Index of the widths and steps the state after `scale` is coded with (one code: no index)."""
  return comp.stages()[scale].code if hasattr(comp, 'stages') else None


def read_back(comp, p, state, scale):
  """What the state after `scale` holds, as its next step reads it: {'exact': bool, 'k', 'v': (B, H, M,
  D) rebuilt keys and values, 'coef': {'k', 'v'} (B, H, M, R) coefficients (coded) or None, 'size'
  (B, H, M), 'valid' (B, H, M)}, float64. Exact entries are held at the geometry dtype; coded ones read
  back as coef @ basis^T + mean."""
  size = np.asarray(state.extra['size'], np.float64) if 'size' in state.extra else np.ones(state.k.shape[:3])
  out = {'size': size, 'valid': np.asarray(state.valid),
         'sink': ({t: np.asarray(state.header[f'sink_{t}'], np.float64) for t in 'kv'}
                  if 'sink_k' in state.header else None)}
  if jnp.issubdtype(state.k.dtype, jnp.floating):
    return {**out, 'exact': True, 'coef': None, 'k': np.asarray(state.k, np.float64),
            'v': np.asarray(state.v, np.float64)}
  code = _coded_stage(comp, scale)
  coef = comp.decode(p, state.k) if code is None else comp.decode(p, state.k, code)
  # decode gives (H, R, B, M): this reference reads (B, H, M, R)
  coef = {t: np.transpose(np.asarray(c, np.float64), (2, 0, 3, 1)) for t, c in coef.items()}
  tt = tensors(comp, p)
  rebuilt = {t: np.einsum('bhmr,hdr->bhmd', coef[t], tt[t][1]) + tt[t][0][None, :, None] for t in 'kv'}
  return {**out, 'exact': False, 'coef': coef, **rebuilt}


def quantiser(comp, p, t, scale):
  """(scale, width) (H, R) of tensor t's code in the state after `scale`."""
  code = _coded_stage(comp, scale)
  step, width = comp.step_width(p, t) if code is None else comp.step_width(p, t, code)
  return np.asarray(step, np.float64), np.round(np.asarray(width)).astype(int)


def coded_like(got_N, want_N, s, w):
  """(N,) bool: the state's read-back values `got` are what the quantiser of scale s and width w reads
  back (the centroid of their own cell, tests/compander_reference.py) for the reference's values
  `want`, up to a neighbouring cell (float32 rounding of the merge may cross an edge)."""
  mine = compander_reference.code(got_N / s, w)
  back = compander_reference.centroid(mine, w, compander.SPREAD[w]) * s
  theirs = compander_reference.code(want_N / s, w)
  return (np.abs(got_N - back) <= 1e-5 * np.abs(back) + 1e-7) & (np.abs(mine - theirs) <= 1)


# ---- the reference step -----------------------------------------------------------------------
def softmax_rows(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_step(tt, held, q, k, v, slots, threshold, last, sink=0):
  """One scale per (b, h) over the held entries (`read_back`: the sink first): outputs (B, H, S, D), and
  unless `last` the entries to store when the state has `slots` slots beside a sink of `sink` tokens
  (taken from exact held entries, the first ones, or kept from the held sink), as lists per (b, h) of
  (coefficients {'k', 'v'} before storage, keys, values, size), and what happened (merges, drops)."""
  Bn, Hn, S, _ = q.shape
  out = np.zeros((Bn, Hn, S, D))
  entries = {}
  events = {'merged': 0, 'dropped': 0}
  for b in range(Bn):
    for h in range(Hn):
      valid = held['valid'][b, h]
      bias = np.log(np.maximum(held['size'][b, h], 1.0))
      lc = np.where(valid, q[b, h] @ held['k'][b, h].T + bias, -np.inf)     # (S, M)
      hs = held['sink']
      ls = np.zeros((q.shape[2], 0)) if hs is None else q[b, h] @ hs['k'][b, h].T
      p = softmax_rows(np.concatenate([ls, lc, q[b, h] @ k[b, h].T], 1))     # (S, n0 + M + S)
      vals = [v[b, h]] if hs is None else [hs['v'][b, h], v[b, h]]
      out[b, h] = p @ np.concatenate(vals[:-1] + [held['v'][b, h], v[b, h]])
      if last:
        continue
      p = p[:, ls.shape[1]:]                  # the held sink is no candidate
      first = sink if hs is None else 0       # exact held entries that become the sink
      proj = lambda t, x: (x - tt[t][0][h]) @ tt[t][1][h]
      # coded entries carry their read-back coefficients; exact ones are projected as new tokens are
      coef = {t: proj(t, held[t][b, h]) if held['coef'] is None else held['coef'][t][b, h] for t in 'kv'}
      cand = [(i, {t: coef[t][i] for t in 'kv'}, held['k'][b, h, i], held['v'][b, h, i], held['size'][b, h, i])
              for i in np.nonzero(valid)[0] if i >= first]
      cand += [(len(valid) + j, {t: proj(t, x[b, h, j]) for t, x in (('k', k), ('v', v))}, k[b, h, j], v[b, h, j],
                1.0) for j in range(S)]
      if len(cand) <= slots:                   # every candidate keeps its slot
        entries[b, h] = [c[1:] for c in cand]
        continue
      score, mass = p.sum(0), p.mean(0)
      order = sorted(cand, key=lambda c: (-score[c[0]], c[0]))                # best first, ties: lower index
      kept = order[:slots]
      unit = lambda x: x / np.linalg.norm(x)
      members = {c[0]: [c] for c in kept}
      for c in order[slots:]:
        sims = [unit(c[2]) @ unit(a[2]) for a in kept]
        if max(sims) >= threshold:
          members[kept[int(np.argmax(sims))][0]].append(c)
          events['merged'] += 1
        else:
          events['dropped'] += 1
      entries[b, h] = []
      for a in kept:
        group = members[a[0]]
        w = np.array([mass[c[0]] + SIZE_FLOOR * c[4] for c in group])
        mean = lambda get: sum(wi * get(c) for wi, c in zip(w, group)) / w.sum()
        entries[b, h].append(({t: mean(lambda c, t=t: c[1][t]) for t in 'kv'}, None, None,
                              float(sum(c[4] for c in group))))
  return out, entries, events


def matching(ok):
  """A perfect matching of a square bool matrix (rows to columns), or None (augmenting paths)."""
  n = ok.shape[0]
  col_of = [-1] * n

  def augment(r, seen):
    for c in np.nonzero(ok[r])[0]:
      if not seen[c]:
        seen[c] = True
        if col_of[c] < 0 or augment(col_of[c], seen):
          col_of[c] = r
          return True
    return False
  return col_of if all(augment(r, [False] * n) for r in range(n)) else None


def check_stored(comp, p, after, entries, scale, what, sink_tokens):
  """The state after `scale` holds the reference's entries (in any slot order: attention does not see
  the order): the same count and sizes; exact entries at the geometry dtype; coded coefficients on the
  state's quantiser's read-backs of the reference's (up to a neighbouring cell: `coded_like`)."""
  count = after['valid'].sum(-1)
  if after['sink'] is not None:              # the first scale's tokens, at the geometry dtype
    for t in 'kv':
      np.testing.assert_array_equal(after['sink'][t], f16(sink_tokens[t]), err_msg=what)
  for (b, h), want in entries.items():
    n = len(want)
    assert count[b, h] == n, (what, b, h, count[b, h], n)
    ok = np.ones((n, n), bool)                 # ok[reference entry, state slot]
    for j, (coef, key, val, size) in enumerate(want):
      ok[j] &= after['size'][b, h, :n] == size
      if after['exact']:
        for x, got in ((key, after['k']), (val, after['v'])):
          ok[j] &= np.all(np.abs(got[b, h, :n] - x) <= 1e-3 * np.abs(x) + 1e-6, axis=-1)
        continue
      for t in 'kv':
        step, width = quantiser(comp, p, t, scale)
        for r in range(step.shape[1]):
          ok[j] &= coded_like(after['coef'][t][b, h, :n, r], coef[t][r], step[h, r], width[h, r])
    assert matching(ok) is not None, (what, b, h, ok.sum(1))


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


def check_against_reference(name, budget, keep, seed=3, pn=PN):
  g = CacheGeometry(pn, D)
  T = g.prefix_tokens
  comp = compress.make(name, g, budget, keep=keep)
  params = comp.init_params(jax.random.key(0), 1, H, calibration=qkv(1, pn))
  if comp.learned:
    params = trained_like(comp, params)
  p0 = jax.tree.map(lambda a: a[0], params)
  m = comp.plan()[0]
  want_keep = keep or min(1.0, (comp.budget.bits / g.coordinates / 2.7) ** 0.8)   # the docstring's rule
  assert m == max(1, round(want_keep * T)) < T and comp.merging
  tt = tensors(comp, p0)
  x = qkv(seed, pn)
  q, k, v = (x[t][0] for t in 'qkv')
  state = comp.init_state(B, H)
  events = {'merged': 0, 'dropped': 0}
  outs, max_size, sinks = [], 0, 0
  for si, (st, S) in enumerate(zip(g.scale_starts, g.scale_sizes)):
    sl = slice(st, st + S)
    held = read_back(comp, p0, state, si - 1)
    last = si == len(pn) - 1
    out, state = jitted_step(comp, si)(p0, state, *(jnp.asarray(a[:, :, sl]) for a in (q, k, v)))
    assert state.k.shape[2] <= m                                # never more slots than the peak's
    sink = state.header['sink_k'].shape[2] if 'sink_k' in state.header else 0
    ref_out, entries, ev = reference_step(tt, held, *(a[:, :, sl].astype(np.float64) for a in (q, k, v)),
                                          state.k.shape[2], comp.threshold, last, sink)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=2e-4, atol=2e-5, err_msg=f'{name} scale {si}')
    outs.append(np.asarray(out))
    if last:
      break
    events = {e: events[e] + ev[e] for e in events}
    after = read_back(comp, p0, state, si)
    check_stored(comp, p0, after, entries, si, f'{name} scale {si}',
                 {t: x[t][0][:, :, :g.scale_sizes[0]] for t in 'kv'})
    sinks += after['sink'] is not None
    max_size = max(max_size, int(after['size'].max()))
  assert after['size'].sum(-1).max() <= T - (g.scale_sizes[0] if sinks else 0)
  assert (sinks > 0) == any(s.sink for s in comp.stages())
  # the case exercises every rule: merges (sizes > 1, so the bias), drops (so the threshold)
  assert events['merged'] > 0 and events['dropped'] > 0 and max_size > 1, events
  return comp, p0, x, np.concatenate(outs, 2), sinks


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
@pytest.mark.parametrize('budget, pn', [('25%', PN), ('60%', PN + (5,))])
def test_merging_at_half_the_slots_equals_the_numpy_reference(name, budget, pn):
  comp, p0, x, outs, sinks = check_against_reference(name, budget, 0.5, pn=pn)
  assert (sinks > 0) == (len(pn) == 5)              # 60 % of 30 tokens: the sink held beside the codes
  if comp.learned:            # the relaxation the trainer differentiates computes the same outputs
    relaxed = comp.train_outputs(p0, *(jnp.asarray(x[t][0]) for t in 'qkv'))
    np.testing.assert_allclose(np.asarray(relaxed), outs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['composed', 'composed_learned'])
@pytest.mark.parametrize('budget', ['3.125%', '5%', '10%'])   # automatic keep < 1: tokens merge
def test_automatic_keep_merges_as_the_numpy_reference(name, budget):
  sinks = check_against_reference(name, budget, 0.0, seed=4)[-1]
  assert sinks == 0                                 # its bits are over 1/16 of these budgets
