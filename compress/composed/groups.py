"""The group means of a merge (composed's token axis): each kept slot's entry becomes the weighted mean
of the candidates merged into it."""
from __future__ import annotations

import jax
import jax.numpy as jnp


# candidates x slots from which a merge's group sums are a scatter-add, not a one-hot matmul: at d16
# (359 x 190 and 424 x 287, 128 features, 256 sequence-heads) the matmul takes 93 / 123 ms against 50 /
# 56 ms; at the default model's generation shapes (77 x 41, 1920 sequence-heads) it was the faster,
# 70 against 82 ms (session 11), and its rows keep their rounding (this 2-core CPU)
SEGMENT_MIN = 16384


def group_means(rows_M: jax.Array, target_N: jax.Array, weight_N: jax.Array, x_NF: jax.Array,
                size_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each row r of `rows_M`: sum_{i: target_i = r} w_i x_i / sum w_i (0 for an empty group) (M, F),
  and the group's total size (M,). target_i = N: member of no group."""
  N, M = target_N.shape[0], rows_M.shape[0]
  if N * M < SEGMENT_MIN:
    onehot_MN = (target_N[None, :] == rows_M[:, None]).astype(jnp.float32)
    num, den, size = (onehot_MN * weight_N[None, :]) @ x_NF, onehot_MN @ weight_N, onehot_MN @ size_N
  else:
    sums = lambda a: jax.ops.segment_sum(a, target_N, num_segments=N + 1)[rows_M]
    num, den, size = sums(weight_N[:, None] * x_NF), sums(weight_N), sums(size_N)
  return jnp.where(den[:, None] > 0, num / jnp.where(den > 0, den, 1.0)[:, None], 0.0), size
