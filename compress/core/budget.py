"""Cache geometry and memory budgets, in bits.

A budget is always held as bits per (sequence, layer, head): the memory one head's persistent cache may
occupy between scales. It is given with its unit (`Budget.parse`, `BUDGET_FORMS`): bits ('100000bits'),
bits per cached coordinate ('2bpc'), or a share of the full fp16 cache at its largest between steps
(every scale but the last: 424 tokens at 256px) as a percentage ('25%') or a float fraction (0.25).
Bare numbers are refused: '25' could mean 25 %, 2500 % or 25 bits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

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


BUDGET_FORMS = ("'25%' (percent of the fp16 cache at its peak, at most 100%), 0.25 (the same as a float "
                "fraction in (0, 1]), '2bpc' or '2.5bpc' (bits per cached coordinate), '100000bits' (bits "
                'per sequence, layer and head) or a Budget')


def _refused(spec: Any, why: str) -> ValueError:
  """The error of an unreadable budget spec: what is wrong and every accepted form."""
  return ValueError(f'cannot read budget {spec!r}: {why}; use {BUDGET_FORMS}')


@dataclasses.dataclass(frozen=True)
class Budget:
  """Bits one (sequence, layer, head) cache may hold between scales.

  `Budget(bits)` takes the whole number of bits directly (0 allowed: nothing is kept); a spec with a
  unit goes through `Budget.parse`.
  """
  bits: int

  def __post_init__(self):
    if (not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, (bool, np.bool_))
        or self.bits < 0):
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
    """`fraction` in [0, 1] of the fp16 cache at its peak (1.0 = the whole fp16 cache)."""
    if not 0 <= fraction <= 1:
      raise ValueError(f'a budget fraction of the fp16 cache must be in [0, 1], got {fraction}')
    return cls(int(math.floor(fraction * geometry.fp16_bits)))

  @classmethod
  def parse(cls, spec: 'Budget | str | float', geometry: CacheGeometry) -> 'Budget':
    """A `Budget`, or a spec with its unit (see `BUDGET_FORMS`), as bits per (sequence, layer, head).

    '25%': floor(0.25 * geometry.fp16_bits); 0.25 (a float in (0, 1]): the same; '2.5bpc':
    floor(2.5 * geometry.coordinates); '100000bits': 100000. Refused (ValueError naming the accepted
    forms): bare numbers (ints, bools, numeric strings without a unit), fractions or percentages above
    the whole fp16 cache, zero or negative values, and bits that are not whole. A budget above the fp16
    cache (e.g. the full cache of a float32 geometry, `geometry.full_bits`) is given in bits or bpc.
    """
    if isinstance(spec, Budget):
      return spec
    if isinstance(spec, (bool, np.bool_)):
      raise _refused(spec, 'a bool is not a budget')
    if isinstance(spec, (int, np.integer)):
      raise _refused(spec, 'a bare number has no unit (for bits write e.g. '
                     f"'{int(spec)}bits', or pass Budget({int(spec)}))")
    if isinstance(spec, (float, np.floating)):
      if not 0 < spec <= 1:
        why = ('a float is a fraction of the fp16 cache, and above 1 is more than the whole fp16 cache'
               if spec > 1 else 'a budget must be a positive number')
        raise _refused(spec, why)
      return cls.from_fraction(float(spec), geometry)
    if not isinstance(spec, str):
      raise _refused(spec, 'a budget is a string with a unit or a float fraction, not '
                     f'{type(spec).__name__}')
    s = spec.strip().lower()
    for unit in ('bits', 'bpc', '%'):
      if s.endswith(unit):
        number = s[:-len(unit)].strip()
        break
    else:
      try:
        float(s)
      except ValueError:
        raise _refused(spec, 'not a number with a unit') from None
      raise _refused(spec, 'a bare number has no unit (a percentage, a fraction and bits all look alike)')
    try:
      value = float(number)
    except ValueError:
      raise _refused(spec, f'{number!r} is not a number') from None
    if not math.isfinite(value) or value <= 0:
      raise _refused(spec, 'a budget must be a positive, finite number')
    if unit == '%':
      if value > 100:
        raise _refused(spec, 'above 100 % of the fp16 cache (for more, e.g. a float32 cache, give bits '
                       'or bpc)')
      return cls.from_fraction(value / 100, geometry)
    if unit == 'bpc':
      return cls.from_bits_per_coordinate(value, geometry)
    if not value.is_integer():
      raise _refused(spec, 'bits are a whole number')
    return cls(int(value))

  def bits_per_coordinate(self, geometry: CacheGeometry) -> float:
    return self.bits / geometry.coordinates

  def fraction_of_fp16(self, geometry: CacheGeometry) -> float:
    return self.bits / geometry.fp16_bits

