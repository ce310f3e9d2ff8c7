"""Teacher-forced sweep points: one compressor at one budget over held-out captured caches.

A method is given as a spec string `name` or `name(key=value,...)` (settings = the compressor's
dataclass fields, e.g. `kivi(bit_width=2)`); its `setting` column is `key=value,...` or `default`.

Per point the row holds the bits actually kept (peak over scales; max and mean over layers,
sequences and heads), bits per cached coordinate (`CacheGeometry.coordinates` = peak tokens x (key +
value dims)), the fraction of the fp16 cache, and the aggregate relative L2 error of the attention
outputs of every query of every scale (overall, per layer, per scale) with a t-interval over the
independent units (the images: the two CFG halves of an image are one unit, `image_units`).
"""
from __future__ import annotations

import ast
import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import compress
from compress.core.budget import CacheGeometry
from eval.engine.stats import ratio_ci

# Columns of frontier.csv. bits: max over (layer, sequence, head) of the peak bits one head's cache
# held between scales; bits_mean: their mean; shared_bits: parameters shared by every sequence
# (projections, scorers), not in the per-head budget; amortised_bits: bits + shared_bits spread over
# every (served sequence, layer, head) (`served_sequences`: the x of the Pareto frontier, the plot,
# TensorBoard and eval.quality.compare); rel_error: sqrt(sum |out - exact|^2 / sum |exact|^2) over every
# output; lower_bound_bits / min_error_at_bits: rate-distortion bound (hard instance only);
# trained_bits: the budget a learned compressor's parameters were trained at (0: none trained);
# reference: what the errors are relative to (float32 attention over the captured q, k, v, at the
# capture's dtype: a float16 capture is the reference, not an approximation of a float32 one);
# per_head_budget_bits: the bits one head's cache was allowed (budget_bits, or less with
# sweep.fit_amortised: the shared parameters' share taken off); selection: how the setting was chosen
# ('' = as given; 'best on dev of ...' = the tuning stage's pick, eval/engine/tuning.py).
COLUMNS = ('dataset', 'method', 'family', 'setting', 'budget', 'oracle', 'learned', 'deployable',
           'budget_bits', 'bits', 'bits_mean', 'bits_per_coordinate', 'fraction_of_fp16', 'shared_bits',
           'served_sequences', 'amortised_bits', 'amortised_bits_per_coordinate', 'rel_error', 'rel_error_ci_low', 'rel_error_ci_high', 'rel_error_per_layer',
           'rel_error_per_scale', 'num_sequences', 'num_units', 'lower_bound_bits', 'min_error_at_bits',
           'seconds', 'warning', 'trained_bits', 'reference', 'per_head_budget_bits', 'selection')
