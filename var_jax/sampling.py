"""Class-conditional VAR sampling with classifier-free guidance and a pluggable KV-cache policy.

`generate` follows the official `VAR.autoregressive_infer_cfg`: every image is two sequences (the
class, then the null class), scale k's logits are guided with t = cfg * k / (K - 1) as
(1 + t) * cond - t * uncond, filtered by top-k then top-p (official `sample_with_top_k_top_p_`) and
sampled (`var_jax.token_sampling`); the codes update the VQ-VAE's f_hat, whose area-downsampled map is
the next scale's input.

One jitted function per scale (static shapes), taking and returning the cache-policy state with its
buffers donated. The compiled functions are cached by jax.jit on (graph of the models, policy,
scale, top_k, top_p, capture flags, shapes), so repeated calls with the same settings do not
recompile; `cfg` and the arrays a policy carries (a compressor's parameters, `policy_arrays`) are
traced values, and policies compare by value: a new policy object of the same compressor and settings
compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.kvcache import CachePolicy, FullCache
from var_jax.token_sampling import sample_top_k_top_p, top_k_top_p_filter  # noqa: F401  (API)
from var_jax.var import VAR
from var_jax.xla_cpu import generation_options

Array = jax.Array
# a compressor's state changes shape between scales, so the step's donated state cannot always be
# reused for its output: expected, and said by jax once per compiled program otherwise
warnings.filterwarnings('ignore', message='Some donated buffers were not usable')


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """What `generate` returns.

  tokens: per scale (B, pn^2) int32 codes.
  images: (B, H, W, 3) in [0, 1].
  cache: the final policy state (FullCache: per layer a KVCache with k, v (2B, H, L, hd),
    conditional half first).
  qkv: with capture_qkv, per scale a tuple over layers of (q, k, v), each (2B, H, pn^2, hd), exactly
    what the policy was given (q pre-scaled); else None.
  logits: with capture_logits, per scale the raw (unguided) logits (2B, pn^2, V) fp32, conditional
    half first; else None.
  """
  tokens: list[Array]
  images: Array
  cache: Any
  qkv: list[tuple[tuple[Array, Array, Array], ...]] | None = None
  logits: list[Array] | None = None


# ------------------------------------------------------------------------------ jitted steps
def policy_arrays(policy: CachePolicy) -> Any:
  """The arrays a policy carries (a compressor's parameters: `policy.params`), or None. The jitted
  steps take them as traced arguments and rebind them (`bind_arrays`), never as constants, so a second
  policy of the same compressor and settings (policies compare by value) compiles nothing."""
  return getattr(policy, 'params', None)


def bind_arrays(policy: CachePolicy, arrays: Any) -> CachePolicy:
  return policy if arrays is None else dataclasses.replace(policy, params=arrays)


def _through_policy(var_model: VAR, policy: CachePolicy, scale: int, state: Any, x_BlC: Array,
                    cond: dict[str, Any], capture_qkv: bool) -> tuple[Array, tuple[Any, ...], Any]:
  """Scale `scale`'s tokens through all blocks, attention by `policy`: (logits, new state, qkv).
  `cond`: `var_model.conditioning(cond_BD)`."""

  def attend(layer: int, q, k, v):
    out, new_layer_state = policy.attend(state[layer], layer, scale, q, k, v)
    return out, (new_layer_state, (q, k, v) if capture_qkv else None)

  h_BlC, auxes = var_model.backbone(x_BlC, cond['cond'], attend, mods=cond['blocks'])
  qkv = tuple(a[1] for a in auxes) if capture_qkv else None
  return var_model.logits(h_BlC, cond['cond'], cond['head']), tuple(a[0] for a in auxes), qkv


@functools.partial(jax.jit, static_argnames=('var_graph', 'policy'))
def _start(var_graph: nnx.GraphDef, var_state: nnx.State, policy: CachePolicy, labels_B: Array):
  """(conditioning of the 2B rows (`VAR.conditioning`: computed once, used by every scale), first input
  (2B, pn0^2, C), empty policy state, f_hat zeros (B, pnK, pnK, Cvae))."""
  var_model: VAR = nnx.merge(var_graph, var_state)
  cfg = var_model.cfg
  cond, x_2BlC, f_hat = start_inputs(var_model, labels_B)
  state = policy.init(2 * labels_B.shape[0], cfg.num_heads, cfg.head_dim, cfg.depth,
                      patch_nums=tuple(cfg.patch_nums))
  return cond, x_2BlC, state, f_hat


def start_inputs(var_model: VAR, labels_B: Array) -> tuple[dict[str, Any], Array, Array]:
  """(conditioning of the 2B rows (`VAR.conditioning`), first input (2B, pn0^2, C), f_hat zeros (B,
  pnK, pnK, Cvae)): the class, then the null class, per image."""
  cfg = var_model.cfg
  cond_2BD = var_model.cond(jnp.concatenate([labels_B, jnp.full_like(labels_B, cfg.num_classes)]))
  pn = cfg.patch_nums[-1]
  f_hat = jnp.zeros((labels_B.shape[0], pn, pn, cfg.z_channels), jnp.float32)
  return var_model.conditioning(cond_2BD), var_model.embed_first(cond_2BD), f_hat


def guidance_weight(cfg: float, scale: int, num_scales: int) -> np.float32:
  """Guidance t of scale `scale`: cfg * scale / (K - 1), as the official code (ratio in double), fp32."""
  return np.float32(cfg * (scale / max(num_scales - 1, 1)))


def guide(logits_2BlV: Any, t: Any) -> Any:
  """Guided logits (1 + t) * cond - t * uncond, (B, l, V), of a batch with the conditional half first
  (jax or numpy arrays)."""
  b = logits_2BlV.shape[0] // 2
  return (1 + t) * logits_2BlV[:b] - t * logits_2BlV[b:]


@functools.partial(
    jax.jit, donate_argnames=('state', 'f_hat_BhwC'),
    static_argnames=('var_graph', 'vae_graph', 'policy', 'scale', 'top_k', 'top_p', 'capture_qkv',
                     'capture_logits'))
def _scale_step(var_graph: nnx.GraphDef, var_state: nnx.State, vae_graph: nnx.GraphDef,
                vae_state: nnx.State, policy: CachePolicy, scale: int, top_k: int, top_p: float,
                capture_qkv: bool, capture_logits: bool, state: Any, x_2BlC: Array, cond_2B: dict[str, Any],
                f_hat_BhwC: Array, t: Array, key: Array, policy_data: Any = None):
  """One scale: blocks through the policy, guided sampling, VQ-VAE update, next input.

  Returns (idx (B, pn^2) int32, f_hat, next input (2B, pn'^2, C) or None at the last scale,
  new policy state, qkv or None, logits (2B, pn^2, V) or None).
  """
  var_model: VAR = nnx.merge(var_graph, var_state)
  vae = nnx.merge(vae_graph, vae_state)
  policy = bind_arrays(policy, policy_data)
  logits_2BlV, new_state, qkv = _through_policy(var_model, policy, scale, state, x_2BlC, cond_2B,
                                                capture_qkv)
  idx_Bl, f_hat_BhwC, x_next = sample_and_advance(var_model, vae, scale, logits_2BlV, t, key, top_k, top_p,
                                                  f_hat_BhwC)
  return idx_Bl, f_hat_BhwC, x_next, new_state, qkv, (logits_2BlV if capture_logits else None)


def sample_and_advance(var_model: VAR, vae: nnx.Module, scale: int, logits_2BlV: Array, t: Array,
                       key: Array, top_k: int, top_p: float, f_hat_BhwC: Array
                       ) -> tuple[Array, Array, Array | None]:
  """Scale `scale`'s guided sampling from its raw logits (2B, pn^2, V) and the VQ-VAE update: (idx (B,
  pn^2) int32, f_hat, next scale's input (2B, pn'^2, C) or None after the last scale)."""
  cfg = var_model.cfg
  pn, b = cfg.patch_nums[scale], logits_2BlV.shape[0] // 2
  idx_Bl = sample_top_k_top_p(key, guide(logits_2BlV, t), top_k, top_p)
  h_BpnpnC = vae.embed_idx(idx_Bl).reshape(b, pn, pn, cfg.z_channels)
  f_hat_BhwC, next_BhwC = vae.next_autoregressive_input(scale, f_hat_BhwC, h_BpnpnC)
  x_next = None
  if scale + 1 < len(cfg.patch_nums):
    x_BlC = var_model.embed_next(scale + 1, next_BhwC.reshape(b, -1, cfg.z_channels))
    x_next = jnp.concatenate([x_BlC, x_BlC], axis=0)
  return idx_Bl, f_hat_BhwC, x_next


@functools.partial(jax.jit, donate_argnames=('state',),
                   static_argnames=('var_graph', 'policy', 'scale', 'capture_qkv'))
def _forward_scale(var_graph: nnx.GraphDef, var_state: nnx.State, policy: CachePolicy, scale: int,
                   capture_qkv: bool, state: Any, labels_B: Array, var_input_BlC: Array,
                   policy_data: Any = None):
  """Teacher-forced scale `scale` through the policy: (logits (B, pn^2, V), new state, qkv or None)."""
  var_model: VAR = nnx.merge(var_graph, var_state)
  policy = bind_arrays(policy, policy_data)
  cfg = var_model.cfg
  cond_BD = var_model.cond(labels_B)
  if scale == 0:
    x_BlC = var_model.embed_first(cond_BD)
  else:
    first_l = cfg.patch_nums[0] ** 2
    begin, end = cfg.begin_ends[scale]
    x_BlC = var_model.embed_next(scale, var_input_BlC[:, begin - first_l:end - first_l])
  return _through_policy(var_model, policy, scale, state, x_BlC, var_model.conditioning(cond_BD),
                         capture_qkv)


@functools.partial(jax.jit, static_argnames=('vae_graph',))
def _decode(vae_graph: nnx.GraphDef, vae_state: nnx.State, f_hat_BhwC: Array) -> Array:
  """(B, H, W, 3) in [0, 1] (official `fhat_to_img(f_hat).add_(1).mul_(0.5)`)."""
  return (nnx.merge(vae_graph, vae_state).fhat_to_img(f_hat_BhwC) + 1) * 0.5


_DECODES: dict[Any, Any] = {}     # (graph, state shapes, f_hat shape, options) -> compiled decode


def compiled_decode(vae_graph: nnx.GraphDef, vae_state: nnx.State, f_hat_BhwC: Any,
                    options: dict[str, Any] | None = None) -> Any:
  """`_decode` compiled for `f_hat_BhwC`'s shape (an array or a jax.ShapeDtypeStruct) with `options`
  over `var_jax.xla_cpu.generation_options(decode=True)` (on CPU YNN fusions of the reductions only:
  the decode's convolutions ran faster without YNN at every size measured, its GroupNorm sums with
  it); once per model, shape and options, then reused: (vae_state, f_hat) -> images."""
  options = generation_options(options, decode=True)
  key = (vae_graph, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(vae_state)),
         tuple(f_hat_BhwC.shape), str(f_hat_BhwC.dtype), tuple(sorted((options or {}).items())))
  if key not in _DECODES:
    _DECODES[key] = _decode.lower(vae_graph, vae_state, f_hat_BhwC).compile(compiler_options=options)
  return _DECODES[key]


def decode_images(vae_graph: nnx.GraphDef, vae_state: nnx.State, f_hat_BhwC: Array) -> Array:
  """(B, H, W, 3) in [0, 1]: the f_hat maps through `compiled_decode`."""
  return compiled_decode(vae_graph, vae_state, f_hat_BhwC)(vae_state, f_hat_BhwC)


# ------------------------------------------------------------------------------ public API
def _checked_labels(labels_B: Any, num_classes: int) -> Array:
  labels_np = np.asarray(labels_B).reshape(-1)
  if labels_np.size == 0 or labels_np.min() < 0 or labels_np.max() > num_classes:
    raise ValueError(f'labels must be a non-empty list of ints in [0, {num_classes}] '
                     f'({num_classes} = unconditional), got {labels_np.tolist()}')
  return jnp.asarray(labels_np, jnp.int32)


def forward_cached(var_model: VAR, labels_B: Array, var_input_BlC: Array, *,
                   policy: CachePolicy | None = None, capture_qkv: bool = False
                   ) -> tuple[Array, Any, list | None]:
  """Teacher forcing scale by scale through a cache policy (no sampling, no CFG doubling).

  labels (B,) int (the null class `num_classes` allowed); var_input (B, L - pn0^2, Cvae) as for
  `VAR.__call__`. Returns (logits (B, L, V) fp32, final policy state, per-scale qkv or None). With
  `FullCache` the logits equal `var_model(labels_B, var_input_BlC)` up to fp32 rounding; with a
  compressing policy they show its effect on real token sequences.
  """
  mcfg = var_model.cfg
  labels_B = _checked_labels(labels_B, mcfg.num_classes)
  var_input_BlC = jnp.asarray(var_input_BlC, jnp.float32)
  want = (labels_B.shape[0], mcfg.seq_len - mcfg.patch_nums[0] ** 2, mcfg.z_channels)
  if tuple(var_input_BlC.shape) != want:
    raise ValueError(f'var_input has shape {tuple(var_input_BlC.shape)}, expected {want} '
                     '(B, L - pn0^2, Cvae); build it with VQVAE.idx_to_var_input')
  policy = FullCache(tuple(mcfg.patch_nums)) if policy is None else policy
  var_graph, var_state = nnx.split(var_model)
  state = policy.init(labels_B.shape[0], mcfg.num_heads, mcfg.head_dim, mcfg.depth,
                      patch_nums=tuple(mcfg.patch_nums))
  logits, qkvs = [], []
  for scale in range(len(mcfg.patch_nums)):
    lg, state, qkv = _forward_scale(var_graph, var_state, policy, scale, capture_qkv, state,
                                    labels_B, var_input_BlC, policy_arrays(policy))
    logits.append(lg)
    qkvs.append(qkv)
  return jnp.concatenate(logits, axis=1), state, (qkvs if capture_qkv else None)


def generate(var_model: VAR, vqvae: nnx.Module, labels_B: Any, *, key: Array, cfg: float = 1.5,
             top_k: int = 900, top_p: float = 0.96, policy: CachePolicy | None = None,
             capture_qkv: bool = False, capture_logits: bool = False) -> GenerateOutput:
  """Samples B images of classes `labels_B` (ints in [0, num_classes]; num_classes = unconditional).

  cfg: guidance ratio (t = cfg * k / (K - 1) at scale k). top_k / top_p: official filters (<= 0
  disables each; top_k=1 is greedy). policy: the KV-cache policy (default `FullCache`, exact).
  key: a JAX PRNG key (one split per scale).
  """
  mcfg = var_model.cfg
  labels_B = _checked_labels(labels_B, mcfg.num_classes)
  vae_cfg = getattr(vqvae, 'cfg', None)
  if vae_cfg is not None and (tuple(vae_cfg.patch_nums), vae_cfg.vocab_size, vae_cfg.z_channels) != (
      tuple(mcfg.patch_nums), mcfg.vocab_size, mcfg.z_channels):
    raise ValueError(f'VQ-VAE (patch_nums {vae_cfg.patch_nums}, V {vae_cfg.vocab_size}, Cvae '
                     f'{vae_cfg.z_channels}) does not match VAR (patch_nums {mcfg.patch_nums}, V '
                     f'{mcfg.vocab_size}, Cvae {mcfg.z_channels}); build both from the same schedule')
  policy = FullCache(tuple(mcfg.patch_nums)) if policy is None else policy
  var_graph, var_state = nnx.split(var_model)
  vae_graph, vae_state = nnx.split(vqvae)
  num_scales = len(mcfg.patch_nums)
  keys = jax.random.split(key, num_scales)
  cond_2B, x_2BlC, state, f_hat = _start(var_graph, var_state, policy, labels_B)
  tokens, qkvs, logits = [], [], []
  for scale in range(num_scales):
    t = guidance_weight(cfg, scale, num_scales)
    idx_Bl, f_hat, x_2BlC, state, qkv, lg = _scale_step(
        var_graph, var_state, vae_graph, vae_state, policy, scale, int(top_k), float(top_p),
        capture_qkv, capture_logits, state, x_2BlC, cond_2B, f_hat, t, keys[scale],
        policy_arrays(policy))
    tokens.append(idx_Bl)
    qkvs.append(qkv)
    logits.append(lg)
  images = decode_images(vae_graph, vae_state, f_hat)
  return GenerateOutput(tokens=tokens, images=images, cache=state,
                        qkv=qkvs if capture_qkv else None, logits=logits if capture_logits else None)
