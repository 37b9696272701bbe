"""How a training method extends :func:`sparsejax.train.fit` without a branch
in its loop: traced step hooks and host callbacks.

* :class:`StepHook` ``(init, update)``: traced, composed into the jitted train
  step like an optax transformation. ``init(state) -> hook_state`` (a pytree,
  or ``None`` for a stateless hook) gives its state, carried in the
  :class:`sparsejax.train.TrainCarry`, checkpointed with the train state and
  part of the run signature; ``update(hook_state, state, info) -> (hook_state,
  state, logs)`` runs after the optimiser update with the step's
  :class:`StepInfo` (loss, gradients, scalars, batch, key): e.g. a
  gradient-flow measurement under ``lax.cond`` every K steps, without host
  round trips. Its ``logs`` of the steps ``logs_at`` selects go to
  ``steps.jsonl``.
* :class:`Callback`: host side, run by ``fit`` after each step in the style
  of clu's periodic actions: every ``every_steps`` steps, at each epoch end
  and/or once on a fresh start (before the first step of a run that does not
  resume). ``callback(step, carry, ctx) -> carry | None`` may return a changed
  carry (e.g. superposed weights in a hook state, or ToST's rescaled initial
  weights) and add fields to the epoch record (``ctx.record``). fit's own
  actions (checkpoint and preemption, non-finite check, evaluation, epoch
  record, metrics log, progress bar) are callbacks of the same kind.

Example, the global gradient norm every 100 steps::

  def grad_norm_hook(every=100):
    def init(state):
      return jnp.zeros((), jnp.int32)           # measurements so far

    def update(count, state, info):
      due = (info.step + 1) % every == 0
      norm = jax.lax.cond(due, lambda: optax.tree.norm(info.grads),
                          lambda: jnp.zeros((), jnp.float32))
      return count + due, state, {"grad_norm": norm}

    return hooks.StepHook(init, update, name="grad_norm",
                          logs_at=hooks.every(every))

  train.fit(model, ds, workdir, init=..., num_epochs=2, batch_size=64,
            hooks=[grad_norm_hook()])
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from sparsejax import data as data_lib
from sparsejax import metrics_log

if TYPE_CHECKING:
  from sparsejax.state import TrainState  # pylint: disable=g-bad-import-order
  from sparsejax.train import TrainCarry  # pylint: disable=g-bad-import-order

PyTree = Any


class StepInfo(NamedTuple):
  """What :attr:`StepHook.update` learns about the step just taken (traced).

  Attributes:
    step: ``int32``, the global index ``t`` of the step (the state it returns
      has ``step == t + 1``).
    loss: the mean training loss of the batch.
    grads: the gradient of the loss w.r.t. the params, before the optimiser
      (dense: pruned entries included).
    scalars: the per-step scalar values of step ``t``, ``{name: float32}``.
    batch: ``(x, y)``, the normalised (and augmented) inputs and the labels.
    key: the step's PRNG key ``fold_in(state.key, t)``.
    state_before: the train state the step started from (``step == t``),
      before the optimiser update: with a dynamic-sparse-training optimiser,
      the params and mask just before a mask update of step ``t``, while
      the ``state`` given to :attr:`StepHook.update` holds those just after.
  """

  step: jax.Array
  loss: jax.Array
  grads: PyTree
  scalars: dict[str, jax.Array]
  batch: tuple[jax.Array, jax.Array]
  key: jax.Array
  state_before: Any = None


def _no_state(state):
  del state


def _no_update(hook_state, state, info):
  del info
  return hook_state, state, {}


class StepHook(NamedTuple):
  """A traced extension of the train step, composed like an optax transformation.

  Attributes:
    init: ``init(state) -> hook_state``: the hook's state from the initial
      train state; ``None`` for a stateless hook. It is checkpointed with the
      train state, is part of the run signature (a workdir written with other
      hook states is refused) and resumes bitwise.
    update: ``update(hook_state, state, info) -> (hook_state, state, logs)``,
      traced inside the jitted train step after the optimiser update: it may
      change the train state (e.g. the mask, with
      :func:`sparsejax.optim.set_mask`) and its own state, and return logs
      (``{name: array}``). Use ``lax.cond`` on ``info.step`` to act every K
      steps; the structure, shapes and dtypes of both states must not change.
    name: the key of the hook's state (``carry.hook_states[name]``) and logs;
      unique among the hooks of a run.
    logs_at: ``logs_at(step) -> bool``, on the host without waiting for the
      device: whether the logs of the step that makes the step count ``step``
      go to ``steps.jsonl`` (as ``{"step": step, **logs}``); ``None``
      (default): never. :func:`every` gives a period.
    scalar_names: the per-step scalars (``info.scalars``) the hook reads
      besides those the model takes. A scalar that neither the model, the
      loss nor a hook reads is an error of
      :func:`sparsejax.train.make_train_step`.
  """

  init: Callable[[TrainState], PyTree] = _no_state
  update: Callable[..., tuple[PyTree, TrainState, dict]] = _no_update
  name: str = "hook"
  logs_at: Callable[[int], bool] | None = None
  scalar_names: tuple[str, ...] = ()


def every(steps: int | None) -> Callable[[int], bool] | None:
  """``logs_at`` of every ``steps`` steps (``step % steps == 0``); ``None``
  for ``None``."""
  if steps is None:
    return None
  steps = int(steps)
  if steps < 1:
    raise ValueError(f"steps must be >= 1 or None, got {steps}")
  return lambda step: int(step) % steps == 0


def check_hooks(hooks: Sequence[StepHook]) -> tuple[StepHook, ...]:
  """``hooks`` as a tuple; refuses non-hooks and duplicate names."""
  hooks = tuple(hooks)
  for hook in hooks:
    if not isinstance(hook, StepHook):
      raise TypeError(
        f"hooks must be sparsejax.hooks.StepHook instances, got {type(hook).__name__}"
      )
  names = [h.name for h in hooks]
  if len(set(names)) != len(names):
    raise ValueError(f"hook names must be unique, got {names}")
  return hooks


@dataclasses.dataclass
class FitContext:
  """What a :class:`Callback` may use besides the carry (host side).

  The first fields describe the run; the last ones the loop's position and
  are updated by :func:`sparsejax.train.fit` as it goes.

  Attributes:
    model: the model of :func:`sparsejax.train.fit`.
    dataset: its dataset.
    mesh: its mesh.
    num_epochs: the run's epochs.
    batch_size: the run's batch size.
    seed: the run's seed.
    augment: whether the run augments (resolved against the dataset's
      default).
    steps_per_epoch: optimiser steps per epoch.
    scalars: the per-step scalar schedules of :func:`sparsejax.train.fit`.
    loss_fn: the training loss ``loss_fn(logits, labels, scalars)``.
    evaluate: ``evaluate(state) -> {"loss", "accuracy", "count"}``: fit's
      test-set evaluation (:func:`sparsejax.train.evaluate` with fit's
      compiled eval step and ``eval_batch_size``) of any train state of the
      run's layout, e.g. ``state.replace(params=...)``.
    total_steps: the schedule's length.
    end_step: where this call stops (``stop_at_step``).
    epoch: the 1-based epoch the last step belongs to.
    epoch_end: whether the last step ended its epoch.
    logs: ``{hook name: logs}`` of the last step (on device).
    record: the epoch record being built at an epoch end; a callback adds
      its fields (JSON numbers, or device scalars) here.
    stop: ``None`` while training; ``"preempted"`` (SIGTERM) or
      ``"stop_at_step"`` once a checkpoint of the stop was saved.
  """

  model: nn.Module
  dataset: data_lib.Dataset
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  scalars: Mapping[str, optax.Schedule]
  num_epochs: int | None = None
  batch_size: int | None = None
  seed: int = 0
  augment: bool = False
  loss_fn: Any = None
  evaluate: Callable[[Any], dict[str, float]] | None = None
  total_steps: int | None = None
  end_step: int | None = None
  epoch: int = 0
  epoch_end: bool = False
  logs: dict = dataclasses.field(default_factory=dict)
  record: dict = dataclasses.field(default_factory=dict)
  stop: str | None = None


class Callback:
  """A host-side action of :func:`sparsejax.train.fit`, run after steps.

  ``fit`` calls ``callback(step, carry, ctx)`` (``step``: the global step
  count after the step) when :meth:`due`: every ``every_steps`` steps,
  after the last step of each epoch with ``at_epoch_end``, and once
  before the first step of a run that starts from scratch (not on resume)
  with ``at_fresh_start``. It returns ``None`` or a changed
  :class:`sparsejax.train.TrainCarry` of the same structure, shapes and
  dtypes. Callbacks run in the order given, after fit's step log and
  before its progress bar, evaluation, epoch record and checkpoint; an
  epoch-end callback adds fields to the epoch record through
  ``ctx.record``. :meth:`check` runs once before the first step of every run
  (fresh or resumed) and raises ``ValueError`` when the callback does not
  fit the run.

  Build one from a function with :func:`callback`, or subclass and override
  ``__call__`` (and :meth:`check`).
  """

  every_steps: int | None = None
  at_epoch_end: bool = False
  at_fresh_start: bool = False

  def due(self, step: int, ctx: FitContext) -> bool:
    """Whether the callback runs after the step that makes the count ``step``."""
    every = self.every_steps
    return bool(every and step % int(every) == 0) or (self.at_epoch_end and ctx.epoch_end)

  def check(self, ctx: FitContext) -> None:
    """Raises ``ValueError`` if the callback cannot run in this fit; default: fits."""
    del ctx

  def __call__(self, step: int, carry: TrainCarry, ctx: FitContext) -> TrainCarry | None:
    raise NotImplementedError


class _FunctionCallback(Callback):
  def __init__(self, fn, every_steps, at_epoch_end, at_fresh_start):
    self.fn = fn
    self.every_steps = every_steps
    self.at_epoch_end = at_epoch_end
    self.at_fresh_start = at_fresh_start

  def __call__(self, step, carry, ctx):
    return self.fn(step, carry, ctx)

  def __repr__(self):
    return (
      f"callback({getattr(self.fn, '__name__', self.fn)}, every_steps="
      f"{self.every_steps}, at_epoch_end={self.at_epoch_end}, "
      f"at_fresh_start={self.at_fresh_start})"
    )


def callback(
  fn: Callable[[int, TrainCarry, FitContext], TrainCarry | None],
  *,
  every_steps: int | None = None,
  at_epoch_end: bool = False,
  at_fresh_start: bool = False,
) -> Callback:
  """A :class:`Callback` that calls ``fn(step, carry, ctx)``.

  Example, the epoch record gets the global weight norm::

    def weight_norm(step, carry, ctx):
      ctx.record["weight_norm"] = float(optax.tree.norm(carry.state.params))

    train.fit(..., callbacks=[hooks.callback(weight_norm, at_epoch_end=True)])

  Raises:
    ValueError: ``every_steps`` below 1, or a callback that never runs.
  """
  if every_steps is not None and int(every_steps) < 1:
    raise ValueError(f"every_steps must be >= 1 or None, got {every_steps}")
  if every_steps is None and not (at_epoch_end or at_fresh_start):
    raise ValueError(
      "a callback needs every_steps, at_epoch_end or at_fresh_start: it would never run"
    )
  return _FunctionCallback(
    fn, None if every_steps is None else int(every_steps), bool(at_epoch_end), bool(at_fresh_start)
  )


def check_callbacks(callbacks: Sequence[Callback]) -> tuple[Callback, ...]:
  """``callbacks`` as a tuple; refuses non-callbacks."""
  callbacks = tuple(callbacks)
  for cb in callbacks:
    if not isinstance(cb, Callback):
      raise TypeError(
        f"callbacks must be sparsejax.hooks.Callback instances "
        f"(see hooks.callback), got {type(cb).__name__}"
      )
  return callbacks


def json_number(value) -> Any:
  """A (device) scalar or array as a JSON number or list."""
  value = np.asarray(jax.device_get(value))
  return value.item() if value.ndim == 0 else value.tolist()


class PendingStepLogs:
  """Hook logs of the steps to record, kept on device until ``flush()``."""

  def __init__(self, hooks: Sequence[StepHook], log: metrics_log.StepLog):
    self.hooks = [h for h in hooks if h.logs_at is not None]
    self.log = log
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, logs: dict) -> None:
    keep = {h.name: logs[h.name] for h in self.hooks if h.logs_at(step)}
    if keep:
      self.pending.append((step, keep))

  def drop(self) -> None:
    self.pending = []

  def flush(self) -> None:
    if not self.pending:
      return
    records = []
    for step, by_hook in jax.device_get(self.pending):
      record = {"step": int(step)}
      for values in by_hook.values():
        record.update({k: json_number(v) for k, v in values.items()})
      records.append(record)
    self.log.write(records)
    self.pending = []
