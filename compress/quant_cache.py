"""Quantised KV caches with eviction: `kivi` (a fixed bit width) and `quant_auto` (bit width from budget).

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

Eviction (`evict`, default 'snapkv'), over the kept entries plus the new scale, keeping the best M:
  'window': most recent positions (a ring buffer; slot positions follow from the schedule, not stored);
  'h2o': attention accumulated over every query so far (stored per entry as float16, counted);
  'snapkv': attention of the current scale's queries only (nothing stored).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from compress import quant
from compress.attention import attend
from compress.base import COUNT_DTYPE, Compressor, Slots, dtype_bits, empty_slots, register
from compress.slots import gather_entries

EVICTION_RULES = ('window', 'h2o', 'snapkv')
LAYOUTS = ('channel', 'token')
AUTO_BIT_WIDTHS = (16, 8, 4, 2)
F16 = jnp.float16


# ---- eviction: scores, selection and stable slot assignment (shared with compress.lowrank) --------
@functools.lru_cache(maxsize=None)
def window_slot_positions(scale_sizes: tuple[int, ...], capacity: int, scale: int) -> np.ndarray:
  """(M,) token position held by each slot before step `scale` under window eviction (-1: empty).

  Simulates `keep_mask` + `stable_assignment` with score = position, so no positions are stored.
  """
  pos = np.full(capacity, -1, np.int64)
  count, start = 0, 0
  for S in scale_sizes[:scale]:
    new = start + np.arange(S)
    valid_old = np.arange(capacity) < count
    kept = np.sort(np.concatenate([pos[valid_old], new]))[-capacity:] if capacity else new[:0]
    surv = valid_old & np.isin(pos, kept)
    new_kept = new[np.isin(new, kept)]
    free = np.flatnonzero(~surv)[:len(new_kept)]
    pos[free] = new_kept
    count = int(surv.sum()) + len(new_kept)
    start += S
  return pos


def candidate_scores(rule: str, p_cache_BHSM: jax.Array, p_new_BHSS: jax.Array,
                     acc_BHM: jax.Array | None, slot_pos_M: np.ndarray | None, start: int
                     ) -> jax.Array:
  """(B, H, M + S) float32 eviction scores of the kept entries followed by the new scale's tokens."""
  B, H, S, M = p_cache_BHSM.shape
  if rule == 'window':
    pos = np.concatenate([slot_pos_M, start + np.arange(S)]).astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(pos), (B, H, M + S))
  mass = jnp.concatenate([p_cache_BHSM.sum(2), p_new_BHSS.sum(2)], axis=-1)   # per key, over queries
  if rule == 'snapkv':
    return mass
  if rule == 'h2o':
    return mass + jnp.pad(acc_BHM.astype(jnp.float32), ((0, 0), (0, 0), (0, S)))
  raise ValueError(f'unknown eviction rule {rule!r}; use one of {EVICTION_RULES}')


def keep_mask(score_BHN: jax.Array, valid_BHN: jax.Array, m: int) -> jax.Array:
  """(B, H, N) bool: the m best valid candidates (all valid ones if there are fewer; ties: lower index)."""
  s = jnp.where(valid_BHN, score_BHN.astype(jnp.float32), -jnp.inf)
  order_BHN = jnp.argsort(-s, axis=-1, stable=True)
  rank_BHN = jnp.argsort(order_BHN, axis=-1)
  return valid_BHN & (rank_BHN < m)


