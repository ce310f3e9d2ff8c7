"""Append-only result tables: one CSV row per finished point, so that a re-run resumes the sweep.

A row is appended (flushed and fsynced) as soon as its point is done; a point whose key is already in
the file is not computed again. The header is fixed when the file is created: a file with another
header is refused (it belongs to another kind of run). A last line without its line end (the process
was killed while writing it) is not a finished point: it is moved to `<path>.cut` and cut off the
table, so its point is computed again; so is any row with the wrong number of fields.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging


def fmt(value: Any) -> str:
  """CSV text of a value: floats with repr precision, None as '', lists space separated."""
  if value is None:
    return ''
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):       # also numpy floats: their repr is 'np.float64(...)'
    return repr(float(value)) if math.isfinite(value) else str(float(value))
  if isinstance(value, (list, tuple)):
    return ' '.join(fmt(v) for v in value)
  if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:   # numpy scalars
    return fmt(value.item())
  return str(value)


class ResultTable:
  """`path` with `columns`; rows are keyed by the `key` columns (as their CSV text)."""

  def __init__(self, path: str, columns: Sequence[str], key: Sequence[str]):
    missing = set(key) - set(columns)
    if missing:
      raise ValueError(f'key columns {sorted(missing)} are not among the columns')
    self.path, self.columns, self.key = path, tuple(columns), tuple(key)
    self._rows: list[dict[str, str]] = []
    if os.path.exists(path) and self._drop_cut_lines():
      with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != self.columns:
          raise ValueError(f'{path} has columns {reader.fieldnames}, expected {list(self.columns)}: it was '
                           'written by another version or kind of run; use a new --workdir')
        self._rows = list(reader)
      whole = [r for r in self._rows if None not in r and None not in r.values()]
      if len(whole) < len(self._rows):       # a row with missing or extra fields: not a finished point
        cells = lambda r: ','.join([r[c] for c in self.columns if r.get(c) is not None] + (r.get(None) or []))
        self._set_aside([cells(r) for r in self._rows if r not in whole], 'rows with the wrong number of fields')
        self._rows = whole
        write_table(path, self.columns, whole)
    self._keys = {self._key(r) for r in self._rows}

  def _drop_cut_lines(self) -> bool:
    """Cuts a last line that lacks its line end (a write interrupted by a kill) off the file, keeping it
    in `<path>.cut`; returns whether the file still holds anything (at least a header)."""
    with open(self.path, 'rb') as f:
      data = f.read()
    end = data.rfind(b'\n') + 1
    if end < len(data):
      self._set_aside([data[end:].decode('utf-8', 'replace')], 'a line cut off mid-write')
      with open(self.path, 'r+b') as f:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return end > 0

  def _set_aside(self, lines: Sequence[Any], why: str) -> None:
    with open(f'{self.path}.cut', 'a') as f:
      for line in lines:
        f.write(f'{line}\n')
    logging.warning('%s: %d incomplete row(s) (%s) are not finished points; they will be computed '
                    'again (kept in %s.cut)', self.path, len(lines), why, self.path)

  def _key(self, row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(fmt(row.get(k)) for k in self.key)

  def __contains__(self, row_key: Mapping[str, Any]) -> bool:
    return self._key(row_key) in self._keys

  def __len__(self) -> int:
    return len(self._rows)

  @property
  def rows(self) -> list[dict[str, str]]:
    """Rows as read back (every value a string), in file order."""
    return list(self._rows)

  def append(self, row: Mapping[str, Any]) -> None:
    """Writes one row (unknown keys are an error, missing columns are left empty)."""
    extra = set(row) - set(self.columns)
    if extra:
      raise ValueError(f'row has keys {sorted(extra)} that are not columns of {self.path}')
    if row in self:
      raise ValueError(f'{self.path} already has a row for {self._key(row)}')
    text = {c: fmt(row.get(c)) for c in self.columns}
    new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, 'a', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(self.columns))
      if new:
        w.writeheader()
      w.writerow(text)
      f.flush()
      os.fsync(f.fileno())
    self._rows.append(text)
    self._keys.add(self._key(text))


def write_table(path: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes a derived table (re-created from the results on every run) atomically."""
  tmp = f'{path}.partial'
  with open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
      w.writerow({c: fmt(r.get(c)) for c in columns})
  os.replace(tmp, path)


def as_float(row: Mapping[str, Any], col: str) -> float:
  v = row.get(col)
  return float('nan') if v in (None, '') else float(v)


def x_of(r: Mapping[str, Any]) -> float:
  """A frontier point's x (frontier.png, TensorBoard): amortised bits per coordinate (per-head bits plus
  its share of the shared parameters), else (tables without that column) bits per coordinate."""
  x = as_float(r, 'amortised_bits_per_coordinate')
  return x if x == x else as_float(r, 'bits_per_coordinate')


class Paths:
  """Where the outputs of the run in `workdir` live."""
  FILES = {'frontier': 'frontier.csv', 'pareto': 'pareto.csv', 'bounds': 'bounds.csv',
           'closed': 'closed_loop.csv', 'png': 'frontier.png', 'quality_png': 'quality_frontier.png', 'tb': 'tb', 'capture': 'capture',
           'samples': 'closed_loop'}

  def __init__(self, workdir: str):
    self.workdir = workdir
    for name, rel in self.FILES.items():
      setattr(self, name, os.path.join(workdir, rel))