ZERO_ENTRIES = 'keeps 0 entries at this budget: every output comes from the current scale alone'
KEY = ('dataset', 'method', 'setting', 'budget')
FULL_BUDGET = 'full'      # the budget label of the full-cache reference point
_SPEC = re.compile(r'^\s*([A-Za-z0-9_]+)\s*(?:\((.*)\))?\s*$')


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A registered compressor name and settings (sorted (key, value) pairs)."""
  name: str
  settings: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, spec: str) -> MethodSpec:
    m = _SPEC.match(spec)
    if not m:
      raise ValueError(f'cannot read method spec {spec!r}: use "name" or "name(key=value,...)", '
                       'e.g. "kivi(bit_width=2)"')
    name, args = m.group(1), (m.group(2) or '').strip()
    if name not in compress.available():
      raise ValueError(f'unknown compressor {name!r} in {spec!r}; registered: {", ".join(compress.available())}')
    settings = {}
    for part in filter(None, (p.strip() for p in args.split(','))):
      key, eq, value = part.partition('=')
      if not eq or not key.strip():
        raise ValueError(f'setting {part!r} of {spec!r} is not key=value')
      try:
        settings[key.strip()] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        settings[key.strip()] = value.strip()    # a bare word: a string setting
    spec_obj = cls(name, tuple(sorted(settings.items())))
    fields = {f.name for f in dataclasses.fields(spec_obj.cls)} - {'geometry', 'budget'}
    unknown = set(settings) - fields
    if unknown:
      raise ValueError(f'{name} has no setting(s) {sorted(unknown)} (in {spec!r}); its settings are '
                       f'{sorted(fields)}')
    return spec_obj

  @property
  def cls(self) -> type[compress.Compressor]:
    return compress.REGISTRY[self.name]

  @property
  def setting(self) -> str:
    return ','.join(f'{k}={v}' for k, v in self.settings) or 'default'

  def __str__(self) -> str:
    return self.name if not self.settings else f'{self.name}({self.setting})'

  def make(self, geometry: CacheGeometry, budget: Any) -> compress.Compressor:
    return compress.make(self.name, geometry, budget, **dict(self.settings))


def parse_methods(specs: Sequence[str]) -> list[MethodSpec]:
  out = [MethodSpec.parse(s) for s in specs]
  dup = {str(s) for s in out if out.count(s) > 1}
  if dup:
    raise ValueError(f'methods listed twice: {sorted(dup)}')
  return out


class CacheSet:
  """Held-out sequences, read batch by batch: q, k, v (layers, b, H, L, D) float32 and `units` (n,)
  (the image of each sequence); `dtype`: the dtype q, k, v were stored at. Backed by a `CaptureDataset` (memory-mapped shards: memory does not
  grow with the number of sequences) or by in-memory arrays (layers, n, H, L, D) (tests, small sets)."""

  def __init__(self, qkv: dict[str, np.ndarray] | Any, units: np.ndarray, patch_nums: Sequence[int],
               num_sequences: int | None = None):
    if isinstance(qkv, dict):
      self.dtype = str(np.asarray(qkv['q']).dtype)
      self._arrays = {t: np.asarray(qkv[t], np.float32) for t in 'qkv'}
      self._reader = None
      self.num_layers, n, self.num_heads, self.num_tokens, self.head_dim = self._arrays['q'].shape
    else:                                      # a CaptureDataset (or anything with .get(indices))
      self._arrays, self._reader = None, qkv
      self.dtype = str(getattr(qkv, 'manifest', {}).get('dtype', 'float32'))
      self.num_layers, self.num_heads, self.num_tokens, self.head_dim = (
          qkv.num_layers, qkv.num_heads, qkv.num_tokens, qkv.head_dim)
      n = qkv.num_sequences
    self.num_sequences = int(n if num_sequences is None else min(num_sequences, n))
    self.units = np.asarray(units)[:self.num_sequences]
    self.patch_nums = tuple(int(p) for p in patch_nums)
    self.exact_store = None    # an eval.engine.exact_store.ExactStore: reference outputs computed once per run
    if self.units.shape != (self.num_sequences,):
      raise ValueError(f'units must be (n,) = ({self.num_sequences},), got {self.units.shape}')

  @classmethod
  def from_dataset(cls, ds: Any, max_sequences: int = 0) -> CacheSet:
    """The first `max_sequences` (0: all) sequences of a `CaptureDataset` split; units = images."""
    n = ds.num_sequences if max_sequences <= 0 else min(max_sequences, ds.num_sequences)
    return cls(ds, image_units(ds), ds.patch_nums, n)

  def sequence_bytes(self) -> int:
    """Bytes one sequence takes in a batch: float32 q, k, v and its reference outputs."""
    return 4 * 4 * self.num_layers * self.num_heads * self.num_tokens * self.head_dim

  def capped_batch(self, batch: int, max_bytes: int) -> int:
    """`batch`, lowered so that a batch's q, k, v and reference outputs take <= `max_bytes` (0: no cap;
    at least 1 sequence): the sweep's and the bounds' memory follows the batch, not the split."""
    if batch < 1:
      raise ValueError(f'sweep.batch must be >= 1, got {batch}')
    return int(batch) if max_bytes <= 0 else int(max(1, min(batch, max_bytes // self.sequence_bytes())))

  def batches(self, batch: int) -> list[tuple[int, int]]:
    b = max(1, int(batch))
    return [(i, min(i + b, self.num_sequences)) for i in range(0, self.num_sequences, b)]

  def numpy(self, a: int, b: int) -> dict[str, np.ndarray]:
    """{'q', 'k', 'v'}: float32 (layers, b - a, H, L, D) of sequences [a, b)."""
    if self._reader is not None:
      return self._reader.get(np.arange(a, b))
    return {t: x[:, a:b] for t, x in self._arrays.items()}

  def slice(self, a: int, b: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = self.numpy(a, b)
    return tuple(jnp.asarray(x[t]) for t in 'qkv')

  def exact(self, a: int, b: int) -> jax.Array:
    """Full-cache float32 outputs (layers, b - a, H, L, D) of sequences [a, b): read from the
    `exact_store` when the set has one (computed and written on first use), else computed."""
    compute = lambda: compress.exact_outputs(*self.slice(a, b), self.patch_nums)
    if self.exact_store is None:
      return compute()
    return jnp.asarray(self.exact_store.get(a, b, compute))


def image_units(ds: Any) -> np.ndarray:
  """(n,) image id of every sequence of a capture split: a shard of `shard_size` images holds the
  conditional halves (rows 0..s-1), then the unconditional ones (rows s..2s-1) of the same images."""
  s = int(ds.manifest['shard_size'])
  i = np.arange(ds.num_sequences)
  units = (i // (2 * s)) * s + i % s
  partner = np.where((i % (2 * s)) < s, i + s, i - s)
  ok = (np.array_equal(np.asarray(ds.halves), (i % (2 * s)) // s)
        and np.array_equal(np.asarray(ds.seeds), np.asarray(ds.seeds)[partner])
        and np.array_equal(np.asarray(ds.labels), np.asarray(ds.labels)[partner]))
  if not ok:
    raise ValueError('the capture does not hold [conditional halves, unconditional halves] per shard of '
                     f'{s} images (manifest shard_size); it was not written by var_jax.capture.capture')
  return units


def run_point(comp: compress.Compressor, params: Any, data: CacheSet, batch: int,
              compiler_options=None) -> dict[str, np.ndarray]:
  """Runs `comp` teacher forced over every held-out sequence, batch by batch (one compiled program for
  every full batch): d2, e2 (n, N, K) float64, peak_bits (N, n, H), peak_entries (-1: no count).
  With an `exact_store` the reference outputs are read from it, else computed in the same program."""
  d2, e2, bits, entries = [], [], [], []
  for a, b in data.batches(batch):
    exact = data.exact(a, b) if data.exact_store is not None else None
    res = compress.teacher_forced_errors(comp, params, *data.slice(a, b), exact_NBHLD=exact,
                                         compiler_options=compiler_options)
    d2.append(np.asarray(res['d2'], np.float64))
    e2.append(np.asarray(res['e2'], np.float64))
    bits.append(np.asarray(res['peak_bits']))
    entries.append(-1 if res['peak_entries'] is None else int(np.asarray(res['peak_entries']).max()))
  return {'d2': np.concatenate(d2), 'e2': np.concatenate(e2), 'peak_bits': np.concatenate(bits, axis=1),
          'peak_entries': max(entries)}


def warm_point(comp: compress.Compressor, params: Any, data: CacheSet, batch: int,
               compiler_options=None) -> None:
  """Compiles (runs nothing) every program `run_point(comp, params, data, batch)` will call: one per
  distinct batch size (eval/engine/points.py calls this on a background thread, a point ahead)."""
  for size in sorted({b - a for a, b in data.batches(batch)}):
    compress.compile_errors(comp, params, (data.num_layers, size, data.num_heads, data.num_tokens,
                                           data.head_dim), with_exact=data.exact_store is not None,
                            compiler_options=compiler_options)


def fitted(spec: MethodSpec, budget: Any, geometry: CacheGeometry,
           share: Callable[[MethodSpec, compress.Compressor], float] | None = None) -> compress.Compressor:
  """The compressor of `spec` at `budget` (FULL_BUDGET: the full cache). With `share(spec, comp)` (its
  shared parameters' bits per (served sequence, layer, head)) the per-head budget is lowered until
  per-head budget + share fits `budget`: amortised bits never exceed the budget (sweep.fit_amortised)."""
  comp = spec.make(geometry, compress.Budget(geometry.full_bits) if budget == FULL_BUDGET else budget)
  if share is None or budget == FULL_BUDGET or comp.passthrough:
    return comp
  limit = comp.budget.bits
  for _ in range(8):                              # the share may depend on the budget: settle it
    part = share(spec, comp)
    new = int(np.floor(limit - part))
    if new >= comp.budget.bits:
      return comp
    if new < 1:
      raise ValueError(f'{spec} at {budget}: its shared parameters alone ({part:.0f} bits per sequence, '
                       f'layer and head) exceed the budget of {limit} bits; serve more sequences '
                       '(sweep.served_sequences), or run it at its per-head budget, flagged '
                       '(sweep.fit_amortised=False)')
    comp = spec.make(geometry, compress.Budget(new))
  return comp


def make_point(spec: MethodSpec, budget: Any, geometry: CacheGeometry,
               params_fn: Callable[[MethodSpec, compress.Compressor], Any],
               share: Callable[[MethodSpec, compress.Compressor], float] | None = None
               ) -> tuple[compress.Compressor, Any]:
  """The compressor of `spec` at `budget` (fitted with `share`, see `fitted`) and its parameters."""
  comp = fitted(spec, budget, geometry, share)
  return comp, params_fn(spec, comp)


def summarize(d2_nNK: np.ndarray, e2_nNK: np.ndarray, units: np.ndarray, level: float) -> dict[str, Any]:
  """Aggregate errors: overall with its CI over units, per layer (N,) and per scale (K,)."""
  _, inverse = np.unique(units, return_inverse=True)
  d2_u = np.bincount(inverse, d2_nNK.sum((1, 2)))
  e2_u = np.bincount(inverse, e2_nNK.sum((1, 2)))
  err, low, high = ratio_ci(d2_u, e2_u, level)
  safe = lambda a, b: np.sqrt(a / np.maximum(b, 1e-300))
  return {'rel_error': err, 'rel_error_ci_low': low, 'rel_error_ci_high': high,
          'rel_error_per_layer': [float(x) for x in safe(d2_nNK.sum((0, 2)), e2_nNK.sum((0, 2)))],
          'rel_error_per_scale': [float(x) for x in safe(d2_nNK.sum((0, 1)), e2_nNK.sum((0, 1)))],
          'num_sequences': int(d2_nNK.shape[0]), 'num_units': int(d2_u.size)}


def over_budget(amortised_bits: float, budget_bits: int) -> str:
  """The `warning` of a point whose amortised bits exceed its budget."""
  return (f'amortised bits {amortised_bits:.0f} exceed the budget {budget_bits} by '
          f'{100 * (amortised_bits / max(budget_bits, 1) - 1):.1f} % (shared parameters); '
          'sweep.fit_amortised=True fits them in')


def bits_columns(bits: float, geometry: CacheGeometry, shared_bits: int = 0, heads: int = 1,
                 served_sequences: int = 1) -> dict[str, float]:
  """Bits per coordinate, fraction of fp16, and the amortised bits: per-head `bits` plus `shared_bits`
  (the whole parameter set, all `heads` = layers x heads) spread over `served_sequences` sequences."""
  if served_sequences < 1 or heads < 1:
    raise ValueError(f'served_sequences and heads must be >= 1, got {served_sequences}, {heads}')
  amortised = bits + shared_bits / (heads * served_sequences)
  return {'bits_per_coordinate': bits / geometry.coordinates, 'fraction_of_fp16': bits / geometry.fp16_bits,
          'shared_bits': int(shared_bits), 'served_sequences': int(served_sequences),
          'amortised_bits': amortised, 'amortised_bits_per_coordinate': amortised / geometry.coordinates}


def evaluate_spec(spec: MethodSpec, budget: Any, data: CacheSet, geometry: CacheGeometry,
                  params_fn: Callable[[MethodSpec, compress.Compressor], Any], *, batch: int, level: float,
                  dataset: str = 'val', served_sequences: int = 0, compiler_options=None,
                  trained_bits: Callable[[MethodSpec, compress.Compressor], int] | None = None,
                  share: Callable[[MethodSpec, compress.Compressor], float] | None = None,
                  selection: str = '') -> dict[str, Any]:
  """One frontier.csv row: `spec` at `budget` (FULL_BUDGET: the full cache) over `data`; shared bits
  are amortised over `served_sequences` (0: the held-out sequences evaluated); `compiler_options` for
  the point's program (compress.core.teacher_forced.fast_compile_options()); `trained_bits(spec, comp)`:
  the budget its parameters were trained at (default: its own budget when learned); `share`: fit the
  amortised bits into the budget (`fitted`); `selection`: how the setting was chosen (a column).
  A deployable point whose amortised bits exceed its budget gets a `warning` (also logged)."""
  t0 = time.perf_counter()
  comp, params = make_point(spec, budget, geometry, params_fn, share)
  res = run_point(comp, params, data, batch, compiler_options)
  bits = float(res['peak_bits'].max())
  summary = summarize(res['d2'], res['e2'], data.units, level)
  if not np.isfinite(summary['rel_error']):
    raise FloatingPointError(f'{spec} at budget {budget}: non-finite attention outputs')
  cls = type(comp)
  limit = comp.budget.bits if budget == FULL_BUDGET else compress.Budget.parse(budget, geometry).bits
  columns = bits_columns(bits, geometry, comp.shared_bits(params), data.num_layers * data.num_heads,
                         served_sequences or data.num_sequences)
  warnings = [ZERO_ENTRIES] if res['peak_entries'] == 0 else []
  if not cls.oracle and budget != FULL_BUDGET and columns['amortised_bits'] > limit:
    warnings.append(over_budget(columns['amortised_bits'], limit))
  warning = '; '.join(warnings)
  if warning:
    logging.warning('%s at budget %s (%d bits): %s', spec, budget, limit, warning)
  return {'dataset': dataset, 'method': spec.name, 'family': cls.family, 'setting': spec.setting,
          'budget': budget, 'oracle': cls.oracle, 'learned': cls.learned, 'deployable': not cls.oracle,
          'budget_bits': limit, 'bits': int(bits), 'bits_mean': float(res['peak_bits'].mean()),
          **columns, **summary, 'per_head_budget_bits': comp.budget.bits, 'selection': selection,
          'seconds': time.perf_counter() - t0, 'warning': warning,
          'reference': f'float32 attention over the {data.dtype} captured q, k, v',
          'trained_bits': (trained_bits(spec, comp) if trained_bits else
                           comp.budget.bits if cls.learned and not comp.passthrough else 0)}
