"""The reference-facing API: one object holding a VAR transformer and its multi-scale VQ-VAE.

    model = var_jax.load_official('var_d16.pth', 'vae_ch160v4096z32.pth')
    out = model.generate([207, 360], seed=0, cfg=4.0, top_k=900, top_p=0.95, return_cache=True)
    out.images   # (B, 256, 256, 3) in [0, 1]; out.tokens: per scale (B, pn*pn); out.cache: per layer k, v

Images are NHWC at this API (inputs in [-1, 1], generated images in [0, 1]).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import convert, sampling
from var_jax.kvcache import CachePolicy
from var_jax.var import VAR
from var_jax.vqvae import VQVAE


@dataclasses.dataclass
class Generation:
  """tokens: per scale (B, pn*pn) int32; images: (B, H, W, 3) in [0, 1];
  cache: per layer {'k', 'v'} each (2B, heads, L, head_dim), conditional half first (None unless asked);
  qkv: per scale, per layer (q, k, v) (2B, heads, pn*pn, head_dim), q pre-scaled (None unless asked)."""
  tokens: list[jax.Array]
  images: jax.Array
  cache: list[dict[str, jax.Array]] | None = None
  qkv: list[Any] | None = None


@nnx.jit
def _img_to_idx(vae: VQVAE, img_BHWC: jax.Array) -> list[jax.Array]:
  return vae.img_to_idx(img_BHWC)


@nnx.jit
def _decode_idx(vae: VQVAE, idx: list[jax.Array]) -> jax.Array:
  return vae.idx_to_img(idx)


@nnx.jit
def _logits(var: VAR, labels_B: jax.Array, var_input_BlC: jax.Array) -> jax.Array:
  return var(labels_B, var_input_BlC)


class VARModel:
  """A loaded VAR + VQ-VAE pair (`var`, `vae` are the flax.nnx modules; `var.cfg`, `vae.cfg`)."""

  def __init__(self, var: VAR, vae: VQVAE):
    if tuple(var.cfg.patch_nums) != tuple(vae.cfg.patch_nums):
      raise ValueError(f'VAR patch_nums {var.cfg.patch_nums} != VQ-VAE patch_nums {vae.cfg.patch_nums}')
    self.var, self.vae = var, vae

  @property
  def patch_nums(self) -> tuple[int, ...]:
    return tuple(self.var.cfg.patch_nums)

  def _check_images(self, images_BHWC: Any) -> jax.Array:
    x = jnp.asarray(images_BHWC, jnp.float32)
    side = self.vae.cfg.image_size
    if x.ndim != 4 or x.shape[1:] != (side, side, 3):
      raise ValueError(f'images must be NHWC (B, {side}, {side}, 3) in [-1, 1], got shape {x.shape}; '
                       'transpose NCHW arrays with x.transpose(0, 2, 3, 1)')
    return x

  def img_to_idx(self, images_BHWC: Any) -> list[jax.Array]:
    """Per-scale token indices, one (B, pn*pn) int32 array per scale."""
    return _img_to_idx(self.vae, self._check_images(images_BHWC))

  def idx_to_var_input(self, idx_list: Sequence[Any]) -> jax.Array:
    """Teacher-forcing input (B, L - pn0^2, Cvae)."""
    return self.vae.idx_to_var_input([jnp.asarray(i, jnp.int32) for i in self._check_idx(idx_list)])

  def decode_idx(self, idx_list: Sequence[Any]) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] from per-scale indices."""
    return _decode_idx(self.vae, [jnp.asarray(i, jnp.int32) for i in self._check_idx(idx_list)])

  def logits(self, labels_B: Any, var_input: Any) -> jax.Array:
    """Teacher-forced logits (B, L, V), no label dropout."""
    labels = jnp.asarray(labels_B, jnp.int32)
    x = jnp.asarray(var_input, jnp.float32)
    cfg = self.var.cfg
    want = (labels.shape[0], cfg.seq_len - cfg.patch_nums[0] ** 2, cfg.z_channels)
    if x.shape != want:
      raise ValueError(f'var_input must be (B, L - pn0^2, Cvae) = {want}, got {x.shape}; '
                       'build it with idx_to_var_input(img_to_idx(images))')
    return _logits(self.var, labels, x)

  def generate(self, labels_B: Any, *, seed: int = 0, cfg: float = 1.5, top_k: int = 900,
               top_p: float = 0.96, return_cache: bool = False, return_qkv: bool = False,
               policy: CachePolicy | None = None) -> Generation:
    """Samples one image per label (class-conditional, CFG as official) from PRNG seed `seed`."""
    out = sampling.generate(self.var, self.vae, jnp.atleast_1d(jnp.asarray(labels_B, jnp.int32)),
                            key=jax.random.key(seed), cfg=cfg, top_k=top_k, top_p=top_p,
                            policy=policy, capture_qkv=return_qkv)
    cache = None
    if return_cache:
      if policy is not None:
        cache = list(out.cache)   # a compressor's own state
      else:
        cache = [{'k': c.k_BHLD, 'v': c.v_BHLD} for c in out.cache]
    return Generation(tokens=out.tokens, images=out.images, cache=cache, qkv=out.qkv)

  def _check_idx(self, idx_list: Sequence[Any]) -> Sequence[Any]:
    pn = self.patch_nums
    shapes = [tuple(np.shape(i)) for i in idx_list]
    if len(idx_list) != len(pn) or any(len(s) != 2 or s[1] != p * p for s, p in zip(shapes, pn)):
      raise ValueError(f'expected {len(pn)} index arrays shaped (B, pn*pn) for patch_nums {pn}, '
                       f'got shapes {shapes}')
    return idx_list


def load_official(var_path: str | os.PathLike, vae_path: str | os.PathLike,
                  patch_nums: Sequence[int] | None = None) -> VARModel:
  """Loads official `var_d*.pth` + `vae_ch160v4096z32.pth` (torch files, read without torch or code
  execution). patch_nums default: read from the checkpoint (10 scales at 256px, 512px for d36-s)."""
  return VARModel(*convert.load_official_models(var_path, vae_path, patch_nums))


def load_converted(ckpt_dir: str | os.PathLike) -> VARModel:
  """Loads a directory written by `python -m var_jax.convert` (orbax + config.json; fast)."""
  return VARModel(*convert.load_converted_models(ckpt_dir))
