"""Masks and sparsity budgets (SPEC §1).

A *mask* is a pytree of ``bool`` arrays with exactly the structure, and leaf by
leaf exactly the shape, of the params it masks: ``True`` keeps an entry, ``False``
prunes it. Leaves that are not prunable (biases, normalisation params by default)
carry an all-``True`` mask. Masks work on any params pytree: Flax linen
``variables['params']`` dicts, Flax NNX ``State`` objects and plain dicts.

Conventions used throughout sparsejax:

* The public API speaks of **sparsity** ``s`` (``0.98`` means 98% of the prunable
  weights are zero); density is ``d = 1 - s``.
* Top-k is exact: a pool of ``N`` scored entries keeps exactly
  ``max(1, round(d * N))`` entries, the highest scores first, ties broken by the
  lower flat index. (``round`` is Python's round-half-to-even.)
* Budgets (how the kept entries are spread over layers) are objects of
  :mod:`sparsejax.budgets`: ``Global()`` (one ranking over all prunable
  entries), ``Uniform()``, ``ERK(power)``, ``ER(power)``, ``NM(n, m)`` (exactly
  ``n`` kept in every group of ``m`` consecutive weights along the input
  dimension, axis -2; its sparsity is ``1 - n/m``), ``ConstantFanIn(base)``
  (every output unit keeps the same number of inputs) and any of them
  ``.with_overrides({regex: sparsity})`` (matching layers at their own
  sparsity, the budget spread over the others). Every one splits the
  prunable layers into the pools of the exact selection
  (:meth:`sparsejax.budgets.Budget.pools`), which :func:`select_pools`
  applies. A budget string is refused: ``budgets.parse("erk")`` makes the
  object.

A *path* is the string that names a leaf: the pytree keys joined by ``/``, e.g.
``"Conv_0/kernel"`` or ``"layers/0/kernel"``.

*Ghost* leaves -- those under a module whose name starts with ``ghost_``
(:func:`is_ghost`), e.g. ToST's ghost skip paths (:mod:`sparsejax.tost`) --
exist only during training and are dropped from the exported model: they are
never prunable (every :class:`Prunable` and predicate excludes them), so
masks keep them dense and budgets and summaries do not count them.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _select
from sparsejax import budgets
from sparsejax._sort_keys import sortable_bits

PyTree = Any

# ----------------------------------------------------------------------------
# Paths and prunability
# ----------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: Sequence[Any]) -> str:
  """Joins a JAX key path into a ``/``-separated string.

  Attribute keys that only unwrap a variable container (the ``.value`` of a Flax
  NNX ``Param``) are dropped, so ``State`` paths read like dict paths.
  """
  names = [_key_name(k) for k in keypath]
  if len(names) > 1 and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]
  return "/".join(names)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in JAX flattening order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in leaves]


def paths(tree: PyTree) -> list[str]:
  """Leaf paths of ``tree`` in JAX flattening order."""
  return [p for p, _ in named_leaves(tree)]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree):
  """``jax.tree.map`` whose function also receives the leaf's path string."""
  return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


#: Module-name prefix of training-only (ghost) parameters, see :func:`is_ghost`.
GHOST_PREFIX = "ghost_"


def is_ghost(path: str) -> bool:
  """Whether the leaf at ``path`` is a ghost (training-only) parameter.

  True when some component of the ``/``-separated path starts with
  :data:`GHOST_PREFIX`, e.g. ``"BasicBlock_0/ghost_in_conv/kernel"``. Ghost
  leaves are never prunable and not counted in budgets.
  """
  return any(part.startswith(GHOST_PREFIX) for part in path.split("/"))


def is_kernel(path: str, leaf) -> bool:
  """Default prunability predicate: every leaf with ``ndim > 1``.

  That is every conv and dense kernel, first layer and classifier included
  (the Synaptic-Flow default); biases and normalisation params are never pruned.
  """
  del path
  return getattr(leaf, "ndim", 0) > 1


