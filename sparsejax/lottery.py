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

Other per-level schedules (:func:`level_sparsities`): ``"linear"``, the
sparsity ``s_L = (L / levels) · s_final`` (e.g. the MNIST-1D lottery-ticket
notebook's 100 levels), or an explicit list ``s_1 ≤ s_2 ≤ ...``; each level
keeps ``max(1, round((1 − s_L) · N))`` entries. The weights a level is pruned
from may be those of a chosen step ``p`` of its training
(``prune_from_step``), not only the final ``θ_T^L``: ``m_{L+1}`` is the
top-``n_{L+1}`` of ``|θ_p^L ⊙ m_L|`` (the level still trains to ``T``).
:func:`imp` runs the whole level loop (train, prune, rewind, retrain) around
any training function.

Functions:

* :func:`imp`: the level loop; :class:`Level`, :class:`IMPResult`.
* :func:`level_sparsity`, :func:`level_sparsities`, :func:`prune_level`,
  :func:`prune_to`: the masks ``m_L``.
* :func:`rewind`, :func:`fresh_optimizer_state`, :func:`rewind_state`: reset
  to the rewind point.
* :func:`random_reprune_mask`: the re-pruning control.
* :func:`save_ticket`, :func:`load_ticket`, :func:`ticket_exists`.

The experiment driver is ``python -m experiments.lottery``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import io
import json
import math
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _checks
from sparsejax import _paths
from sparsejax import budgets
from sparsejax import masks
from sparsejax import optim
from sparsejax import scores
from sparsejax import state as state_lib

PyTree = Any

#: Fraction of the remaining prunable weights removed per level (SPEC §3).
DEFAULT_FRACTION = 0.2
#: Per-level sparsity schedules of :func:`level_sparsities`.
SCHEDULES = ("geometric", "linear", "explicit")
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
      f"weights removed per level (SPEC default 0.2), got {fraction!r}"
    )
  return 1.0 - (1.0 - p) ** int(level)


def level_sparsities(
  levels: int | None = None,
  schedule: str = "geometric",
  *,
  fraction: float = DEFAULT_FRACTION,
  final_sparsity: float | None = None,
  sparsities: Sequence[float] | None = None,
) -> tuple[float, ...]:
  """The sparsity of every IMP level ``0`` to ``levels`` (level 0 is dense).

  * ``"geometric"`` (default, SPEC §3): ``s_L = 1 − (1 − p)^L`` with
    ``p = fraction``, the fraction of the remaining weights removed per level;
  * ``"linear"``: ``s_L = (L / levels) · final_sparsity`` (equal steps of
    sparsity, e.g. 100 levels to 0.99);
  * ``"explicit"``: ``s_L = sparsities[L − 1]`` for ``L = 1 .. len(sparsities)``
    (``levels`` defaults to, and must equal, that length).

  Args:
    levels: number of pruning levels (``>= 0``); required unless explicit.
    schedule: one of :data:`SCHEDULES`.
    fraction: ``p`` in (0, 1) of the geometric schedule.
    final_sparsity: ``s_levels`` in [0, 1) of the linear schedule.
    sparsities: the explicit levels' sparsities, each in [0, 1) and
      non-decreasing (a level prunes among the weights the previous kept).

  Returns:
    ``(s_0 = 0.0, s_1, ..., s_levels)``.

  Raises:
    ValueError: an unknown schedule, a missing or bad argument, or explicit
      sparsities that are out of range or decrease.

  Example:

    >>> from sparsejax import lottery
    >>> lottery.level_sparsities(4, "linear", final_sparsity=0.8)
    (0.0, 0.2, 0.4, 0.6, 0.8)
    >>> lottery.level_sparsities(schedule="explicit", sparsities=(0.5, 0.9))
    (0.0, 0.5, 0.9)
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if schedule == "explicit":
    if sparsities is None or len(sparsities) == 0:
      raise ValueError(
        f"the explicit schedule needs sparsities=(s_1, s_2, ...), got {sparsities!r}"
      )
    values = tuple(
      _checks.number(v, f"sparsities[{i}]", 0.0, 1.0, hi_open=True)
      for i, v in enumerate(sparsities)
    )
    for i in range(1, len(values)):
      if values[i] < values[i - 1]:
        raise ValueError(
          f"sparsities must not decrease (a level prunes among the weights "
          f"the previous level kept), got sparsities[{i - 1}]={values[i - 1]} "
          f"> sparsities[{i}]={values[i]}"
        )
    if levels is not None and levels != len(values):
      raise ValueError(
        f"levels={levels!r} but the explicit schedule has "
        f"{len(values)} sparsities: leave levels unset"
      )
    return (0.0, *values)
  if sparsities is not None:
    raise ValueError(f"sparsities are for schedule='explicit', not {schedule!r}")
  if levels is None:
    raise ValueError(f"the {schedule} schedule needs levels (an integer >= 0)")
  levels = _checks.step(levels, "levels")
  if schedule == "geometric":
    return tuple(level_sparsity(l, fraction) for l in range(levels + 1))
  if final_sparsity is None:
    raise ValueError("the linear schedule needs final_sparsity in [0, 1)")
  final = _checks.number(final_sparsity, "final_sparsity", 0.0, 1.0, hi_open=True)
  return tuple(round(final * l / levels, 12) if levels else 0.0 for l in range(levels + 1))


def _check_enough(
  mask: PyTree, prunable, sparsity: float, budget: budgets.Budget, what: str
) -> None:
  """Raises unless ``mask`` keeps at least ``sparsity``'s count per pool."""
  if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
    return
  summary = masks.summary(mask, prunable)
  pools = (
    [(summary.kept, summary.total, "prunable weights")]
    if isinstance(budget, budgets.Global)
    else [(l.kept, l.total, repr(l.path)) for l in summary.layers]
  )
  for kept, total, name in pools:
    need = masks.kept_count(total, sparsity)
    if kept < need:
      raise ValueError(f"the mask keeps {kept} of the {total} {name} but " + what.format(need=need))


