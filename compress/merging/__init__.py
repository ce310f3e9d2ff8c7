"""Merging: entries that stand for several tokens. `tome`, `cam`, and the learned `merge_learned`."""
from compress.core.registry import import_family

import_family(__name__, __path__)
