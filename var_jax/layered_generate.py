"""Generation as small programs shared between cache policies: a policy compiles only its own steps.

`sampling._scale_step` is one program per (policy, scale) holding the whole model and, per layer, the
policy's attention and compression; a run that generates with many policies (the frontier's closed
loop: every method at every budget) compiles the model again for each, depth copies of a block per
scale. Here a scale runs as four kinds of program:

  block_in   (model)   one block up to its attention: q, k, v          one per scale, every layer
  attend     (policy)  the policy's step for one layer: attention over its state and the new scale,
                       then the state update                            one per scale, every layer
  block_out  (model)   the block after its attention                   one per scale, every layer
  head       (model)   logits, guided sampling, VQ-VAE update, the next scale's input

`ModelPrograms` (with the start and the decode) is compiled once per batch size and serves every policy;
`compile_layered` compiles a policy's K `attend` programs, which take a layer's parameters and state as
arguments (a compressor's step depends on the layer through them only), so depth layers share one.

    model = ModelPrograms.compile(var, vae, batch=240, top_k=0, top_p=0.0, capture_logits=True)
    gen = compile_layered(model, policy)          # K small programs; runs nothing
    out = gen(labels_B, key, cfg=1.5)              # a sampling.GenerateOutput

The functions are `sampling.generate`'s, split at the attention; XLA no longer fuses across the splits,
so the outputs equal it up to float rounding (tests/test_layered_generate.py). Policies: `FullCache` and
`CompressorPolicy` (any policy whose `attend` uses the layer index only to pick its parameters).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax import sampling
from var_jax.compiled_generate import Options, compile_decode, shapes_of
from var_jax.kvcache import CachePolicy, FullCache
from var_jax.xla_cpu import generation_options


@functools.partial(jax.jit, static_argnames=('var_graph',))
def _start(var_graph: nnx.GraphDef, var_state: nnx.State, labels_B: jax.Array):
  """`sampling.start_inputs`: conditioning, first input, f_hat zeros."""
  return sampling.start_inputs(nnx.merge(var_graph, var_state), labels_B)


@functools.partial(jax.jit, static_argnames=('block_graph',))
def _block_in(block_graph: nnx.GraphDef, block_state: nnx.State, x_BLC: jax.Array, mod_B16C: jax.Array):
  return nnx.merge(block_graph, block_state).attn_in(x_BLC, mod_B16C)


@functools.partial(jax.jit, static_argnames=('block_graph',), donate_argnames=('x_BLC',))
def _block_out(block_graph: nnx.GraphDef, block_state: nnx.State, x_BLC: jax.Array, o_BHLD: jax.Array,
               mod_B16C: jax.Array):
  return nnx.merge(block_graph, block_state).attn_out(x_BLC, o_BHLD, mod_B16C)


@functools.partial(jax.jit, static_argnames=('var_graph', 'vae_graph', 'scale', 'top_k', 'top_p',
                                             'capture_logits'), donate_argnames=('f_hat_BhwC',))
def _head(var_graph: nnx.GraphDef, var_state: nnx.State, vae_graph: nnx.GraphDef, vae_state: nnx.State,
          scale: int, top_k: int, top_p: float, capture_logits: bool, h_2BlC: jax.Array,
          cond_2BD: jax.Array, head_mod: jax.Array, f_hat_BhwC: jax.Array, t: jax.Array, key: jax.Array):
  """(idx (B, pn^2), f_hat, next input or None, raw logits (2B, pn^2, V) or None) from the last block's
  output."""
  var_model = nnx.merge(var_graph, var_state)
  logits_2BlV = var_model.logits(h_2BlC, cond_2BD, head_mod)
  idx_Bl, f_hat_BhwC, x_next = sampling.sample_and_advance(
      var_model, nnx.merge(vae_graph, vae_state), scale, logits_2BlV, t, key, top_k, top_p, f_hat_BhwC)
  return idx_Bl, f_hat_BhwC, x_next, (logits_2BlV if capture_logits else None)


@functools.partial(jax.jit, static_argnames=('policy', 'batch', 'num_heads', 'head_dim', 'num_layers',
                                             'patch_nums'))
def _init(policy: CachePolicy, batch: int, num_heads: int, head_dim: int, num_layers: int,
          patch_nums: tuple[int, ...]):
  return policy.init(batch, num_heads, head_dim, num_layers, patch_nums=patch_nums)


@functools.partial(jax.jit, static_argnames=('policy', 'scale'), donate_argnames=('state_layer',))
def _attend(policy: CachePolicy, scale: int, params_layer: Any, state_layer: Any, q_BHSD: jax.Array,
            k_BHSD: jax.Array, v_BHSD: jax.Array):
  """One layer's (attention output, new state); `params_layer`: the layer's parameters with a leading
  axis of 1 (the policy sees layer 0 of them)."""
  return sampling.bind_arrays(policy, params_layer).attend(state_layer, 0, scale, q_BHSD, k_BHSD, v_BHSD)


@dataclasses.dataclass
class ModelPrograms:
  """The model's compiled programs for `batch` images: start, per scale block_in / block_out (every
  layer) and head, and the decode. Shared by every `compile_layered` policy of this batch."""
  var_model: Any
  batch: int
  var_state: nnx.State
  vae_state: nnx.State
  block_states: list[nnx.State]
  start: Callable
  block_in: list[Callable]
  block_out: list[Callable]
  head: list[Callable]
  decode: Callable
  qkv_shapes: list[Any]          # per scale: the q (= k = v) shape the policy's step takes

  @classmethod
  def compile(cls, var_model: Any, vqvae: nnx.Module, batch: int, *, top_k: int = 900, top_p: float = 0.96,
              capture_logits: bool = False) -> ModelPrograms:
    """Compiles (runs nothing) the model's programs, with `var_jax.xla_cpu.generation_options`."""
    if batch < 1:
      raise ValueError(f'batch must be >= 1, got {batch}')
    mcfg = var_model.cfg
    var_graph, var_state = nnx.split(var_model)
    vae_graph, vae_state = nnx.split(vqvae)
    block_graph, block_states = None, []
    for block in var_model.blocks:
      block_graph, state = nnx.split(block)
      block_states.append(state)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    opts = generation_options()
    start = _start.lower(var_graph, var_state, labels).compile(compiler_options=opts)
    cond, x, f_hat = start.out_info
    key, t = shapes_of(jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.float32)
    mod = cond['blocks'][0]
    block_in, block_out, head, qkv = [], [], [], []
    for scale in range(len(mcfg.patch_nums)):
      b_in = _block_in.lower(block_graph, block_states[0], x, mod).compile(compiler_options=opts)
      q = b_in.out_info[0]
      b_out = _block_out.lower(block_graph, block_states[0], x, q, mod).compile(compiler_options=opts)
      hd = _head.lower(var_graph, var_state, vae_graph, vae_state, scale, int(top_k), float(top_p),
                       bool(capture_logits), x, cond['cond'], cond['head'], f_hat, t, key
                       ).compile(compiler_options=opts)
      block_in.append(b_in)
      block_out.append(b_out)
      head.append(hd)
      qkv.append(q)
      _, f_hat, x, _ = hd.out_info
    return cls(var_model=var_model, batch=batch, var_state=var_state, vae_state=vae_state,
               block_states=block_states, start=start, block_in=block_in, block_out=block_out, head=head,
               decode=compile_decode(vqvae, batch), qkv_shapes=qkv)


