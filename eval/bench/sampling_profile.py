"""Where a generate call's time goes, per scale: the whole scale step, the cache policy's part of it, and
the attention over the held cache inside that part.

Three jitted pieces per scale, each timed apart (median of `runs` calls, after a compile call):
  step:      `var_jax.sampling._scale_step` in the generation loop itself (model + policy + sampling +
             VQ-VAE update), one call per scale of a real generation, synchronised after each;
  policy:    `policy.attend` of every layer at that scale on the same q, k, v (captured from a full-cache
             generation of the same batch) and the state it would hold there: attention + compress step;
  attention: the attention the output needs, alone: every layer's queries over the held entries already
             decoded plus the new scale under one softmax (`compress.core.attention.attend_output`); for
             the full cache, `softmax_attention` over its buffer's prefix with the scale already written
             (`FullCache.attend` less its write).
So model = step - policy, compress = policy - attention: decoding, the probabilities a method scores
with (eviction, merging), coding and storing (the full cache: its write).
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from compress.core.attention import attend_output
from var_jax import sampling
from var_jax.blocks import softmax_attention
from var_jax.kvcache import FullCache, scale_offsets


def _median_time(fn: Callable[..., Any], runs: int, make_args: Callable[[], tuple] = tuple) -> float:
  """Median seconds of fn(*make_args()) over `runs` calls after a compile call; the arguments are made
  (e.g. copies of a state the call donates) outside the timed span."""
  jax.block_until_ready(fn(*make_args()))          # compile (and warm) apart
  times = []
  for _ in range(runs):
    args = jax.block_until_ready(make_args())
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def step_times(var, vae, policy, labels_B, *, seed: int, cfg: float, top_k: int, top_p: float
               ) -> tuple[list[float], float]:
  """Seconds of each scale's `_scale_step` and of the decode in one generate call (as `generate`)."""
  mcfg = var.cfg
  var_graph, var_state = nnx.split(var)
  vae_graph, vae_state = nnx.split(vae)
  labels = jnp.asarray(labels_B, jnp.int32)
  K = len(mcfg.patch_nums)
  keys = jax.random.split(jax.random.key(seed), K)
  cond, x, state, f_hat = jax.block_until_ready(sampling._start(var_graph, var_state, policy, labels))
  times = []
  for scale in range(K):
    t0 = time.perf_counter()
    _, f_hat, x, state, _, _ = jax.block_until_ready(sampling._scale_step(
        var_graph, var_state, vae_graph, vae_state, policy, scale, int(top_k), float(top_p), False,
        False, state, x, cond, f_hat, sampling.guidance_weight(cfg, scale, K), keys[scale],
        sampling.policy_arrays(policy)))
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  jax.block_until_ready(sampling._decode(vae_graph, vae_state, f_hat))
  return times, time.perf_counter() - t0


def _after(q_BHSD: jax.Array, prev_BHSD: jax.Array | None) -> jax.Array:
  """q, made to wait for the previous layer's output: + 0 x one of its elements (XLA does not fold a
  float's x * 0). In the model a layer's input is the previous layer's output, so its attention runs
  after the previous one's; the captured q, k, v have no such dependency, and XLA CPU would run the
  layers' attention concurrently, each at a fraction of its speed (16 independent layers of d16's last
  scale: 116 ms for the full cache against 171 for the same attention over a concatenated copy, 8.4
  against 8.1 ms for one layer alone)."""
  return q_BHSD if prev_BHSD is None else q_BHSD + 0 * prev_BHSD.reshape(-1)[0].astype(q_BHSD.dtype)


@functools.partial(jax.jit, static_argnames=('policy', 'scale'), donate_argnames=('state',))
def _policy_scale(policy, scale: int, state, qkv, params):
  """Every layer's `policy.attend` at `scale`, layer after layer (`_after`): (outputs, new state)."""
  policy = sampling.bind_arrays(policy, params)
  outs, new = [], []
  for layer, (q, k, v) in enumerate(qkv):
    o, s = policy.attend(state[layer], layer, scale, _after(q, outs[-1] if outs else None), k, v)
    outs.append(o)
    new.append(s)
  return outs, tuple(new)


@jax.jit
def _attention_only(views, qkv):
  """Every layer's output (B, H, S, D), layer after layer: its queries over the decoded held entries
  (ck, cv, valid, bias), or over nothing (None), plus the new scale, under one softmax."""
  outs = []
  for view, (q, k, v) in zip(views, qkv):
    if view is None:
      none = q[:, :, :0]
      view = (none, none, jnp.zeros(none.shape[:3], bool), None)
    outs.append(attend_output(_after(q, outs[-1] if outs else None), *view, k, v))
  return outs


@functools.partial(jax.jit, static_argnames=('end',))
def _full_attention_only(caches, qkv, end: int):
  """Every layer's output over its full cache's first `end` positions (the scale already written),
  layer after layer."""
  outs = []
  for cache, (q, _, _) in zip(caches, qkv):
    outs.append(softmax_attention(_after(q, outs[-1] if outs else None), *cache.prefix(end)))
  return outs