def prune_level(
  params: PyTree,
  mask: PyTree,
  level: int,
  fraction: float = DEFAULT_FRACTION,
  *,
  prunable=None,
  budget: budgets.Budget = budgets.Global(),
) -> PyTree:
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
  sparsity = level_sparsity(level, fraction)
  return _prune(
    params,
    mask,
    sparsity,
    prunable,
    budget,
    f"level {level} keeps {{need}}: pass the mask of level {level - 1}",
  )


def prune_to(
  params: PyTree,
  mask: PyTree,
  sparsity: float,
  *,
  prunable=None,
  budget: budgets.Budget = budgets.Global(),
) -> PyTree:
  """Magnitude pruning to ``sparsity`` among the entries ``mask`` keeps.

  The mask of any IMP level (:func:`prune_level` is this at the geometric
  level's sparsity): the ``max(1, round((1 − s) · N))`` prunable entries of
  largest ``|θ ⊙ m|`` (exact count, ties to the lower flat index), ``N``
  counting all prunable entries (per layer with ``budget=Uniform()``).

  Args:
    params: the weights to prune from (e.g. a level's trained weights, or
      those of a chosen step of its training).
    mask: the previous level's mask.
    sparsity: the new level's sparsity in [0, 1), at least the sparsity of
      ``mask``.
    prunable, budget: as in :func:`prune_level`.

  Returns:
    The bool mask; it only keeps entries that ``mask`` kept.

  Raises:
    ValueError: a bad budget or sparsity, a mask that does not fit, or one
      that keeps fewer weights than ``sparsity`` does.
  """
  budgets.check_sparsity(sparsity)
  return _prune(
    params,
    mask,
    float(sparsity),
    prunable,
    budget,
    f"sparsity {sparsity} keeps {{need}}: pass a mask that keeps at least as many",
  )


def _prune(params, mask, sparsity, prunable, budget, what):
  budgets.check(budget)
  if type(budget) not in BUDGETS:
    raise ValueError(
      f"budget must be budgets.Global() or budgets.Uniform() for IMP, got {budget!r}"
    )
  masks.check_mask(mask, params)
  flags = masks.prunable_tree(params, prunable)
  _check_enough(mask, flags, sparsity, budget, what)
  return masks.topk_mask(
    scores.magnitude(params, mask), sparsity, budget=budget, prunable=flags, within=mask
  )


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
  return jax.tree.unflatten(
    treedef,
    [jax.random.permutation(k, jnp.ravel(m)).reshape(jnp.shape(m)) for k, m in zip(keys, leaves)],
  )


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
  everywhere = jax.tree.map(lambda m: jnp.ones(jnp.shape(m), jnp.bool_), optim.get_mask(opt_state))
  return optim.set_mask(optim.reset_moments(opt_state, everywhere), mask)