@dataclasses.dataclass
class LayeredGenerate:
  """A policy's compiled `attend` programs (one per scale) on shared `ModelPrograms`; call it with
  labels (batch,) and a key, as `compiled_generate.CompiledGenerate`."""
  model: ModelPrograms
  policy: CachePolicy
  init: Callable
  attend: list[Callable]
  layer_params: list[Any]        # per layer: its parameters with a leading axis of 1 (None: none)

  @property
  def decode(self) -> Callable:
    return self.model.decode

  def __call__(self, labels_B: Any, key: jax.Array, cfg: float = 1.5) -> sampling.GenerateOutput:
    m = self.model
    num_scales = len(m.var_model.cfg.patch_nums)
    labels_B = sampling._checked_labels(labels_B, m.var_model.cfg.num_classes)  # pylint: disable=protected-access
    if labels_B.shape[0] != m.batch:
      raise ValueError(f'this generation was compiled for {m.batch} labels, got {labels_B.shape[0]}; '
                       'compile another with ModelPrograms.compile(..., batch=...)')
    cond, x, f_hat = m.start(m.var_state, labels_B)
    state = list(self.init())
    keys = jax.random.split(key, num_scales)
    tokens, logits = [], []
    for scale in range(num_scales):
      for layer, block_state in enumerate(m.block_states):
        mod = cond['blocks'][layer]
        q, k, v = m.block_in[scale](block_state, x, mod)
        o, state[layer] = self.attend[scale](self.layer_params[layer], state[layer], q, k, v)
        x = m.block_out[scale](block_state, x, o, mod)
      t = sampling.guidance_weight(cfg, scale, num_scales)
      idx, f_hat, x, lg = m.head[scale](m.var_state, m.vae_state, x, cond['cond'], cond['head'], f_hat, t,
                                        keys[scale])
      tokens.append(idx)
      logits.append(lg)
    images = m.decode(m.vae_state, f_hat)
    return sampling.GenerateOutput(tokens=tokens, images=images, cache=tuple(state),
                                   logits=logits if logits[0] is not None else None)


def compile_layered(model: ModelPrograms, policy: CachePolicy | None,
                    options_per_scale: Sequence[Options] | None = None) -> LayeredGenerate:
  """Compiles (runs nothing) `policy`'s init and one `attend` program per scale (None: FullCache) on
  `model`'s shapes; `options_per_scale`: XLA options of each scale's program, over
  `var_jax.xla_cpu.generation_options` (None: those alone)."""
  mcfg = model.var_model.cfg
  num_scales = len(mcfg.patch_nums)
  options = list(options_per_scale) if options_per_scale is not None else [None] * num_scales
  if len(options) != num_scales:
    raise ValueError(f'options_per_scale has {len(options)} entries for {num_scales} scales')
  policy = FullCache(tuple(mcfg.patch_nums)) if policy is None else policy
  if not isinstance(policy, FullCache) and not hasattr(policy, 'compressor'):
    raise ValueError(f'{type(policy).__name__}: layered generation runs one program for every layer, so '
                     'it takes FullCache or compress.CompressorPolicy (whose steps depend on the layer '
                     'through its parameters only); generate with var_jax.sampling.generate instead')
  init = _init.lower(policy, 2 * model.batch, mcfg.num_heads, mcfg.head_dim, mcfg.depth,
                     tuple(mcfg.patch_nums)).compile(compiler_options=generation_options())
  state = init.out_info[0]
  params = sampling.policy_arrays(policy)
  layer_params = [None if params is None else jax.tree.map(lambda p, i=i: p[i:i + 1], params)
                  for i in range(mcfg.depth)]
  attend = []
  for scale in range(num_scales):
    q = model.qkv_shapes[scale]
    prog = _attend.lower(policy, scale, shapes_of(layer_params[0]), state, q, q, q).compile(
        compiler_options=generation_options(options[scale]))
    state = prog.out_info[1]
    attend.append(prog)
  return LayeredGenerate(model=model, policy=policy, init=init, attend=attend, layer_params=layer_params)