def held_view(policy, state_layer, scale: int, params_layer) -> tuple | None:
  """(ck, cv, valid, bias) float32: the held entries the step at `scale` attends to beside the scale's
  own tokens, decoded as the step decodes them (None: nothing held)."""
  comp = policy.compressor
  if comp.passthrough:
    return state_layer.k, state_layer.v, state_layer.valid, None
  if hasattr(comp, 'stages'):                       # composed: the layout follows the scale
    plan = comp.stages()
    view = comp._view(params_layer, state_layer, plan[scale - 1] if scale > 0 else None)
    if view is None:
      return None
    return comp.held_entries(view)
  if hasattr(comp, 'attended_entries'):             # kivi: the held prefix only, until the cache is full
    return *comp.attended_entries(state_layer, scale), None
  ck, cv = comp.decode(state_layer)
  bias = comp.bias(state_layer) if hasattr(comp, 'bias') else None
  return ck, cv, state_layer.valid, bias


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def policy_profile(policy, qkv_per_scale, batch: int, mcfg, runs: int) -> list[dict[str, float]]:
  """Per scale: seconds of the policy's attend over every layer and of the attention alone."""
  state = policy.init(batch, mcfg.num_heads, mcfg.head_dim, mcfg.depth, patch_nums=tuple(mcfg.patch_nums))
  params = sampling.policy_arrays(policy)
  offsets = scale_offsets(mcfg.patch_nums)
  rows = []
  for scale, qkv in enumerate(qkv_per_scale):
    row = {'policy_s': _median_time(lambda st: _policy_scale(policy, scale, st, qkv, params)[0], runs,
                                    lambda: (_copy(state),))}
    if isinstance(policy, FullCache):
      written = jax.block_until_ready([s.write(offsets[scale], k, v) for s, (_, k, v) in zip(state, qkv)])
      end = offsets[scale + 1]
      row['attention_s'] = _median_time(lambda: _full_attention_only(written, qkv, end=end), runs)
    else:
      views = []
      for layer in range(mcfg.depth):
        p = None if params is None else jax.tree.map(lambda a: a[layer], params)
        views.append(held_view(policy, state[layer], scale, p))
      views = jax.block_until_ready(views)
      row['attention_s'] = _median_time(lambda: _attention_only(views, qkv), runs)
    row['compress_s'] = row['policy_s'] - row['attention_s']
    _, state = _policy_scale(policy, scale, state, qkv, params)
    rows.append(row)
  return rows


def captured_qkv(var, vae, labels_B, *, seed: int, cfg: float, top_k: int, top_p: float):
  """Per scale, per layer (q, k, v) of a full-cache generation (what every policy is profiled on)."""
  out = sampling.generate(var, vae, labels_B, key=jax.random.key(seed), cfg=cfg, top_k=top_k,
                          top_p=top_p, capture_qkv=True)
  return out.qkv


def profile(var, vae, policies: dict[str, Any], labels_B, *, runs: int, cfg: float, top_k: int,
            top_p: float) -> dict[str, list[dict[str, float]]]:
  """{policy name: per scale {'step_s', 'policy_s', 'attention_s', 'compress_s', 'model_s'}}, model_s
  being the full cache's step less its policy part (the same network runs under every policy)."""
  mcfg = var.cfg
  qkv = captured_qkv(var, vae, labels_B, seed=0, cfg=cfg, top_k=top_k, top_p=top_p)
  batch = 2 * len(labels_B)
  result = {}
  for name, policy in policies.items():
    pol = FullCache(tuple(mcfg.patch_nums)) if policy is None else policy
    per_run = [step_times(var, vae, pol, labels_B, seed=r, cfg=cfg, top_k=top_k, top_p=top_p)[0]
               for r in range(max(runs, 1))]      # compiled by the benchmark's first calls
    steps = [statistics.median(t[s] for t in per_run) for s in range(len(mcfg.patch_nums))]
    rows = policy_profile(pol, qkv, batch, mcfg, max(runs, 3))
    for row, step in zip(rows, steps):
      row['step_s'] = step
    result[name] = rows
  full = result.get('full')
  if full is not None:
    for rows in result.values():
      for row, f in zip(rows, full):
        row['model_s'] = f['step_s'] - f['policy_s']
  return result



def markdown(result: dict[str, list[dict[str, float]]]) -> str:
  """One table: per policy and scale, milliseconds of step / model / policy / attention / compress, and
  the attention's share of the step; a total row per policy."""
  lines = ['| policy | scale | step ms | model ms | policy ms | attention ms | compress ms | attention / step |',
           '|' + '---|' * 8]
  for name, rows in result.items():
    tot = {k: sum(r.get(k, float('nan')) for r in rows) for k in rows[0]}
    for scale, r in [*enumerate(rows), ('all', tot)]:
      ms = lambda k, r=r: f'{1e3 * r[k]:.1f}' if k in r else '-'
      lines.append(f'| {name} | {scale} | {ms("step_s")} | {ms("model_s")} | {ms("policy_s")} | '
                   f'{ms("attention_s")} | {ms("compress_s")} | {r["attention_s"] / r["step_s"]:.1%} |')
  return '\n'.join(lines)
