"""Bit accounting: every array counted at its stored dtype.

`bits(state)` of a compressor and `shared_bits(params)` both come down to `tree_bits`: the sum over a
pytree's arrays of (elements x bits of the stored dtype). Nothing is counted at a nominal width.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COUNT_DTYPE = jnp.uint16          # a per-head count of kept entries (16 bits, counted)


def dtype_bits(dtype: Any) -> int:
  """Bits of one element stored at `dtype`."""
  return jnp.dtype(dtype).itemsize * 8


def tree_bits(tree: Any) -> int:
  """Bits of every array leaf of `tree` at its stored dtype (0 for None or an empty tree)."""
  return sum(int(np.prod(np.shape(a), dtype=np.int64)) * dtype_bits(jnp.result_type(a))
             for a in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
  """Bytes of every array leaf of `tree` as allocated (a state's or a parameter set's footprint)."""
  return tree_bits(tree) // 8
