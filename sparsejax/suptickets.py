"""Sup-tickets: cheap tickets from cyclic learning rates, superposed (SPEC §6).

Yin et al. 2022, "Superposing many tickets into one". Within the usual budget
of ``E`` epochs a dynamic-sparse-training method (GraNet, RigL, SET;
:mod:`sparsejax.dst`) trains with its normal schedule, compressed into the
first ``E − C·M`` epochs (the *DST phase*); then ``M`` cycles of ``C`` epochs
follow with the periodic mask updates off and

* one large drop-and-regrow at each cycle start: fraction 0.5 of each
  layer's active weights, magnitude drop, gradient growth
  (:meth:`Plan.mask_updates`, an ``extra_updates`` entry of
  :func:`sparsejax.dst.dynamic_sparse`);
* a cyclic learning rate per iteration, triangular ``lr1 → lr2 → lr1``
  (reference 0.001 and 0.005) or cosine (:func:`cyclic_lr`,
  :meth:`Plan.learning_rate`, from optax schedules).

At every cycle end the current weights are a cheap *ticket*; the
:class:`Superpose` callback of :func:`sparsejax.train.fit` averages it into the
running model (cumulative mean ``θ̄ ← θ̄ + (θ − θ̄)/(k + 1)``, or an EMA with
a fixed factor; :func:`superpose`), re-prunes the average globally by
magnitude to the tickets' exact count (:func:`reprune`), recomputes its
batch-norm statistics on the training data
(:func:`sparsejax.batch_stats.recompute_batch_stats`) and evaluates it. Training
continues from the trained weights, not the superposed ones; the result is
the last superposed model. The hook's state (the running average, the
superposed model, the ticket counter) is checkpointed with the train state,
so a run killed anywhere (mid-cycle included) resumes bitwise.

Usage with RigL (``E = 250``, ``M = 3``, ``C = 8``)::

  plan = sj.suptickets.Plan(num_epochs=250, num_cycles=3, cycle_epochs=8,
                            steps_per_epoch=spe)
  # the normal schedules, over the DST phase only
  base_lr = optax.piecewise_constant_schedule(
      0.1, {plan.dst_steps // 2: 0.1, 3 * plan.dst_steps // 4: 0.1})
  inner = sj.schedules.make_optimizer(plan.learning_rate(base_lr),
                                      weight_decay=5e-4)
  tx = sj.dst.rigl_optimizer(inner, mask_fn, end_step=int(0.75 * plan.dst_steps),
                             extra_updates=plan.mask_updates())
  sup = sj.suptickets.Superpose(plan)
  init = lambda: sj.state.create_train_state(model, tx, sample, jax.random.key(0))
  result = sj.train.fit(model, ds, workdir, init=init, num_epochs=250,
                        batch_size=128, hooks=[sup.hook()],
                        callbacks=[sup.callback()])
  sup = result.hook_states["suptickets"]   # params, batch_stats, mask, ...

``experiments.suptickets`` builds the same from a config
(``config.suptickets``; ``experiments.common.make_dst_optimizer``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import _checks
from sparsejax import dst
from sparsejax import hooks
from sparsejax import masks
from sparsejax import modeling
from sparsejax import schedules
from sparsejax import train

PyTree = Any

#: Shapes of the cyclic learning rate.
LR_SHAPES = ("triangular", "cosine")


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def cyclic_lr(
  lr1: float, lr2: float, cycle_steps: int, shape: str = "triangular"
) -> optax.Schedule:
  """The cyclic learning rate ``lr1 → lr2 → lr1``, repeating every ``cycle_steps``.

  Iteration ``i`` of a cycle (``i = t mod cycle_steps``) gets ``lr1`` at
  ``i = 0`` and ``lr2`` at ``i = h = ⌊cycle_steps / 2⌋``:

  * ``"triangular"`` (default): linear up ``lr1 + (lr2 − lr1)·i/h``, then
    linear down ``lr2 + (lr1 − lr2)·(i − h)/(cycle_steps − h)``;
  * ``"cosine"``: the same end points along half cosines.

  One cycle is ``optax.join_schedules`` of two ``optax.linear_schedule`` s
  (or ``optax.cosine_decay_schedule`` s); ``t`` may be traced.

  >>> from sparsejax import suptickets
  >>> lr = suptickets.cyclic_lr(0.001, 0.005, 8)
  >>> [round(float(lr(t)), 4) for t in (0, 2, 4, 6, 8)]
  [0.001, 0.003, 0.005, 0.003, 0.001]

  Args:
    lr1: the rate at the start (and end) of a cycle (reference 0.001).
    lr2: the rate at mid-cycle (reference 0.005).
    cycle_steps: steps per cycle, at least 2.
    shape: ``"triangular"`` or ``"cosine"``.

  Returns:
    An optax schedule ``t -> lr``.
  """
  if shape not in LR_SHAPES:
    raise ValueError(f"shape must be one of {LR_SHAPES}, got {shape!r}")
  cycle_steps = int(cycle_steps)
  if cycle_steps < 2:
    raise ValueError(f"cycle_steps must be >= 2, got {cycle_steps}")
  if lr1 <= 0 or lr2 <= 0:
    raise ValueError(f"lr1 and lr2 must be positive, got {lr1} and {lr2}")
  lr1, lr2 = float(lr1), float(lr2)
  half = cycle_steps // 2
  if shape == "triangular":
    up = optax.linear_schedule(lr1, lr2, half)
    down = optax.linear_schedule(lr2, lr1, cycle_steps - half)
  else:
    rise = optax.cosine_decay_schedule(lr2, half, alpha=lr1 / lr2)
    up = lambda i: lr1 + lr2 - rise(i)  # lr1 at 0, lr2 at half
    down = optax.cosine_decay_schedule(lr2, cycle_steps - half, alpha=lr1 / lr2)
  one = optax.join_schedules([up, down], [half])
  return lambda t: one(jnp.mod(jnp.asarray(t, jnp.int32), cycle_steps))


@dataclasses.dataclass(frozen=True)
class Plan:
  """The schedule of one Sup-tickets run of ``E`` epochs (SPEC §6).

  Epochs ``1 .. E − C·M`` are the DST phase; cycle ``j = 1 .. M`` covers
  epochs ``E − C·M + (j − 1)·C + 1 .. E − C·M + j·C`` and starts at step
  ``dst_steps + (j − 1)·cycle_steps``.

  Attributes:
    num_epochs: ``E``, the whole budget (reference 250).
    num_cycles: ``M`` (reference 3).
    cycle_epochs: ``C`` (reference 8).
    steps_per_epoch: optimiser steps per epoch
      (:func:`sparsejax.schedules.steps_per_epoch`).
  """

  num_epochs: int
  num_cycles: int
  cycle_epochs: int
  steps_per_epoch: int

  def __post_init__(self):
    for name in ("num_epochs", "num_cycles", "cycle_epochs", "steps_per_epoch"):
      _checks.step(getattr(self, name), f"Plan.{name}", 1)
    if self.dst_epochs < 1:
      raise ValueError(
        f"the cycles ({self.num_cycles} x {self.cycle_epochs} epochs) leave no DST "
        f"phase in {self.num_epochs} epochs"
      )
    if self.cycle_steps < 2:
      raise ValueError("a cycle needs at least 2 steps")

  @property
  def dst_epochs(self) -> int:
    """``E − C·M``, the epochs of the DST phase."""
    return self.num_epochs - self.num_cycles * self.cycle_epochs

  @property
  def dst_steps(self) -> int:
    """Steps of the DST phase; the first cycle starts at this step."""
    return self.dst_epochs * self.steps_per_epoch

  @property
  def cycle_steps(self) -> int:
    return self.cycle_epochs * self.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  @property
  def cycle_start_steps(self) -> tuple[int, ...]:
    """The step of each cycle's large drop-and-regrow."""
    return tuple(self.dst_steps + j * self.cycle_steps for j in range(self.num_cycles))

  @property
  def cycle_end_epochs(self) -> tuple[int, ...]:
    """The (1-based) epoch at whose end each cycle's ticket is taken."""
    return tuple(self.dst_epochs + (j + 1) * self.cycle_epochs for j in range(self.num_cycles))

  def is_cycle_start(self, t) -> jax.Array:
    """Whether step ``t`` (may be traced) starts a cycle."""
    return dst.is_update_step(
      t, update_every=self.cycle_steps, start_step=self.dst_steps, end_step=self.total_steps
    )

  def learning_rate(
    self,
    dst_schedule: optax.Schedule,
    lr1: float = 0.001,
    lr2: float = 0.005,
    shape: str = "triangular",
  ) -> optax.Schedule:
    """``dst_schedule`` for the DST phase, then :func:`cyclic_lr` in every cycle.

    ``optax.join_schedules([dst_schedule, cyclic_lr(lr1, lr2, cycle_steps,
    shape)], [dst_steps])``: ``dst_schedule`` is the method's normal
    schedule over the ``dst_steps`` of the phase (e.g.
    :func:`sparsejax.schedules.lr_schedule` of the config with
    ``num_epochs = dst_epochs``).

    The schedule reads the optimiser's own step count. A DST optimiser with
    ``skip_update=True`` (the default) leaves that count alone on its
    mask-update steps (SPEC §4), so after ``u`` mask updates the rate is the
    one of step ``t − u``: the cyclic part starts ``u`` steps after the
    first cycle's large drop-and-regrow (a few of its thousands of steps at
    the reference ``ΔT``).
    """
    return optax.join_schedules(
      [dst_schedule, cyclic_lr(lr1, lr2, self.cycle_steps, shape)], [self.dst_steps]
    )

  def mask_updates(
    self, fraction: float = 0.5, prunable=None
  ) -> list[tuple[dst.StepPredicate, dst.MaskUpdate]]:
    """The large drop-and-regrow at each cycle start, for ``extra_updates``.

    At :attr:`cycle_start_steps` every prunable layer drops ``⌊fraction ·
    n_active⌋`` weights by magnitude and grows as many by dense gradient
    magnitude (:func:`sparsejax.dst.drop_and_grow_rule`). Pass the result
    as ``extra_updates`` of :func:`sparsejax.dst.rigl_optimizer`
    (``set_optimizer``, ``gmp_optimizer``, ``granet_optimizer``,
    ``dynamic_sparse``) whose periodic updates end within the
    DST phase (``end_step`` / ``regrow_end_step <= dst_steps``): then no
    periodic update happens after it.

    Args:
      fraction: the drop fraction (reference 0.5).
      prunable: which leaves change (default: every kernel).
    """
    if not 0 < fraction <= 1:
      raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return [(self.is_cycle_start, dst.drop_and_grow_rule(float(fraction), "gradient", prunable))]


