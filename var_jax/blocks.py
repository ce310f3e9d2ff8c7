"""VAR transformer blocks (official `models/basic_var.py`) in flax.nnx.

Pre-norm AdaLN blocks: LayerNorm without affine (eps `cfg.norm_eps`), a class-conditioned
modulation `ada_lin = SiLU -> Linear(D, 6C)` (or a per-block `ada_gss` added to one shared
modulation when `cfg.shared_aln`), self-attention whose keys have no bias, and a tanh-GELU FFN.

Attention is split in two so that the caller decides how queries meet keys: `SelfAttention.qkv`
returns q (already multiplied by the softmax scale), k and v per head, and the block calls an
`attend(q_BHSD, k_BHSD, v_BHSD) -> (out_BHSD, aux)` function: dense block-causal attention for
teacher forcing, a KV-cache policy for sampling (`var_jax.kvcache`).

Initialisation follows the official `VAR.init_weights` with its training defaults (`init_std`
automatic = sqrt(1/(3C)), AdaLN 0.5, AdaLN gamma 1e-5, head 0.02); truncation is at 2 std.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.config import VARConfig

Array = jax.Array
# attend(q_BHSD, k_BHSD, v_BHSD) -> (out_BHSD, aux); q is pre-scaled (plain softmax(q k^T) v).
AttendFn = Callable[[Array, Array, Array], tuple[Array, Any]]

MAX_SCALE_MUL = math.log(100.0)   # official clamp of `scale_mul_1H11` before exp
INIT_ADALN, INIT_ADALN_GAMMA, INIT_HEAD = 0.5, 1e-5, 0.02


def init_std(cfg: VARConfig) -> float:
  """Official automatic init std sqrt(1 / (3C))."""
  return math.sqrt(1.0 / cfg.width / 3.0)


def trunc_normal(std: float, mul: float = 1.0, rows: tuple[int, int] | None = None,
                 rows_mul: float = 1.0) -> nnx.Initializer:
  """Truncated normal (2 std) times `mul`; columns `rows` (official weight rows) times `rows_mul`."""
  base = jax.nn.initializers.truncated_normal(stddev=std)

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    w = base(key, shape, dtype) * mul
    if rows is not None:
      w = w.at[..., rows[0]:rows[1]].multiply(rows_mul)
    return w
  return init


def layer_norm(x: Array, eps: float) -> Array:
  """LayerNorm over the last axis without affine parameters (torch `elementwise_affine=False`)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """torch `F.normalize(x, dim=-1)`: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def softmax_attention(q_BHSD: Array, k_BHTD: Array, v_BHTD: Array,
                      mask_ST: Array | None = None) -> Array:
  """softmax(q k^T) v in fp32 (q pre-scaled); `mask_ST` True where query s may see key t."""
  q, k, v = (a.astype(jnp.float32) for a in (q_BHSD, k_BHTD, v_BHTD))
  logits_BHST = jnp.einsum('bhsd,bhtd->bhst', q, k)
  if mask_ST is not None:
    logits_BHST = jnp.where(mask_ST, logits_BHST, -jnp.inf)
  return jnp.einsum('bhst,bhtd->bhsd', jax.nn.softmax(logits_BHST, axis=-1), v)


def linear(din: int, dout: int, rngs: nnx.Rngs, *, use_bias: bool = True,
           kernel_init: nnx.Initializer) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class SelfAttention(nnx.Module):
  """Official `SelfAttention`: `mat_qkv` without bias plus bias cat(q_bias, 0, v_bias)."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    c, std = cfg.width, init_std(cfg)
    self.num_heads, self.head_dim, self.attn_l2_norm = cfg.num_heads, cfg.head_dim, cfg.attn_l2_norm
    self.mat_qkv = linear(c, 3 * c, rngs, use_bias=False, kernel_init=trunc_normal(std))
    self.q_bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    self.v_bias = nnx.Param(jnp.zeros((c,), jnp.float32))
    if cfg.attn_l2_norm:
      self.scale_mul_1H11 = nnx.Param(jnp.full((1, cfg.num_heads, 1, 1), math.log(4.0), jnp.float32))
    self.proj = linear(c, c, rngs, kernel_init=trunc_normal(std, 1.0 / math.sqrt(2 * cfg.depth)))

  def qkv(self, x_BLC: Array) -> tuple[Array, Array, Array]:
    """q (times the softmax scale), k (no bias; L2-normalised if `attn_l2_norm`), v: (B, H, L, hd)."""
    zeros_C = jnp.zeros_like(self.q_bias[...])
    qkv_BLc = self.mat_qkv(x_BLC) + jnp.concatenate([self.q_bias[...], zeros_C, self.v_bias[...]])
    q, k, v = einops.rearrange(qkv_BLc, 'b l (three h d) -> three b h l d', three=3, h=self.num_heads)
    if self.attn_l2_norm:
      scale_mul_1H11 = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], MAX_SCALE_MUL))
      q = l2_normalize(q) * scale_mul_1H11
      k = l2_normalize(k)
    else:
      q = q * (0.25 / math.sqrt(self.head_dim))
    return q, k, v

  def out(self, o_BHLD: Array) -> Array:
    return self.proj(einops.rearrange(o_BHLD, 'b h l d -> b l (h d)'))


