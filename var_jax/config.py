"""Model configurations: the official VAR size table and small variants.

Every size follows the official recipe: depth D, width C = 64*D, heads = D (head dim 64), MLP 4C.
`VQVAEConfig` describes the multi-scale VQ-VAE; `VARConfig` the transformer. Both are frozen
dataclasses so they can be static arguments of jitted functions and round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Multi-scale VQ-VAE (official `VQVAE`); the image side is `patch_nums[-1] * downsample`."""
  vocab_size: int = 4096          # V
  z_channels: int = 32            # Cvae
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # downsample = 2 ** (len(ch_mult) - 1)
  num_res_blocks: int = 2
  using_sa: bool = True
  using_mid_sa: bool = True
  quant_conv_ks: int = 3
  quant_resi: float = 0.5         # Phi(h) = (1 - r) h + r conv3x3(h)
  share_quant_resi: int = 4       # number of Phi convs shared over the scales
  beta: float = 0.25              # commitment weight (training only)
  patch_nums: tuple[int, ...] = PATCH_NUMS_256

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def image_size(self) -> int:
    return self.patch_nums[-1] * self.downsample


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """VAR transformer (official `VAR`). `width = 64 * depth` and `num_heads = depth` officially."""
  depth: int = 16
  width: int = 1024               # C
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  vocab_size: int = 4096          # V (must match the VQ-VAE)
  z_channels: int = 32            # Cvae (must match the VQ-VAE)
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  attn_l2_norm: bool = True
  shared_aln: bool = False
  norm_eps: float = 1e-6
  cond_drop_rate: float = 0.1     # label dropout for CFG (training only)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def seq_len(self) -> int:
    """L: tokens of the whole pyramid."""
    return sum(pn * pn for pn in self.patch_nums)

  @property
  def begin_ends(self) -> tuple[tuple[int, int], ...]:
    out, cur = [], 0
    for pn in self.patch_nums:
      out.append((cur, cur + pn * pn))
      cur += pn * pn
    return tuple(out)


def official_var(depth: int, patch_nums: tuple[int, ...] = PATCH_NUMS_256, **kw: Any) -> VARConfig:
  """The official size recipe: width 64*depth, heads = depth (d36-s sets shared_aln=True)."""
  kw.setdefault('shared_aln', depth >= 36)
  return VARConfig(depth=depth, width=64 * depth, num_heads=depth, patch_nums=tuple(patch_nums), **kw)


SIZES: dict[str, VARConfig] = {
    'd16': official_var(16),
    'd20': official_var(20),
    'd24': official_var(24),
    'd30': official_var(30),
    'd36-s': official_var(36, PATCH_NUMS_512),
    # the official recipe at depth 8 (no released checkpoint): the benchmarks' small official-layout model
    'd8': official_var(8),
    # small variants (head_dim 64 like the official ones), for tests and CPU work
    'd2-tiny': official_var(2, (1, 2, 3, 4), num_classes=10, vocab_size=64, z_channels=8),
    'd4-small': official_var(4, (1, 2, 3, 4, 5, 6, 8), num_classes=10, vocab_size=512, z_channels=16),
}


def to_json(cfg: VQVAEConfig | VARConfig) -> str:
  return json.dumps({'type': type(cfg).__name__, **dataclasses.asdict(cfg)}, indent=2)


def from_json(text: str | dict) -> VQVAEConfig | VARConfig:
  d = dict(json.loads(text) if isinstance(text, str) else text)
  kind = d.pop('type')
  cls = {'VQVAEConfig': VQVAEConfig, 'VARConfig': VARConfig}[kind]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f'{kind} JSON has unknown fields {sorted(unknown)}; expected a subset of {sorted(fields)}')
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