@dataclasses.dataclass(frozen=True)
class Prunable:
  """Which leaves of a params pytree are prunable.

  Attributes:
    predicate: ``(path, leaf) -> bool``; default :func:`is_kernel`.
    keep_first_dense: exclude the first prunable leaf (the stem / first layer).
    keep_last_dense: exclude the last prunable leaf (the classifier).
    exclude: regular expressions (``re.search`` on the path); matching leaves
      are not prunable.
    order: leaf paths in forward (data-flow) order, which decides "first" and
      "last"; required by ``keep_first_dense`` and ``keep_last_dense``. For
      sparsejax models use ``sparsejax.models.layer_order(model, x)``. The
      key order of a params pytree is no substitute: ``jax.jit(init)``,
      optimiser updates, checkpoint restores and Flax NNX ``State`` sort the
      keys (a ResNet's ``'BasicBlock_0'`` then precedes its stem ``'Conv_0'``).
      Default ``None``.

  Example:

    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> from sparsejax import masks
    >>> params = {"head": {"kernel": jnp.ones((4, 2))},
    ...           "stem": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    >>> keep_first = dataclasses.replace(
    ...     masks.KEEP_FIRST_DENSE, order=("stem/kernel", "stem/bias", "head/kernel"))
    >>> keep_first(params)
    {'head': {'kernel': True}, 'stem': {'bias': False, 'kernel': False}}
  """

  predicate: Callable[[str, Any], bool] = is_kernel
  keep_first_dense: bool = False
  keep_last_dense: bool = False
  exclude: tuple[str, ...] = ()
  order: tuple[str, ...] | None = None

  def __call__(self, params: PyTree) -> PyTree:
    """Returns a pytree of Python bools parallel to ``params``; ghost leaves
    (:func:`is_ghost`) are never prunable."""
    flags = dict(
      (p, bool(self.predicate(p, x)) and not is_ghost(p)) for p, x in named_leaves(params)
    )
    for pattern in self.exclude:
      hits = [p for p in flags if re.search(pattern, p)]
      if not hits:
        raise ValueError(f"exclude pattern {pattern!r} matches no path; paths are {list(flags)}")
      for p in hits:
        flags[p] = False
    if self.order is None and (self.keep_first_dense or self.keep_last_dense):
      raise ValueError(
        "keep_first_dense/keep_last_dense need order=, the leaf paths in forward "
        "order: the params' key order is not the layer order (jit, checkpoint "
        "restores and NNX State sort the keys). Pass e.g. dataclasses.replace("
        "masks.KEEP_FIRST_DENSE, order=sparsejax.models.layer_order(model, x))"
      )
    order = self.order or ()
    unknown = [p for p in order if p not in flags]
    if unknown:
      raise ValueError(f"order names paths that are not in the params: {unknown[:5]}")
    ordered = [p for p in order if flags[p]]
    if ordered and self.keep_first_dense:
      flags[ordered[0]] = False
    if ordered and self.keep_last_dense:
      flags[ordered[-1]] = False
    return map_with_path(lambda p, _: flags[p], params)


#: Every kernel (leaf with ``ndim > 1``) prunable, the default.
KERNELS = Prunable()
KEEP_FIRST_DENSE = Prunable(keep_first_dense=True)
KEEP_CLASSIFIER_DENSE = Prunable(keep_last_dense=True)
KEEP_FIRST_AND_CLASSIFIER_DENSE = Prunable(keep_first_dense=True, keep_last_dense=True)


def prunable_tree(params: PyTree, prunable=None) -> PyTree:
  """Resolves ``prunable`` to a pytree of Python bools parallel to ``params``.

  Ghost leaves (:func:`is_ghost`) are not prunable, whatever ``prunable`` says.

  Args:
    params: the params pytree.
    prunable: ``None`` (default :data:`KERNELS`), a :class:`Prunable`, a
      predicate ``(path, leaf) -> bool``, or already a pytree of bools.
  """
  if prunable is None:
    prunable = KERNELS
  if isinstance(prunable, Prunable):
    return prunable(params)
  if callable(prunable):
    return map_with_path(lambda p, x: bool(prunable(p, x)) and not is_ghost(p), params)
  _check_same_structure(prunable, params, "prunable", "params")
  return map_with_path(lambda p, f: bool(f) and not is_ghost(p), prunable)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


#: Raises ``ValueError`` unless ``0 <= sparsity < 1`` (skipped when traced);
#: :func:`sparsejax.budgets.check_sparsity`.
check_sparsity = budgets.check_sparsity


