"""Window with running sums (Haris-Onak): a recent window plus sums of the evicted keys and values."""
from compress.core.registry import import_family

import_family(__name__, __path__)
