"""Training: train state, jitted data-parallel steps and the checkpointed loop.

* :class:`TrainState`: params, batch statistics, optimiser state (holding the
  mask for sparse training, :func:`sparsejax.optim.masked`), step, rng and, as
  a static field, the optimiser transformation; a pytree.
* :func:`create_train_state`: initialises a model, masks the fresh params and
  builds the (masked) optimiser and its state.
* :func:`make_train_step`, :func:`make_eval_step`, :func:`evaluate`: jitted,
  data-parallel steps (:mod:`sparsejax.mesh`: batches sharded along
  ``"data"``, state and device-resident ``uint8`` datasets replicated; each
  step gathers, augments and normalises its batch inside ``jit``).
* :func:`fit`: the epoch loop with Orbax checkpoints (:mod:`sparsejax.checkpoints`:
  every epoch and on SIGTERM, the last N kept, automatic resume that skips
  unreadable checkpoints), a progress bar, ``metrics.jsonl``, ``steps.jsonl``
  and TensorBoard logs (:mod:`sparsejax.metrics_log`) and a clear stop on a
  non-finite loss. It can start from a given state (e.g. a lottery-ticket
  rewind point) and stop at a given step.

Extension points of :func:`fit`, so that a method plugs in without a branch in
the loop: ``tx`` (the optimiser; default
:func:`sparsejax.schedules.make_optimizer`), ``scalars`` (named
``optax.Schedule`` s of the step, evaluated inside the jitted train and eval
steps and given to the model, e.g. ``act_coef``, and to the loss),
``loss_fn`` (``loss_fn(logits, labels, scalars) -> per-example loss``) and
``hooks`` (:class:`sparsejax.hooks.Hook`: a state of their own, checkpointed
with the train state; a change of the initial state on a fresh start, e.g.
ToST's LRsI; a traced per-step update, e.g. a mask change every K steps; host
per-step and epoch-end updates).

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
of the step. A checkpoint holds the train state, the hooks' states and the
epoch's running metric sums, so a run resumed from any checkpoint (an epoch
end, the SIGTERM step, ``stop_at_step``) computes bitwise what a run that never
stopped computes (same devices and software); ``metrics.jsonl`` and
``steps.jsonl`` are truncated to the restored epoch and step.

Example::

  from sparsejax import data, models, train

  ds = data.load("digits")
  model = models.get("mlp", ds.num_classes)
  config = dict(num_epochs=20, batch_size=64, learning_rate=0.05,
                lr_schedule="cosine", weight_decay=5e-4)
  result = train.fit(config, "/tmp/run", model=model, dataset=ds)
  print(result.history[-1]["test_accuracy"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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
from sparsejax.batch_stats import BN_VARIANCE_MODES, recompute_batch_stats  # noqa: F401  (re-exported)
from sparsejax import data as data_lib
from sparsejax import hooks as hooks_lib
from sparsejax import losses
from sparsejax import masks as masks_lib
from sparsejax import mesh as mesh_lib
from sparsejax import metrics_log
from sparsejax import modeling
from sparsejax import optim
from sparsejax import schedules

PyTree = Any
logger = logging.getLogger(__name__)

#: Sentinel of the ``first_bad_step`` metric: no non-finite loss seen.
_NO_BAD_STEP = np.iinfo(np.int32).max
#: Keys of an epoch record written by :func:`fit` itself.
RECORD_KEYS = ("epoch", "step", "lr", "train_loss", "train_accuracy",
               "test_loss", "test_accuracy", "sparsity", "epoch_seconds",
               "steps_per_second")


# ----------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and the optimiser that changes it.

  A pytree: the arrays are its leaves; the optimiser transformation ``tx`` is
  a static field (part of the tree structure, not saved in checkpoints). The
  steps call ``state.tx.update``, so what :func:`create_train_state` built (an
  inner optimiser wrapped with :func:`sparsejax.optim.masked` for sparse
  training, or a transformation that holds its own mask) is exactly what
  trains. ``state.tx`` is compared by identity: each transformation object
  compiles its own step (the persistent compilation cache shares identical
  programs across them).

  Attributes:
    step: ``int32`` scalar, the number of optimiser steps taken.
    params: model parameters (pruned entries exactly 0).
    batch_stats: batch-norm running statistics; ``{}`` for models without.
    opt_state: optimiser state; for sparse training it contains a
      :class:`sparsejax.optim.MaskedState` holding the mask.
    rng: ``uint32`` raw key data (``jax.random.key_data``) of the training key;
      constant during training. The augmentation key of step ``t`` is
      ``fold_in(key, t)``.
    tx: the full optimiser transformation (static).
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def key(self) -> jax.Array:
    """The training key as a typed PRNG key."""
    return jax.random.wrap_key_data(self.rng)

  @property
  def mask(self) -> PyTree | None:
    """The mask held in the optimiser state, or ``None`` for dense training."""
    return optim.find_mask(self.opt_state)

  @property
  def variables(self) -> dict:
    """``{'params', 'batch_stats'}`` ready for ``model.apply``."""
    return _variables(self.params, self.batch_stats)


def _variables(params, batch_stats) -> dict:
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


@functools.partial(jax.jit, static_argnums=(0,))
def init_variables(model: nn.Module, sample_input: jax.Array,
                   key: jax.Array) -> dict:
  """``model.init`` in inference mode; returns ``{'params', 'batch_stats'?}``.

  Jitted with the model static: one compilation per model and input shape,
  shared by every caller (train-state creation, scoring, re-initialisation).
  """
  variables = model.init(key, sample_input, train=False)
  return flax.core.unfreeze(variables) if isinstance(
      variables, flax.core.FrozenDict) else dict(variables)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_optimizer(tx, params, mask):
  """``(params, opt_state)`` of ``tx`` (wrapped with ``mask`` unless ``None``).

  Jitted with the inner ``tx`` static and the mask traced: one compilation per
  optimiser for every mask. Params are masked with the mask in the state.
  """
  if mask is not None:
    tx = optim.masked(tx, mask)
  opt_state = tx.init(params)
  held = optim.find_mask(opt_state)
  if held is not None:
    params = masks_lib.apply(params, held)
  return params, opt_state


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       sample_input: jax.Array, rng: jax.Array,
                       mask: PyTree | Callable[[PyTree], PyTree] | None = None
                       ) -> TrainState:
  """Initialises the model and the optimiser; step 0.

  ``rng`` is split into the init key and the training key; the same ``rng``
  always gives the same state. Initialisation is jitted (one compilation per
  model and optimiser), and the function also works under ``jax.eval_shape``.

  The state's transformation is ``sparsejax.optim.masked(tx, mask)`` when a
  ``mask`` is given, else ``tx`` itself. A ``tx`` whose state already holds a
  mask (one that contains a :class:`sparsejax.optim.MaskedState`, e.g. a
  dynamic-sparse-training optimiser) is used as is, with ``mask=None``. In
  both sparse cases the fresh params are masked with the mask of the state.

  Args:
    model: a Flax linen module (e.g. from :func:`sparsejax.models.get`).
    tx: the optimiser (e.g. :func:`sparsejax.schedules.make_optimizer`).
    sample_input: an input batch of the right shape, e.g. ``zeros((1, H, W, C))``.
    rng: a PRNG key (typed or raw ``uint32`` key data).
    mask: ``None`` (dense, or ``tx`` holds its own mask); a bool mask pytree
      parallel to the params; or a callable ``params -> mask`` applied to the
      fresh params (e.g. magnitude pruning at initialisation; called outside
      ``jit``).

  Returns:
    A :class:`TrainState` on the default device.

  Raises:
    ValueError: a mask that does not fit the params, or a mask for a ``tx``
      that already holds one.
  """
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
  init_key, train_key = jax.random.split(rng)
  variables = init_variables(model, sample_input, init_key)
  params = variables["params"]
  if callable(mask):
    mask = mask(params)
  if mask is not None:
    masks_lib.check_mask(mask, params)
    if optim.find_mask(jax.eval_shape(tx.init, params)) is not None:
      raise ValueError("tx already holds a mask in its state (it contains an "
                       "optim.MaskedState); pass mask=None")
  params, opt_state = _init_optimizer(tx, params, mask)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=opt_state, rng=jax.random.key_data(train_key),
                    tx=tx if mask is None else optim.masked(tx, mask))


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
  hook_read = {n for h in hooks for n in getattr(h, "scalar_names", ())}
  used = set(model_scalars) | set(loss_read) | hook_read
  unused = sorted(set(names) - used)
  if unused:
    raise ValueError(
        f"scalars {unused} are read by neither the model, the loss nor a hook, "
        f"so they would change nothing; read are: model {sorted(model_scalars)}, "
        f"loss {sorted(loss_read)}, hooks {sorted(hook_read)}. Rename or drop "
        "them (ToST's α needs its loss, tost.label_smoothing_loss())")


def init_train_metrics() -> dict[str, jax.Array]:
  """Zeroed running sums of :func:`make_train_step`.

  Keys: ``loss_sum`` (sum of the per-step mean losses), ``steps``,
  ``correct``, ``count`` and ``first_bad_step`` (smallest global step with a
  non-finite loss; int32 max when none).
  """
  return {"loss_sum": jnp.zeros((), jnp.float32),
          "steps": jnp.zeros((), jnp.int32),
          "correct": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), _NO_BAD_STEP, jnp.int32)}


def make_train_step(model: nn.Module, *, mesh: jax.sharding.Mesh,
                    batch_size: int, mean, std, augment: bool = False,
                    pad: int = 4, flip: bool = True,
                    loss_fn: losses.LossFn | None = None,
                    scalars: Mapping[str, optax.Schedule] | None = None,
                    hooks: Sequence[hooks_lib.Hook] = ()) -> Callable:
  """Builds the jitted, data-parallel training step.

  The returned function is::

    step(state, metrics, images, labels, perm, step_in_epoch, hook_states=None)
        -> (state, metrics, hook_states, logs)

  * ``state``: a :class:`TrainState` replicated on ``mesh``; its ``tx``
    makes the update.
  * ``metrics``: running sums from :func:`init_train_metrics`.
  * ``images``: the whole training set, ``uint8 [N, H, W, C]``, replicated on
    ``mesh``; ``labels``: ``int32 [N]``.
  * ``perm``: the epoch's permutation (:func:`sparsejax.data.epoch_permutation`).
  * ``step_in_epoch``: int, which batch of the permutation to take
    (:func:`sparsejax.data.batch_indices`).
  * ``hook_states``: ``{hook.key: state}`` of the hooks that have one
    (default ``{}``); ``logs``: ``{hook.key: logs}`` of each hook's
    :meth:`sparsejax.hooks.Hook.after_step`.

  Inside ``jit``: the scalars of ``state.step``, gather the batch, shard it
  along ``"data"``, augment with ``fold_in(state.key, state.step)`` (random
  crop with ``pad`` and horizontal flip) when ``augment``, normalise with
  ``mean``/``std``, forward in training mode (batch norm over the global
  batch), the mean of ``loss_fn``, gradient, ``state.tx`` update, then each
  hook's :meth:`sparsejax.hooks.Hook.after_step`. ``state`` and ``metrics`` are donated.

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
      model, the loss or a hook (:attr:`sparsejax.hooks.Hook.scalar_names`):
      a scalar nothing reads (a typo such as ``act_coeff``) raises
      ``ValueError`` when the step is first traced, before it runs.
    hooks: :class:`sparsejax.hooks.Hook` objects.
  """
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} is not divisible by the "
                     f"{mesh.size} devices of the mesh")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  in_batch = mesh_lib.batch_sharding(mesh)
  loss_fn = losses.smoothed_cross_entropy() if loss_fn is None else loss_fn
  scalars = dict(scalars or {})
  model_scalars = _model_scalar_names(model, scalars)
  all_hooks = hooks_lib.check_hooks(hooks)
  stepping = [h for h in all_hooks if hooks_lib.overrides(h, "after_step")]

  def step(state: TrainState, metrics, images, labels, perm, step_in_epoch,
           hook_states=None):
    hook_states = dict(hook_states or {})
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
          model, params, {"batch_stats": state.batch_stats} if state.batch_stats else {},
          x, y, loss_fn,
          scalars=values, loss_scalars=loss_scalars, rngs={"dropout": dropout_key})
      return loss, (logits, model_state.get("batch_stats", state.batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    _check_scalars_read(values, model_scalars, loss_scalars.read, all_hooks)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_stats, opt_state=opt_state)
    finite = jnp.isfinite(loss)
    metrics = {
        "loss_sum": metrics["loss_sum"] + loss,
        "steps": metrics["steps"] + 1,
        "correct": metrics["correct"] + jnp.sum(
            jnp.argmax(logits, -1) == y).astype(jnp.int32),
        "count": metrics["count"] + y.shape[0],
        "first_bad_step": jnp.where(
            finite, metrics["first_bad_step"],
            jnp.minimum(metrics["first_bad_step"], state.step)),
    }
    info = hooks_lib.StepInfo(step=state.step, loss=loss, grads=grads,
                              scalars=values, batch=(x, y), key=key,
                              state_before=state)
    logs = {}
    for hook in stepping:
      hook_state, new_state, logs[hook.key] = hook.after_step(
          hook_states.get(hook.key), new_state, info)
      if hook.key in hook_states:
        hook_states[hook.key] = hook_state
    return new_state, metrics, hook_states, logs

  return jax.jit(step, donate_argnums=(0, 1),
                 out_shardings=mesh_lib.replicated(mesh))


def make_eval_step(model: nn.Module, *, mesh: jax.sharding.Mesh, mean, std,
                   scalars: Mapping[str, optax.Schedule] | None = None
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

  def step(state: TrainState, sums, images, labels, valid):
    values = schedules.scalar_values({n: scalars[n] for n in model_scalars}, state.step)
    x = data_lib.normalize(images, mean, std)
    logits, _ = modeling.apply_model(model, state.variables, x, train=False,
                                     scalars=values)
    loss = losses.cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {"loss_sum": sums["loss_sum"] + jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": sums["correct"] + jnp.sum(correct).astype(jnp.int32),
            "count": sums["count"] + jnp.sum(valid).astype(jnp.int32)}

  return jax.jit(step, out_shardings=mesh_lib.replicated(mesh))


def eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh size."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def evaluate(model: nn.Module, state: TrainState, images: np.ndarray,
             labels: np.ndarray, *, mean, std, batch_size: int = 500,
             mesh: jax.sharding.Mesh | None = None,
             eval_step: Callable | None = None,
             scalars: Mapping[str, optax.Schedule] | None = None
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
  eval_step = eval_step or make_eval_step(model, mesh=mesh, mean=mean, std=std,
                                          scalars=scalars)
  sums = mesh_lib.put_replicated({"loss_sum": np.zeros((), np.float32),
                                  "correct": np.zeros((), np.int32),
                                  "count": np.zeros((), np.int32)}, mesh)
  bs = eval_batch_size(batch_size, mesh)
  for batch_images, batch_labels, valid in data_lib.eval_batches(
      images, labels, bs):
    batch = mesh_lib.put_batch(
        (np.asarray(batch_images), np.asarray(batch_labels, np.int32),
         np.asarray(valid, bool)), mesh)
    sums = eval_step(state, sums, *batch)
  sums = jax.device_get(sums)
  count = int(sums["count"])
  if count == 0:
    raise ValueError("evaluate() got an empty set")
  return {"loss": float(sums["loss_sum"]) / count,
          "accuracy": float(sums["correct"]) / count, "count": count}


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


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
    hook_states: ``{hook.key: state}`` of the hooks that have one.
  """

  state: TrainState
  history: list[dict]
  preempted: bool
  resumed_from: int | None
  hook_states: dict[str, PyTree] = dataclasses.field(default_factory=dict)