# ----------------------------------------------------------------------------
# Superposition
# ----------------------------------------------------------------------------


def superpose(average: PyTree, ticket: PyTree, count, ema: float | None = None) -> PyTree:
  """The running average after one more ticket.

  ``count`` tickets are in ``average`` already. Cumulative mean (default):
  ``θ̄ + (θ − θ̄)/(count + 1)``, so after ``k`` tickets ``θ̄`` is their
  arithmetic mean. With ``ema = β``: ``(1 − β)·θ̄ + β·θ``, the first ticket
  taken as is. ``count`` may be traced.

  Args:
    average: the running average (any pytree of float arrays).
    ticket: the new ticket, same structure.
    count: number of tickets in ``average``.
    ema: ``None`` (cumulative mean) or the EMA factor ``β ∈ (0, 1]``.
  """
  count = jnp.asarray(count, jnp.float32)
  if ema is None:
    weight = 1.0 / (count + 1.0)
  else:
    weight = jnp.where(count == 0, 1.0, jnp.float32(ema))
  return jax.tree.map(
    lambda a, t: (a + (t - a) * weight.astype(a.dtype)).astype(a.dtype), average, ticket
  )


def reprune(params: PyTree, num_kept, prunable=None) -> tuple[PyTree, PyTree]:
  """Global magnitude pruning to exactly ``num_kept`` prunable weights.

  One ranking of ``|θ|`` over every prunable entry (exact top-k, ties to the
  lower flat index, :func:`sparsejax.masks.keep_top`); non-prunable leaves
  are kept whole.

  Args:
    params: the weights (e.g. the superposed ones).
    num_kept: how many prunable entries to keep (may be traced), e.g. the
      number of active weights of a ticket's mask.
    prunable: see :func:`sparsejax.masks.prunable_tree` (default: kernels).

  Returns:
    ``(pruned params, mask)``: pruned entries exactly 0.
  """
  flags = masks.prunable_tree(params, prunable)
  leaves, treedef = jax.tree.flatten(params)
  flag_leaves = jax.tree.leaves(flags)
  pooled = [i for i, f in enumerate(flag_leaves) if f]
  out = [jnp.ones(jnp.shape(x), bool) for x in leaves]
  if pooled:
    flat = jnp.concatenate([jnp.abs(jnp.ravel(leaves[i])).astype(jnp.float32) for i in pooled])
    keep = masks.keep_top(flat, num_kept)
    offset = 0
    for i in pooled:
      size = leaves[i].size
      out[i] = keep[offset : offset + size].reshape(leaves[i].shape)
      offset += size
  mask = jax.tree.unflatten(treedef, out)
  return masks.apply(params, mask), mask


