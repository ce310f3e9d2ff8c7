"""Composed compressors: one budget spent across tokens x rank x bits (transform coding of every entry
in per-head bases, bits allocated per component on the data, optional token merging)."""
from compress.core.registry import import_family

import_family(__name__, __path__)
