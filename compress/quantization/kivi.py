"""Quantised KV caches with eviction: `kivi` at a fixed bit width (the base of `quant_auto`).

State (a `Slots` of capacity M, every array counted at its stored dtype):
  k, v: packed integer codes (B, H, M, ceil(D * b / 8)) uint8, or float16 (B, H, M, D) at b = 16;
  per-token layout: extra '{k,v}_scale', '{k,v}_zero' (B, H, M, ceil(D / G)) float16;
  per-channel layout: header '{k,v}_scale', '{k,v}_zero' (B, H, ceil(M / G), D) float16, one scale per
    channel per group of G consecutive slots (counted for every allocated group);
  'score' (B, H, M) float16 with evict='h2o' (accumulated attention); count (B, H) uint16.

Slots are stable: a kept entry stays in its slot and the entries a step admits fill the freed slots in
position order (kept entries always form a prefix, since nothing is evicted before the cache is full).
Per-token codes are written once and never touched again. A per-channel group is re-quantised, from its
survivors' dequantised values plus the admitted tokens' exact values, only when a step writes into one
of its slots; untouched groups keep their codes and scales bit for bit. So survivors of a rewritten
group pick up one more rounding (<= s/2 on the new grid) per rewrite; with window eviction a slot
group is rewritten at most once per scale, and groups overwritten whole are quantised afresh.

Unlike KIVI there is no full-precision residual window: every kept token is quantised when admitted.

Eviction (`evict`, default 'snapkv'; `compress.core.stable_slots`), over the kept entries plus the new
scale, keeping the best M: 'window' (a ring buffer), 'h2o' (accumulated attention, float16 per entry,
counted) or 'snapkv' (the current scale's attention, nothing stored).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from compress.core.accounting import COUNT_DTYPE, dtype_bits
from compress.core.attention import attend, attend_output
from compress.core.interface import Compressor
from compress.core.registry import register
from compress.core.slots import empty_slots, gather_entries, Slots
from compress.core.stable_slots import EVICTION_RULES, kept_scores, plan_slots
from compress.quantization import codes as quant
LAYOUTS = ('channel', 'token')
AUTO_BIT_WIDTHS = (16, 8, 4, 2)
F16 = jnp.float16


@dataclasses.dataclass(frozen=True)
class QuantCache(Compressor):
  """Quantised slot cache; subclasses give `bit_width` (16, 8, 4 or 2), a setting or a property."""
  group_size: int = 32
  key_layout: str = 'channel'     # KIVI: keys per channel, values per token
  value_layout: str = 'token'
  evict: str = 'snapkv'

  family = 'quantization'

  def __post_init__(self):
    if self.key_layout not in LAYOUTS or self.value_layout not in LAYOUTS:
      raise ValueError(f'{self.name}: key_layout/value_layout must be one of {LAYOUTS}, got '
                       f'{self.key_layout!r}/{self.value_layout!r}')
    if self.evict not in EVICTION_RULES:
      raise ValueError(f'{self.name}: evict must be one of {EVICTION_RULES}, got {self.evict!r}')
    if not isinstance(self.group_size, (int, np.integer)) or self.group_size < 1:
      raise ValueError(f'{self.name}: group_size must be a positive integer, got {self.group_size!r}')

  # ---- layout and accounting ----------------------------------------------------------------------
  def _layouts(self) -> dict[str, str]:
    return {'k': self.key_layout, 'v': self.value_layout}

  def layout_bits(self, bits: int, capacity: int) -> tuple[int, int]:
    """(bits per kept entry, per-head bits) of this layout at `bits` wide codes and `capacity` slots."""
    D = self.geometry.head_dim
    per_entry = 16 if self.evict == 'h2o' else 0
    header = dtype_bits(COUNT_DTYPE)
    for lay in self._layouts().values():
      if bits == 16:
        per_entry += D * 16
        continue
      per_entry += quant.packed_width(D, bits) * 8
      if lay == 'token':
        per_entry += 2 * 16 * quant.token_groups(D, self.group_size)[1]
      else:
        header += 2 * 16 * D * quant.channel_groups(capacity, self.group_size)[1]
    return per_entry, header

  def capacity_at(self, bits: int) -> int:
    """Most entries a `bits`-wide cache holds within the budget (at most the peak cache length)."""
    return _capacity(self, bits)

  @property
  def capacity(self) -> int:
    return self.capacity_at(self.bit_width)

  def init_compressed(self, batch: int, num_heads: int) -> Slots:
    M, D, b = self.capacity, self.geometry.head_dim, self.bit_width
    if M == 0:  # nothing fits: an empty cache whose (zero) count needs no storage
      return empty_slots(batch, num_heads, 0, (D,), F16).replace(count_implied=True)
    code = ((D,), F16) if b == 16 else ((quant.packed_width(D, b),), jnp.uint8)
    extra, header = {}, {}
    for t, lay in self._layouts().items():
      if b == 16:
        continue
      if lay == 'token':
        ng = quant.token_groups(D, self.group_size)[1]
        extra.update({f'{t}_scale': ((ng,), F16), f'{t}_zero': ((ng,), F16)})
      else:
        ng = quant.channel_groups(M, self.group_size)[1]
        header.update({f'{t}_scale': ((ng, D), F16), f'{t}_zero': ((ng, D), F16)})
    if self.evict == 'h2o':
      extra['score'] = ((), F16)
    return empty_slots(batch, num_heads, M, *code, extra=extra, header=header)

  # ---- codec ------------------------------------------------------------------------------------
  def _decode_one(self, state: Slots, t: str, n: int | None = None) -> jax.Array:
    stored, b = getattr(state, t)[:, :, :n], self.bit_width
    if b == 16 or state.capacity == 0:
      return stored.astype(jnp.float32)
    codes = quant.unpack_codes(stored, b, self.geometry.head_dim)
    if self._layouts()[t] == 'token':
      ex = state.extra
      return quant.dequantize_per_token(codes, ex[f'{t}_scale'][:, :, :n], ex[f'{t}_zero'][:, :, :n],
                                        self.group_size)
    return quant.dequantize_per_channel(codes, state.header[f'{t}_scale'], state.header[f'{t}_zero'],
                                        self.group_size)

  def decode(self, state: Slots, n: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Dequantised (k, v), float32 (B, H, M, D); of the first n slots only when n is given."""
    return self._decode_one(state, 'k', n), self._decode_one(state, 'v', n)

  def attended_entries(self, state: Slots, scale: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What the step at `scale` attends to beside the scale's tokens: keys, values float32 (B, H, n, D)
    and validity (B, H, n). While start <= M, slots [0, start) hold every token so far (nothing is
    evicted before the cache is full) and the rest are empty: only the held ones are decoded (the empty
    ones would get zero probability), n = min(start, M)."""
    held = min(self.geometry.scale_starts[scale], state.capacity)
    ck, cv = self.decode(state, held)
    return ck, cv, state.valid[:, :, :held]

  def _append(self, state: Slots, ck, cv, k_BHSD, v_BHSD, start: int) -> Slots:
    """The step's store when the scale fits whole after the `start` kept entries (static): the S new
    tokens go to slots [start, start + S), exactly as `plan_slots`' static append places them. Only what
    changes is coded: the new tokens (per token), and the slot groups they land in (per channel,
    re-quantised from their survivors' read-back values (ck, cv: slots [0, start)) plus the new ones)."""
    b, G, M = self.bit_width, self.group_size, state.capacity
    S = k_BHSD.shape[2]
    put = lambda a, x, at: jax.lax.dynamic_update_slice_in_dim(a, x.astype(a.dtype), at, axis=2)
    new_arrays, extra, header = {}, dict(state.extra), dict(state.header)
    for t, old, new in (('k', ck, k_BHSD), ('v', cv, v_BHSD)):
      stored = getattr(state, t)
      if b == 16:
        new_arrays[t] = put(stored, new.astype(F16), start)
      elif self._layouts()[t] == 'token':
        codes, scale, zero = quant.quantize_per_token(new, b, G)
        new_arrays[t] = put(stored, quant.pack_codes(codes, b), start)
        extra[f'{t}_scale'] = put(extra[f'{t}_scale'], scale, start)
        extra[f'{t}_zero'] = put(extra[f'{t}_zero'], zero, start)
      else:                        # the groups [g0, g1) the new tokens land in, quantised afresh
        g0, g1 = start // G, -(-(start + S) // G)
        lo, hi = g0 * G, min(g1 * G, M)
        x = jnp.concatenate([old[:, :, lo:start], new.astype(jnp.float32),
                             jnp.zeros(new.shape[:2] + (hi - start - S, new.shape[3]), jnp.float32)], 2)
        ok = jnp.broadcast_to(jnp.arange(lo, hi) < start + S, x.shape[:3])
        codes, scale, zero = quant.quantize_per_channel(x, ok, b, G)
        new_arrays[t] = put(stored, quant.pack_codes(codes, b), lo)
        header[f'{t}_scale'] = put(header[f'{t}_scale'], scale, g0)
        header[f'{t}_zero'] = put(header[f'{t}_zero'], zero, g0)
    count = jnp.full(state.count.shape, start + S, COUNT_DTYPE)
    return state.replace(count=count, extra=extra, header=header, **new_arrays)

  def _store_one(self, state: Slots, t: str, old_BHMD: jax.Array, new_BHSD: jax.Array,
                 take_new_BHM: jax.Array, src_BHM: jax.Array, valid_BHM: jax.Array
                 ) -> tuple[jax.Array, dict, dict]:
    """Writes admitted tokens into their slots: (stored array, extra updates, header updates)."""
    b, stored = self.bit_width, getattr(state, t)
    pick = lambda new, old: jnp.where(take_new_BHM.reshape(take_new_BHM.shape + (1,) * (old.ndim - 3)),
                                      gather_entries(new, src_BHM), old)
    if b == 16:
      return pick(new_BHSD.astype(F16), stored), {}, {}
    if self._layouts()[t] == 'token':
      codes, scale, zero = quant.quantize_per_token(new_BHSD, b, self.group_size)
      ex = state.extra
      return (pick(quant.pack_codes(codes, b), stored),
              {f'{t}_scale': pick(scale, ex[f'{t}_scale']), f'{t}_zero': pick(zero, ex[f'{t}_zero'])}, {})
    # per channel: re-quantise the slot groups a new token lands in, keep the others bit for bit
    x_BHMD = pick(new_BHSD.astype(jnp.float32), old_BHMD)
    codes, scale, zero = quant.quantize_per_channel(x_BHMD, valid_BHM, b, self.group_size)
    M = stored.shape[2]
    g, ng = quant.channel_groups(M, self.group_size)
    touched_BHK = jnp.pad(take_new_BHM, ((0, 0), (0, 0), (0, ng * g - M))).reshape(
        take_new_BHM.shape[:2] + (ng, g)).any(-1)
    touched_BHM = quant.expand_channel_groups(touched_BHK[..., None], M, self.group_size)[..., 0]
    hd = state.header
    keep_old = lambda new, old, m: jnp.where(m[..., None], new, old)
    return (keep_old(quant.pack_codes(codes, b), stored, touched_BHM), {},
            {f'{t}_scale': keep_old(scale, hd[f'{t}_scale'], touched_BHK),
             f'{t}_zero': keep_old(zero, hd[f'{t}_zero'], touched_BHK)})

  # ---- the step ---------------------------------------------------------------------------------
  def compress_step(self, params, state: Slots, q_BHSD, k_BHSD, v_BHSD, scale: int, ctx):
    del params, ctx
    M = state.capacity
    start, S = self.geometry.scale_starts[scale], k_BHSD.shape[2]
    ck, cv, held_valid = self.attended_entries(state, scale)
    held = held_valid.shape[-1]
    appends = start + S <= M and 'score' not in state.extra   # the scale fits whole: code only what it adds
    if self.is_last(scale) or M == 0 or appends:
      out = attend_output(q_BHSD, ck, cv, held_valid, None, k_BHSD, v_BHSD)
      if appends and not self.is_last(scale):
        return out, self._append(state, ck, cv, k_BHSD, v_BHSD, start)
      return out, state
    out, p_cache, p_new = attend(q_BHSD, ck, cv, held_valid, None, k_BHSD, v_BHSD)
    if held < M:        # the empty slots back, at zero probability (they take new tokens or stay empty)
      ck, cv = (jnp.pad(x, ((0, 0), (0, 0), (0, M - held), (0, 0))) for x in (ck, cv))
      p_cache = jnp.pad(p_cache, ((0, 0), (0, 0), (0, 0), (0, M - held)))
    take_new, src, valid, score = plan_slots(self.evict, self.geometry, state, p_cache, p_new, scale)
    k, ex_k, hd_k = self._store_one(state, 'k', ck, k_BHSD, take_new, src, valid)
    v, ex_v, hd_v = self._store_one(state, 'v', cv, v_BHSD, take_new, src, valid)
    extra = {**state.extra, **ex_k, **ex_v}
    if 'score' in extra:
      extra['score'] = kept_scores(score, take_new, src, valid)
    return out, state.replace(k=k, v=v, count=valid.sum(-1).astype(COUNT_DTYPE), extra=extra,
                              header={**state.header, **hd_k, **hd_v})


@functools.lru_cache(maxsize=None)
def _capacity(comp: QuantCache, bits: int) -> int:
  budget, T = comp.budget.bits, comp.geometry.prefix_tokens
  fits = lambda m: m * comp.layout_bits(bits, m)[0] + comp.layout_bits(bits, m)[1] <= budget
  lo, hi = 0, T               # cost grows with m: the largest m that fits, by bisection
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


@register
@dataclasses.dataclass(frozen=True)
class KIVI(QuantCache):
  """KIVI-style asymmetric quantisation (keys per channel, values per token) at `bit_width` in
  {8, 4, 2} (16 = float16, no codes); keeps as many tokens as the budget holds, evicts the rest by
  `evict`. (The setting is not called `bits`: that name is `Compressor.bits(state)`.)"""
  bit_width: int = 4

  name = 'kivi'

  def __post_init__(self):
    super().__post_init__()
    if self.bit_width not in AUTO_BIT_WIDTHS:
      raise ValueError(f'kivi: bit_width must be one of {AUTO_BIT_WIDTHS}, got {self.bit_width!r}')


