"""Low rank: per-head bases from calibration (`pca`, `pca_evict`) and the learned `lowrank_learned`."""
from compress.core.registry import import_family

import_family(__name__, __path__)
