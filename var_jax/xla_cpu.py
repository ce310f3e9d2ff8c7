"""XLA options of the generation programs that run faster with fewer YNNPACK library fusions on CPU.

jaxlib 0.10's XLA CPU hands dots (with the layer norms, modulations and activations around them),
convolutions and reductions to YNNPACK fusions (`__ynn_fusion` in the compiled HLO). Whether they pay
depends on the shapes, so the option is per program, where it was measured (docs/benchmarks.md,
"Generation programs without YNN fusions"; 2-core CPU):

- the VQ-VAE decode, everywhere (`sampling.generate`, `compiled_generate.compile_decode`): YNN
  reductions only (`DECODE`: the GroupNorm statistics, 42 MB at 256 px: 14 -> 1 ms a sum; its
  convolutions and element-wise fusions stay XLA's). With every YNN fusion, 32 px at batch 240 took 1.41
  s against 0.62 without any; with the reductions alone (and `vae_blocks.GroupNorm`'s per-channel sums)
  0.56 s; 256 px (d16) at batch 2 3.57 s (all), 2.05 (none), 1.94 (reductions);
- the closed loop's programs (`layered_generate.ModelPrograms`, `compile_layered`: the built-in model,
  480 sequences with CFG): one 240-image generation 5.96 / 6.05 s with them, 4.27 / 4.42 s without;
- everything else keeps XLA's defaults: the frontier's sweep and training ran 8-12 % slower without
  them (the whole main job under XLA_FLAGS), and so did d16 sampling's scale steps at batch 1.

Outputs are the same computation fused differently: equal up to float rounding (tests/test_xla_cpu.py).
VAR_XLA_DEFAULTS=1 in the environment gives every program XLA's defaults.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax

NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}   # an empty list: no YNN fusion of any kind
DECODE = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}   # YNN reductions only
DEFAULTS_ENV = 'VAR_XLA_DEFAULTS'                         # =1: XLA's defaults for generation too


def cpu_accepted(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
  """The (name, value) pairs of `options` that this jaxlib accepts on the default backend, each tried
  on a one-op program (none off CPU: they are XLA CPU options)."""
  if jax.default_backend() != 'cpu':
    return ()
  known = []
  for name, value in options.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
      known.append((name, value))
    except Exception:  # noqa: BLE001  (an option this XLA does not have: compile without it)
      pass
  return tuple(known)


@functools.lru_cache(maxsize=None)
def _accepted(decode: bool) -> tuple[tuple[str, Any], ...]:
  return cpu_accepted(DECODE if decode else NO_YNN)


def generation_options(options: dict[str, Any] | None = None, *, decode: bool = False
                       ) -> dict[str, Any] | None:
  """`options` (XLA compiler options, None: defaults) with the generation programs' CPU options added
  (`NO_YNN`, or `DECODE` for the VQ-VAE decode; what `options` sets wins); None when there is nothing
  to set (off CPU, an XLA without the option, or VAR_XLA_DEFAULTS=1)."""
  base = {} if os.environ.get(DEFAULTS_ENV, '') not in ('', '0') else dict(_accepted(decode))
  merged = {**base, **(options or {})}
  return merged or None
