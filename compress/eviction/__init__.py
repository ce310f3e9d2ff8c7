"""Eviction: keep the best entries under a score. Static scores (`random`, `window`, `streaming`,
`knorm`), attention scores (`h2o`, `tova`, `snapkv`), `scalekv` (+ layer-wise budgets, `allocation`),
the future-query `oracle` (a reference), and the learned scorer `evict_learned`."""
from compress.core.registry import import_family

import_family(__name__, __path__)
