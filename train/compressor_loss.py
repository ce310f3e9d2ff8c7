"""The compressor trainer's loss and its gradient, all layers at once or layer group by layer group.

The loss is the aggregate relative L2 error sqrt(D2 / E2) of the attention outputs, D2 = sum |out - exact|^2
and E2 = sum |exact|^2 over layers, sequences, heads, tokens and dims (`out`: the compressor's
`train_outputs`, vmapped over layers; `exact`: the full-cache attention). Both sums split over layers, and a
layer's outputs depend only on its own parameters (every trained leaf has leading axes (layers, heads)), so
the gradient of D2 is the concatenation of every layer group's own gradient, and
dloss/dparams = dloss/dD2 * dD2/dparams. `loss_and_grad(..., group=G)` computes D2, E2 and the gradient of D2
G layers at a time in a `lax.scan` (each group's activations are freed before the next group runs): the
same loss and gradient as all layers at once (up to float summation order) with G/layers of the activation
memory. `auto_group` picks G from a byte cap on the attention logits of a group.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import compress
from compress.core.attention import rel_error
from compress.core.budget import CacheGeometry
from compress.core.teacher_forced import exact_outputs


def relaxed_error(comp: compress.Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                  v_NBHLD: jax.Array) -> jax.Array:
  """Aggregate relative L2 error of `train_outputs` (vmapped over layers) against the full cache."""
  out = jax.vmap(comp.train_outputs)(params, q_NBHLD, k_NBHLD, v_NBHLD)
  return rel_error(out, exact_outputs(q_NBHLD, k_NBHLD, v_NBHLD, comp.geometry.patch_nums))


def squared_sums(comp: compress.Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                 v_NBHLD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(D2, E2) = (sum |out - exact|^2, sum |exact|^2) float32 scalars over the given layers."""
  out = jax.vmap(comp.train_outputs)(params, q_NBHLD, k_NBHLD, v_NBHLD)
  exact = exact_outputs(q_NBHLD, k_NBHLD, v_NBHLD, comp.geometry.patch_nums).astype(jnp.float32)
  d = out.astype(jnp.float32) - exact
  return jnp.sum(d * d), jnp.sum(exact * exact)


def _check_group(group: int, layers: int) -> None:
  if layers % group:
    raise ValueError(f'layer group {group} does not divide the {layers} layers; pick a divisor of {layers}')


def _scan_groups(body, group: int, params: Any, *xs_NBHLD: jax.Array) -> tuple[tuple[jax.Array, ...], Any]:
  """`body(params_group, *xs_group) -> ((scalar sums...), per-group output)` over consecutive groups of
  `group` layers in a `lax.scan`: (the sums added over groups, the outputs stacked on the layer axis)."""
  N = xs_NBHLD[0].shape[0]
  _check_group(group, N)
  split = lambda x: x.reshape((N // group, group) + x.shape[1:])  # noqa: E731

  def step(carry, xs):
    sums, out = body(*xs)
    return tuple(c + x for c, x in zip(carry, sums)), out

  zero = jnp.zeros((), jnp.float32)
  sums, out = jax.lax.scan(step, (zero, zero), (jax.tree.map(split, params),) + tuple(map(split, xs_NBHLD)))
  return sums, jax.tree.map(lambda x: x.reshape((N,) + x.shape[2:]), out)


def grouped_sums(comp: compress.Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                 v_NBHLD: jax.Array, group: int = 0) -> tuple[jax.Array, jax.Array]:
  """`squared_sums` (forward only), `group` layers at a time (0 or >= the layer count: all at once)."""
  if group <= 0 or group >= q_NBHLD.shape[0]:
    return squared_sums(comp, params, q_NBHLD, k_NBHLD, v_NBHLD)
  sums, _ = _scan_groups(lambda *a: (squared_sums(comp, *a), None), group, params, q_NBHLD, k_NBHLD, v_NBHLD)
  return sums


def loss_and_grad(comp: compress.Compressor, params: Any, q_NBHLD: jax.Array, k_NBHLD: jax.Array,
                  v_NBHLD: jax.Array, group: int = 0) -> tuple[jax.Array, Any]:
  """(loss, d loss / d params) of `relaxed_error`; `group` > 0: computed `group` layers at a time (it must
  divide the layer count; module doc), 0 (or >= the layer count): all layers in one program, as before.
  q, k, v: (N_layers, B, H, L, D), any float dtype (each group is cast to float32 where it is used)."""
  if group <= 0 or group >= q_NBHLD.shape[0]:
    return jax.value_and_grad(lambda p: relaxed_error(comp, p, q_NBHLD, k_NBHLD, v_NBHLD))(params)

  def body(p, q, k, v):
    return jax.value_and_grad(lambda p: squared_sums(comp, p, q, k, v), has_aux=True)(p)

  (d2, e2), g = _scan_groups(body, group, params, q_NBHLD, k_NBHLD, v_NBHLD)
  # rel_error's own formula on the sums, so that its gradient (and its value at D2 = 0) is the same
  loss, dloss = jax.value_and_grad(lambda d: jnp.sqrt(d / jnp.maximum(e2, 1e-30)))(d2)
  return loss, jax.tree.map(lambda x: x * dloss, g)


def logit_bytes(geometry: CacheGeometry, batch: int, num_heads: int) -> int:
  """Bytes of one layer's float32 attention logits over the pyramid (every scale's queries over every
  key up to its end) for `batch` sequences: the yardstick of a layer's activation memory in training."""
  ends = [s + n for s, n in zip(geometry.scale_starts, geometry.scale_sizes)]
  return 4 * batch * num_heads * sum(n * e for n, e in zip(geometry.scale_sizes, ends))


def auto_group(layers: int, group: int, group_bytes: int, geometry: CacheGeometry, batch: int,
               num_heads: int) -> int:
  """Layers per gradient group: `group` if > 0 (must divide `layers`), else the largest divisor of
  `layers` whose `logit_bytes` (per-device `batch`) fit `group_bytes` (at least 1); `layers` (all at once)
  when they all fit or `group_bytes` <= 0."""
  if group > 0:
    if layers % group:
      raise ValueError(f'config.grad_layers={group} does not divide the {layers} layers; pick a divisor '
                       f'of {layers}, or 0 (chosen from config.grad_bytes)')
    return group
  per_layer = logit_bytes(geometry, batch, num_heads)
  if group_bytes <= 0 or per_layer * layers <= group_bytes:
    return layers
  fits = [g for g in range(1, layers + 1) if layers % g == 0 and g * per_layer <= group_bytes]
  return max(fits, default=1)