def _check_same_structure(a, b, a_name, b_name) -> None:
  if jax.tree.structure(a) == jax.tree.structure(b):
    return
  pa, pb = paths(a), paths(b)
  only_a = [p for p in pa if p not in set(pb)]
  only_b = [p for p in pb if p not in set(pa)]
  detail = []
  if only_a:
    detail.append(f"paths only in {a_name}: {only_a[:5]}")
  if only_b:
    detail.append(f"paths only in {b_name}: {only_b[:5]}")
  if not detail:
    detail.append(f"container types differ: {jax.tree.structure(a)} vs {jax.tree.structure(b)}")
  raise ValueError(f"{a_name} does not match the structure of {b_name}; " + "; ".join(detail))


def _check_shapes(mask: PyTree, params: PyTree) -> None:
  """Raises ``ValueError`` naming the first leaf whose shapes differ."""
  if all(
    jnp.shape(m) == jnp.shape(p) for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params))
  ):
    return
  for (path, m), (_, p) in zip(named_leaves(mask), named_leaves(params)):
    if jnp.shape(m) != jnp.shape(p):
      raise ValueError(
        f"mask leaf {path!r} has shape {jnp.shape(m)} but the params leaf has shape {jnp.shape(p)}"
      )


def check_mask(mask: PyTree, params: PyTree) -> None:
  """Raises ``ValueError`` naming the path unless ``mask`` fits ``params``.

  A mask fits when it has the params' exact pytree structure and every leaf is
  a ``bool`` array of the params leaf's shape.
  """
  _check_same_structure(mask, params, "mask", "params")
  _check_shapes(mask, params)
  for path, m in named_leaves(mask):
    if jnp.result_type(m) != jnp.bool_:
      raise ValueError(
        f"mask leaf {path!r} has dtype {jnp.result_type(m)}; masks must be bool "
        "(use `mask.astype(bool)` or `x != 0`)"
      )


def check_scores(scores: PyTree, prunable: PyTree | None = None) -> None:
  """Raises ``ValueError`` naming the path of any prunable score leaf with NaN.

  Skipped for traced values (inside ``jit`` a NaN score ranks last).
  """
  flags = dict(named_leaves(prunable)) if prunable is not None else None
  for path, s in named_leaves(scores):
    if flags is not None and not flags[path]:
      continue
    if not _is_concrete(s):
      continue
    # numpy, not jnp: inside a jit trace jnp would stage out even a constant.
    n = int(np.isnan(np.asarray(s, np.float32)).sum())
    if n:
      raise ValueError(
        f"scores for {path!r} contain {n} NaN value(s); a NaN score cannot be "
        "ranked (check the loss and the scoring data)"
      )


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------


def ones_like(params: PyTree) -> PyTree:
  """The dense mask: all ``True``."""
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def apply(params: PyTree, mask: PyTree) -> PyTree:
  """Returns ``params`` with every pruned entry set to exactly ``0``.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import masks
    >>> masks.apply({"w": jnp.array([1.0, -2.0, 3.0])},
    ...             {"w": jnp.array([True, False, True])})
    {'w': Array([1., 0., 3.], dtype=float32)}

  Raises:
    ValueError: ``mask`` does not have the structure and shapes of ``params``
      (the message names the paths, as :func:`check_mask`'s).
  """
  _check_same_structure(mask, params, "mask", "params")
  _check_shapes(mask, params)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))), params, mask)


def from_params(params: PyTree) -> PyTree:
  """The mask of the nonzero entries of ``params`` (e.g. of a loaded ticket)."""
  return jax.tree.map(lambda p: jnp.asarray(p) != 0, params)


# ----------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------


def layer_sparsities(
  params: PyTree, sparsity: float, budget: budgets.Budget = budgets.ERK(), *, prunable=None
) -> dict[str, float]:
  """Per-layer sparsity of a per-layer allocation (``Uniform``, ``ERK``, ``ER``).

  Args:
    params: params pytree (only shapes are read; ``jax.ShapeDtypeStruct`` ok).
    sparsity: target sparsity in [0, 1) over the prunable layers that have no
      override.
    budget: :class:`sparsejax.budgets.Uniform`, ``ERK`` (default) or ``ER``,
      optionally ``.with_overrides(...)``. (A ``Global`` budget has no
      allocation before scores are known.)
    prunable: see :func:`prunable_tree`.

  Returns:
    ``{path: sparsity}`` for every prunable layer.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import budgets, masks
    >>> params = {"a": jnp.zeros((4, 4)), "b": jnp.zeros((8, 8))}
    >>> masks.layer_sparsities(params, 0.5, budgets.Uniform().with_overrides({"a": 0.0}))
    {'a': 0.0, 'b': 0.5}
  """
  check_sparsity(sparsity)
  budgets.check(budget)
  flags = dict(named_leaves(prunable_tree(params, prunable)))
  shapes = {p: tuple(jnp.shape(x)) for p, x in named_leaves(params) if flags[p]}
  return budget.layer_sparsities(shapes, float(sparsity))


