"""Generation compiled ahead of time, for many policies in a row (the frontier's closed loop).

`var_jax.sampling.generate` compiles its per-scale steps on first use (jax.jit's cache). A run that
generates with dozens of compressors (one program per compressor, budget and batch) wants more:

  - compile a policy's programs before they are needed, on another thread, while the previous
    policy generates (`compile_generate` runs nothing: it lowers from shapes alone);
  - choose XLA options per scale: `options_per_scale[k]` for scale k's step (e.g. fast-compile options
    for the early scales, whose steps run in milliseconds but compile in seconds, and XLA's defaults for
    the last ones, where the run time is);
  - share the VQ-VAE decode (it does not depend on the policy) between policies of one batch size.

    gen = compile_generate(var, vae, policy, batch=240, top_k=0, top_p=0.0, capture_logits=True)
    out = gen(labels_B, key, cfg=1.5)        # a GenerateOutput, as sampling.generate returns

The programs are `sampling._start`, `sampling._scale_step` and `sampling._decode` themselves, so with
the same XLA options (None: XLA's defaults) the outputs are exactly `sampling.generate`'s for the same
labels and key (tests/test_compiled_generate.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax import sampling
from var_jax.kvcache import CachePolicy, FullCache

Options = dict[str, Any] | None


def shapes_of(tree: Any) -> Any:
  """The jax.ShapeDtypeStruct of every array of `tree` (what `lower` takes)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@dataclasses.dataclass
class CompiledGenerate:
  """Compiled programs of one (models, policy, batch, top_k, top_p, capture flags); call it with
  labels (batch,) and a key. `decode` may be shared by every CompiledGenerate of a batch size."""
  policy: CachePolicy
  batch: int
  num_classes: int
  var_state: nnx.State
  vae_state: nnx.State
  start: Callable
  steps: list[Callable]
  decode: Callable
  num_scales: int

  def __call__(self, labels_B: Any, key: jax.Array, cfg: float = 1.5) -> sampling.GenerateOutput:
    labels_B = sampling._checked_labels(labels_B, self.num_classes)  # pylint: disable=protected-access
    if labels_B.shape[0] != self.batch:
      raise ValueError(f'this generation was compiled for {self.batch} labels, got {labels_B.shape[0]}; '
                       'compile another with compile_generate(..., batch=...)')
    arrays = sampling.policy_arrays(self.policy)
    cond_2B, x_2BlC, state, f_hat = self.start(self.var_state, labels_B)
    keys = jax.random.split(key, self.num_scales)
    tokens, logits = [], []
    for scale, step in enumerate(self.steps):
      t = sampling.guidance_weight(cfg, scale, self.num_scales)
      idx_Bl, f_hat, x_2BlC, state, _, lg = step(self.var_state, self.vae_state, state, x_2BlC, cond_2B,
                                                f_hat, t, keys[scale], arrays)
      tokens.append(idx_Bl)
      logits.append(lg)
    images = self.decode(self.vae_state, f_hat)
    return sampling.GenerateOutput(tokens=tokens, images=images, cache=state,
                                   logits=logits if logits[0] is not None else None)


def compile_decode(vqvae: nnx.Module, batch: int, options: Options = None) -> Callable:
  """The VQ-VAE decode of `batch` f_hat maps, compiled: (vae_state, f_hat) -> images (batch, H, W, 3);
  `sampling.compiled_decode` (the sampler's own, `options` over `var_jax.xla_cpu.generation_options`)."""
  vae_graph, vae_state = nnx.split(vqvae)
  cfg = vqvae.cfg
  pn = cfg.patch_nums[-1]
  f_hat = jax.ShapeDtypeStruct((batch, pn, pn, cfg.z_channels), jnp.float32)
  return sampling.compiled_decode(vae_graph, vae_state, f_hat, options)


def compile_generate(var_model: Any, vqvae: nnx.Module, policy: CachePolicy | None, batch: int, *,
                     top_k: int = 900, top_p: float = 0.96, capture_logits: bool = False,
                     options_per_scale: Sequence[Options] | None = None, decode: Callable | None = None
                     ) -> CompiledGenerate:
  """Compiles (runs nothing) the start, every scale's step and the decode of generating `batch` images
  with `policy` (None: FullCache). `options_per_scale`: XLA options of each scale's step (None: XLA's
  defaults everywhere); `decode`: a `compile_decode` of this batch size to reuse (else compiled here,
  as `sampling.generate`'s)."""
  mcfg = var_model.cfg
  num_scales = len(mcfg.patch_nums)
  options = list(options_per_scale) if options_per_scale is not None else [None] * num_scales
  if len(options) != num_scales:
    raise ValueError(f'options_per_scale has {len(options)} entries for {num_scales} scales')
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  policy = FullCache(tuple(mcfg.patch_nums)) if policy is None else policy
  var_graph, var_state = nnx.split(var_model)
  vae_graph, vae_state = nnx.split(vqvae)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  start = sampling._start.lower(var_graph, var_state, policy, labels).compile()  # pylint: disable=protected-access
  cond, x, state, f_hat = start.out_info
  key = shapes_of(jax.random.key(0))
  t = jax.ShapeDtypeStruct((), jnp.float32)
  arrays = sampling.policy_arrays(policy)
  steps = []
  for scale in range(num_scales):
    step = sampling._scale_step.lower(  # pylint: disable=protected-access
        var_graph, var_state, vae_graph, vae_state, policy, scale, int(top_k), float(top_p), False,
        bool(capture_logits), state, x, cond, f_hat, t, key, arrays).compile(compiler_options=options[scale])
    _, f_hat, x, state, _, _ = step.out_info
    steps.append(step)
  if decode is None:
    decode = compile_decode(vqvae, batch)
  return CompiledGenerate(policy=policy, batch=batch, num_classes=mcfg.num_classes, var_state=var_state,
                          vae_state=vae_state, start=start, steps=steps, decode=decode,
                          num_scales=num_scales)


def fast_early_scales(num_scales: int, fast: int, options: Options) -> list[Options]:
  """Per-scale options: `options` for the first `fast` scales, XLA's defaults (None) after."""
  return [options if k < fast else None for k in range(num_scales)]

