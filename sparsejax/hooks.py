"""Hooks: how a training method extends :func:`sparsejax.train.fit` without a
branch in its loop.

A :class:`Hook` has a state of its own, saved in the same checkpoint as the
train state and part of the run signature, and up to three entry points:

* :meth:`Hook.after_step`, traced inside the jitted train step after the
  optimiser update, with the step's :class:`StepInfo` (loss, gradients,
  scalars, batch, key): e.g. a dynamic-sparse-training mask update every K
  steps with :func:`sparsejax.optim.set_mask` under ``lax.cond``, or a
  gradient-flow measurement, without host round trips. Its logs of every
  :attr:`Hook.log_every_steps` steps go to ``steps.jsonl``.
* :meth:`Hook.fresh_start`, on the host once before the first step of a run
  that starts from scratch (not on resume): it may change the initial train
  state, e.g. ToST's LRsI rescales the initial weights (:mod:`sparsejax.tost`).
* :meth:`Hook.after_step_host`, on the host after each step is dispatched.
* :meth:`Hook.epoch_end`, on the host at each epoch end, before the
  evaluation, with a :class:`FitContext` (model, data, mesh, config): e.g. a
  weight superposition followed by a batch-norm recompute.

Example, the global gradient norm every 100 steps::

  class GradNorm(hooks.Hook):
    log_every_steps = 100

    def init(self, state):
      return jnp.zeros((), jnp.int32)           # measurements so far

    def after_step(self, count, state, info):
      due = (info.step + 1) % 100 == 0
      norm = jax.lax.cond(due, lambda: optax.tree.norm(info.grads),
                          lambda: jnp.zeros((), jnp.float32))
      return count + due, state, {"grad_norm": norm}

  train.fit(config, workdir, model=model, dataset=ds, hooks=[GradNorm()])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from sparsejax import data as data_lib
from sparsejax import metrics_log

if TYPE_CHECKING:
  from sparsejax.train import TrainState  # pylint: disable=g-bad-import-order

PyTree = Any


# ----------------------------------------------------------------------------


class StepInfo(NamedTuple):
  """What :meth:`Hook.after_step` learns about the step just taken (traced).

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
      the ``state`` given to :meth:`Hook.after_step` holds those just after.
  """

  step: jax.Array
  loss: jax.Array
  grads: PyTree
  scalars: dict[str, jax.Array]
  batch: tuple[jax.Array, jax.Array]
  key: jax.Array
  state_before: Any = None


@dataclasses.dataclass(frozen=True)
class FitContext:
  """What :meth:`Hook.fresh_start` and :meth:`Hook.epoch_end` may use besides
  the states (host side).

  Attributes:
    model, dataset, mesh, config: those of :func:`fit`.
    steps_per_epoch: optimiser steps per epoch.
    scalars: the per-step scalar schedules of :func:`fit`.
    num_epochs: the epochs of the run (``None`` when built by hand).
    evaluate: ``evaluate(state) -> {"loss", "accuracy", "count"}``: fit's
      test-set evaluation (:func:`sparsejax.train.evaluate` with fit's
      compiled eval step and ``eval_batch_size``) of any train state of the
      run's layout, e.g. the train state with other weights
      (``state.replace(params=..., batch_stats=...)``).
    loss_fn: the training loss ``loss_fn(logits, labels, scalars)`` of
      :func:`fit`; ``None`` when built by hand.
  """

  model: nn.Module
  dataset: data_lib.Dataset
  mesh: jax.sharding.Mesh
  config: Any
  steps_per_epoch: int
  scalars: Mapping[str, optax.Schedule]
  evaluate: Callable[[Any], dict[str, float]] | None = None
  loss_fn: Any = None
  num_epochs: int | None = None


class Hook:
  """An extension of :func:`fit` with a state of its own. Override what you need.

  * :meth:`init` gives the hook's state (a pytree of arrays, or ``None`` for a
    stateless hook). It is saved in the same checkpoint as the train state,
    is part of the run signature (a workdir written with other hook states is
    refused), and resumes bitwise.
  * :meth:`after_step` runs *traced*, inside the jitted train step, after the
    optimiser update: it may change the train state (e.g. the mask, with
    :func:`sparsejax.optim.set_mask`) and its own state, and return logs. Use
    ``lax.cond`` on ``info.step`` to act every K steps; the structure,
    shapes and dtypes of both states must not change.
  * :meth:`check` runs on the host before the first step of every run, fresh
    or resumed, and raises ``ValueError`` when the hook's settings do not fit
    the run (e.g. a plan made for another number of epochs).
  * :meth:`fresh_start` runs on the host once, before the first step of a
    run that does not resume from a checkpoint (and before :meth:`init`), and
    may change the initial train state, keeping its structure, shapes and
    dtypes. A resumed run gets the changed state from its checkpoint.
  * :meth:`after_step_host` runs on the host after each step is dispatched
    (not waited for), with the global step count.
  * :meth:`logs_at` decides, on the host and without waiting for the device,
    which steps' :meth:`after_step` logs go to ``steps.jsonl`` (default: every
    :attr:`log_every_steps` steps).
  * :meth:`epoch_end` runs on the host at the end of each epoch, before the
    evaluation, and may change both states and add fields to the epoch record.

  Attributes:
    name: key of the hook's state and logs; default the class name. Names
      must be unique among the hooks of a run.
    log_every_steps: the logs of :meth:`after_step` after every this many
      global steps go to ``steps.jsonl`` as ``{"step": s, **logs}``, ``s``
      the number of steps taken; ``None`` (default): not logged. Override
      :meth:`logs_at` for another set of steps.
    scalar_names: the per-step scalars (``info.scalars``) the hook reads
      besides those the model takes; default none. A scalar that neither
      the model, the loss nor a hook reads is an error of
      :func:`sparsejax.train.make_train_step`.
  """

  name: str | None = None
  log_every_steps: int | None = None
  scalar_names: tuple[str, ...] = ()

  @property
  def key(self) -> str:
    """The hook's name, :attr:`name` or the class name."""
    return self.name or type(self).__name__

  def check(self, ctx: FitContext) -> None:
    """Raises ``ValueError`` if the hook cannot run in this fit; default: fits."""
    del ctx

  def init(self, state: TrainState) -> PyTree:
    """The hook's initial state, from the initial train state; default ``None``."""
    del state
    return None

  def fresh_start(self, state: TrainState, ctx: FitContext) -> TrainState:
    """On the host before the first step of a fresh run: the (changed) initial
    train state, replicated on ``ctx.mesh``; default unchanged."""
    del ctx
    return state

  def after_step(self, hook_state: PyTree, state: TrainState,
                 info: StepInfo) -> tuple[PyTree, TrainState, dict[str, jax.Array]]:
    """Traced after each update: ``(hook_state, state, logs)``; default no-op."""
    del info
    return hook_state, state, {}

  def logs_at(self, step: int) -> bool:
    """Whether the logs of the step that makes the step count ``step`` are
    written to ``steps.jsonl`` (host side, a pure function of ``step``);
    default ``step % log_every_steps == 0`` (never when it is ``None``)."""
    every = self.log_every_steps
    return bool(every) and step % int(every) == 0

  def after_step_host(self, step: int) -> None:
    """On the host after step ``step`` (the global step count) was dispatched."""

  def epoch_end(self, hook_state: PyTree, state: TrainState, epoch: int,
                ctx: FitContext) -> tuple[PyTree, TrainState, dict[str, Any]]:
    """On the host after epoch ``epoch`` (1-based): ``(hook_state, state,
    record_fields)``; the fields (JSON numbers) join the epoch record."""
    del epoch, ctx
    return hook_state, state, {}