def kept_count(n: int, sparsity) -> Any:
  """Exact kept count of a pool of ``n`` entries: ``max(1, round((1 - s) n))``.

  One rounding rule whatever ``sparsity`` is: ``1 - s`` and its product with
  ``n`` are computed in float32 (the dtype of a traced sparsity, e.g. a
  pruning schedule inside the step), then rounded half to even. So a Python
  float and the same value traced always give the same count (``s =
  0.73125`` on 240 entries keeps 64 either way, the exact half 64.5 rounded
  to even; float64 arithmetic would give 64.50000000000001, so 65).

  Returns a Python int for a Python ``sparsity`` and an ``int32`` array when
  ``sparsity`` is traced.

  Example:

    >>> from sparsejax import masks
    >>> masks.kept_count(10, 0.75), masks.kept_count(10, 0.99)  # round(2.5) is 2
    (2, 1)
  """
  if isinstance(sparsity, (int, float, np.floating, np.integer)):
    density = np.float32(1.0) - np.float32(sparsity)
    return max(1, int(np.round(density * np.float32(n))))
  k = jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * jnp.float32(n)).astype(jnp.int32)
  return jnp.maximum(k, 1)


def keep_top(flat_scores: jax.Array, k) -> jax.Array:
  """Exact top-k: keeps exactly the ``k`` highest scores, ties to the lower index.

  The selection of every mask of sparsejax (:func:`topk_mask`), for custom
  pruning and regrowth rules (e.g. dynamic sparse training). Pure and
  ``jit``-compatible; ``k`` may be traced. NaN ranks lowest and ``-0.0``
  equals ``0.0``.

  Args:
    flat_scores: float scores ``[N]`` (float16/bfloat16/float32/float64;
      float64 keeps its precision).
    k: number of entries to keep, an int or int32 scalar in ``[0, N]``.

  Returns:
    bool ``[N]`` with exactly ``k`` entries ``True``: every score above the
    k-th largest, and of the scores equal to it the ones of lowest index.

  A radix select finds the k-th largest value bit by bit from the most
  significant one (32 or 64 count passes over the scores, ``O(N)`` each, no
  sort; a ``lax.fori_loop``, so the compiled program holds one pass whatever
  the bit width); every score above it is kept, and of the scores equal to it
  the ones of lowest flat index fill the remaining places. So the count is
  exact, never a ``>=`` threshold whose ties change it.

  Example::

    >>> import jax.numpy as jnp
    >>> from sparsejax import masks
    >>> scores = jnp.array([0.5, 2.0, 0.5, 1.0, 0.5])
    >>> masks.keep_top(scores, 3)  # 2.0, 1.0 and the first of the tied 0.5s
    Array([ True,  True, False,  True, False], dtype=bool)
  """
  return keep_top_in_segments(flat_scores, jnp.reshape(k, (1,)), sizes=(jnp.shape(flat_scores)[0],))