def prunable_count(mask: PyTree, prunable=None) -> jax.Array:
  """Number of active entries of ``mask`` in its prunable leaves (``int32``)."""
  flags = jax.tree.leaves(masks.prunable_tree(mask, prunable))
  return sum(
    (jnp.sum(m, dtype=jnp.int32) for m, f in zip(jax.tree.leaves(mask), flags) if f),
    jnp.zeros((), jnp.int32),
  )


class Superpose(hooks.Callback):
  """The :func:`sparsejax.train.fit` callback that superposes the tickets of a
  :class:`Plan`, with its state in a step hook (:meth:`Superpose.hook`): pass
  ``hooks=[sup.hook()], callbacks=[sup]``.

  At the end of each epoch of :attr:`Plan.cycle_end_epochs` (on the host):

  1. the trained weights are the ticket: :func:`superpose` into the running
     average (cumulative mean, or EMA with ``ema``);
  2. :func:`reprune` the average to the ticket mask's count of prunable
     weights (the target sparsity, exactly);
  3. :func:`sparsejax.batch_stats.recompute_batch_stats` of the pruned average on
     the training set (no augmentation);
  4. evaluate the ticket (``evaluate_tickets``) and the superposed model on
     the test set (``FitContext.evaluate``).

  The train state is returned unchanged: training continues from the ticket.
  The epoch record of a cycle end gets ``cycle`` (1-based),
  ``ticket_test_loss`` / ``ticket_test_accuracy``,
  ``superposed_test_loss`` / ``superposed_test_accuracy`` and
  ``superposed_sparsity``. The state of :meth:`hook`, checkpointed with the
  train state, is ``{"tickets": int32 count, "average": running average,
  "params": superposed (pruned) params, "mask": their mask,
  "batch_stats": their statistics}`` (no ``batch_stats`` for a model
  without); before the first cycle end ``params`` and ``average`` are 0.

  Args:
    plan: the run's :class:`Plan`: its ``num_epochs`` and
      ``steps_per_epoch`` must be fit's (checked before the first step).
    ema: ``None`` (cumulative mean, default) or the EMA factor.
    prunable: the leaves of the global re-pruning (default: every kernel;
      use the DST method's).
    bn_batch_size: batch size of the statistics pass (default: fit's
      ``batch_size``).
    bn_variance: ``variance`` of :func:`sparsejax.batch_stats.recompute_batch_stats`.
    evaluate_tickets: also evaluate each ticket (default True).
  """

  name = "suptickets"
  at_epoch_end = True

  def __init__(
    self,
    plan: Plan,
    *,
    ema: float | None = None,
    prunable=None,
    bn_batch_size: int | None = None,
    bn_variance: str = "pooled",
    evaluate_tickets: bool = True,
  ):
    if ema is not None and not 0 < ema <= 1:
      raise ValueError(f"ema must be None or in (0, 1], got {ema}")
    if bn_variance not in train.BN_VARIANCE_MODES:
      raise ValueError(f"bn_variance must be one of {train.BN_VARIANCE_MODES}, got {bn_variance!r}")
    self.plan = plan
    self.ema = ema
    self.prunable = prunable
    self.bn_batch_size = bn_batch_size
    self.bn_variance = bn_variance
    self.evaluate_tickets = evaluate_tickets
    self._superpose = jax.jit(functools.partial(superpose, ema=ema))
    self._reprune = jax.jit(self._reprune_like)

  def _reprune_like(self, average, ticket_mask):
    return reprune(average, prunable_count(ticket_mask, self.prunable), self.prunable)

  def init(self, state):
    if state.mask is None:
      raise ValueError(
        "Superpose needs a sparse train state (an optimiser state "
        "that holds a mask, e.g. a sparsejax.dst transformation)"
      )
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    hook_state = {
      "tickets": jnp.zeros((), jnp.int32),
      "average": zeros,
      "params": zeros,
      "mask": masks.ones_like(state.params),
    }
    if state.batch_stats:
      hook_state["batch_stats"] = jax.tree.map(jnp.copy, state.batch_stats)
    return hook_state

  def check(self, ctx):
    """The plan must be the fit's: same epochs, same steps per epoch."""
    plan = self.plan
    if ctx.num_epochs is not None and ctx.num_epochs != plan.num_epochs:
      raise ValueError(
        f"Superpose: the plan has num_epochs={plan.num_epochs} but fit trains "
        f"{ctx.num_epochs} epochs; build the Plan with the run's num_epochs "
        f"(its cycles end at epochs {list(plan.cycle_end_epochs)})"
      )
    if ctx.steps_per_epoch != plan.steps_per_epoch:
      raise ValueError(
        f"Superpose: the plan has steps_per_epoch={plan.steps_per_epoch} but "
        f"fit has {ctx.steps_per_epoch} (sparsejax.schedules.steps_per_epoch"
        "(num_train, batch_size))"
      )

  def hook(self) -> hooks.StepHook:
    """The :class:`sparsejax.hooks.StepHook` holding the superposition's
    state (no per-step work)."""
    return hooks.StepHook(self.init, name=self.name)

  def callback(self) -> hooks.Callback:
    """The callback itself (for symmetry with :meth:`hook`)."""
    return self

  def __call__(self, step, carry, ctx):
    del step
    if ctx.epoch not in self.plan.cycle_end_epochs:
      return None
    hook_state, state = carry.hook_states[self.name], carry.state
    average = self._superpose(hook_state["average"], state.params, hook_state["tickets"])
    params, mask = self._reprune(average, state.mask)
    out = dict(
      hook_state, tickets=hook_state["tickets"] + 1, average=average, params=params, mask=mask
    )
    superposed = state.replace(params=params)
    if state.batch_stats:
      # The per-step scalars the model reads (e.g. act_coef), as in training.
      values = schedules.scalar_values(modeling.model_scalars(ctx.model, ctx.scalars), state.step)
      batch_size = self.bn_batch_size or ctx.batch_size
      stats = train.recompute_batch_stats(
        ctx.model,
        {"params": params, "batch_stats": state.batch_stats},
        ctx.dataset.train_images,
        mean=ctx.dataset.mean,
        std=ctx.dataset.std,
        batch_size=int(batch_size),
        mesh=ctx.mesh,
        variance=self.bn_variance,
        scalars=values,
      )
      out["batch_stats"] = stats
      superposed = superposed.replace(batch_stats=stats)
    fields = {"cycle": int(jax.device_get(out["tickets"]))}
    if ctx.evaluate is None:
      raise ValueError("Superpose needs FitContext.evaluate (run it inside fit)")
    if self.evaluate_tickets:
      ev = ctx.evaluate(state)
      fields.update(ticket_test_loss=ev["loss"], ticket_test_accuracy=ev["accuracy"])
    ev = ctx.evaluate(superposed)
    fields.update(
      superposed_test_loss=ev["loss"],
      superposed_test_accuracy=ev["accuracy"],
      superposed_sparsity=masks.summary(mask).sparsity,
    )
    ctx.record.update(fields)
    return carry.replace(hook_states=dict(carry.hook_states, **{self.name: out}))
