"""Cache geometry and memory budgets, in bits.

A budget is always held as bits per (sequence, layer, head): the memory one head's persistent cache may
occupy between scales. It can be given as bits, as bits per cached coordinate, or as a fraction of the
full fp16 cache at its largest between steps (every scale but the last: 424 tokens at 256px).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
  """What one head's cache looks like: the scale schedule, head dim and the dtype kept entries use."""
  patch_nums: tuple[int, ...]
  head_dim: int = 64
  kv_dtype: str = 'float16'       # dtype of kept keys/values (and of the full reference cache)

  def __post_init__(self):
    if len(self.patch_nums) < 2 or any(int(p) < 1 for p in self.patch_nums):
      raise ValueError(f'patch_nums must list >= 2 positive scale sides, got {self.patch_nums}')
    if self.head_dim < 1:
      raise ValueError(f'head_dim must be positive, got {self.head_dim}')
    jnp.dtype(self.kv_dtype)  # raises on an unknown dtype name

  @property
  def scale_sizes(self) -> tuple[int, ...]:
    return tuple(p * p for p in self.patch_nums)

  @property
  def scale_starts(self) -> tuple[int, ...]:
    return tuple(int(x) for x in np.cumsum((0,) + self.scale_sizes[:-1]))

  @property
  def num_tokens(self) -> int:
    """L: tokens of the whole pyramid."""
    return sum(self.scale_sizes)

  @property
  def prefix_tokens(self) -> int:
    """Largest persistent cache between steps: every scale but the last."""
    return sum(self.scale_sizes[:-1])

  @property
  def kv_bits(self) -> int:
    return jnp.dtype(self.kv_dtype).itemsize * 8

  @property
  def coordinates(self) -> int:
    """Cached coordinates of one head at the peak: tokens x (key dims + value dims)."""
    return self.prefix_tokens * 2 * self.head_dim

  @property
  def full_bits(self) -> int:
    """Bits of one head's uncompressed cache at its peak, at `kv_dtype`."""
    return self.coordinates * self.kv_bits

  @property
  def fp16_bits(self) -> int:
    """Bits of one head's fp16 cache at its peak (the yardstick for `fraction_of_fp16`)."""
    return self.coordinates * 16

  def scale_of_position(self) -> np.ndarray:
    """(L,) int: the scale index of every token position."""
    return np.repeat(np.arange(len(self.patch_nums)), self.scale_sizes)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Bits one (sequence, layer, head) cache may hold between scales."""
  bits: int

  def __post_init__(self):
    if not isinstance(self.bits, (int, np.integer)) or self.bits < 0:
      raise ValueError(f'a budget is a non-negative whole number of bits, got {self.bits!r}')

  @classmethod
  def from_bits(cls, bits: float) -> 'Budget':
    return cls(int(math.floor(bits)))

  @classmethod
  def from_bits_per_coordinate(cls, bpc: float, geometry: CacheGeometry) -> 'Budget':
    if not bpc >= 0:
      raise ValueError(f'bits per coordinate must be >= 0, got {bpc}')
    return cls(int(math.floor(bpc * geometry.coordinates)))

  @classmethod
  def from_fraction(cls, fraction: float, geometry: CacheGeometry) -> 'Budget':
    """`fraction` of the fp16 cache at its peak (1.0 = the whole fp16 cache)."""
    if not fraction >= 0:
      raise ValueError(f'a budget fraction must be >= 0, got {fraction}')
    return cls(int(math.floor(fraction * geometry.fp16_bits)))

  @classmethod
  def parse(cls, spec: str | float | int, geometry: CacheGeometry) -> 'Budget':
    """'12345bits' | '2.5bpc' | '25%' | 0.25 (a float < = 1 is a fraction) | int (bits)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
      return cls(int(spec))
    if isinstance(spec, float):
      return cls.from_fraction(spec, geometry)
    s = str(spec).strip().lower()
    try:
      if s.endswith('bits'):
        return cls.from_bits(float(s[:-4]))
      if s.endswith('bpc'):
        return cls.from_bits_per_coordinate(float(s[:-3]), geometry)
      if s.endswith('%'):
        return cls.from_fraction(float(s[:-1]) / 100, geometry)
      return cls.from_fraction(float(s), geometry)
    except ValueError as e:
      raise ValueError(f'cannot read budget {spec!r}: use e.g. "25%", "0.25" (fraction of the fp16 '
                       f'cache), "2.5bpc" (bits per cached coordinate) or "100000bits" ({e})') from None

  def bits_per_coordinate(self, geometry: CacheGeometry) -> float:
    return self.bits / geometry.coordinates

  def fraction_of_fp16(self, geometry: CacheGeometry) -> float:
    return self.bits / geometry.fp16_bits