@functools.partial(jax.jit, static_argnames="sizes")
def keep_top_in_segments(flat_scores: jax.Array, k, sizes: Sequence[int]) -> jax.Array:
  """:func:`keep_top` in each of several contiguous segments, in one pass.

  The scores of several pools laid end to end (``sizes[0]`` entries, then
  ``sizes[1]``, ...), e.g. the layers of a network flattened and
  concatenated: segment ``j`` keeps exactly its ``k[j]`` highest scores,
  ties to the lower index, as :func:`keep_top` on it alone would. One radix
  select serves every segment (per-segment counts by
  ``jax.ops.segment_sum``), so a dynamic-sparse-training step compiles one
  selection loop for all its layers, not one per layer. Jitted (``sizes``
  static): a call outside ``jit`` compiles once per shape and dtype.

  >>> import jax.numpy as jnp
  >>> from sparsejax import masks
  >>> scores = jnp.array([0.5, 2.0, 0.5, 3.0, 1.0])   # segments [0:3], [3:5]
  >>> masks.keep_top_in_segments(scores, jnp.array([2, 1]), (3, 2))
  Array([ True,  True, False,  True, False], dtype=bool)

  Args:
    flat_scores: float scores ``[N]``, ``N = sum(sizes)``.
    k: int32 ``[len(sizes)]``, each in ``[0, sizes[j]]`` (may be traced).
    sizes: the static segment sizes.

  Returns:
    bool ``[N]``.
  """
  sizes = tuple(int(n) for n in sizes)
  num = len(sizes)
  keys = sortable_bits(flat_scores)
  utype = keys.dtype
  k = jnp.asarray(k, jnp.int32).reshape(num)
  bits = 8 * jnp.dtype(utype).itemsize
  if num == 1:
    spread = lambda per_segment: per_segment[0]
    count = lambda flags: jnp.sum(flags, dtype=jnp.int32).reshape(1)
  else:
    # Segment ids from broadcasts (no N-sized constant in the program).
    seg = jnp.concatenate([jnp.full((n,), j, jnp.int32) for j, n in enumerate(sizes)])
    spread = lambda per_segment: per_segment[seg]
    count = lambda flags: jax.ops.segment_sum(
      flags.astype(jnp.int32), seg, num_segments=num, indices_are_sorted=True
    )

  def radix_pass(i, threshold):
    bit = (bits - 1 - i).astype(utype)
    candidate = threshold | (jnp.array(1, utype) << bit)
    enough = count(keys >= spread(candidate)) >= k
    return jnp.where(enough, candidate, threshold)

  # A loop, not 32 or 64 unrolled passes: a DST step selects twice in every
  # layer, and unrolled it compiled several times slower than the static step.
  threshold = spread(jax.lax.fori_loop(0, bits, radix_pass, jnp.zeros((num,), utype)))
  above = keys > threshold
  need = k - count(above)
  at = keys == threshold
  # Rank of each tie within its segment: the running count minus the count
  # before the segment's first entry.
  ties = jnp.cumsum(at, dtype=jnp.int32)
  starts = np.cumsum((0,) + sizes[:-1])
  before = jnp.zeros((1,), jnp.int32)
  if num > 1:
    before = jnp.concatenate([before, ties[starts[1:] - 1]])
  return above | (at & (ties - spread(before) <= spread(need)))


def topk_mask(
  scores: PyTree,
  sparsity=None,
  *,
  budget: budgets.Budget = budgets.Global(),
  prunable=None,
  within: PyTree | None = None,
) -> PyTree:
  """The mask keeping the highest ``scores`` under a sparsity budget.

  Pure and ``jit``-compatible. With a :class:`~sparsejax.budgets.Global` or
  :class:`~sparsejax.budgets.Uniform` budget the ``sparsity`` may be traced
  (e.g. a schedule inside ``lax.fori_loop``); ``ERK``/``ER`` allocations and
  overrides are computed from static shapes and need a Python float.

  Args:
    scores: pytree of float arrays parallel to the params; higher is kept.
    sparsity: fraction in [0, 1) of each pool's entries to prune. Always
      relative to the pool's total size, also with ``within``. ``None`` for
      an :class:`~sparsejax.budgets.NM` budget, which implies ``1 - n/m``
      (a different value is refused).
    budget: a :mod:`sparsejax.budgets` object: ``Global()`` (default, one
      ranking over all prunable entries), ``Uniform()``, ``ERK(power)``,
      ``ER(power)``, ``NM(n, m)`` (exactly ``n`` kept in every group of ``m``
      consecutive entries along axis -2, ties to the lower flat index; every
      prunable layer without an override needs an input dimension divisible
      by ``m``; overridden layers get a per-layer top-k),
      ``ConstantFanIn(base)`` (layer sparsities from ``base``, exactly
      ``k`` inputs kept per output unit), or one of them
      ``.with_overrides({regex: sparsity})`` (matching layers pruned at their
      own sparsity, outside the shared budget).
    prunable: see :func:`prunable_tree`. Non-prunable leaves get all ``True``.
    within: an existing mask; only entries it keeps can be kept (iterative
      pruning). Each pool keeps ``min(k, entries kept by within)``.

  Returns:
    A bool mask pytree parallel to ``scores``.

  Raises:
    ValueError: bad sparsity, a budget that is not a budget object (a string:
      use :func:`sparsejax.budgets.parse`), NaN scores (when not traced),
      ``within`` not matching, an override that matches no path, or (N:M) a
      sparsity other than ``1 - n/m`` or an input dimension not divisible by m.

  Example:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from sparsejax import budgets, masks
    >>> scores = {"a": jnp.array([[3.0, 1.0], [4.0, 1.0]]),
    ...           "b": jnp.array([[5.0, 9.0], [2.0, 6.0]])}
    >>> as_ints = lambda mask: jax.tree.map(lambda m: m.astype(int).tolist(), mask)
    >>> as_ints(masks.topk_mask(scores, 0.5))  # the 4 highest of the 8: 9, 6, 5, 4
    {'a': [[0, 0], [1, 0]], 'b': [[1, 1], [0, 1]]}
    >>> as_ints(masks.topk_mask(scores, 0.5, budget=budgets.Uniform()))  # 2 per layer
    {'a': [[1, 0], [1, 0]], 'b': [[0, 1], [0, 1]]}
    >>> # 1:2: one of each column (input dim 2); a's tied 1.0s keep the first.
    >>> as_ints(masks.topk_mask(scores, budget=budgets.NM(1, 2)))
    {'a': [[0, 1], [1, 0]], 'b': [[1, 1], [0, 0]]}
  """
  budgets.check(budget)
  sparsity = budget.resolve_sparsity(sparsity)
  prunable = prunable_tree(scores, prunable)
  check_scores(scores, prunable)
  if within is not None:
    check_mask(within, scores)
  shapes = {
    p: tuple(jnp.shape(x))
    for (p, x), f in zip(named_leaves(scores), jax.tree.leaves(prunable))
    if f
  }
  return select_pools(scores, budget.pools(shapes, sparsity), within=within)


