"""`quant_auto`: the bit width of a `kivi` cache chosen from the budget by a two-term error model."""
from __future__ import annotations

import dataclasses
import math

from compress.core.registry import register
from compress.quantization.kivi import AUTO_BIT_WIDTHS, QuantCache


@register
@dataclasses.dataclass(frozen=True)
class QuantAuto(QuantCache):
  """Picks the bit width b in 16/8/4/2 from the budget, then behaves as `kivi` at b.

  rule='keep_all': the widest b that keeps every token; if none does, 2 (the most tokens).
  rule='tradeoff' (default): the b minimising a two-term error model
      e(b)^2 = (1 / (2^b - 1))^2 + (evict_weight * (1 - f_b))^2     (b = 16: first term 0),
  where f_b is the fraction of the peak cache kept at b bits. The first term is the min-max grid step
  (rms rounding error is proportional to it); the second charges the evicted fraction. Both are in
  units of the 2-bit error: on compress.core.synthetic.var_like_qkv (patch_nums (1,2,3,4,5,6,8), head_dim
  64, G=32) the attention error is 0.18 / (2^b - 1) with every token kept (0.060 / 0.011 / 0.0007 at
  2 / 4 / 8 bits) and about 0.12-0.17 x the evicted fraction, hence evict_weight = 0.8. It keeps every
  token whenever the widest such b is not beaten; e.g. at 25% of fp16 it takes 4 bits with 77% of the
  tokens (error 0.030) over 2 bits with all (0.060), at 10% 2 bits (0.091 vs 0.118 at 4 bits).
  """
  rule: str = 'tradeoff'
  evict_weight: float = 0.8

  name = 'quant_auto'

  def __post_init__(self):
    super().__post_init__()
    if self.rule not in ('tradeoff', 'keep_all'):
      raise ValueError(f"quant_auto: rule must be 'tradeoff' or 'keep_all', got {self.rule!r}")
    if not self.evict_weight >= 0:
      raise ValueError(f'quant_auto: evict_weight must be >= 0, got {self.evict_weight!r}')

  def predicted_error(self, bits: int) -> float:
    """The model e(b) above (in units of the 2-bit all-token error x 3)."""
    kept = self.capacity_at(bits) / self.geometry.prefix_tokens
    grid = 0.0 if bits == 16 else 1.0 / (2 ** bits - 1)
    return math.hypot(grid, self.evict_weight * (1.0 - kept))

  @property
  def bit_width(self) -> int:
    if self.rule == 'keep_all':
      T = self.geometry.prefix_tokens
      return next((b for b in AUTO_BIT_WIDTHS if self.capacity_at(b) >= T), AUTO_BIT_WIDTHS[-1])
    return min(AUTO_BIT_WIDTHS, key=lambda b: (self.predicted_error(b), -b))
