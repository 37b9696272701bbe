"""N:M sparsity: exactly N kept in every group of M weights (SPEC §1).

An ``"N:M"`` budget (e.g. ``"2:4"``, the pattern GPU sparse tensor cores
accelerate) keeps exactly ``N`` weights in every group of ``M`` consecutive
weights along a layer's **input dimension**, axis -2 of the kernel: ``din`` of a
dense kernel ``[din, dout]``; ``c_in`` of a conv kernel ``[kh, kw, c_in, c_out]``,
one set of groups per ``(kh, kw, c_out)``. Counts are exact per group, not on
average: ties go to the lower flat index and NaN ranks lowest, as in every
sparsejax mask. The sparsity is ``1 - N/M`` (``"2:4"``: 0.5), and every N:M
layer needs an input dimension divisible by ``M``.

An ``"N:M"`` string is a budget wherever one is taken
(:func:`sparsejax.masks.topk_mask`, ``scores.prune_at_init``, the DST methods'
``nm=``); this module parses and checks it (:func:`nm`, :func:`parse_nm`,
:func:`nm_sparsity`, :func:`check_nm`) and selects within groups
(:func:`nm_keep`, :func:`keep_top_in_groups`). A layer's groups are laid out by
:func:`nm_groups`: ``[..., c_in, c_out]`` → ``[..., c_out, c_in/M, M]``, the last
axis running along a group; :func:`nm_ungroup` is its inverse.

Every public name is also available from :mod:`sparsejax.masks`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._sort_keys import sortable_bits

PyTree = Any

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def nm(n: int, m: int) -> str:
  """The N:M budget string, e.g. ``nm(2, 4) == "2:4"`` (checked).

  Args:
    n: kept weights per group, ``1 <= n <= m``.
    m: group size (consecutive weights along the input dimension), ``m >= 1``.

  Returns:
    ``"n:m"``, usable as ``budget=`` everywhere a budget is taken.
  """
  budget = f"{int(n)}:{int(m)}"
  parse_nm(budget)  # checks 1 <= n <= m
  return budget


def parse_nm(budget) -> tuple[int, int] | None:
  """``(n, m)`` of an ``"N:M"`` budget; ``None`` for any other value.

  Raises:
    ValueError: an ``"N:M"`` string with ``N < 1`` or ``N > M``.

  Example:

    >>> from sparsejax import nm
    >>> nm.parse_nm("2:4"), nm.parse_nm("global")
    ((2, 4), None)
  """
  if not isinstance(budget, str):
    return None
  match = _NM_PATTERN.match(budget.strip())
  if match is None:
    return None
  n, m = int(match.group(1)), int(match.group(2))
  if not 1 <= n <= m:
    raise ValueError(f"an N:M budget needs 1 <= N <= M, got {budget!r}")
  return n, m


def nm_sparsity(budget: str) -> float:
  """The sparsity ``1 - N/M`` of an ``"N:M"`` budget (``"2:4"`` → 0.5)."""
  parsed = parse_nm(budget)
  if parsed is None:
    raise ValueError(f"not an N:M budget: {budget!r}")
  return 1.0 - parsed[0] / parsed[1]


def _check_nm_sparsity(sparsity, n: int, m: int) -> None:
  """An N:M budget keeps ``round((1 - s) · M)`` per group, which must be ``N``."""
  if isinstance(sparsity, jax.core.Tracer):
    raise ValueError(f"an N:M budget ({n}:{m}) needs a Python float sparsity "
                     "(1 - N/M), not a traced value")
  if round((1.0 - float(sparsity)) * m) != n:
    raise ValueError(
        f"budget '{n}:{m}' keeps {n} of every {m} weights, sparsity "
        f"{1.0 - n / m:g}; got sparsity={float(sparsity)!r} (pass "
        f"nm.nm_sparsity('{n}:{m}'))")


def _check_nm_shape(path: str, shape: tuple[int, ...], m: int) -> None:
  if len(shape) < 2:
    raise ValueError(
        f"an N:M budget groups weights along the input dimension (axis -2); "
        f"prunable leaf {path!r} has shape {shape}: make it non-prunable")
  if shape[-2] % m:
    raise ValueError(
        f"an N:M budget needs the input dimension (axis -2) of every prunable "
        f"layer to be divisible by M={m}; {path!r} has shape {shape} (input "
        f"dimension {shape[-2]}). Keep it out of the budget, e.g. "
        f"prunable=masks.KEEP_FIRST_DENSE (with order=) or "
        f"overrides={{{path.rsplit('/', 1)[0]!r}: 0.0}}")


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


def nm_keep(scores_leaf: jax.Array, n, m: int,
            within: jax.Array | None = None) -> jax.Array:
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


def check_nm(mask: PyTree, budget: str, prunable=None) -> None:
  """Raises ``ValueError`` unless every prunable leaf of ``mask`` is N:M.

  Every group of ``M`` consecutive entries along axis -2 of every prunable
  leaf must keep exactly ``N``; the error names the first bad path and group.

  Args:
    mask: a bool mask pytree (concrete, not traced).
    budget: the ``"N:M"`` budget, e.g. ``"2:4"``.
    prunable: which leaves to check; see
      :func:`sparsejax.masks.prunable_tree` (default: the ``ndim > 1`` leaves).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import nm
    >>> nm.check_nm({"w": jnp.array([[True], [False], [False], [True]])}, "2:4")
    >>> nm.check_nm({"w": jnp.ones((4, 1), bool)}, "2:4")
    Traceback (most recent call last):
    ...
    ValueError: 'w' is not 2:4: the group holding entry (0, 0) keeps 4 of 4
  """
  # Imported here, not at the top: sparsejax.masks imports this module.
  from sparsejax import masks  # pylint: disable=g-import-not-at-top

  n, m = parse_nm(budget) or (None, None)
  if n is None:
    raise ValueError(f"not an N:M budget: {budget!r}")
  flags = dict(masks.named_leaves(masks.prunable_tree(mask, prunable)))
  for path, leaf in masks.named_leaves(mask):
    if not flags[path]:
      continue
    _check_nm_shape(path, tuple(jnp.shape(leaf)), m)
    counts = np.asarray(nm_ungroup(
        jnp.repeat(group_counts(leaf, m)[..., None], m, axis=-1),
        tuple(jnp.shape(leaf))))
    bad = np.argwhere(counts != n)
    if bad.size:
      entry = tuple(int(i) for i in bad[0])  # not numpy 2's (np.int64(0), ...)
      raise ValueError(
          f"{path!r} is not {n}:{m}: the group holding entry {entry} "
          f"keeps {int(counts[entry])} of {m}")


def _nm_topk_mask(scores, nm_budget, names, leaves, flags, keep_in, fixed):
  """:func:`sparsejax.masks.topk_mask` under an N:M budget.

  ``names``, ``leaves``, ``flags`` and ``keep_in`` are the flattened paths,
  scores, prunability and ``within`` leaves (``None`` without ``within``);
  ``fixed`` maps overridden paths to their sparsity (per-layer exact top-k).
  """
  # Imported here, not at the top: sparsejax.masks imports this module.
  from sparsejax import masks  # pylint: disable=g-import-not-at-top

  n, m = nm_budget
  for path, leaf, flag in zip(names, leaves, flags):
    if flag and path not in fixed:
      _check_nm_shape(path, tuple(jnp.shape(leaf)), m)
  out = []
  for i, (path, leaf, flag) in enumerate(zip(names, leaves, flags)):
    shape = jnp.shape(leaf)
    if not flag:
      out.append(jnp.ones(shape, jnp.bool_))
    elif path in fixed:
      s = jnp.ravel(leaf)
      s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
      k = masks.kept_count(s.shape[0], fixed[path])
      if keep_in[i] is not None:
        s = jnp.where(jnp.ravel(keep_in[i]), s, -jnp.inf)
        k = jnp.minimum(k, jnp.sum(keep_in[i]).astype(jnp.int32))
      out.append(masks.keep_top(s, k).reshape(shape))
    else:
      out.append(nm_keep(leaf, n, m, keep_in[i]))
  return jax.tree.unflatten(jax.tree.structure(scores), out)
