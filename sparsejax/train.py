"""Training: the carry, jitted data-parallel steps and the checkpointed loop.

* :class:`TrainCarry`: everything a train step changes, one pytree: the
  :class:`sparsejax.state.TrainState`, the epoch's running metric sums and the
  step hooks' states (:func:`init_carry`).
* :func:`make_train_step`, :func:`make_eval_step`, :func:`evaluate`: jitted,
  data-parallel steps (:mod:`sparsejax.mesh`: batches sharded along
  ``"data"``, carry and device-resident ``uint8`` datasets replicated; each
  step gathers, augments and normalises its batch inside ``jit``). The train
  step is ``train_step(carry, images, labels, perm, k) -> (carry, logs)``,
  its carry donated.
* :func:`fit`: the epoch loop with Orbax checkpoints (:mod:`sparsejax.checkpoints`:
  every epoch and on SIGTERM, the last N kept, automatic resume that skips
  unreadable checkpoints), a progress bar, ``metrics.jsonl``, ``steps.jsonl``
  and TensorBoard logs (:mod:`sparsejax.metrics_log`) and a clear stop on a
  non-finite loss. It starts from ``init``, a train state (e.g. a
  lottery-ticket rewind point) or a function making one, and can stop at a
  given step; :class:`FitOptions` holds the loop's knobs.

Extension points of :func:`fit`, so that a method plugs in without a branch in
the loop: ``init`` (the initial state and so the optimiser, e.g.
:func:`sparsejax.schedules.make_optimizer` wrapped with
:func:`sparsejax.optim.sparse`, or a dynamic-sparse-training optimiser),
``scalars`` (named ``optax.Schedule`` s of the step, evaluated inside the
jitted train and eval steps and given to the model, e.g. ``act_coef``, and to
the loss), ``loss_fn`` (``loss_fn(logits, labels, scalars) -> per-example
loss``), ``hooks`` (:class:`sparsejax.hooks.StepHook` ``(init, update)``:
traced in the step, a state of their own carried and checkpointed with the
train state, e.g. a gradient-flow measurement) and ``callbacks``
(:class:`sparsejax.hooks.Callback`: host actions after steps, at epoch ends
or on a fresh start, e.g. Sup-tickets' superposition or ToST's LRsI). fit's
own actions (checkpoint and preemption, non-finite check, evaluation, epoch
record, metrics log, progress bar) are callbacks too.

On N devices XLA inserts the gradient all-reduce and batch norm in training
mode uses the global batch, so an N-device step equals the one-device step up
to float summation order. Multi-host: call ``jax.distributed.initialize()``
first and build the mesh over ``jax.devices()``; a preemption stop is agreed on
through ``CheckpointManager.reached_preemption``; ``fit`` checks at start-up
that every process loaded the same dataset. The suite tests two local
processes of two CPU devices each, on a contiguous and on an interleaved
device order (``tests/test_multihost.py``).

Resume determinism. Nothing in a step depends on host state: the batch is
``batch_indices(epoch_permutation(seed, epoch, n), step_in_epoch, batch_size)``,
the step's random key is ``fold_in(rng, step)`` and every scalar is a function
of the step. A checkpoint holds the carry (train state, the hooks' states and
the epoch's running metric sums), so a run resumed from any checkpoint (an
epoch end, the SIGTERM step, ``stop_at_step``) computes bitwise what a run
that never stopped computes (same devices and software); ``metrics.jsonl``
and ``steps.jsonl`` are truncated to the restored epoch and step.

Example::

  import jax, jax.numpy as jnp
  from sparsejax import data, models, schedules, state, train

  ds = data.load("digits")
  model = models.get("mlp", ds.num_classes)
  spe = schedules.steps_per_epoch(ds.num_train, 64)
  tx = schedules.make_optimizer(schedules.lr_schedule(
      0.05, num_epochs=20, steps_per_epoch=spe, kind="cosine"), weight_decay=5e-4)
  init = lambda: state.create_train_state(
      model, tx, jnp.zeros((1, *ds.image_shape)), jax.random.key(0))
  result = train.fit(model, ds, "/tmp/run", init=init, num_epochs=20, batch_size=64)
  print(result.history[-1]["test_accuracy"])
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any

from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from sparsejax import _paths
from sparsejax import checkpoints as ckpt_lib
from sparsejax import data as data_lib
from sparsejax import hooks as hooks_lib
from sparsejax import losses
from sparsejax import masks as masks_lib
from sparsejax import mesh as mesh_lib
from sparsejax import metrics_log
from sparsejax import modeling
from sparsejax import schedules
from sparsejax import state as state_lib
from sparsejax.batch_stats import BN_VARIANCE_MODES  # noqa: F401  (re-exported)
from sparsejax.batch_stats import recompute_batch_stats  # noqa: F401  (re-exported)

PyTree = Any
logger = logging.getLogger(__name__)

#: Sentinel of the ``first_bad_step`` metric: no non-finite loss seen.
_NO_BAD_STEP = np.iinfo(np.int32).max
#: Keys of an epoch record written by :func:`fit` itself.
RECORD_KEYS = (
  "epoch",
  "step",
  "lr",
  "train_loss",
  "train_accuracy",
  "test_loss",
  "test_accuracy",
  "sparsity",
  "epoch_seconds",
  "steps_per_second",
)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def _model_scalar_names(model: nn.Module, scalars) -> tuple[str, ...]:
  """The scalars passed to the model: those it reads
  (:func:`sparsejax.modeling.scalar_names`)."""
  return tuple(modeling.model_scalars(model, scalars))


class _ReadKeys(Mapping):
  """A read-only view of a dict that records which keys were read."""

  def __init__(self, values: Mapping[str, Any]):
    self._values = values
    self.read: set[str] = set()

  def __getitem__(self, name):
    self.read.add(name)
    return self._values[name]

  def __contains__(self, name):
    self.read.add(name)
    return name in self._values

  def __iter__(self):  # iterating (dict(scalars), .items()) reads them all
    self.read.update(self._values)
    return iter(self._values)

  def __len__(self):
    return len(self._values)


def _check_scalars_read(names, model_scalars, loss_read, hooks) -> None:
  """Raises ``ValueError`` for a scalar that nothing of the step reads."""
  hook_read = {n for h in hooks for n in h.scalar_names}
  used = set(model_scalars) | set(loss_read) | hook_read
  unused = sorted(set(names) - used)
  if unused:
    raise ValueError(
      f"scalars {unused} are read by neither the model, the loss nor a hook, "
      f"so they would change nothing; read are: model {sorted(model_scalars)}, "
      f"loss {sorted(loss_read)}, hooks {sorted(hook_read)}. Rename or drop "
      "them (ToST's α needs its loss, tost.label_smoothing_loss())"
    )


def init_train_metrics() -> dict[str, jax.Array]:
  """Zeroed running sums of :func:`make_train_step`.

  Keys: ``loss_sum`` (sum of the per-step mean losses), ``steps``,
  ``correct``, ``count`` and ``first_bad_step`` (smallest global step with a
  non-finite loss; int32 max when none).
  """
  return {
    "loss_sum": jnp.zeros((), jnp.float32),
    "steps": jnp.zeros((), jnp.int32),
    "correct": jnp.zeros((), jnp.int32),
    "count": jnp.zeros((), jnp.int32),
    "first_bad_step": jnp.full((), _NO_BAD_STEP, jnp.int32),
  }


@flax.struct.dataclass
class TrainCarry:
  """Everything a train step changes: one pytree, one donated argument.

  Attributes:
    state: the :class:`sparsejax.state.TrainState`.
    metrics: the epoch's running sums (:func:`init_train_metrics`).
    hook_states: ``{hook.name: state}`` of the step hooks that have one.
  """

  state: state_lib.TrainState
  metrics: dict[str, jax.Array]
  hook_states: dict[str, PyTree]


def init_carry(state: state_lib.TrainState, hooks: Sequence[hooks_lib.StepHook] = ()) -> TrainCarry:
  """The carry of the first step from ``state``: zeroed metrics and each
  hook's ``init(state)`` (copied, since the carry is donated and a hook state
  may hold arrays of the train state, e.g. its mask; ``None`` ones left out).

  Example, a three-step loop::

    step = train.make_train_step(model, mesh=mesh, batch_size=32, mean=m,
                                 std=s, hooks=hooks)
    carry = train.init_carry(state, hooks)
    for k in range(3):
      carry, logs = step(carry, images, labels, perm, k)
  """
  hook_states = {}
  for hook in hooks_lib.check_hooks(hooks):
    hook_state = hook.init(state)
    if hook_state is not None:
      hook_states[hook.name] = jax.tree.map(jnp.copy, hook_state)
  return TrainCarry(state=state, metrics=init_train_metrics(), hook_states=hook_states)


def make_train_step(
  model: nn.Module,
  *,
  mesh: jax.sharding.Mesh,
  batch_size: int,
  mean,
  std,
  augment: bool = False,
  pad: int = 4,
  flip: bool = True,
  loss_fn: losses.LossFn | None = None,
  scalars: Mapping[str, optax.Schedule] | None = None,
  hooks: Sequence[hooks_lib.StepHook] = (),
) -> Callable:
  """Builds the jitted, data-parallel training step.

  The returned function is::

    step(carry, images, labels, perm, step_in_epoch) -> (carry, logs)

  * ``carry``: a :class:`TrainCarry` replicated on ``mesh`` (donated); its
    ``state.tx`` makes the update.
  * ``images``: the whole training set, ``uint8 [N, H, W, C]``, replicated on
    ``mesh``; ``labels``: ``int32 [N]``.
  * ``perm``: the epoch's permutation (:func:`sparsejax.data.epoch_permutation`).
  * ``step_in_epoch``: int, which batch of the permutation to take
    (:func:`sparsejax.data.batch_indices`).
  * ``logs``: ``{hook.name: logs}`` of each hook's
    :attr:`sparsejax.hooks.StepHook.update`.

  Inside ``jit``: the scalars of ``state.step``, gather the batch, shard it
  along ``"data"``, augment with ``fold_in(state.key, state.step)`` (random
  crop with ``pad`` and horizontal flip) when ``augment``, normalise with
  ``mean``/``std``, forward in training mode (batch norm over the global
  batch), the mean of ``loss_fn``, gradient, ``state.tx`` update, the
  metric sums, then each hook's ``update`` in order (composed like an optax
  chain).

  Args:
    model: the linen module.
    mesh: the data-parallel mesh.
    batch_size: global batch size, a multiple of ``mesh.size``.
    mean, std: per-channel normalisation constants.
    augment, pad, flip: data augmentation.
    loss_fn: ``loss_fn(logits, labels, scalars) -> per-example loss``;
      default :func:`sparsejax.losses.smoothed_cross_entropy` ``()`` (plain
      cross-entropy unless a ``"label_smoothing"`` scalar is given).
    scalars: per-step scalar schedules ``{name: optax.Schedule}``; those named
      the model reads (``model.scalar_names``, e.g. ``act_coef``) are passed
      to the model, all of them to ``loss_fn`` and the hooks. Their values are
      traced: changing them never recompiles. Each must be read by the
      model, the loss or a hook (``scalar_names`` of :class:`sparsejax.hooks.StepHook`):
      a scalar nothing reads (a typo such as ``act_coeff``) raises
      ``ValueError`` when the step is first traced, before it runs.
    hooks: :class:`sparsejax.hooks.StepHook` s; their states are
      ``carry.hook_states`` (:func:`init_carry`).
  """
  if batch_size % mesh.size:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the {mesh.size} devices of the mesh"
    )
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  in_batch = mesh_lib.batch_sharding(mesh)
  loss_fn = losses.smoothed_cross_entropy() if loss_fn is None else loss_fn
  scalars = dict(scalars or {})
  model_scalars = _model_scalar_names(model, scalars)
  all_hooks = hooks_lib.check_hooks(hooks)

  def step(carry: TrainCarry, images, labels, perm, step_in_epoch):
    state, metrics = carry.state, carry.metrics
    hook_states = dict(carry.hook_states)
    values = schedules.scalar_values(scalars, state.step)
    idx = data_lib.batch_indices(perm, step_in_epoch, batch_size)
    x = jax.lax.with_sharding_constraint(jnp.take(images, idx, axis=0), in_batch)
    y = jax.lax.with_sharding_constraint(jnp.take(labels, idx, axis=0), in_batch)
    key = jax.random.fold_in(state.key, state.step)
    aug_key, dropout_key = jax.random.split(key)
    if augment:
      x = data_lib.augment(aug_key, x, pad=pad, flip=flip)
    x = data_lib.normalize(x, mean, std)

    loss_scalars = _ReadKeys(values)

    def objective(params):
      loss, (logits, model_state) = modeling.loss_and_logits(
        model,
        params,
        {"batch_stats": state.batch_stats} if state.batch_stats else {},
        x,
        y,
        loss_fn,
        scalars=values,
        loss_scalars=loss_scalars,
        rngs={"dropout": dropout_key},
      )
      return loss, (logits, model_state.get("batch_stats", state.batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    _check_scalars_read(values, model_scalars, loss_scalars.read, all_hooks)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    finite = jnp.isfinite(loss)
    metrics = {
      "loss_sum": metrics["loss_sum"] + loss,
      "steps": metrics["steps"] + 1,
      "correct": metrics["correct"] + jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32),
      "count": metrics["count"] + y.shape[0],
      "first_bad_step": jnp.where(
        finite, metrics["first_bad_step"], jnp.minimum(metrics["first_bad_step"], state.step)
      ),
    }
    info = hooks_lib.StepInfo(
      step=state.step,
      loss=loss,
      grads=grads,
      scalars=values,
      batch=(x, y),
      key=key,
      state_before=state,
    )
    logs = {}
    for hook in all_hooks:
      hook_state, new_state, logs[hook.name] = hook.update(
        hook_states.get(hook.name), new_state, info
      )
      if hook.name in hook_states:
        hook_states[hook.name] = hook_state
    return TrainCarry(new_state, metrics, hook_states), logs

  return jax.jit(step, donate_argnums=(0,), out_shardings=mesh_lib.replicated(mesh))


def make_eval_step(
  model: nn.Module,
  *,
  mesh: jax.sharding.Mesh,
  mean,
  std,
  scalars: Mapping[str, optax.Schedule] | None = None,
) -> Callable:
  """Builds the jitted eval step ``(state, sums, images, labels, valid) -> sums``.

  ``images`` ``uint8`` and ``labels`` are a (padded) batch sharded with
  :func:`sparsejax.mesh.put_batch`; ``valid`` is the bool validity mask of the
  rows. ``sums`` holds ``loss_sum`` (float32, plain cross-entropy), ``correct``
  and ``count`` (int32) over the valid rows. Batch norm runs in inference
  mode. The model gets the ``scalars`` it takes (see :func:`make_train_step`)
  at ``state.step``, e.g. the activation-blend coefficient the next training
  step would use.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  scalars = dict(scalars or {})
  model_scalars = _model_scalar_names(model, scalars)

  def step(state: state_lib.TrainState, sums, images, labels, valid):
    values = schedules.scalar_values({n: scalars[n] for n in model_scalars}, state.step)
    x = data_lib.normalize(images, mean, std)
    logits, _ = modeling.apply_model(model, state.variables, x, train=False, scalars=values)
    loss = losses.cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {
      "loss_sum": sums["loss_sum"] + jnp.sum(jnp.where(valid, loss, 0.0)),
      "correct": sums["correct"] + jnp.sum(correct).astype(jnp.int32),
      "count": sums["count"] + jnp.sum(valid).astype(jnp.int32),
    }

  return jax.jit(step, out_shardings=mesh_lib.replicated(mesh))


def eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh size."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def evaluate(
  model: nn.Module,
  state: state_lib.TrainState,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mean,
  std,
  batch_size: int = 500,
  mesh: jax.sharding.Mesh | None = None,
  eval_step: Callable | None = None,
  scalars: Mapping[str, optax.Schedule] | None = None,
) -> dict[str, float]:
  """Mean loss and accuracy of ``state`` on a whole set, tail included.

  Every example counts exactly once: the last, short batch is padded and the
  padding masked out (:func:`sparsejax.data.eval_batches`). The sums stay on
  device until the end (one host sync).

  Args:
    model: the linen module.
    state: the train state, replicated on ``mesh``.
    images: ``uint8 [N, H, W, C]`` host array; ``labels``: ``int [N]``.
    mean, std: normalisation constants.
    batch_size: rounded up to a multiple of the mesh size.
    mesh: default :func:`sparsejax.mesh.make_mesh` over all devices.
    eval_step: a step from :func:`make_eval_step` to reuse (saves a compile).
    scalars: per-step scalar schedules for a new eval step (see
      :func:`make_eval_step`); ignored with ``eval_step``.

  Returns:
    ``{"loss": float, "accuracy": float, "count": int}``.
  """
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  eval_step = eval_step or make_eval_step(model, mesh=mesh, mean=mean, std=std, scalars=scalars)
  sums = mesh_lib.put_replicated(
    {
      "loss_sum": np.zeros((), np.float32),
      "correct": np.zeros((), np.int32),
      "count": np.zeros((), np.int32),
    },
    mesh,
  )
  bs = eval_batch_size(batch_size, mesh)
  for batch_images, batch_labels, valid in data_lib.eval_batches(images, labels, bs):
    batch = mesh_lib.put_batch(
      (np.asarray(batch_images), np.asarray(batch_labels, np.int32), np.asarray(valid, bool)), mesh
    )
    sums = eval_step(state, sums, *batch)
  sums = jax.device_get(sums)
  count = int(sums["count"])
  if count == 0:
    raise ValueError("evaluate() got an empty set")
  return {
    "loss": float(sums["loss_sum"]) / count,
    "accuracy": float(sums["correct"]) / count,
    "count": count,
  }


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """The knobs of :func:`fit`'s loop (none changes what a step computes,
  except ``augment``).

  Attributes:
    eval_batch_size: test-set batch size, rounded up to a multiple of the
      mesh size (default 500).
    log_every_steps: period of the non-finite check and the progress bar's
      loss (default 50).
    eval_every_epochs: test-set evaluation period (default 1; the last epoch
      always evaluates).
    checkpoint_every_epochs: checkpoint period (default 1; the last epoch,
      ``stop_at_step`` and SIGTERM always save).
    max_to_keep: checkpoints kept (default 3).
    async_checkpointing: save in the background (default True).
    tensorboard: write TensorBoard events (default True).
    progress_bar: show a progress bar on a terminal (default True).
    augment: random crop and flip of the training batches; ``None``
      (default): the dataset's default (``dataset.augment``).

  Raises:
    ValueError: a period or size below 1.
  """

  eval_batch_size: int = 500
  log_every_steps: int = 50
  eval_every_epochs: int = 1
  checkpoint_every_epochs: int = 1
  max_to_keep: int = 3
  async_checkpointing: bool = True
  tensorboard: bool = True
  progress_bar: bool = True
  augment: bool | None = None

  def __post_init__(self):
    for name in (
      "eval_batch_size",
      "log_every_steps",
      "eval_every_epochs",
      "checkpoint_every_epochs",
      "max_to_keep",
    ):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"FitOptions.{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    state: the final train state (replicated on the mesh).
    history: per-epoch metric records, those of earlier sessions included
      (read back from ``metrics.jsonl``).
    preempted: True when the run stopped early on SIGTERM (a checkpoint of
      the last step was saved; rerun to resume).
    resumed_from: global step restored from a checkpoint, or ``None``.
    hook_states: ``{hook.name: state}`` of the hooks that have one.
  """

  state: state_lib.TrainState
  history: list[dict]
  preempted: bool
  resumed_from: int | None
  hook_states: dict[str, PyTree] = dataclasses.field(default_factory=dict)


def _non_finite_message(
  bad_step: int, steps_per_epoch: int, last_good: tuple[int, int] | None, ckpt_dir: str
) -> str:
  epoch = bad_step // steps_per_epoch + 1
  where = (
    f"at epoch {epoch}, step {bad_step % steps_per_epoch + 1} of "
    f"{steps_per_epoch} (global step {bad_step + 1})"
  )
  if last_good is None:
    kept = "No checkpoint had been written yet"
  else:
    kept = (
      f"The last good checkpoint (epoch {last_good[1]}, global step "
      f"{last_good[0]}) in {ckpt_dir} is kept"
    )
  return (
    f"Non-finite training loss {where}; training stopped. {kept}, and no "
    "checkpoint of the non-finite state was written. Lower the learning "
    "rate or check the data."
  )


def _sparsity(state: state_lib.TrainState) -> float:
  mask = state.mask
  return masks_lib.summary(mask).sparsity if mask is not None else 0.0


def _layout(init, model, sample, hooks, mesh):
  """The abstract initial state and the checkpoint tree of the run's carry.

  Raises ``ValueError`` when the params or statistics of ``init`` do not have
  the layout of ``model``'s.
  """
  abstract_state = jax.eval_shape(init) if callable(init) else ckpt_lib.abstract(init)
  if not isinstance(abstract_state, state_lib.TrainState):
    raise TypeError(
      f"init must be a TrainState or a function returning one, got {type(abstract_state).__name__}"
    )
  variables = jax.eval_shape(lambda: state_lib.init_variables(model, sample, jax.random.key(0)))
  variables = state_lib.variables_of(variables["params"], variables.get("batch_stats", {}))
  if ckpt_lib.tree_signature(variables) != ckpt_lib.tree_signature(abstract_state.variables):
    raise ValueError(
      "init does not have the structure, shapes and dtypes of the params "
      "and batch statistics of this model"
    )
  abstract_carry = jax.eval_shape(lambda s: init_carry(s, hooks), abstract_state)
  return abstract_state, ckpt_lib.abstract(_ckpt_tree(abstract_carry), mesh_lib.replicated(mesh))


def _ckpt_tree(carry: TrainCarry) -> dict:
  """The checkpointed tree: ``{state, metrics, hooks?}`` (no ``hooks`` item
  without stateful hooks)."""
  tree = {"state": carry.state, "metrics": carry.metrics}
  if carry.hook_states:
    tree["hooks"] = carry.hook_states
  return tree


class _Loop:
  """fit's host-side actions, as callbacks, and what they share."""

  def __init__(self, ctx, ckpts, meta, options, step_logs, log, total_steps, step):
    self.ctx, self.ckpts, self.meta, self.options = ctx, ckpts, meta, options
    self.step_logs, self.log = step_logs, log
    self.last_good: tuple[int, int] | None = None
    self.stop_signal = ckpt_lib.StopSignal()
    show = options.progress_bar and sys.stderr.isatty()
    self.bar = tqdm.tqdm(
      total=total_steps,
      initial=step,
      unit="step",
      disable=not show,
      dynamic_ncols=True,
      leave=False,
    )
    self.t0, self.steps_run, self.elapsed, self.host = time.perf_counter(), 0, 0.0, {}

  def callbacks(self, user: Sequence[hooks_lib.Callback]) -> list:
    every, at_end = hooks_lib.callback, functools.partial(hooks_lib.callback, at_epoch_end=True)
    return [
      every(self.add_step_logs, every_steps=1),
      every(self.check_finite, every_steps=self.options.log_every_steps, at_epoch_end=True),
      *user,
      every(self.progress, every_steps=1),
      every(self.stop_mid_epoch, every_steps=1),
      at_end(self.evaluate),
      at_end(self.write_record),
      at_end(self.checkpoint),
    ]

  def start_epoch(self) -> None:
    self.t0, self.steps_run = time.perf_counter(), 0

  def stop_requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.stop_signal.signum is not None
    return bool(self.ckpts.manager.reached_preemption(step))

  def save(self, carry: TrainCarry, epochs: int, step: int) -> None:
    self.step_logs.flush()
    self.ckpts.save(step, _ckpt_tree(carry), dict(self.meta, epoch=epochs, step=step))

  def add_step_logs(self, step, carry, ctx):
    self.steps_run += 1
    self.step_logs.add(step, ctx.logs)

  def check_finite(self, step, carry, ctx):
    self.host = jax.device_get(carry.metrics)
    if ctx.epoch_end:  # the epoch's training time, evaluation excluded
      self.elapsed = time.perf_counter() - self.t0
    bad = int(self.host["first_bad_step"])
    if bad != _NO_BAD_STEP:
      self.step_logs.drop()
      raise FloatingPointError(
        _non_finite_message(bad, ctx.steps_per_epoch, self.last_good, self.ckpts.directory)
      )

  def progress(self, step, carry, ctx):
    self.bar.update(1)
    if step % self.options.log_every_steps == 0:
      self.bar.set_postfix(
        epoch=ctx.epoch,
        loss="%.4f" % (float(self.host["loss_sum"]) / max(int(self.host["steps"]), 1)),
      )

  def stop_mid_epoch(self, step, carry, ctx):
    if ctx.epoch_end:
      return
    preempted = self.stop_requested(step)
    if preempted or step == ctx.end_step:
      self.check_finite(step, carry, ctx)
      self.save(carry, ctx.epoch - 1, step)
      self.ckpts.wait()
      k, spe = step % ctx.steps_per_epoch, ctx.steps_per_epoch
      if preempted:
        logger.warning(
          "SIGTERM: saved checkpoint %s (epoch %d, step %d of %d); "
          "exiting. Rerun the same command to resume.",
          self.ckpts.step_dir(step),
          ctx.epoch,
          k,
          spe,
        )
      else:
        logger.info(
          "Reached stop_at_step: saved checkpoint %s (epoch %d, step %d of %d).",
          self.ckpts.step_dir(step),
          ctx.epoch,
          k,
          spe,
        )
      ctx.stop = "preempted" if preempted else "stop_at_step"

  def evaluate(self, step, carry, ctx):
    if ctx.epoch % self.options.eval_every_epochs == 0 or step == ctx.total_steps:
      ev = ctx.evaluate(carry.state)
      ctx.record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])

  def write_record(self, step, carry, ctx):
    host, lr = self.host, carry.state.learning_rate
    record = {"epoch": ctx.epoch, "step": step}
    if lr is not None:
      record["lr"] = float(lr)
    record.update(
      train_loss=float(host["loss_sum"]) / max(int(host["steps"]), 1),
      train_accuracy=float(host["correct"]) / max(int(host["count"]), 1),
    )
    fields = {k: hooks_lib.json_number(v) for k, v in ctx.record.items()}
    record.update({k: fields.pop(k) for k in ("test_loss", "test_accuracy") if k in fields})
    record.update(
      sparsity=_sparsity(carry.state),
      epoch_seconds=self.elapsed,
      steps_per_second=self.steps_run / max(self.elapsed, 1e-9),
    )
    record.update({n: float(fn(step - 1)) for n, fn in ctx.scalars.items()})
    record.update(fields)
    self.bar.clear()  # keep the log line off the bar's line
    logger.info(
      "epoch %d/%d: %s",
      ctx.epoch,
      ctx.num_epochs,
      ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))
      ),
    )
    self.bar.refresh()
    self.step_logs.flush()
    self.log.write(record)
    metrics = mesh_lib.put_replicated(init_train_metrics(), ctx.mesh)
    return carry.replace(metrics=metrics)

  def checkpoint(self, step, carry, ctx):
    stopping = step < ctx.total_steps and self.stop_requested(step)
    if (
      ctx.epoch % self.options.checkpoint_every_epochs == 0
      or stopping
      or step in (ctx.end_step, ctx.total_steps)
    ):
      self.save(carry, ctx.epoch, step)
      self.last_good = (step, ctx.epoch)
    if stopping:
      self.ckpts.wait()
      logger.warning(
        "SIGTERM: saved checkpoint %s (end of epoch %d); "
        "exiting. Rerun the same command to resume.",
        self.ckpts.step_dir(step),
        ctx.epoch,
      )
      ctx.stop = "preempted"


