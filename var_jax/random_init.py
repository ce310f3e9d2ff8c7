"""Models with random weights, drawn straight into the abstract module (fast even at d16/d30).

For benchmarks and engine tests at official scale without checkpoints: sampling speed and the cache
shapes do not depend on the weights' values (what the caches hold does; use the official checkpoints
for results).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.config import SIZES, VQVAEConfig


def random_model(build: Callable[[], Any], seed: int) -> Any:
  """Builds `build()` abstractly and fills its float leaves with small normals (0.02 for matrices,
  0.1 for vectors); integer leaves are zeros."""
  graph, state = nnx.split(nnx.eval_shape(build))
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    std = 0.02 if len(leaf.shape) > 1 else 0.1
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std)
  return nnx.merge(graph, jax.tree.unflatten(treedef, [draw(l) for l in leaves]))


def random_models(size: str, seed: int = 0) -> tuple[Any, Any]:
  """(VAR, VQVAE) of official size `size` (var_jax.config.SIZES: 'd16', 'd20', ...) with random weights."""
  from var_jax.var import VAR  # pylint: disable=g-import-not-at-top
  from var_jax.vqvae import VQVAE  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise ValueError(f'model size must be one of {", ".join(SIZES)}, got {size!r}')
  vcfg = SIZES[size]
  var = random_model(lambda: VAR(vcfg, rngs=nnx.Rngs(seed)), seed)
  vae_cfg = VQVAEConfig(vocab_size=vcfg.vocab_size, z_channels=vcfg.z_channels, patch_nums=vcfg.patch_nums,
                        **({} if vcfg.vocab_size == 4096 else {'ch': 32}))
  vae = random_model(lambda: VQVAE(vae_cfg, rngs=nnx.Rngs(seed + 1)), seed + 1)
  return var, vae
