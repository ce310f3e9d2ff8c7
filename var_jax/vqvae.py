"""Multi-scale VQ-VAE of VAR (official `models/vqvae.py`) in flax.nnx; images NHWC in [-1, 1].

Loading official weights (eval_shape skips the random init, which costs one XLA compile per shape):
  sd = torch_pickle.load_torch_state_dict('vae_ch160v4096z32.pth')
  vae = nnx.eval_shape(lambda: VQVAE(infer_vqvae_config(sd, patch_nums), rngs=nnx.Rngs(0)))
  load_vqvae_state_dict(vae, sd)
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.config import VQVAEConfig
from var_jax.quant import VectorQuantizer
from var_jax.vae_blocks import Decoder, Encoder, conv

__all__ = ['VQVAE', 'VQVAEOutput', 'infer_vqvae_config', 'load_vqvae_state_dict', 'vqvae_to_torch_state_dict']


class VQVAEOutput(NamedTuple):
  """Training forward (official `VQVAE.forward`)."""
  rec_BHWC: jax.Array     # decoded straight-through f_hat, not clamped
  usages_S: jax.Array     # per-scale codebook usage in %
  vq_loss: jax.Array      # scalar


def _validate(cfg: VQVAEConfig) -> None:
  pns = tuple(cfg.patch_nums)
  if len(pns) < 2 or any(int(p) != p or p < 1 for p in pns):
    raise ValueError(f'patch_nums must hold >= 2 positive ints (one per scale), got {pns}')
  if max(pns) != pns[-1]:
    raise ValueError(f'the last patch_num must be the largest (it is the latent side), got {pns}')
  if not cfg.ch_mult or cfg.num_res_blocks < 1 or cfg.quant_conv_ks % 2 == 0:
    raise ValueError(f'need a non-empty ch_mult, num_res_blocks >= 1 and an odd quant_conv_ks; got '
                     f'ch_mult={cfg.ch_mult}, num_res_blocks={cfg.num_res_blocks}, '
                     f'quant_conv_ks={cfg.quant_conv_ks}')


class VQVAE(nnx.Module):
  """Encoder -> quant_conv -> residual multi-scale quantiser -> post_quant_conv -> decoder."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    _validate(cfg)
    self.cfg = cfg
    blocks = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  z_channels=cfg.z_channels, using_sa=cfg.using_sa, using_mid_sa=cfg.using_mid_sa)
    self.encoder = Encoder(**blocks, rngs=rngs)
    self.decoder = Decoder(**blocks, rngs=rngs)
    self.quantize = VectorQuantizer(cfg, rngs=rngs)
    self.quant_conv = conv(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, rngs=rngs)
    self.post_quant_conv = conv(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, rngs=rngs)

  def _check_img(self, img_BHWC: jax.Array) -> None:
    side = self.cfg.image_size
    if img_BHWC.ndim != 4 or tuple(img_BHWC.shape[1:]) != (side, side, 3):
      raise ValueError(f'expected NHWC images (B, {side}, {side}, 3) (patch_nums[-1]={self.cfg.patch_nums[-1]} '
                       f'x downsample {self.cfg.downsample}), got shape {img_BHWC.shape}')

  def encode(self, img_BHWC: jax.Array) -> jax.Array:
    """Pre-quantisation features quant_conv(encoder(img)): (B, pn_K, pn_K, Cvae)."""
    self._check_img(img_BHWC)
    return self.quant_conv(self.encoder(img_BHWC))

  def __call__(self, img_BHWC: jax.Array, *, update_usage: bool = True) -> VQVAEOutput:
    """VAE training forward: reconstruction, per-scale usage, VQ loss (straight-through estimator)."""
    q = self.quantize(self.encode(img_BHWC), update_usage=update_usage)
    return VQVAEOutput(self.decoder(self.post_quant_conv(q.f_hat_BhwC)), q.usages_S, q.vq_loss)

  def img_to_idx(self, img_BHWC: jax.Array) -> list[jax.Array]:
    """Official `img_to_idxBl`: one (B, pn*pn) int32 array of codes per scale."""
    idx_list, _ = self.quantize.quantize_scales(self.encode(img_BHWC))
    return idx_list

  def embed_idx(self, idx_Bl: jax.Array) -> jax.Array:
    """Codebook lookup: int (B, l) -> (B, l, Cvae)."""
    return self.quantize.embed(idx_Bl)

  def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Official `quantize.idxBl_to_var_input`: (B, L - pn_1^2, Cvae) teacher-forcing input."""
    return self.quantize.idx_to_var_input(idx_list)

  def next_autoregressive_input(self, si: int, f_hat_BhwC: jax.Array,
                                h_BpnpnC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Official `quantize.get_next_autoregressive_input` (see `VectorQuantizer`)."""
    return self.quantize.next_autoregressive_input(si, f_hat_BhwC, h_BpnpnC)

  def fhat_to_img(self, f_hat_BhwC: jax.Array) -> jax.Array:
    """Decode f_hat (B, pn_K, pn_K, Cvae) to an image (B, H, W, 3) clamped to [-1, 1]."""
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BhwC)), -1, 1)

  def idx_to_img(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Official `idxBl_to_img(same_shape=True, last_one=True)`: (B, H, W, 3) in [-1, 1]."""
    return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list, last_one=True))


# ------------------------------------------------------------------ official checkpoints
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}
_OPTIONAL_BUFFERS = ('quantize.ema_vocab_hit_SV',)  # loaded when its shape matches, else ignored
_NOT_IN_TORCH = ('quantize.record_hit',)


def _torch_targets(model: VQVAE) -> dict[str, tuple[nnx.Variable, bool]]:
  """torch key -> (nnx variable, is_conv_kernel) for every parameter and official buffer of `model`."""
  out = {}
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, (nnx.Param, nnx.BatchStat)):
      continue
    prefix, leaf = '.'.join(str(p) for p in path[:-1]), str(path[-1])
    key = f'{prefix}.{leaf}'
    if key in _NOT_IN_TORCH:
      continue
    if isinstance(var, nnx.Param):
      key = f'{prefix}.{_LEAF_TO_TORCH[leaf]}'
    out[key] = (var, isinstance(var, nnx.Param) and leaf == 'kernel' and len(var.get_value().shape) == 4)
  return out


def _fmt(keys: Sequence[str], limit: int = 12) -> str:
  keys = sorted(keys)
  return ', '.join(keys[:limit]) + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def load_vqvae_state_dict(model: VQVAE, sd: Mapping[str, np.ndarray]) -> None:
  """Assigns an official torch VQVAE state dict into `model` (conv weights OIHW -> HWIO).

  All keys are checked before anything is assigned; a missing, unexpected or mis-shaped key raises a
  ValueError that names it. `quantize.ema_vocab_hit_SV` (a training buffer) is optional. `model` may be
  abstract (`nnx.eval_shape(lambda: VQVAE(cfg, rngs=...))`), which skips the random init.
  """
  targets = _torch_targets(model)
  missing = [k for k in targets if k not in sd and k not in _OPTIONAL_BUFFERS]
  unexpected = [k for k in sd if k not in targets]
  bad_shape, values = [], {}
  for key, (var, is_kernel) in targets.items():
    if key not in sd:
      continue
    arr = np.asarray(sd[key])
    want = var.get_value().shape
    want_torch = (want[3], want[2], want[0], want[1]) if is_kernel else want
    if arr.shape != want_torch:
      if key in _OPTIONAL_BUFFERS:  # the official loader also keeps its own buffer on a size mismatch
        continue
      bad_shape.append(f'{key}: expected {want_torch} (torch layout), got {arr.shape}')
      continue
    values[key] = arr.transpose(2, 3, 1, 0) if is_kernel else arr
  problems = []
  if missing:
    problems.append(f'missing keys: {_fmt(missing)}')
  if unexpected:
    problems.append(f'unexpected keys: {_fmt(unexpected)}')
  if bad_shape:
    problems.append('mis-shaped keys: ' + '; '.join(bad_shape[:12]) + (' ...' if len(bad_shape) > 12 else ''))
  if problems:
    raise ValueError('state dict does not match the VQVAE built from ' + repr(model.cfg) + ':\n  '
                     + '\n  '.join(problems) + '\nbuild the model with infer_vqvae_config(sd, patch_nums) '
                     'and pass an official VQVAE state dict')
  for key, arr in values.items():
    var = targets[key][0]
    var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
  # A model built abstractly (nnx.eval_shape, no random init) gets the official initial buffers.
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.BatchStat) and isinstance(var.get_value(), jax.ShapeDtypeStruct):
      var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))


def vqvae_to_torch_state_dict(model: VQVAE) -> dict[str, np.ndarray]:
  """The inverse of `load_vqvae_state_dict`: official torch names and layouts (conv weights OIHW)."""
  return {key: np.asarray(var.get_value()).transpose(3, 2, 0, 1) if is_kernel else np.asarray(var.get_value())
          for key, (var, is_kernel) in _torch_targets(model).items()}


def _require(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in sd:
    raise ValueError(f'cannot infer the VQVAE config: key {key!r} is missing; '
                     'is this an official VAR VQVAE state dict (vae_ch160v4096z32.pth)?')
  return np.asarray(sd[key])


def _indices(sd: Mapping[str, np.ndarray], pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_vqvae_config(sd: Mapping[str, np.ndarray], patch_nums: Sequence[int], **overrides) -> VQVAEConfig:
  """Infers V, Cvae, ch, ch_mult, num_res_blocks, attention, Phi sharing, quant_conv_ks from a state dict.

  `patch_nums` cannot be inferred. `quant_resi` and `beta` are not stored and keep their defaults unless
  given in `overrides` (quant_resi becomes 0 when the checkpoint has no Phi convs).
  """
  vocab_size, z_channels = _require(sd, 'quantize.embedding.weight').shape
  ch = _require(sd, 'encoder.conv_in.weight').shape[0]
  levels = _indices(sd, r'encoder\.down\.(\d+)\.')
  if levels != list(range(len(levels))) or not levels:
    raise ValueError(f'encoder.down levels must be 0..n-1, found {levels}')
  ch_mult = []
  for i in levels:
    c_out = _require(sd, f'encoder.down.{i}.block.0.conv1.weight').shape[0]
    if c_out % ch:
      raise ValueError(f'encoder.down.{i} has {c_out} channels, not a multiple of ch={ch}')
    ch_mult.append(c_out // ch)
  num_res_blocks = len(_indices(sd, r'encoder\.down\.0\.block\.(\d+)\.'))
  using_sa = bool(_indices(sd, rf'encoder\.down\.{levels[-1]}\.attn\.(\d+)\.'))
  using_mid_sa = 'encoder.mid.attn_1.qkv.weight' in sd
  quant_conv_ks = _require(sd, 'quant_conv.weight').shape[-1]

  kw = {}
  partial = _indices(sd, r'quantize\.quant_resi\.qresi_ls\.(\d+)\.')
  non_shared = _indices(sd, r'quantize\.quant_resi\.(\d+)\.')
  if partial:
    kw['share_quant_resi'] = len(partial)
  elif 'quantize.quant_resi.qresi.weight' in sd:
    kw['share_quant_resi'] = 1
  elif non_shared:
    if len(non_shared) != len(patch_nums):
      raise ValueError(f'checkpoint has {len(non_shared)} non-shared Phi convs but patch_nums has '
                       f'{len(patch_nums)} scales; pass the patch_nums it was trained with')
    kw['share_quant_resi'] = 0
  else:
    kw['quant_resi'] = 0.0
  fields = {f.name for f in dataclasses.fields(VQVAEConfig)}
  if set(overrides) - fields:
    raise ValueError(f'unknown VQVAEConfig overrides {sorted(set(overrides) - fields)}')
  kw.update(overrides)
  return VQVAEConfig(vocab_size=int(vocab_size), z_channels=int(z_channels), ch=int(ch), ch_mult=tuple(ch_mult),
                     num_res_blocks=num_res_blocks, using_sa=using_sa, using_mid_sa=using_mid_sa,
                     quant_conv_ks=int(quant_conv_ks), patch_nums=tuple(int(p) for p in patch_nums), **kw)