def _run_callbacks(callbacks, step, carry, ctx, *, fresh_start=False):
  """Runs the due callbacks in order; the carry they return replaces the
  carry (its hook states copied: they may share arrays with the state, and
  both are donated to the next step)."""
  for cb in callbacks:
    if not (cb.at_fresh_start if fresh_start else cb.due(step, ctx)):
      continue
    changed = cb(step, carry, ctx)
    if changed is None or changed is carry:
      continue
    if ckpt_lib.tree_signature(changed) != ckpt_lib.tree_signature(carry):
      raise ValueError(f"callback {cb!r} changed the structure, shapes or dtypes of the carry")
    if changed.hook_states is not carry.hook_states:
      changed = changed.replace(hook_states=jax.tree.map(jnp.copy, changed.hook_states))
    carry = changed
    if fresh_start:
      carry = mesh_lib.put_replicated(carry, ctx.mesh)
  return carry


def _check_args(dataset, num_epochs, batch_size, stop_at_step, scalars):
  n_train = int(dataset.train_images.shape[0])
  if int(num_epochs) < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
  spe = schedules.steps_per_epoch(n_train, int(batch_size))
  total_steps = int(num_epochs) * spe
  if stop_at_step is not None and int(stop_at_step) < 0:
    raise ValueError(f"stop_at_step must be >= 0, got {stop_at_step}")
  end_step = total_steps if stop_at_step is None else min(int(stop_at_step), total_steps)
  clash = sorted(set(scalars) & set(RECORD_KEYS))
  if clash:
    raise ValueError(f"scalar names {clash} are taken by the epoch record")
  return n_train, spe, total_steps, end_step


