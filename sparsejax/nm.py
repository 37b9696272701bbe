"""N:M sparsity: exactly N kept in every group of M weights (SPEC §1).

The budget :class:`sparsejax.budgets.NM` (e.g. ``NM(2, 4)``, the pattern GPU
sparse tensor cores accelerate) keeps exactly ``N`` weights in every group of
``M`` consecutive weights along a layer's **input dimension**, axis -2 of the
kernel: ``din`` of a dense kernel ``[din, dout]``; ``c_in`` of a conv kernel
``[kh, kw, c_in, c_out]``, one set of groups per ``(kh, kw, c_out)``. Counts
are exact per group, not on average: ties go to the lower flat index and NaN
ranks lowest, as in every sparsejax mask. The sparsity is ``1 - N/M``
(``NM(2, 4)``: 0.5), and every N:M layer needs an input dimension divisible
by ``M``.

An ``NM`` budget is taken wherever a budget is
(:func:`sparsejax.masks.topk_mask`, ``scores.prune_at_init``,
``masks.random_mask``, the DST methods' ``nm=``). This module checks masks
(:func:`check_nm`) and holds the group layout and within-group selection
(``nm_groups``, ``nm_ungroup``, ``group_counts``,
``keep_top_in_groups``, ``nm_keep``, defined in the bottom module
``sparsejax._select``): ``[..., c_in, c_out]`` → ``[..., c_out, c_in/M, M]``,
the last axis running along a group.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsejax import budgets
from sparsejax import masks
from sparsejax._select import group_counts  # noqa: F401  (the public N:M helpers)
from sparsejax._select import keep_top_in_groups  # noqa: F401  (the public N:M helpers)
from sparsejax._select import nm_groups  # noqa: F401  (the public N:M helpers)
from sparsejax._select import nm_keep  # noqa: F401  (the public N:M helpers)
from sparsejax._select import nm_ungroup  # noqa: F401  (the public N:M helpers)

PyTree = Any


def check_nm(mask: PyTree, budget: budgets.NM, prunable=None) -> None:
  """Raises ``ValueError`` unless every prunable leaf of ``mask`` is N:M.

  Every group of ``M`` consecutive entries along axis -2 of every prunable
  leaf must keep exactly ``N``; the error names the first bad path and group.

  Args:
    mask: a bool mask pytree (concrete, not traced).
    budget: the :class:`sparsejax.budgets.NM` budget, e.g. ``NM(2, 4)``.
    prunable: which leaves to check; see
      :func:`sparsejax.masks.prunable_tree` (default: the ``ndim > 1`` leaves).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import budgets, nm
    >>> two_four = budgets.NM(2, 4)
    >>> nm.check_nm({"w": jnp.array([[True], [False], [False], [True]])}, two_four)
    >>> nm.check_nm({"w": jnp.ones((4, 1), bool)}, two_four)
    Traceback (most recent call last):
    ...
    ValueError: 'w' is not 2:4: the group holding entry (0, 0) keeps 4 of 4
  """
  budgets.check(budget)
  if not isinstance(budget, budgets.NM):
    raise ValueError(f"check_nm needs an NM(n, m) budget, got {budget!r}")
  n, m = budget.n, budget.m
  flags = dict(masks.named_leaves(masks.prunable_tree(mask, prunable)))
  for path, leaf in masks.named_leaves(mask):
    if not flags[path]:
      continue
    budget.check_shape(path, tuple(jnp.shape(leaf)))
    counts = np.asarray(
      nm_ungroup(jnp.repeat(group_counts(leaf, m)[..., None], m, axis=-1), tuple(jnp.shape(leaf)))
    )
    bad = np.argwhere(counts != n)
    if bad.size:
      entry = tuple(int(i) for i in bad[0])  # not numpy 2's (np.int64(0), ...)
      raise ValueError(
        f"{path!r} is not {n}:{m}: the group holding entry {entry} "
        f"keeps {int(counts[entry])} of {m}"
      )
