"""Residual multi-scale vector quantiser (official `models/quant.py`, `VectorQuantizer2`), NHWC, flax.nnx.

Scale k (patch side pn_k, K scales, final side H = pn_K) quantises the area-downsampled residual
`f_rest` to its nearest codes, upsamples their embeddings bicubically to H x H (the last scale is already
H x H), applies Phi_k(h) = (1 - r) h + r conv3x3(h) and moves h from `f_rest` to `f_hat`.

Phi convs are picked as officially: `share_quant_resi = 0` one per scale, `1` a single shared conv,
`n >= 2` n convs (`PhiPartiallyShared`), scale k using the one whose tick is nearest to k / (K - 1).
Attribute names mirror the official module tree, so nnx paths joined with '.' are the torch keys.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.config import VQVAEConfig
from var_jax.interp import resize_area, resize_bicubic
from var_jax.vae_blocks import uniform_init

__all__ = ['Phi', 'PhiIdentity', 'PhiPartiallyShared', 'PhiShared', 'QuantOutput', 'VectorQuantizer',
           'phi_index']


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
  """Official `PhiPartiallyShared.__getitem__(si / (K-1))`: index of the nearest tick."""
  ticks = (np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi) if num_phi == 4
           else np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi))
  return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class Phi(nnx.Conv):
  """Phi(h) = (1 - r) h + r conv3x3(h) on (B, H, W, C); like the official class, it *is* the conv."""

  def __init__(self, channels: int, resi_ratio: float, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(channels * 9)
    super().__init__(channels, channels, (3, 3), padding='SAME', kernel_init=uniform_init(bound),
                     bias_init=uniform_init(bound), rngs=rngs)
    self.resi_ratio = abs(resi_ratio)

  def __call__(self, h_BHWC: jax.Array) -> jax.Array:
    return h_BHWC * (1 - self.resi_ratio) + super().__call__(h_BHWC) * self.resi_ratio


class PhiIdentity(nnx.Module):
  """Phi when quant_resi == 0 (official `nn.Identity`): no parameters."""

  def __call__(self, h_BHWC: jax.Array) -> jax.Array:
    return h_BHWC


class PhiShared(nnx.Module):
  def __init__(self, qresi: Phi | PhiIdentity):
    self.qresi = qresi


class PhiPartiallyShared(nnx.Module):
  def __init__(self, qresi_ls: Sequence[Phi | PhiIdentity]):
    self.qresi_ls = nnx.List(qresi_ls)


class QuantOutput(NamedTuple):
  """Training forward of the quantiser."""
  f_hat_BhwC: jax.Array   # straight-through: value of the quantised f_hat, gradient of f
  usages_S: jax.Array     # per scale, % of codes whose EMA hit count reaches the official margin
  vq_loss: jax.Array      # scalar: mean over scales of beta*|sg(f_hat_k)-f|^2 + |f_hat_k-sg(f)|^2


class VectorQuantizer(nnx.Module):
  """Codebook (V, Cvae) plus Phi convs; `cfg.patch_nums` sets the scales."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    self.vocab_size, self.Cvae, self.beta = cfg.vocab_size, cfg.z_channels, cfg.beta
    self.patch_nums = tuple(cfg.patch_nums)
    num_scales, share = len(self.patch_nums), cfg.share_quant_resi
    if share < 0:
      raise ValueError(f'share_quant_resi must be >= 0 (0: one Phi per scale, 1: shared), got {share}')
    # Taming's codebook init U(+-1/V); a loaded checkpoint overwrites it.
    self.embedding = nnx.Embed(cfg.vocab_size, cfg.z_channels, embedding_init=uniform_init(1 / cfg.vocab_size),
                               rngs=rngs)

    def make_phi():
      return Phi(cfg.z_channels, cfg.quant_resi, rngs=rngs) if abs(cfg.quant_resi) > 1e-6 else PhiIdentity()

    if share == 0:
      self.quant_resi = nnx.List([make_phi() for _ in range(num_scales)])
    elif share == 1:
      self.quant_resi = PhiShared(make_phi())
    else:
      self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(share)])
    # Official training-time buffer (per-scale EMA of code hits) and its update counter.
    self.ema_vocab_hit_SV = nnx.BatchStat(jnp.zeros((num_scales, cfg.vocab_size), jnp.float32))
    self.record_hit = nnx.BatchStat(jnp.zeros((), jnp.int32))

  # ------------------------------------------------------------------ helpers
  def phi(self, si: int) -> Phi | PhiIdentity:
    """The Phi used at scale si."""
    qr = self.quant_resi
    if isinstance(qr, PhiShared):
      return qr.qresi
    seq = qr.qresi_ls if isinstance(qr, PhiPartiallyShared) else qr
    return seq[phi_index(si, len(self.patch_nums), len(seq))]

  def embed(self, idx_Bl: jax.Array) -> jax.Array:
    """Codebook lookup: int (B, l) -> (B, l, Cvae)."""
    return jnp.take(self.embedding.embedding[...], idx_Bl, axis=0)

  def nearest_code(self, z_NC: jax.Array) -> jax.Array:
    """argmin_v |z - e_v|^2 computed as officially (|z|^2 + |e|^2 - 2 z.e, fp32): (N,) int32."""
    e_VC = jax.lax.stop_gradient(self.embedding.embedding[...])
    z_NC = jax.lax.stop_gradient(z_NC)
    d_NV = jnp.sum(jnp.square(z_NC), axis=1, keepdims=True) + jnp.sum(jnp.square(e_VC), axis=1)
    d_NV = d_NV - 2 * jnp.einsum('nc,vc->nv', z_NC, e_VC, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmin(d_NV, axis=1).astype(jnp.int32)

  def check_idx_list(self, idx_list: Sequence[jax.Array]) -> int:
    """Validates one (B, pn*pn) int array per scale; returns B."""
    if len(idx_list) != len(self.patch_nums):
      raise ValueError(f'expected {len(self.patch_nums)} index arrays (patch_nums={self.patch_nums}), '
                       f'got {len(idx_list)}')
    B = idx_list[0].shape[0]
    for si, (idx, pn) in enumerate(zip(idx_list, self.patch_nums)):
      if tuple(idx.shape) != (B, pn * pn):
        raise ValueError(f'index array of scale {si} must have shape (B={B}, {pn * pn}), got {idx.shape}')
    return B

  # ------------------------------------------------------------------ quantisation
  def quantize_scales(self, f_BhwC: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """Residual quantisation of encoder features (B, H, H, Cvae), H = patch_nums[-1].

    Returns (idx_list, f_hat_list): per scale the (B, pn*pn) int32 codes and the running f_hat
    (B, H, H, Cvae) after that scale (differentiable in the codebook and Phi, not in f).
    """
    B, H, W, C = f_BhwC.shape
    if (H, W, C) != (self.patch_nums[-1],) * 2 + (self.Cvae,):
      raise ValueError(f'features must be (B, {self.patch_nums[-1]}, {self.patch_nums[-1]}, {self.Cvae}) '
                       f'for patch_nums={self.patch_nums}, got {f_BhwC.shape}')
    last = len(self.patch_nums) - 1
    f_rest = jax.lax.stop_gradient(f_BhwC)
    f_hat = jnp.zeros_like(f_rest)
    idx_list, f_hat_list = [], []
    for si, pn in enumerate(self.patch_nums):
      z_BpnpnC = resize_area(f_rest, pn) if si != last else f_rest
      idx_N = self.nearest_code(z_BpnpnC.reshape(-1, C))
      h_BhwC = self.embed(idx_N).reshape(B, pn, pn, C)
      if si != last:
        h_BhwC = resize_bicubic(h_BhwC, H)
      h_BhwC = self.phi(si)(h_BhwC)
      f_hat = f_hat + h_BhwC
      f_rest = f_rest - jax.lax.stop_gradient(h_BhwC)
      idx_list.append(idx_N.reshape(B, pn * pn))
      f_hat_list.append(f_hat)
    return idx_list, f_hat_list

  def __call__(self, f_BhwC: jax.Array, *, update_usage: bool = True) -> QuantOutput:
    """Training forward (official `VectorQuantizer2.forward`, using_znorm=False).

    With `update_usage` the per-scale EMA of code hits is updated as officially (first hit copies, then
    momentum 0.9 for 100 updates, then 0.99; the counter advances once per scale).
    """
    f_BhwC = f_BhwC.astype(jnp.float32)
    B, H, W, _ = f_BhwC.shape
    idx_list, f_hat_list = self.quantize_scales(f_BhwC)
    f_sg = jax.lax.stop_gradient(f_BhwC)
    vq_loss = sum(self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f_BhwC))
                  + jnp.mean(jnp.square(f_hat - f_sg)) for f_hat in f_hat_list) / len(f_hat_list)
    if update_usage:
      ema_SV, count = self.ema_vocab_hit_SV[...], self.record_hit[...]
      for si, idx_Bl in enumerate(idx_list):
        hit_V = jnp.bincount(idx_Bl.reshape(-1), length=self.vocab_size).astype(jnp.float32)
        new_V = jnp.where(count == 0, hit_V,
                          jnp.where(count < 100, 0.9 * ema_SV[si] + 0.1 * hit_V, 0.99 * ema_SV[si] + 0.01 * hit_V))
        ema_SV, count = ema_SV.at[si].set(new_V), count + 1
      self.ema_vocab_hit_SV[...], self.record_hit[...] = ema_SV, count
    margin = B * H * W / self.vocab_size * 0.08
    usages_S = jnp.mean((self.ema_vocab_hit_SV[...] >= margin).astype(jnp.float32), axis=1) * 100
    f_hat_ste = jax.lax.stop_gradient(f_hat_list[-1]) - f_sg + f_BhwC
    return QuantOutput(f_hat_ste, usages_S, vq_loss)

  # ------------------------------------------------------------------ decoding side
  def embed_to_fhat(self, ms_h_BpnpnC: Sequence[jax.Array], last_one: bool = True) -> jax.Array | list[jax.Array]:
    """Official `embed_to_fhat(all_to_max_scale=True)`: per-scale embeddings -> f_hat (B, H, H, Cvae).

    Returns the final f_hat, or (last_one=False) the running f_hat after every scale.
    """
    H, last = self.patch_nums[-1], len(self.patch_nums) - 1
    f_hat = jnp.zeros((ms_h_BpnpnC[0].shape[0], H, H, self.Cvae), jnp.float32)
    f_hats = []
    for si, h_BpnpnC in enumerate(ms_h_BpnpnC):
      h = resize_bicubic(h_BpnpnC, H) if si < last else h_BpnpnC
      f_hat = f_hat + self.phi(si)(h)
      f_hats.append(f_hat)
    return f_hat if last_one else f_hats

  def idx_to_fhat(self, idx_list: Sequence[jax.Array], last_one: bool = True) -> jax.Array | list[jax.Array]:
    B = self.check_idx_list(idx_list)
    ms_h = [self.embed(idx).reshape(B, pn, pn, self.Cvae) for idx, pn in zip(idx_list, self.patch_nums)]
    return self.embed_to_fhat(ms_h, last_one=last_one)

  def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Teacher-forcing input of VAR (official `idxBl_to_var_input`): (B, L - pn_1^2, Cvae).

    Scale k+1's input is f_hat after scales 1..k, area-downsampled to pn_{k+1} x pn_{k+1}.
    """
    B = self.check_idx_list(idx_list)
    H = self.patch_nums[-1]
    f_hat = jnp.zeros((B, H, H, self.Cvae), jnp.float32)
    next_scales = []
    for si in range(len(self.patch_nums) - 1):
      pn, pn_next = self.patch_nums[si], self.patch_nums[si + 1]
      h_BHHC = resize_bicubic(self.embed(idx_list[si]).reshape(B, pn, pn, self.Cvae), H)
      f_hat = f_hat + self.phi(si)(h_BHHC)
      next_scales.append(resize_area(f_hat, pn_next).reshape(B, pn_next * pn_next, self.Cvae))
    return jnp.concatenate(next_scales, axis=1)

  def next_autoregressive_input(self, si: int, f_hat_BhwC: jax.Array,
                                h_BpnpnC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Official `get_next_autoregressive_input`: adds scale si's Phi(upsampled h) to f_hat.

    Returns (f_hat (B, H, H, Cvae), next input): the area-downsampled f_hat (B, pn_{si+1}, pn_{si+1}, Cvae),
    or f_hat itself after the last scale.
    """
    H, last = self.patch_nums[-1], len(self.patch_nums) - 1
    if not 0 <= si <= last:
      raise ValueError(f'scale index si={si} out of range for patch_nums={self.patch_nums}')
    if si != last:
      f_hat_BhwC = f_hat_BhwC + self.phi(si)(resize_bicubic(h_BpnpnC, H))
      return f_hat_BhwC, resize_area(f_hat_BhwC, self.patch_nums[si + 1])
    f_hat_BhwC = f_hat_BhwC + self.phi(si)(h_BpnpnC)
    return f_hat_BhwC, f_hat_BhwC
