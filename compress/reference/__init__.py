"""Reference: `full`, the exact cache (ignores the budget)."""
from compress.core.registry import import_family

import_family(__name__, __path__)
