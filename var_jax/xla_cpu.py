"""XLA options of the generation programs compiled ahead of time: no YNNPACK library fusions on CPU.

jaxlib 0.10's XLA CPU hands dots (with the layer norms, modulations and activations around them) and
convolutions to YNNPACK fusions (`__ynn_fusion` in the compiled HLO). For generation at the built-in
model's shapes XLA's own emitters and dot / convolution runtime are faster: one closed-loop generation
of 240 images (`layered_generate.ModelPrograms`, full cache, 2-core CPU) took 5.9 s with YNN fusions
and 4.1 s without (VQ-VAE decode 1.41 -> 0.62 s, the blocks up to attention 1.09 -> 0.63 s, after it
1.97 -> 1.40 s; docs/benchmarks.md, "Generation programs without YNN fusions"). The frontier's sweep and
training programs ran 8-12 % slower without them (the whole main job under XLA_FLAGS), so the option is
per program: `ModelPrograms`, `compile_layered`, `compile_generate` and `compile_decode` compile with
`generation_options()`; everything else keeps XLA's defaults. Outputs are the same computation fused
differently: equal up to float rounding.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax

NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}   # an empty list: no YNN fusion of any kind
DEFAULTS_ENV = 'VAR_XLA_DEFAULTS'                         # =1: XLA's defaults for generation too


@functools.lru_cache(maxsize=None)
def _accepted() -> tuple[tuple[str, Any], ...]:
  """The `NO_YNN` options this jaxlib accepts on the default backend (none off CPU)."""
  if jax.default_backend() != 'cpu':
    return ()
  known = []
  for name, value in NO_YNN.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
      known.append((name, value))
    except Exception:  # noqa: BLE001  (an option this XLA does not have: compile without it)
      pass
  return tuple(known)


def generation_options(options: dict[str, Any] | None = None) -> dict[str, Any] | None:
  """`options` (XLA compiler options, None: defaults) with the generation programs' CPU options added
  (what `options` sets wins); None when there is nothing to set (off CPU, an XLA without the option,
  or VAR_XLA_DEFAULTS=1)."""
  base = {} if os.environ.get(DEFAULTS_ENV, '') not in ('', '0') else dict(_accepted())
  merged = {**base, **(options or {})}
  return merged or None
