"""The full cache: the exact reference (keeps everything at the geometry dtype)."""
from __future__ import annotations

import dataclasses

from compress.core.interface import Compressor
from compress.core.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Full(Compressor):
  """Keeps every token; ignores the budget (its bits show what exactness costs)."""
  name = 'full'
  family = 'reference'
  respects_budget = False

  @property
  def passthrough(self) -> bool:
    return True
