r"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding (SPEC §3).

Notation as in SPEC: θ params, m mask, ``N`` the number of prunable entries,
``p`` the fraction of the *remaining* prunable weights removed per level
(default 0.2), ``k`` the rewind step and ``T`` the last step of the training
schedule. The algorithm (Frankle & Carbin 2019; rewinding to a step ``k > 0``:
Frankle, Dziugaite, Roy & Carbin 2020)::

    θ_0 ~ init,   m_0 = 1                                  (level 0 is dense)
    θ_k = train(θ_0, steps 0..k)                           (rewind point; θ_k = θ_0 if k = 0)
    for L = 0, 1, ..., levels:
        θ_T^L   = train(θ_k ⊙ m_L, fresh optimiser state, steps k..T)
                                                            (same schedule, same data order)
        m_{L+1} = top-n_{L+1} of |θ_T^L ⊙ m_L|  over the prunable entries kept by m_L
                                                            (one global ranking)

    n_L = max(1, round((1 − p)^L · N))      density d_L = (1 − p)^L  (= 0.8^L)

Removing the fraction ``p`` of the remaining weights at every level compounds
to the density ``(1 − p)^L``; the kept count ``n_L`` is computed from it
directly (exact top-k of :func:`sparsejax.masks.topk_mask`, ties to the lower
flat index), so rounding never accumulates over levels. (OpenLTH removes
``ceil(p · remaining)`` per level instead, which can differ by a few weights.)

Fresh optimiser state at the rewind point: every moment (momentum trace, Adam
μ/ν, ...) is zero and the step counters -- the position of the learning-rate
schedule -- stay at ``k``, like the new optimiser of OpenLTH whose schedule is
advanced to the rewind step. Training then runs steps ``k..T`` with the data
order and augmentation of those steps (:func:`sparsejax.train.fit` with
``init=rewind_state(...)``).

The control experiments of the lottery-ticket literature, on the same masks:

* **random re-initialisation**: the same mask ``m_L`` on the weights of another
  initialisation ``θ'_0``: ``rewind_state(point, m_L, params=θ'_0)``;
* **random re-pruning**: every layer's mask shuffled uniformly at random
  (:func:`random_reprune_mask`: same per-layer counts, random positions), trained
  from ``θ_k``.

A *ticket* on disk (:func:`save_ticket`, :func:`load_ticket`) is a directory
with ``ticket.npz`` (the mask and the rewind weights ``θ_k ⊙ m``, one array
per leaf path) and ``meta.json``; other experiments load it as "the LTH mask".

Functions:

* :func:`level_sparsity`, :func:`prune_level`: the masks ``m_L``.
* :func:`rewind`, :func:`fresh_optimizer_state`, :func:`rewind_state`: reset
  to the rewind point.
* :func:`random_reprune_mask`: the re-pruning control.
* :func:`save_ticket`, :func:`load_ticket`, :func:`ticket_exists`.

The experiment driver is ``python -m experiments.lottery``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _paths
from sparsejax import budgets
from sparsejax import masks
from sparsejax import optim
from sparsejax import scores
from sparsejax import state as state_lib

PyTree = Any

#: Fraction of the remaining prunable weights removed per level (SPEC §3).
DEFAULT_FRACTION = 0.2
#: The budget types :func:`prune_level` accepts: one global ranking (IMP
#: default) or the same fraction of every layer (layer-wise IMP).
BUDGETS = (budgets.Global, budgets.Uniform)
#: File names of a ticket directory.
TICKET_ARRAYS = "ticket.npz"
TICKET_META = "meta.json"


# ----------------------------------------------------------------------------
# Pruning levels
# ----------------------------------------------------------------------------