def select_pools(scores: PyTree, pools, *, within: PyTree | None = None) -> PyTree:
  """The exact selection of :func:`topk_mask` over given budget pools.

  Every :class:`sparsejax.budgets.Pool` keeps its count: a joint pool one
  ranking over the entries of all its layers, any other pool each layer
  alone, an N:M pool ``n`` of every group of ``m``, a constant fan-in pool
  (``per_unit``) ``max(1, round(d · fan_in))`` inputs of every output unit
  (with ``within``: ``min`` of that and the unit's available entries,
  :func:`sparsejax.condensed.constant_fan_in_mask`); leaves in no pool get all
  ``True``. Pure and ``jit``-compatible (a pool's sparsity, or an N:M pool's
  ``n``, may be traced). Unchecked: :func:`topk_mask` checks its arguments
  and makes the pools with :meth:`sparsejax.budgets.Budget.pools`.

  Args:
    scores: pytree of float arrays; higher is kept.
    pools: the :class:`sparsejax.budgets.Pool` s (disjoint).
    within: an optional mask; only its entries can be kept.

  Returns:
    A bool mask pytree parallel to ``scores``.
  """
  names = paths(scores)
  leaves = jax.tree.leaves(scores)
  keep_in = jax.tree.leaves(within) if within is not None else [None] * len(leaves)

  def prepared(i):
    s = jnp.ravel(leaves[i])
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))  # float64 stays float64
    if keep_in[i] is not None:
      s = jnp.where(jnp.ravel(keep_in[i]), s, -jnp.inf)
    return s

  def capped(k, idx):
    if keep_in[idx[0]] is None:
      return k
    avail = sum(jnp.sum(keep_in[i]).astype(jnp.int32) for i in idx)
    return jnp.minimum(k, avail)

  out: list[Any] = [None] * len(leaves)
  for pool in pools:
    members = [i for i, p in enumerate(names) if p in pool.paths]
    if pool.group is not None:
      n, m = pool.group
      for i in members:
        out[i] = _select.nm_keep(leaves[i], n, m, keep_in[i])
    elif pool.per_unit:
      for i in members:
        shape = jnp.shape(leaves[i])
        k = kept_count(int(np.prod(shape[:-1])), pool.sparsity)
        out[i] = _select.fan_in_keep(leaves[i], k, keep_in[i])
    elif pool.joint and members:
      flat = jnp.concatenate([prepared(i) for i in members])
      keep = keep_top(flat, capped(kept_count(flat.shape[0], pool.sparsity), members))
      offset = 0
      for i in members:
        size = int(np.prod(jnp.shape(leaves[i])))
        out[i] = keep[offset : offset + size].reshape(jnp.shape(leaves[i]))
        offset += size
    else:
      for i in members:
        flat = prepared(i)
        keep = keep_top(flat, capped(kept_count(flat.shape[0], pool.sparsity), [i]))
        out[i] = keep.reshape(jnp.shape(leaves[i]))
  for i in range(len(leaves)):
    if out[i] is None:
      out[i] = jnp.ones(jnp.shape(leaves[i]), jnp.bool_)
  return jax.tree.unflatten(jax.tree.structure(scores), out)