def overrides(hook: Hook, method: str) -> bool:
  """Whether ``hook``'s class overrides ``method`` (else fit skips it)."""
  return getattr(type(hook), method) is not getattr(Hook, method)


def check_hooks(hooks: Sequence[Hook]) -> tuple[Hook, ...]:
  """``hooks`` as a tuple; refuses non-hooks and duplicate names."""
  hooks = tuple(hooks)
  for hook in hooks:
    if not isinstance(hook, Hook):
      raise TypeError(f"hooks must be sparsejax.hooks.Hook instances, got "
                      f"{type(hook).__name__}")
  names = [h.key for h in hooks]
  if len(set(names)) != len(names):
    raise ValueError(f"hook names must be unique, got {names}")
  return hooks


def json_number(value) -> Any:
  """A (device) scalar or array as a JSON number or list."""
  value = np.asarray(jax.device_get(value))
  return value.item() if value.ndim == 0 else value.tolist()


class PendingStepLogs:
  """Hook logs of the steps to record, kept on device until :meth:`flush`."""

  def __init__(self, hooks: Sequence[Hook], log: metrics_log.StepLog):
    self.hooks = [h for h in hooks if overrides(h, "after_step") and (
        h.log_every_steps or overrides(h, "logs_at"))]
    self.log = log
    self.pending: list[tuple[int, dict]] = []

  def add(self, step: int, logs: dict) -> None:
    keep = {h.key: logs[h.key] for h in self.hooks if h.logs_at(step)}
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