def level_sparsity(level: int, fraction: float = DEFAULT_FRACTION) -> float:
  """Sparsity after ``level`` IMP levels: ``1 − (1 − fraction)^level``.

  Args:
    level: number of pruning levels, an integer ``>= 0`` (0 is dense).
    fraction: share ``p`` in (0, 1) of the remaining prunable weights removed
      per level.

  Raises:
    ValueError: a negative or non-integer level, or a fraction outside (0, 1).

  Example:

    >>> from sparsejax import lottery
    >>> round(lottery.level_sparsity(3), 6)  # 1 - 0.8 ** 3
    0.488
  """
  if isinstance(level, bool) or int(level) != level or level < 0:
    raise ValueError(f"level must be an integer >= 0, got {level!r}")
  p = float(fraction)
  if not (math.isfinite(p) and 0.0 < p < 1.0):
    raise ValueError(
        f"fraction must be in (0, 1): the share of the remaining prunable "
        f"weights removed per level (SPEC default 0.2), got {fraction!r}")
  return 1.0 - (1.0 - p) ** int(level)


def _check_enough(mask: PyTree, prunable, sparsity: float,
                  budget: budgets.Budget, level: int) -> None:
  """Raises unless ``mask`` keeps at least level ``level``'s count per pool."""
  if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
    return
  summary = masks.summary(mask, prunable)
  pools = ([(summary.kept, summary.total, "prunable weights")]
           if isinstance(budget, budgets.Global) else
           [(l.kept, l.total, repr(l.path)) for l in summary.layers])
  for kept, total, name in pools:
    need = masks.kept_count(total, sparsity)
    if kept < need:
      raise ValueError(
          f"the mask keeps {kept} of the {total} {name} but level {level} keeps "
          f"{need}: pass the mask of level {level - 1}")


def prune_level(params: PyTree, mask: PyTree, level: int,
                fraction: float = DEFAULT_FRACTION, *, prunable=None,
                budget: budgets.Budget = budgets.Global()) -> PyTree:
  """One IMP level: the mask ``m_L`` from the trained weights of level ``L − 1``.

  ``m_L`` keeps the ``n_L = max(1, round((1 − p)^L · N))`` prunable entries of
  largest ``|θ|`` among those that ``m_{L−1}`` kept (exact count, ties to the
  lower flat index), i.e. global magnitude pruning over the *remaining*
  weights removes the fraction ``p`` of them at every level. Non-prunable
  leaves stay all ``True``.

  Args:
    params: the trained params ``θ_T^{L−1}`` of level ``L − 1``.
    mask: its mask ``m_{L−1}`` (all ``True`` for level 1).
    level: ``L >= 1`` (level 0 is the dense mask: everything kept).
    fraction: ``p`` in (0, 1).
    prunable: which leaves are prunable, see
      :func:`sparsejax.masks.prunable_tree`; ``N`` counts their entries.
    budget: :class:`sparsejax.budgets.Global` ``()`` (one ranking over all
      prunable layers; the IMP default) or ``Uniform()`` (every layer keeps
      ``(1 − p)^L`` of its own entries, layer-wise IMP).

  Returns:
    The bool mask ``m_L``; it only keeps entries that ``mask`` kept.

  Raises:
    ValueError: a bad level, fraction or budget, a mask that does not fit
      ``params``, or a mask that keeps fewer weights than level ``L`` (not the
      mask of level ``L − 1``).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import lottery, masks
    >>> params = {"w": jnp.arange(1.0, 11.0).reshape(2, 5)}
    >>> m1 = lottery.prune_level(params, masks.ones_like(params), 1)  # keeps 8
    >>> m1["w"].astype(int).tolist()
    [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    >>> m2 = lottery.prune_level(params, m1, 2)  # round(0.64 * 10) = 6 of those
    >>> int(m2["w"].sum())
    6
  """
  budgets.check(budget)
  if type(budget) not in BUDGETS:
    raise ValueError(f"budget must be budgets.Global() or budgets.Uniform() for "
                     f"IMP, got {budget!r}")
  sparsity = level_sparsity(level, fraction)
  masks.check_mask(mask, params)
  flags = masks.prunable_tree(params, prunable)
  _check_enough(mask, flags, sparsity, budget, level)
  return masks.topk_mask(scores.magnitude(params, mask), sparsity,
                         budget=budget, prunable=flags, within=mask)