def _non_finite_message(bad_step: int, steps_per_epoch: int,
                        last_good: tuple[int, int] | None, ckpt_dir: str) -> str:
  epoch = bad_step // steps_per_epoch + 1
  where = (f"at epoch {epoch}, step {bad_step % steps_per_epoch + 1} of "
           f"{steps_per_epoch} (global step {bad_step + 1})")
  if last_good is None:
    kept = "No checkpoint had been written yet"
  else:
    kept = (f"The last good checkpoint (epoch {last_good[1]}, global step "
            f"{last_good[0]}) in {ckpt_dir} is kept")
  return (f"Non-finite training loss {where}; training stopped. {kept}, and no "
          "checkpoint of the non-finite state was written. Lower the learning "
          "rate or check the data.")


def _sparsity(state: TrainState) -> float:
  mask = state.mask
  return masks_lib.summary(mask).sparsity if mask is not None else 0.0


def fit(config, workdir: str | os.PathLike, *, model: nn.Module,
        dataset: data_lib.Dataset,
        mask: PyTree | Callable[[PyTree], PyTree] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        initial_state: TrainState | None = None,
        stop_at_step: int | None = None,
        tx: optax.GradientTransformation | None = None,
        loss_fn: losses.LossFn | None = None,
        scalars: Mapping[str, optax.Schedule] | None = None,
        hooks: Sequence[hooks_lib.Hook] = ()) -> FitResult:
  """Trains ``model`` on ``dataset``; checkpointed, resumable, logged.

  Resumes automatically from the newest readable checkpoint in
  ``workdir/checkpoints``. Writes ``workdir/metrics.jsonl`` (one JSON record
  per epoch: ``epoch``, ``step``, ``lr`` (without a ``tx`` argument),
  ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
  ``sparsity`` (of the mask in the state at the epoch's end), ``epoch_seconds``,
  ``steps_per_second``, the value of each scalar at the epoch's last step and
  the fields added by the hooks), ``workdir/steps.jsonl`` (the hooks'
  per-step logs, see :attr:`sparsejax.hooks.Hook.log_every_steps`) and TensorBoard events in
  ``workdir/tb``.

  Config fields (attributes or keys of an ``ml_collections.ConfigDict``):
    ``seed``, ``num_epochs``, ``batch_size``, ``eval_batch_size`` (500),
    the optimiser and schedule fields of
    :func:`sparsejax.schedules.make_optimizer` (unless ``tx`` is given),
    ``label_smoothing`` (0; for the default loss), ``augment`` (``None`` = the
    dataset's default), ``max_to_keep`` (3), ``async_checkpointing`` (True),
    ``progress_bar`` (True; shown only on a terminal), ``log_every_steps``
    (50: progress-bar loss and non-finite check), ``eval_every_epochs`` (1),
    ``checkpoint_every_epochs`` (1; the last epoch, ``stop_at_step`` and
    SIGTERM always save) and ``tensorboard`` (True).

  Args:
    config: the run configuration.
    workdir: run directory: a local directory or any path ``etils.epath``
      and Orbax accept (e.g. ``gs://bucket/run``).
    model: linen module.
    dataset: a :class:`sparsejax.data.Dataset`.
    mask: ``None`` (dense, or ``tx`` holds its own mask), a mask or a callable
      ``params -> mask``, see :func:`create_train_state`. Not called on
      resume: the mask comes from the checkpoint.
    mesh: default :func:`sparsejax.mesh.make_mesh` over all devices.
    initial_state: start from this state (and its ``tx``) instead of
      ``create_train_state(model, tx, sample, key(seed), mask)``, e.g. a
      lottery-ticket rewind point (:func:`sparsejax.lottery.rewind_state`:
      step ``k``, rewound params, fresh optimiser state holding the new
      mask). Training continues from ``initial_state.step`` with the
      schedule and data order of that step. It must have the structure,
      shapes and dtypes of ``create_train_state(model, initial_state.tx,
      ...)``; then pass neither ``mask`` nor ``tx``. Used on resume for its
      ``tx`` only.
    stop_at_step: train only up to this global step, save a checkpoint there
      (also mid-epoch) and return; a later call without it continues exactly
      as if the run had never stopped. ``None``: the whole schedule.
    tx: the optimiser; default
      ``sparsejax.schedules.make_optimizer(config, steps_per_epoch)``.
    loss_fn: ``loss_fn(logits, labels, scalars) -> per-example loss``; default
      cross-entropy with label smoothing ``scalars["label_smoothing"]`` if
      that scalar is given, else ``config.label_smoothing``.
    scalars: ``{name: optax.Schedule}`` of the global step, evaluated inside
      the jitted train and eval steps (see :func:`make_train_step`), e.g.
      ``{"act_coef": schedules.hold_then_ramp(1.0, 0.0, 500, 2000)}``.
    hooks: :class:`sparsejax.hooks.Hook` objects; their states are checkpointed with the
      train state.

  Returns:
    A :class:`FitResult`.

  Raises:
    FloatingPointError: on a non-finite training loss; the message names the
      epoch and step and the last good checkpoint, which is kept.
    CheckpointMismatchError: ``workdir`` holds checkpoints of a different
      run (another model, mask, optimiser state, hook states, batch size,
      seed or dataset).
    ValueError: a batch size larger than the training set; both ``mask``
      (or ``tx``) and ``initial_state``, or an ``initial_state`` of another
      structure; a negative ``stop_at_step``; a scalar named like a record
      field.
  """
  workdir = _paths.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  mesh_lib.assert_same_across_processes(
      (dataset.train_images, dataset.train_labels, dataset.test_images,
       dataset.test_labels), what=f"dataset {dataset.name!r}")
  cfg = functools.partial(schedules.config_value, config)
  seed = int(cfg("seed", 0))
  num_epochs = int(cfg("num_epochs"))
  batch_size = int(cfg("batch_size"))
  n_train = int(dataset.train_images.shape[0])
  spe = schedules.steps_per_epoch(n_train, batch_size)
  total_steps = num_epochs * spe
  if stop_at_step is not None and int(stop_at_step) < 0:
    raise ValueError(f"stop_at_step must be >= 0, got {stop_at_step}")
  end_step = (total_steps if stop_at_step is None
              else min(int(stop_at_step), total_steps))
  if initial_state is not None and mask is not None:
    raise ValueError("pass either mask or initial_state (whose optimiser state "
                     "holds the mask), not both")
  if initial_state is not None and tx is not None:
    raise ValueError("pass either tx or initial_state (which carries its "
                     "optimiser, initial_state.tx), not both")
  scalars = dict(scalars or {})
  clash = sorted(set(scalars) & set(RECORD_KEYS))
  if clash:
    raise ValueError(f"scalar names {clash} are taken by the epoch record")
  hooks = hooks_lib.check_hooks(hooks)
  augment = cfg("augment", None)
  augment = bool(dataset.augment if augment is None else augment)
  log_every = max(1, int(cfg("log_every_steps", 50)))
  eval_every = max(1, int(cfg("eval_every_epochs", 1)))
  ckpt_every = max(1, int(cfg("checkpoint_every_epochs", 1)))

  lr = schedules.lr_schedule(config, spe) if tx is None else None
  if initial_state is not None:
    tx = initial_state.tx
  elif tx is None:
    tx = schedules.make_optimizer(config, spe)
  if loss_fn is None:
    loss_fn = losses.smoothed_cross_entropy(float(cfg("label_smoothing", 0.0)))
  sample = jnp.zeros((1,) + tuple(dataset.train_images.shape[1:]), jnp.float32)
  rng = jax.random.key(seed)
  train_step = make_train_step(
      model, mesh=mesh, batch_size=batch_size, mean=dataset.mean,
      std=dataset.std, augment=augment, loss_fn=loss_fn, scalars=scalars,
      hooks=hooks)
  eval_step = make_eval_step(model, mesh=mesh, mean=dataset.mean,
                             std=dataset.std, scalars=scalars)
  epoch_perm = jax.jit(
      functools.partial(data_lib.epoch_permutation, n=n_train),
      out_shardings=mesh_lib.replicated(mesh))

  # The layout of the state fit trains (and of its checkpoints). A mask
  # function is not called for it (it may be costly): the all-ones mask has
  # the same layout.
  wrap = mask is not None
  abstract_state = jax.eval_shape(lambda: create_train_state(
      model, tx, sample, rng, mask=masks_lib.ones_like if wrap else None))
  stateful = [h for h in hooks
              if jax.eval_shape(h.init, abstract_state) is not None]
  tree = {"state": abstract_state, "metrics": init_train_metrics()}
  if stateful:
    tree["hooks"] = {h.key: jax.eval_shape(h.init, abstract_state)
                     for h in stateful}
  abstract = ckpt_lib.abstract(tree, mesh_lib.replicated(mesh))
  meta_expected = {"batch_size": batch_size, "num_train": n_train,
                   "steps_per_epoch": spe, "seed": seed,
                   "state_signature": ckpt_lib.tree_signature(abstract)}
  if initial_state is not None and (ckpt_lib.tree_signature(initial_state)
                                    != ckpt_lib.tree_signature(abstract_state)):
    raise ValueError(
        "initial_state does not have the structure, shapes and dtypes of the "
        "train state of this model and optimiser (dense or with a mask)")

  with contextlib.ExitStack() as cleanup:
    ckpts = ckpt_lib.Checkpoints(workdir / "checkpoints",
                                 max_to_keep=int(cfg("max_to_keep", 3)),
                                 async_save=bool(cfg("async_checkpointing", True)))
    cleanup.callback(ckpts.close)

    def check_meta(step, meta):
      ckpt_lib.check_same_run(
          meta, meta_expected, where=f"checkpoint {ckpts.step_dir(step)}",
          fields=meta_expected, what="another model, mask, optimiser, hooks, "
          "batch size, seed or dataset")

    evaluate_test = functools.partial(
        evaluate, model, images=dataset.test_images, labels=dataset.test_labels,
        mean=dataset.mean, std=dataset.std,
        batch_size=int(cfg("eval_batch_size", 500)), mesh=mesh,
        eval_step=eval_step)
    ctx = hooks_lib.FitContext(model=model, dataset=dataset, mesh=mesh,
                               config=config, steps_per_epoch=spe,
                               scalars=scalars, loss_fn=loss_fn,
                               evaluate=evaluate_test, num_epochs=num_epochs)
    for hook in hooks:
      hook.check(ctx)
    found = ckpts.restore_latest(abstract, check_meta) if ckpts.all_steps() else None
    if found is not None:
      resumed_from, restored, meta = found
      state, metrics = restored["state"], restored["metrics"]
      hook_states = dict(restored.get("hooks", {}))
      # The restored arrays in the layout of abstract_state; the transformation
      # is this run's (with the checkpoint's mask when fit wraps it).
      state = state.replace(tx=optim.masked(tx, state.mask) if wrap else tx)
      epochs_done = int(meta["epoch"])
      last_good = (resumed_from, epochs_done)
      logger.info("Resumed from checkpoint %s (epoch %d, global step %d).",
                  ckpts.step_dir(resumed_from), epochs_done, resumed_from)
    else:
      if ckpts.all_steps() or epath.Path(ckpts.quarantine_dir).is_dir():
        logger.warning("No readable checkpoint in %s; starting from scratch.",
                       ckpts.directory)
      state = mesh_lib.put_replicated(
          create_train_state(model, tx, sample, rng, mask=mask)
          if initial_state is None else initial_state, mesh)
      for hook in hooks:
        if hooks_lib.overrides(hook, "fresh_start"):
          changed = hook.fresh_start(state, ctx)
          if (ckpt_lib.tree_signature(changed)
              != ckpt_lib.tree_signature(state)):
            raise ValueError(f"hook {hook.key!r}: fresh_start changed the "
                             "structure, shapes or dtypes of the train state")
          state = mesh_lib.put_replicated(changed, mesh)
      metrics = mesh_lib.put_replicated(init_train_metrics(), mesh)
      # Copies: a hook state may hold arrays of the train state (e.g. its
      # mask), and both are donated to the step.
      hook_states = mesh_lib.put_replicated(
          {h.key: jax.tree.map(np.array, h.init(state)) for h in stateful}, mesh)
      resumed_from, epochs_done, last_good = None, 0, None

    step = int(jax.device_get(state.step))
    log = metrics_log.MetricsLog(workdir, epochs_done,
                                 tensorboard=bool(cfg("tensorboard", True)))
    cleanup.callback(log.close)
    step_logs = hooks_lib.PendingStepLogs(hooks,
                                          metrics_log.StepLog(workdir, step))
    host_hooks = [h for h in hooks if hooks_lib.overrides(h, "after_step_host")]
    epoch_hooks = [h for h in hooks if hooks_lib.overrides(h, "epoch_end")]
    images = mesh_lib.put_replicated(np.asarray(dataset.train_images), mesh)
    labels = mesh_lib.put_replicated(
        np.asarray(dataset.train_labels, np.int32), mesh)
    show_bar = bool(cfg("progress_bar", True)) and sys.stderr.isatty()
    bar = tqdm.tqdm(total=total_steps, initial=step, unit="step",
                    disable=not show_bar, dynamic_ncols=True, leave=False)
    cleanup.callback(bar.close)
    stop = cleanup.enter_context(ckpt_lib.StopSignal())
    preempted = False

    def stop_requested() -> bool:
      if jax.process_count() == 1:
        return stop.signum is not None
      return bool(ckpts.manager.reached_preemption(step))

    def check_finite(host_metrics):
      bad = int(host_metrics["first_bad_step"])
      if bad != _NO_BAD_STEP:
        step_logs.drop()
        raise FloatingPointError(_non_finite_message(
            bad, spe, last_good, ckpts.directory))

    def save(epochs: int):
      step_logs.flush()
      tree = {"state": state, "metrics": metrics}
      if stateful:
        tree["hooks"] = hook_states
      ckpts.save(step, tree, dict(meta_expected, epoch=epochs, step=step))

    while step < end_step and not preempted:
      epoch = step // spe
      perm = epoch_perm(seed, epoch)
      t0, steps_run = time.perf_counter(), 0
      for k in range(step % spe, spe):
        state, metrics, hook_states, logs = train_step(
            state, metrics, images, labels, perm, k, hook_states)
        step += 1
        steps_run += 1
        step_logs.add(step, logs)
        for hook in host_hooks:
          hook.after_step_host(step)
        bar.update(1)
        if step % log_every == 0:
          host = jax.device_get(metrics)
          check_finite(host)
          bar.set_postfix(epoch=epoch + 1, loss="%.4f" % (
              float(host["loss_sum"]) / max(int(host["steps"]), 1)))
        if k + 1 < spe:
          preempted = stop_requested()
          if preempted or step == end_step:
            check_finite(jax.device_get(metrics))
            save(epoch)
            ckpts.wait()
            if preempted:
              logger.warning(
                  "SIGTERM: saved checkpoint %s (epoch %d, step %d of %d); "
                  "exiting. Rerun the same command to resume.",
                  ckpts.step_dir(step), epoch + 1, k + 1, spe)
            else:
              logger.info("Reached stop_at_step: saved checkpoint %s (epoch %d, "
                          "step %d of %d).", ckpts.step_dir(step), epoch + 1,
                          k + 1, spe)
            break
      if step % spe:  # stopped mid-epoch: no epoch record
        break
      host = jax.device_get(metrics)
      check_finite(host)
      elapsed = time.perf_counter() - t0
      record = {"epoch": epoch + 1, "step": step}
      if lr is not None:
        record["lr"] = float(lr(step - 1))
      record.update(
          train_loss=float(host["loss_sum"]) / max(int(host["steps"]), 1),
          train_accuracy=float(host["correct"]) / max(int(host["count"]), 1))
      extra = {name: float(fn(step - 1)) for name, fn in scalars.items()}
      for hook in epoch_hooks:
        hook_state, state, fields = hook.epoch_end(
            hook_states.get(hook.key), state, epoch + 1, ctx)
        if hook.key in hook_states:  # a copy: it may share arrays with state
          hook_states[hook.key] = jax.tree.map(jnp.copy, hook_state)
        extra.update({k: hooks_lib.json_number(v) for k, v in fields.items()})
      if (epoch + 1) % eval_every == 0 or step == total_steps:
        ev = evaluate_test(state)
        record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
      record.update(sparsity=_sparsity(state), epoch_seconds=elapsed,
                    steps_per_second=steps_run / max(elapsed, 1e-9))
      record.update(extra)
      metrics = mesh_lib.put_replicated(init_train_metrics(), mesh)
      bar.clear()  # keep the log line off the bar's line
      logger.info("epoch %d/%d: %s", epoch + 1, num_epochs, ", ".join(
          f"{k}={v:.4g}" for k, v in record.items()
          if k != "epoch" and isinstance(v, (int, float))))
      bar.refresh()
      step_logs.flush()
      log.write(record)
      stopping = step < total_steps and stop_requested()
      if (epoch + 1) % ckpt_every == 0 or step in (end_step, total_steps) or (
          stopping):
        save(epoch + 1)
        last_good = (step, epoch + 1)
      if stopping:
        ckpts.wait()
        logger.warning("SIGTERM: saved checkpoint %s (end of epoch %d); "
                       "exiting. Rerun the same command to resume.",
                       ckpts.step_dir(step), epoch + 1)
        preempted = True
  return FitResult(state=state, history=list(log.history), preempted=preempted,
                   resumed_from=resumed_from, hook_states=hook_states)
