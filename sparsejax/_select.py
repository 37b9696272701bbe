"""N:M groups, constant fan-in units and their exact selections (below masks and nm).

The bottom of the N:M code: :func:`sparsejax.masks.topk_mask` selects N:M
pools with :func:`nm_keep`, :mod:`sparsejax.dst` regrows within groups with
:func:`keep_top_in_groups`, and :mod:`sparsejax.nm` (the public N:M module,
which re-exports these names) checks masks with :func:`group_counts`. It
imports only :mod:`sparsejax._sort_keys`, so none of them imports another
for it.

A layer's groups are laid out by :func:`nm_groups`: ``[..., c_in, c_out]`` →
``[..., c_out, c_in/M, M]``, the last axis running along a group;
:func:`nm_ungroup` is its inverse.

A layer's *units* (constant fan-in, :class:`sparsejax.budgets.ConstantFanIn`)
are its output units: :func:`fan_in_keep` keeps the top ``k`` of each unit's
fan-in (every axis but the last), the selection of
``sparsejax.condensed.constant_fan_in_mask`` and of the constant fan-in pools
of :func:`sparsejax.masks.select_pools`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax._sort_keys import sortable_bits


def nm_groups(x: jax.Array, m: int) -> jax.Array:
  """``x`` as its N:M groups: ``[..., c_in, c_out]`` → ``[..., c_out, c_in/m, m]``.

  Axis -2 (the input dimension) is split into groups of ``m`` consecutive
  entries; the last axis of the result runs along a group, in increasing flat
  index. :func:`nm_ungroup` is the inverse.
  """
  xt = jnp.moveaxis(x, -2, -1)
  return xt.reshape(xt.shape[:-1] + (xt.shape[-1] // m, m))


def nm_ungroup(groups: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`nm_groups` for a leaf of ``shape``."""
  xt = groups.reshape(tuple(shape[:-2]) + (shape[-1], shape[-2]))
  return jnp.moveaxis(xt, -1, -2)


def group_counts(mask_leaf: jax.Array, m: int) -> jax.Array:
  """Kept entries of every N:M group of ``mask_leaf``: ``int32 [..., c_out, c_in/m]``."""
  return jnp.sum(nm_groups(jnp.asarray(mask_leaf), m), axis=-1, dtype=jnp.int32)


def keep_top_in_groups(keys: jax.Array, k) -> jax.Array:
  """Exact top-``k`` within each group (the last axis), ties to the lower index.

  Args:
    keys: ``[..., m]`` float scores (or unsigned sort keys) of each group.
    k: kept per group, an int or an int array broadcastable to ``keys.shape[:-1]``.

  Returns:
    bool ``[..., m]`` with exactly ``min(k, m)`` entries ``True`` per group.
  """
  if jnp.issubdtype(keys.dtype, jnp.floating):
    keys = sortable_bits(keys)
  m = keys.shape[-1]
  idx = jnp.arange(m)
  a, b = keys[..., :, None], keys[..., None, :]
  beats = (b > a) | ((b == a) & (idx[None, :] < idx[:, None]))  # [.., i, j]: j beats i
  rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  return rank < jnp.asarray(k, jnp.int32)[..., None]


def nm_keep(scores_leaf: jax.Array, n, m: int, within: jax.Array | None = None) -> jax.Array:
  """The N:M mask of one layer: the ``n`` highest scores of each group of ``m``.

  Pure and ``jit``-compatible (``n`` may be traced). Groups run along axis -2
  (see :func:`nm_groups`); ties go to the lower flat index; NaN ranks lowest.
  With ``within`` only its entries can be kept, ``min(n, available)`` per group.

  Args:
    scores_leaf: float ``[..., c_in, c_out]`` with ``c_in % m == 0``.
    n: kept per group.
    m: group size.
    within: optional bool mask of the same shape.

  Returns:
    bool mask of ``scores_leaf``'s shape.
  """
  shape = tuple(jnp.shape(scores_leaf))
  s = jnp.asarray(scores_leaf)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  keys = sortable_bits(nm_groups(s, m))
  if within is None:
    return nm_ungroup(keep_top_in_groups(keys, n), shape)
  w = nm_groups(jnp.asarray(within), m)
  keys = jnp.where(w, keys, jnp.zeros((), keys.dtype))  # below every score
  return nm_ungroup(keep_top_in_groups(keys, n) & w, shape)


def units_by_fan_in(x: jax.Array) -> jax.Array:
  """``[..., d_out]`` → ``[d_out, fan_in]``: row ``o`` is unit ``o``'s inputs in
  increasing flat index."""
  x = jnp.asarray(x)
  return x.reshape(-1, x.shape[-1]).T


@jax.jit
def fan_in_keep(scores_leaf: jax.Array, k, within: jax.Array | None = None) -> jax.Array:
  """The top ``k`` inputs of every output unit of one kernel (constant fan-in).

  Pure and ``jit``-compatible. Unit ``o`` (the last axis) keeps exactly
  ``min(k_o, fan_in)`` entries of its fan-in (every other axis), with
  ``within`` ``min(k_o, available)``: the highest scores, ties to the lower
  flat index, NaN lowest.

  Args:
    scores_leaf: float ``[..., d_out]`` (``ndim >= 2``).
    k: an int (may be traced) or an int array ``[d_out]`` (per unit).
    within: optional bool mask of the same shape: only its entries can be kept.

  Returns:
    bool mask of ``scores_leaf``'s shape.
  """
  shape = jnp.shape(scores_leaf)
  s = jnp.asarray(scores_leaf)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  keys = sortable_bits(units_by_fan_in(s))  # [d_out, F]
  if within is not None:
    w = units_by_fan_in(jnp.asarray(within, bool))
    keys = jnp.where(w, keys, jnp.zeros((), keys.dtype))  # below every score
  f = keys.shape[1]
  # Descending keys, ties to the lower index: a stable sort of the complement.
  order = jnp.argsort(~keys, axis=1, stable=True)
  rank = (
    jnp.zeros_like(order)
    .at[jnp.arange(keys.shape[0])[:, None], order]
    .set(jnp.broadcast_to(jnp.arange(f, dtype=order.dtype), order.shape))
  )
  kept = rank < jnp.reshape(jnp.asarray(k, rank.dtype), (-1, 1))
  if within is not None:
    kept = kept & w
  return kept.T.reshape(shape)