def random_reprune_mask(key: jax.Array, mask: PyTree) -> PyTree:
  """The random re-pruning control: each layer's mask shuffled at random.

  Every leaf of ``mask`` is permuted uniformly at random (its own key from
  ``key``), so each layer keeps exactly as many entries as in ``mask``, at
  random positions. All-``True`` leaves (non-prunable or unpruned layers) are
  unchanged, so no ``prunable`` argument is needed.

  Args:
    key: a PRNG key.
    mask: a bool mask, e.g. the ticket's ``m_L``.

  Returns:
    A bool mask with ``mask``'s structure and per-leaf counts.
  """
  masks.check_mask(mask, mask)
  leaves, treedef = jax.tree.flatten(mask)
  keys = jax.random.split(key, max(1, len(leaves)))
  return jax.tree.unflatten(treedef, [
      jax.random.permutation(k, jnp.ravel(m)).reshape(jnp.shape(m))
      for k, m in zip(keys, leaves)])


# ----------------------------------------------------------------------------
# Rewinding
# ----------------------------------------------------------------------------


def rewind(rewind_params: PyTree, mask: PyTree) -> PyTree:
  """``θ_k ⊙ m``: surviving entries get exactly their rewind-point values.

  Pruned entries are exactly ``0``. With the weights of another
  initialisation ``θ'_0`` instead of ``θ_k`` this is the random
  re-initialisation control.
  """
  masks.check_mask(mask, rewind_params)
  return masks.apply(rewind_params, mask)


def fresh_optimizer_state(opt_state, mask: PyTree):
  """``opt_state`` with every moment zeroed and its mask replaced by ``mask``.

  The moments (momentum trace, Adam μ and ν, ... -- every param-shaped part of
  the state, :func:`sparsejax.optim.reset_moments`) become 0; step counters,
  i.e. the position of the learning-rate schedule, are kept. Applied to the
  optimiser state at the rewind step ``k`` this is a new optimiser whose
  schedule starts at ``k``; at ``k = 0`` it equals ``opt.init(params)``.

  Args:
    opt_state: a state holding a :class:`sparsejax.optim.MaskedState`.
    mask: the new mask (same structure, shapes and dtype as the old one).
  """
  everywhere = jax.tree.map(lambda m: jnp.ones(jnp.shape(m), jnp.bool_),
                            optim.get_mask(opt_state))
  return optim.set_mask(optim.reset_moments(opt_state, everywhere), mask)


def rewind_state(point: state_lib.TrainState, mask: PyTree, *,
                 params: PyTree | None = None,
                 batch_stats: PyTree | None = None) -> state_lib.TrainState:
  """The train state a level starts from: ``point`` rewound under ``mask``.

  * ``step``: ``point.step`` (the rewind step ``k``), so that
    :func:`sparsejax.train.fit` continues with the schedule and the data order
    of step ``k``;
  * ``params``: :func:`rewind` of ``params`` (default ``point.params``,
    ``θ_k``) under ``mask``;
  * ``batch_stats``: ``batch_stats`` (default ``point``'s);
  * ``opt_state``: :func:`fresh_optimizer_state` holding ``mask``;
  * ``rng``: ``point``'s (the same augmentation keys at every step).

  Args:
    point: the rewind point, a sparse-format state (its optimiser state holds
      a mask; train the dense rewind run with ``mask=masks.ones_like``).
    mask: the level's mask.
    params: other weights to start from, e.g. another initialisation for the
      random re-initialisation control.
    batch_stats: batch-norm statistics to go with ``params``.

  Raises:
    ValueError: a ``point`` without a mask, or a mask that does not fit.
  """
  if point.mask is None:
    raise ValueError("the rewind point must hold a mask in its optimiser state "
                     "(train the dense run with mask=sparsejax.masks.ones_like)")
  return point.replace(
      params=rewind(point.params if params is None else params, mask),
      batch_stats=point.batch_stats if batch_stats is None else batch_stats,
      opt_state=fresh_optimizer_state(point.opt_state, mask))


# ----------------------------------------------------------------------------
# Ticket files
# ----------------------------------------------------------------------------