def fit(
  model: nn.Module,
  dataset: data_lib.Dataset,
  workdir: str | os.PathLike,
  *,
  init: state_lib.TrainState | Callable[[], state_lib.TrainState],
  num_epochs: int,
  batch_size: int,
  seed: int = 0,
  loss_fn: losses.LossFn | None = None,
  scalars: Mapping[str, optax.Schedule] | None = None,
  hooks: Sequence[hooks_lib.StepHook] = (),
  callbacks: Sequence[hooks_lib.Callback] = (),
  mesh: jax.sharding.Mesh | None = None,
  stop_at_step: int | None = None,
  options: FitOptions = FitOptions(),
) -> FitResult:
  """Trains ``model`` on ``dataset``; checkpointed, resumable, logged.

  Resumes automatically from the newest readable checkpoint in
  ``workdir/checkpoints``. Writes ``workdir/metrics.jsonl`` (one JSON record
  per epoch: ``epoch``, ``step``, ``lr`` (the learning rate of the epoch's
  last update, read from the optimiser state when it carries one:
  :attr:`sparsejax.state.TrainState.learning_rate`), ``train_loss``,
  ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``sparsity`` (of the
  mask in the state at the epoch's end), ``epoch_seconds``,
  ``steps_per_second``, the value of each scalar at the epoch's last step and
  the fields the callbacks add), ``workdir/steps.jsonl`` (the hooks' per-step
  logs, see :attr:`sparsejax.hooks.StepHook.logs_at`) and TensorBoard events
  in ``workdir/tb``.

  Args:
    model: linen module.
    dataset: a :class:`sparsejax.data.Dataset`.
    workdir: run directory: a local directory or any path ``etils.epath``
      and Orbax accept (e.g. ``gs://bucket/run``).
    init: the initial train state, or a zero-argument function making one
      (e.g. ``lambda: state.create_train_state(model, tx, sample, key)``).
      Its layout (traced with ``jax.eval_shape``: a mask function inside is
      traced, not run) is the checkpoints'; the function is called only on a
      fresh start. On resume the arrays come from the checkpoint and the
      optimiser (``state.tx``) from ``init``'s state. A state that does not
      start at step 0 (e.g. a lottery-ticket rewind point,
      :func:`sparsejax.lottery.rewind_state`) continues with the schedule and
      data order of its step.
    num_epochs: epochs of the schedule.
    batch_size: global batch size (full batches only,
      :func:`sparsejax.schedules.steps_per_epoch`).
    seed: the data order's seed (:func:`sparsejax.data.epoch_permutation`).
    loss_fn: ``loss_fn(logits, labels, scalars) -> per-example loss``; default
      :func:`sparsejax.losses.smoothed_cross_entropy` ``()``.
    scalars: ``{name: optax.Schedule}`` of the global step, evaluated inside
      the jitted train and eval steps (see :func:`make_train_step`), e.g.
      ``{"act_coef": schedules.hold_then_ramp(1.0, 0.0, 500, 2000)}``.
    hooks: :class:`sparsejax.hooks.StepHook` s, traced in the step; their
      states are checkpointed with the train state.
    callbacks: :class:`sparsejax.hooks.Callback` s, run on the host after
      the steps they are due at, before fit's own.
    mesh: default :func:`sparsejax.mesh.make_mesh` over all devices.
    stop_at_step: train only up to this global step, save a checkpoint there
      (also mid-epoch) and return; a later call without it continues exactly
      as if the run had never stopped. ``None``: the whole schedule.
    options: :class:`FitOptions`.

  Returns:
    A :class:`FitResult`.

  Raises:
    FloatingPointError: on a non-finite training loss; the message names the
      epoch and step and the last good checkpoint, which is kept.
    CheckpointMismatchError: ``workdir`` holds checkpoints of a different
      run (another model, mask, optimiser state, hook states, batch size,
      seed or dataset).
    ValueError: a batch size larger than the training set; an ``init`` of
      another model; a negative ``stop_at_step``; a scalar named like a
      record field.
  """
  workdir = _paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  mesh_lib.assert_same_across_processes(
    (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels),
    what=f"dataset {dataset.name!r}",
  )
  scalars = dict(scalars or {})
  n_train, spe, total_steps, end_step = _check_args(
    dataset, num_epochs, batch_size, stop_at_step, scalars
  )
  hooks = hooks_lib.check_hooks(hooks)
  callbacks = hooks_lib.check_callbacks(callbacks)
  augment = bool(dataset.augment if options.augment is None else options.augment)
  loss_fn = losses.smoothed_cross_entropy() if loss_fn is None else loss_fn
  sample = jnp.zeros((1,) + tuple(dataset.train_images.shape[1:]), jnp.float32)
  abstract_state, abstract = _layout(init, model, sample, hooks, mesh)
  meta = {
    "batch_size": int(batch_size),
    "num_train": n_train,
    "steps_per_epoch": spe,
    "seed": int(seed),
    "state_signature": ckpt_lib.tree_signature(abstract),
  }
  train_step = make_train_step(
    model,
    mesh=mesh,
    batch_size=int(batch_size),
    mean=dataset.mean,
    std=dataset.std,
    augment=augment,
    loss_fn=loss_fn,
    scalars=scalars,
    hooks=hooks,
  )
  eval_step = make_eval_step(model, mesh=mesh, mean=dataset.mean, std=dataset.std, scalars=scalars)
  epoch_perm = jax.jit(
    functools.partial(data_lib.epoch_permutation, n=n_train),
    out_shardings=mesh_lib.replicated(mesh),
  )
  ctx = hooks_lib.FitContext(
    model=model,
    dataset=dataset,
    mesh=mesh,
    steps_per_epoch=spe,
    scalars=scalars,
    num_epochs=int(num_epochs),
    batch_size=int(batch_size),
    seed=int(seed),
    augment=augment,
    loss_fn=loss_fn,
    evaluate=functools.partial(
      evaluate,
      model,
      images=dataset.test_images,
      labels=dataset.test_labels,
      mean=dataset.mean,
      std=dataset.std,
      batch_size=options.eval_batch_size,
      mesh=mesh,
      eval_step=eval_step,
    ),
    total_steps=total_steps,
    end_step=end_step,
  )
  for cb in callbacks:
    cb.check(ctx)

  with contextlib.ExitStack() as cleanup:
    ckpts = ckpt_lib.Checkpoints(
      workdir / "checkpoints",
      max_to_keep=options.max_to_keep,
      async_save=options.async_checkpointing,
    )
    cleanup.callback(ckpts.close)
    carry, resumed_from, epochs_done = _start(
      init, abstract_state, abstract, ckpts, meta, hooks, mesh
    )
    step = int(jax.device_get(carry.state.step))
    log = metrics_log.MetricsLog(workdir, epochs_done, tensorboard=options.tensorboard)
    cleanup.callback(log.close)
    loop = _Loop(
      ctx,
      ckpts,
      meta,
      options,
      hooks_lib.PendingStepLogs(hooks, metrics_log.StepLog(workdir, step)),
      log,
      total_steps,
      step,
    )
    cleanup.callback(loop.bar.close)
    cleanup.enter_context(loop.stop_signal)
    loop.last_good = (resumed_from, epochs_done) if resumed_from is not None else None
    if resumed_from is None:
      carry = _run_callbacks(callbacks, step, carry, ctx, fresh_start=True)
    all_callbacks = loop.callbacks(callbacks)
    images = mesh_lib.put_replicated(np.asarray(dataset.train_images), mesh)
    labels = mesh_lib.put_replicated(np.asarray(dataset.train_labels, np.int32), mesh)
    while step < end_step and ctx.stop is None:
      ctx.epoch = step // spe + 1
      perm = epoch_perm(int(seed), ctx.epoch - 1)
      loop.start_epoch()
      for k in range(step % spe, spe):
        carry, ctx.logs = train_step(carry, images, labels, perm, k)
        step += 1
        ctx.epoch_end, ctx.record = k + 1 == spe, {}
        carry = _run_callbacks(all_callbacks, step, carry, ctx)
        if ctx.stop is not None:
          break
  return FitResult(
    state=carry.state,
    history=list(log.history),
    preempted=ctx.stop == "preempted",
    resumed_from=resumed_from,
    hook_states=carry.hook_states,
  )


