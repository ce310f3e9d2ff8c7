"""The compressor registry: `@register` adds a class under its name; `make` builds one at a budget.

The registry imports no compressor. The built-in families register themselves when the `compress`
package is imported: `compress/__init__.py` imports each family package explicitly, and each family
package imports every module in its folder (`import_family`), so a new file in a family folder is all it
takes to add a built-in compressor. Since importing any `compress.*` module first runs that package,
`make` and `available` always see them. A compressor of your own registers when its module is imported.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Iterable

from compress.core.budget import Budget, CacheGeometry
from compress.core.interface import Compressor

REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
  """Class decorator: adds a compressor under `cls.name` (names are unique)."""
  if not cls.name or not cls.family:
    raise ValueError(f'{cls.__name__} needs class attributes `name` and `family` to be registered')
  if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
    raise ValueError(f'a compressor named {cls.name!r} is already registered ({REGISTRY[cls.name]})')
  REGISTRY[cls.name] = cls
  return cls


def available(*, oracle: bool = True, learned: bool = True, calibrated: bool = True) -> list[str]:
  """Registered names, optionally without oracle / learned / calibration-needing ones."""
  return sorted(n for n, c in REGISTRY.items()
                if (oracle or not c.oracle) and (learned or not c.learned)
                and (calibrated or not c.needs_calibration))


def make(name: str, geometry: CacheGeometry, budget: Budget | str | float, **settings: Any
         ) -> Compressor:
  """Builds registered compressor `name` at `budget` (see `Budget.parse`) with its settings."""
  if name not in REGISTRY:
    raise KeyError(f'no compressor named {name!r}; registered: {", ".join(sorted(REGISTRY))}')
  if not isinstance(budget, Budget):
    budget = Budget.parse(budget, geometry)
  cls = REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {'geometry', 'budget'}
  unknown = set(settings) - fields
  if unknown:
    raise TypeError(f'{name} has no setting(s) {sorted(unknown)}; its settings are {sorted(fields)}')
  return cls(geometry=geometry, budget=budget, **settings)


def import_family(package: str, path: Iterable[str]) -> None:
  """Imports every module of family package `package` (its `__path__`), in name order, so that each
  registers its compressors. Called by each family's `__init__.py`."""
  for info in pkgutil.iter_modules(path):
    importlib.import_module(f'{package}.{info.name}')