def rewind_state(
  point: state_lib.TrainState,
  mask: PyTree,
  *,
  params: PyTree | None = None,
  batch_stats: PyTree | None = None,
) -> state_lib.TrainState:
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
    raise ValueError(
      "the rewind point must hold a mask in its optimiser state "
      "(train the dense run with mask=sparsejax.masks.ones_like)"
    )
  return point.replace(
    params=rewind(point.params if params is None else params, mask),
    batch_stats=point.batch_stats if batch_stats is None else batch_stats,
    opt_state=fresh_optimizer_state(point.opt_state, mask),
  )


# ----------------------------------------------------------------------------
# The level loop
# ----------------------------------------------------------------------------


TrainFn = Callable[[str, state_lib.TrainState, "int | None"], state_lib.TrainState]
"""``train_fn(name, state, stop_at_step) -> state``: trains ``state`` up to the
global step ``stop_at_step`` (``None``: to the end of the schedule) and
returns the state reached. ``name`` is the stage, ``"rewind_point"`` or
``"level_<L>"`` (e.g. a run subdirectory); one level may be trained in two
calls of the same name, the second continuing from the first's state (a
:func:`sparsejax.train.fit` in ``workdir/name`` with ``init=state``
and ``stop_at_step`` does exactly this, resuming from its checkpoint)."""


@dataclasses.dataclass(frozen=True)
class Level:
  """One finished IMP level.

  Attributes:
    level: ``L`` (0 is dense).
    sparsity: the schedule's nominal sparsity ``s_L``.
    mask: ``m_L``, the mask the level trained.
    kept: prunable entries kept by ``m_L``; total: all prunable entries.
  """

  level: int
  sparsity: float
  mask: PyTree
  kept: int
  total: int


@dataclasses.dataclass(frozen=True)
class IMPResult:
  """What :func:`imp` returns.

  Attributes:
    levels: one :class:`Level` per level, in order.
    point: the rewind point (the state at ``rewind_step``).
    state: the trained state of the last level.
  """

  levels: tuple[Level, ...]
  point: state_lib.TrainState
  state: state_lib.TrainState