class FFN(nnx.Module):
  """fc1 -> tanh-GELU -> fc2."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    c, hidden, std = cfg.width, round(cfg.width * cfg.mlp_ratio), init_std(cfg)
    self.fc1 = linear(c, hidden, rngs, kernel_init=trunc_normal(std))
    self.fc2 = linear(hidden, c, rngs, kernel_init=trunc_normal(std, 1.0 / math.sqrt(2 * cfg.depth)))

  def __call__(self, x_BLC: Array) -> Array:
    return self.fc2(jax.nn.gelu(self.fc1(x_BLC), approximate=True))


class AdaLNSelfAttn(nnx.Module):
  """Official `AdaLNSelfAttn`: x += attn(LN(x)(1+scale1)+shift1)*gamma1; same for the FFN."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    c, std = cfg.width, init_std(cfg)
    self.width, self.eps, self.shared_aln = c, cfg.norm_eps, cfg.shared_aln
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.ffn = FFN(cfg, rngs=rngs)
    if cfg.shared_aln:
      gss = jax.random.normal(rngs.params(), (1, 1, 6, c), jnp.float32) / math.sqrt(c)
      self.ada_gss = nnx.Param(gss * jnp.array([INIT_ADALN_GAMMA] * 2 + [INIT_ADALN] * 4)[:, None])
    else:
      self.ada_lin = linear(c, 6 * c, rngs, kernel_init=trunc_normal(
          std, INIT_ADALN, rows=(0, 2 * c), rows_mul=INIT_ADALN_GAMMA / INIT_ADALN))

  def modulation(self, cond: Array) -> Array:
    """(B, 1, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2. `cond` is cond_BD, or the
    shared modulation (B, 1, 6, C) when `shared_aln`."""
    if self.shared_aln:
      return self.ada_gss[...] + cond
    return einops.rearrange(self.ada_lin(jax.nn.silu(cond)), 'b (six c) -> b 1 six c', six=6)

  def __call__(self, x_BLC: Array, cond: Array, attend: AttendFn, mod_B16C: Array | None = None
               ) -> tuple[Array, Any]:
    """One block; `attend` decides what the queries see; `mod_B16C`: `modulation(cond)` computed
    beforehand (generation computes it once per call, not once per scale). Returns (x_BLC, aux)."""
    if mod_B16C is None:
      mod_B16C = self.modulation(cond)
    o_BHLD, aux = attend(*self.attn_in(x_BLC, mod_B16C))
    return self.attn_out(x_BLC, o_BHLD, mod_B16C), aux

  def attn_in(self, x_BLC: Array, mod_B16C: Array) -> tuple[Array, Array, Array]:
    """The block up to its attention: q, k, v (B, H, L, hd) of the modulated LayerNorm of x."""
    scale1, shift1 = mod_B16C[:, :, 2], mod_B16C[:, :, 4]
    return self.attn.qkv(layer_norm(x_BLC, self.eps) * (1 + scale1) + shift1)

  def attn_out(self, x_BLC: Array, o_BHLD: Array, mod_B16C: Array) -> Array:
    """The block after its attention: the gated projection of `o_BHLD` and the gated FFN, on x."""
    gamma1, gamma2, scale2, shift2 = (mod_B16C[:, :, i] for i in (0, 1, 3, 5))
    x_BLC = x_BLC + self.attn.out(o_BHLD) * gamma1
    return x_BLC + self.ffn(layer_norm(x_BLC, self.eps) * (1 + scale2) + shift2) * gamma2


class AdaLNBeforeHead(nnx.Module):
  """Official `AdaLNBeforeHead` (`head_nm`): LN(x) * (1 + scale) + shift from the class embedding."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    c = cfg.width
    self.width, self.eps = c, cfg.norm_eps
    self.ada_lin = linear(c, 2 * c, rngs, kernel_init=trunc_normal(init_std(cfg), INIT_ADALN))

  def modulation(self, cond_BD: Array) -> Array:
    """(B, 1, 2, C): scale, shift."""
    return einops.rearrange(self.ada_lin(jax.nn.silu(cond_BD)), 'b (two c) -> b 1 two c', two=2)

  def __call__(self, x_BLC: Array, cond_BD: Array, mod_B12C: Array | None = None) -> Array:
    if mod_B12C is None:
      mod_B12C = self.modulation(cond_BD)
    scale, shift = mod_B12C[:, :, 0], mod_B12C[:, :, 1]
    return layer_norm(x_BLC, self.eps) * (1 + scale) + shift