def stable_assignment(keep_BHN: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where kept candidates go when survivors stay put: (take_new_BHM, src_BHM, valid_BHM).

  Candidates are the m slots followed by S new tokens. The j-th free slot (in slot order) receives the
  j-th kept new token (in position order): take_new marks those slots, src is the new token's index.
  """
  surv_BHM, keep_new_BHS = keep_BHN[..., :m], keep_BHN[..., m:]
  S = keep_new_BHS.shape[-1]
  free_BHM = ~surv_BHM
  free_rank_BHM = jnp.cumsum(free_BHM, axis=-1) - 1
  order_BHS = jnp.argsort(~keep_new_BHS, axis=-1, stable=True)   # kept new tokens first, in order
  n_new_BH1 = keep_new_BHS.sum(-1, keepdims=True)
  take_new = free_BHM & (free_rank_BHM < n_new_BH1)
  src = jnp.take_along_axis(order_BHS, jnp.clip(free_rank_BHM, 0, S - 1), axis=-1)
  return take_new, src.astype(jnp.int32), surv_BHM | take_new


def static_append(start: int, S: int, m: int, batch_shape: tuple[int, int]
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`stable_assignment` when all start + S <= m candidates are kept: the scale goes to slots
  [start, start + S) (kept entries always fill slots [0, start) then)."""
  slot = np.arange(m)
  take_new = (slot >= start) & (slot < start + S)
  src = np.clip(slot - start, 0, S - 1).astype(np.int32)
  b = lambda x: jnp.broadcast_to(jnp.asarray(x), batch_shape + (m,))
  return b(take_new), b(src), b(slot < start + S)


# ---- the quantised slot cache ---------------------------------------------------------------------
def plan_slots(evict: str, geometry, state: Slots, p_cache_BHSM, p_new_BHSS, scale: int):
  """Where the new scale goes in a fixed-slot cache that never moves kept entries.

  Returns (take_new_BHM, src_BHM, valid_BHM, score_BHN): which slots take a new token, from which
  new token, which slots are valid after the step, and the candidate scores (M kept + S new).
  """
  M = state.capacity
  B, H, S = p_new_BHSS.shape[:3]
  start = geometry.scale_starts[scale]
  slot_pos = window_slot_positions(geometry.scale_sizes, M, scale) if evict == 'window' else None
  score = candidate_scores(evict, p_cache_BHSM, p_new_BHSS, state.extra.get('score'), slot_pos, start)
  if start + S <= M:   # the scale fits whole (known from the schedule): append, nothing to evict
    return (*static_append(start, S, M, (B, H)), score)
  valid_N = jnp.concatenate([state.valid, jnp.ones((B, H, S), bool)], axis=-1)
  return (*stable_assignment(keep_mask(score, valid_N, M), M), score)


def kept_scores(score_BHN, take_new_BHM, src_BHM, valid_BHM) -> jax.Array:
  """Accumulated scores of the slots after `plan_slots` (float16, zero where invalid)."""
  M = take_new_BHM.shape[-1]
  acc = jnp.where(take_new_BHM, gather_entries(score_BHN[..., M:], src_BHM), score_BHN[..., :M])
  return jnp.where(valid_BHM, acc, 0).astype(jnp.float16)


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
  def _decode_one(self, state: Slots, t: str) -> jax.Array:
    stored, b = getattr(state, t), self.bit_width
    if b == 16 or state.capacity == 0:
      return stored.astype(jnp.float32)
    codes = quant.unpack_codes(stored, b, self.geometry.head_dim)
    if self._layouts()[t] == 'token':
      return quant.dequantize_per_token(codes, state.extra[f'{t}_scale'], state.extra[f'{t}_zero'],
                                        self.group_size)
    return quant.dequantize_per_channel(codes, state.header[f'{t}_scale'], state.header[f'{t}_zero'],
                                        self.group_size)

  def decode(self, state: Slots) -> tuple[jax.Array, jax.Array]:
    """Dequantised (k, v), float32 (B, H, M, D)."""
    return self._decode_one(state, 'k'), self._decode_one(state, 'v')

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
    ck, cv = self.decode(state)
    out, p_cache, p_new = attend(q_BHSD, ck, cv, state.valid, None, k_BHSD, v_BHSD)
    M = state.capacity
    if self.is_last(scale) or M == 0:
      return out, state
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


@register
@dataclasses.dataclass(frozen=True)
class QuantAuto(QuantCache):
  """Picks the bit width b in 16/8/4/2 from the budget, then behaves as `kivi` at b.

  rule='keep_all': the widest b that keeps every token; if none does, 2 (the most tokens).
  rule='tradeoff' (default): the b minimising a two-term error model
      e(b)^2 = (1 / (2^b - 1))^2 + (evict_weight * (1 - f_b))^2     (b = 16: first term 0),
  where f_b is the fraction of the peak cache kept at b bits. The first term is the min-max grid step
  (rms rounding error is proportional to it); the second charges the evicted fraction. Both are in
  units of the 2-bit error: on compress.synthetic.var_like_qkv (patch_nums (1,2,3,4,5,6,8), head_dim
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
