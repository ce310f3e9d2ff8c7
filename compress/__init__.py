"""KV-cache compressors for VAR, their budgets and bit accounting, and the theory they are held to.

    import compress
    g = compress.CacheGeometry(patch_nums=(1, 2, 3, 4, 5, 6, 8), head_dim=64)
    comp = compress.make('snapkv', g, '25%')            # any name in compress.available()
    res = compress.run_teacher_forced(comp, None, q, k, v)

Layout: `core/` (interface, budgets, slots and accounting, attention, top-k, relaxations, registry, the
teacher-forced driver, the generation policy), one subpackage per family with its heuristics beside its
learned variant (`reference/`, `eviction/`, `merging/`, `quantization/`, `lowrank/`, `matching/`,
`window/`), and `theory/` (bounds, hard instance). Importing this package registers every built-in
compressor; the registry itself imports none.
"""
from compress.core import synthetic
from compress.core.budget import Budget, CacheGeometry
from compress.core.interface import Compressor, StepContext
from compress.core.policy import CompressorPolicy
from compress.core.registry import available, make, register, REGISTRY
from compress.core.teacher_forced import (compile_errors, errors, exact_outputs, run_teacher_forced,
                                          teacher_forced_errors)

# The built-in families, imported explicitly: each module registers its compressors on import.
from compress import composed, eviction, lowrank, matching, merging, quantization, reference, window  # noqa: E402,F401

__all__ = ['Budget', 'CacheGeometry', 'Compressor', 'CompressorPolicy', 'REGISTRY', 'StepContext',
           'available', 'compile_errors', 'errors', 'exact_outputs', 'make', 'register', 'run_teacher_forced', 'synthetic',
           'teacher_forced_errors']