def imp(
  init: state_lib.TrainState,
  train_fn: TrainFn,
  sparsities: Sequence[float],
  *,
  rewind_step: int = 0,
  prune_from_step: int | None = None,
  prunable=None,
  budget: budgets.Budget = budgets.Global(),
  callback: Callable[[Level, state_lib.TrainState], None] | None = None,
  known_masks: Mapping[int, PyTree] | None = None,
) -> IMPResult:
  r"""Iterative magnitude pruning with rewinding: the whole level loop (SPEC §3).

  Frankle & Carbin (2019), rewinding to step ``k`` as in Frankle et al.
  (2020), with any per-level sparsity schedule and pruning from the weights
  of any step ``p`` of a level's training::

      θ_k = train_fn("rewind_point", init, k)          (θ_0 = init if k = 0)
      m_0 = 1
      for L = 0 .. levels:
          state = rewind_state(θ_k, m_L)               (θ_k ⊙ m_L, fresh moments, step k)
          θ_p^L = train_fn("level_L", state, p)        (only with prune_from_step)
          θ_T^L = train_fn("level_L", ..., None)       (to the end of the schedule)
          m_{L+1} = prune_to(θ_p^L or θ_T^L, m_L, s_{L+1})

  Args:
    init: the initial train state in the sparse format (its optimiser state
      holds an all-``True`` mask: ``create_train_state(..., mask=masks.ones_like)``).
    train_fn: trains a state, see :data:`TrainFn`.
    sparsities: ``(s_0 = 0, s_1, ..., s_levels)``, e.g.
      :func:`level_sparsities`.
    rewind_step: ``k >= 0``, the step the surviving weights rewind to.
    prune_from_step: ``p > k``: prune from the weights of global step ``p`` of
      each level's training instead of its final weights (``None``, default).
    prunable, budget: as in :func:`prune_to`.
    callback: ``callback(level, trained_state)`` after each level (e.g.
      evaluate it, save its ticket with :func:`save_ticket`).
    known_masks: ``{L: m_L}``, masks already computed (e.g. read back from
      the tickets of an interrupted run): level ``L`` takes ``m_L`` instead of
      pruning again, and level ``L − 1`` then trains in one call (its step-``p``
      weights are not needed). Default none.

  Returns:
    An :class:`IMPResult`.

  Raises:
    ValueError: a schedule that does not start dense or decreases, a bad
      ``rewind_step`` or ``prune_from_step``, an ``init`` without a mask, or a
      ``train_fn`` that stops at another step than asked.
  """
  sparsities = tuple(float(v) for v in sparsities)
  if not sparsities or sparsities[0] != 0.0:
    raise ValueError(f"sparsities must start with level 0 at 0.0 (dense), got {sparsities[:1]}")
  level_sparsities(schedule="explicit", sparsities=sparsities)  # range, order
  rewind_step = _checks.step(rewind_step, "rewind_step")
  if prune_from_step is not None:
    prune_from_step = _checks.step(prune_from_step, "prune_from_step", rewind_step + 1)
  if init.mask is None:
    raise ValueError(
      "init must hold a mask in its optimiser state (create it with mask=sparsejax.masks.ones_like)"
    )

  def run(name, state, stop):
    out = train_fn(name, state, stop)
    if stop is not None and int(out.step) != stop:
      raise ValueError(
        f"train_fn({name!r}, ..., {stop}) returned a state at step {int(out.step)}, not {stop}"
      )
    return out

  point = run("rewind_point", init, rewind_step) if rewind_step else init
  if int(point.step) != rewind_step:
    raise ValueError(
      f"the rewind point is at step {int(point.step)}, not rewind_step={rewind_step}"
    )
  flags = masks.prunable_tree(point.params, prunable)
  mask = masks.ones_like(point.params)
  known = dict(known_masks or {})
  levels, state, source = [], point, None
  for level, sparsity in enumerate(sparsities):
    if level in known:
      masks.check_mask(known[level], point.params)
      mask = jax.tree.map(jnp.asarray, known[level])
    elif level:
      mask = prune_to(source, mask, sparsity, prunable=flags, budget=budget)
    name = f"level_{level}"
    state = rewind_state(point, mask)
    needed = level + 1 < len(sparsities) and level + 1 not in known
    if prune_from_step is not None and needed:
      state = run(name, state, prune_from_step)
      source = state.params
    state = run(name, state, None)
    if prune_from_step is None:
      source = state.params
    summary = masks.summary(mask, flags)
    done = Level(level, sparsity, mask, summary.kept, summary.total)
    levels.append(done)
    if callback is not None:
      callback(done, state)
  return IMPResult(tuple(levels), point, state)


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
    jax.tree.structure(_nest(flat)) != jax.tree.structure(tree)
  ):
    raise ValueError(
      f"a ticket stores its {what} as nested dicts of arrays (Flax linen "
      f"params); this pytree does not read back as one: "
      f"{jax.tree.structure(tree)}"
    )
  return flat


def ticket_exists(directory: str | os.PathLike) -> bool:
  """Whether ``directory`` holds a complete ticket (its ``meta.json`` is last)."""
  return epath.Path(directory, TICKET_META).is_file()


def save_ticket(
  directory: str | os.PathLike,
  mask: PyTree,
  rewind_params: PyTree,
  meta: Mapping[str, Any] | None = None,
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
  arrays.update({f"params/{p}": x for p, x in _flat_arrays(rewind_params, "rewind params").items()})
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
  _paths.write_text(meta_path, json.dumps(dict(meta or {}), indent=2, sort_keys=True) + "\n")
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
      "one with sparsejax.lottery.save_ticket or python -m experiments.lottery)"
    )
  root = epath.Path(directory)
  with np.load(io.BytesIO((root / TICKET_ARRAYS).read_bytes())) as z:
    mask = _nest({k[len("mask/") :]: z[k] for k in z.files if k.startswith("mask/")})
    params = _nest({k[len("params/") :]: z[k] for k in z.files if k.startswith("params/")})
  meta = json.loads((root / TICKET_META).read_text())
  return mask, params, meta