def random_mask(
  key: jax.Array,
  params: PyTree,
  sparsity: float | None = None,
  *,
  budget: budgets.Budget = budgets.ERK(),
  prunable=None,
) -> PyTree:
  """A uniformly random mask at ``sparsity`` under ``budget`` (DST's start).

  The exact counts of :func:`topk_mask` over i.i.d. uniform scores (leaf
  ``i`` draws from the ``i``-th key of ``jax.random.split(key)``).

  Args:
    key: a PRNG key.
    params: the params pytree (only shapes are read).
    sparsity: in [0, 1); ``None`` with an ``NM`` budget.
    budget: a :mod:`sparsejax.budgets` object, default ``ERK()``.
    prunable: see :func:`prunable_tree`.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import budgets, masks
    >>> mask = masks.random_mask(jax.random.key(0), {"w": jnp.zeros((8, 4))},
    ...                          budget=budgets.NM(2, 4))
    >>> int(mask["w"].sum())
    16
  """
  budgets.check(budget)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  scores = jax.tree.unflatten(
    treedef, [jax.random.uniform(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
  )
  return topk_mask(scores, sparsity, budget=budget, prunable=prunable)


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerStats:
  path: str
  kept: int
  total: int

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total if self.total else 0.0


@dataclasses.dataclass(frozen=True)
class MaskSummary:
  """Per-layer and total counts of a mask over its prunable layers."""

  layers: tuple[LayerStats, ...]

  @property
  def kept(self) -> int:
    return sum(l.kept for l in self.layers)

  @property
  def total(self) -> int:
    return sum(l.total for l in self.layers)

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total if self.total else 0.0

  @property
  def collapsed(self) -> tuple[str, ...]:
    """Paths of prunable layers with zero active weights (layer collapse)."""
    return tuple(l.path for l in self.layers if l.kept == 0)

  def as_dict(self) -> dict:
    return {
      "sparsity": self.sparsity,
      "kept": self.kept,
      "total": self.total,
      "collapsed": list(self.collapsed),
      "layers": {
        l.path: {"kept": l.kept, "total": l.total, "sparsity": l.sparsity} for l in self.layers
      },
    }

  def __str__(self) -> str:
    width = max([len(l.path) for l in self.layers] + [5])
    rows = [f"{'layer':<{width}}  {'kept':>10}  {'total':>10}  sparsity"]
    for l in self.layers:
      flag = "  COLLAPSED" if l.kept == 0 else ""
      rows.append(f"{l.path:<{width}}  {l.kept:>10}  {l.total:>10}  {l.sparsity:8.4f}{flag}")
    rows.append(f"{'total':<{width}}  {self.kept:>10}  {self.total:>10}  {self.sparsity:8.4f}")
    return "\n".join(rows)


def summary(mask: PyTree, prunable=None) -> MaskSummary:
  """Kept/total counts per prunable layer, total sparsity, collapsed layers.

  Args:
    mask: a bool mask pytree (concrete, not traced).
    prunable: which leaves to report; see :func:`prunable_tree` (default: the
      ``ndim > 1`` leaves).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import masks
    >>> mask = {"conv": {"kernel": jnp.array([[True, False], [False, False]]),
    ...                  "bias": jnp.array([True, True])},
    ...         "dense": {"kernel": jnp.zeros((2, 3), bool)}}
    >>> s = masks.summary(mask)  # biases are not prunable, so not counted
    >>> s.kept, s.total, s.sparsity, s.collapsed
    (1, 10, 0.9, ('dense/kernel',))
  """
  flags = jax.tree.leaves(prunable_tree(mask, prunable))
  counts = jax.device_get(jax.tree.map(lambda m: jnp.sum(m, dtype=jnp.int32), mask))
  layers = tuple(
    LayerStats(path, int(c), int(np.prod(jnp.shape(m))))
    for (path, m), c, f in zip(named_leaves(mask), jax.tree.leaves(counts), flags)
    if f
  )
  return MaskSummary(layers)