def _nest(flat: Mapping[str, Any]) -> dict:
  """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
  tree: dict = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = value
  return tree


def _flat_arrays(tree: PyTree, what: str) -> dict[str, np.ndarray]:
  """``{path: host array}``; refuses trees that do not read back as nested dicts."""
  flat = {p: np.asarray(jax.device_get(x)) for p, x in masks.named_leaves(tree)}
  if len(flat) != len(jax.tree.leaves(tree)) or (
      jax.tree.structure(_nest(flat)) != jax.tree.structure(tree)):
    raise ValueError(
        f"a ticket stores its {what} as nested dicts of arrays (Flax linen "
        f"params); this pytree does not read back as one: "
        f"{jax.tree.structure(tree)}")
  return flat


def ticket_exists(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds a complete ticket (its ``meta.json`` is last)."""
  return epath.Path(directory, TICKET_META).is_file()


def save_ticket(directory: str | os.PathLike, mask: PyTree,
                rewind_params: PyTree, meta: Mapping[str, Any] | None = None
                ) -> str:
  """Writes a ticket: the mask, the rewind weights ``θ_k ⊙ m`` and metadata.

  ``directory/ticket.npz`` holds one array per leaf, named ``mask/<path>``
  (bool) and ``params/<path>`` (the weights as given, normally
  :func:`rewind` ``(θ_k, mask)``), ``<path>`` as in
  :func:`sparsejax.masks.named_leaves` (``"Conv_0/kernel"``).
  ``directory/meta.json`` is written last (each file atomically), so a ticket
  is complete exactly when :func:`ticket_exists`. Only process 0 writes.

  Args:
    directory: created if needed; an existing ticket there is replaced.
    mask: bool mask parallel to ``rewind_params``.
    rewind_params: the weights a run with this ticket starts from.
    meta: JSON-serialisable metadata (model, dataset, level, density, ...).

  Returns:
    ``directory`` as an absolute path (a URI such as ``gs://...``, any
    ``etils.epath`` location, as given).

  Raises:
    ValueError: a mask that does not fit, or params that are not nested dicts.
  """
  directory = str(_paths.resolve(directory))
  masks.check_mask(mask, rewind_params)
  arrays = {f"mask/{p}": x for p, x in _flat_arrays(mask, "mask").items()}
  arrays.update({f"params/{p}": x for p, x in
                 _flat_arrays(rewind_params, "rewind params").items()})
  if jax.process_index() != 0:
    return directory
  root = epath.Path(directory)
  root.mkdir(parents=True, exist_ok=True)
  meta_path = root / TICKET_META
  if meta_path.exists():
    meta_path.unlink()
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _paths.write_bytes(root / TICKET_ARRAYS, buffer.getvalue())
  _paths.write_text(meta_path, json.dumps(dict(meta or {}), indent=2,
                                          sort_keys=True) + "\n")
  return directory


def load_ticket(directory: str | os.PathLike) -> tuple[dict, dict, dict]:
  """Reads a ticket written by :func:`save_ticket`.

  The mask is "the LTH mask": pass it to :func:`sparsejax.train.fit`
  (``mask=``) to train it from any initialisation, or start from the rewind
  weights too with :func:`rewind_state` (``params=rewind_params``).

  Returns:
    ``(mask, rewind_params, meta)``: the mask (bool) and the rewind weights as
    nested dicts of numpy arrays, the structure of Flax linen params, and the
    metadata dict.

  Raises:
    FileNotFoundError: ``directory`` holds no complete ticket.
  """
  directory = os.fspath(directory)
  if not ticket_exists(directory):
    raise FileNotFoundError(
        f"no lottery ticket in {directory!r}: {TICKET_META} is missing (write "
        "one with sparsejax.lottery.save_ticket or python -m experiments.lottery)")
  root = epath.Path(directory)
  with np.load(io.BytesIO((root / TICKET_ARRAYS).read_bytes())) as z:
    mask = _nest({k[len("mask/"):]: z[k] for k in z.files
                  if k.startswith("mask/")})
    params = _nest({k[len("params/"):]: z[k] for k in z.files
                    if k.startswith("params/")})
  meta = json.loads((root / TICKET_META).read_text())
  return mask, params, meta