def _start(init, abstract_state, abstract, ckpts, meta, hooks, mesh):
  """``(carry, resumed_from, epochs_done)``: the newest readable checkpoint's
  carry (with ``init``'s optimiser), else the fresh carry of ``init``."""

  def check_meta(step, recorded):
    ckpt_lib.check_same_run(
      recorded,
      meta,
      where=f"checkpoint {ckpts.step_dir(step)}",
      fields=meta,
      what="another model, mask, optimiser, hooks, batch size, seed or dataset",
    )

  found = ckpts.restore_latest(abstract, check_meta) if ckpts.all_steps() else None
  if found is not None:
    resumed_from, restored, recorded = found
    # The restored arrays in the layout of init's state, with its optimiser.
    state = restored["state"].replace(tx=abstract_state.tx)
    carry = TrainCarry(
      state=state, metrics=restored["metrics"], hook_states=dict(restored.get("hooks", {}))
    )
    logger.info(
      "Resumed from checkpoint %s (epoch %d, global step %d).",
      ckpts.step_dir(resumed_from),
      int(recorded["epoch"]),
      resumed_from,
    )
    return carry, resumed_from, int(recorded["epoch"])
  if ckpts.all_steps() or epath.Path(ckpts.quarantine_dir).is_dir():
    logger.warning("No readable checkpoint in %s; starting from scratch.", ckpts.directory)
  state = init() if callable(init) else init
  carry = mesh_lib.put_replicated(init_carry(state, hooks), mesh)
  return carry, None, 0
