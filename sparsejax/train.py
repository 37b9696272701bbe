"""Training: train state, jitted data-parallel steps, schedules, checkpointed loop.

The pieces, from low to high level:

* :class:`TrainState`: params, batch statistics, optimiser state (holding the
  mask for sparse training, see :func:`sparsejax.optim.masked`), step and rng;
  a pure pytree, so it checkpoints and shards like any other.
* :func:`create_train_state`: initialises a model, applies a mask to the fresh
  params and builds the (masked) optimiser state.
* :func:`make_optimizer` and :func:`lr_schedule`: SGD with momentum (optionally
  Nesterov) and PyTorch-style weight decay on all params, with multistep,
  cosine or constant learning rates and linear warmup, from optax.
* :func:`make_train_step` and :func:`evaluate`: jitted steps. The whole training
  set lives on device as ``uint8``; each step gathers its batch by index from a
  per-epoch permutation, augments and normalises it inside ``jit``.
* :func:`fit`: the epoch loop with Orbax checkpoints (every epoch and on
  SIGTERM, keep the last N, automatic resume that skips unreadable
  checkpoints), a progress bar, ``metrics.jsonl`` and TensorBoard logs, and a
  clear stop on a non-finite loss. It can start from a given train state
  (e.g. a lottery-ticket rewind point) and stop at a given step.

Data parallelism. Every function takes a :class:`jax.sharding.Mesh` with one
axis named ``"data"`` (:func:`make_mesh`): batches are sharded along it, the
train state and the device-resident datasets are replicated. The same code runs
on one device (a mesh of one) and on N devices; XLA inserts the gradient
all-reduce, and batch norm statistics in training mode are computed over the
global batch, so an N-device step equals the one-device step up to float
summation order.

Multi-host. Call ``jax.distributed.initialize()`` before anything else touches
JAX (``experiments.train`` does this when ``config.distributed`` is set) and
build the mesh over ``jax.devices()`` (all processes' devices). Every process
loads the full dataset; :func:`put_replicated` and :func:`put_batch` assemble
global arrays from process-local data with
``jax.make_array_from_process_local_data`` (replicated arrays from each
process's identical copy; each eval batch from this process's contiguous slice
of the global batch). Checkpoints are written by Orbax from all processes. A
preemption stop is agreed on through ``CheckpointManager.reached_preemption``
when there is more than one process. Only the single-process path is tested.

Resume determinism. Nothing in a step depends on host state: the batch is
``batch_indices(epoch_permutation(seed, epoch, n), step_in_epoch, batch_size)``
and the step's random key (augmentation, dropout) is ``fold_in(rng, step)``.
A checkpoint (global step ``t``) holds the train state, the running sums of
the epoch's training metrics and, as JSON, the per-epoch history, so a run
resumed from any checkpoint -- an epoch end or the step at which SIGTERM
arrived -- computes bitwise the same params and metrics as one that never
stopped (on the same devices and software), and ``metrics.jsonl`` is rewritten
from that history. A checkpoint that cannot be read is moved, never deleted,
to ``checkpoints.unreadable/`` with a warning, and the previous one is used.

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
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax import data as data_lib
from sparsejax import masks as masks_lib
from sparsejax import optim

PyTree = Any
logger = logging.getLogger(__name__)

#: Name of the mesh axis along which batches are sharded.
DATA_AXIS = "data"
#: Sentinel of the ``first_bad_step`` metric: no non-finite loss seen.
_NO_BAD_STEP = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------
# Mesh and data placement
# ----------------------------------------------------------------------------


def make_mesh(num_devices: int | None = None,
              devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis ``("data",)`` mesh over the first ``num_devices`` devices.

  Args:
    num_devices: mesh size; default all devices (of all processes).
    devices: devices to use; default ``jax.devices()``.

  Returns:
    A mesh with automatic (GSPMD) sharding propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} device(s) are available")
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that replicates an array over every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places every leaf of ``tree`` replicated on ``mesh``.

  Each process passes its own, identical, copy (multi-host safe).
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def put_batch(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places a global batch sharded along its leading axis.

  Every process passes the same *global* batch; each one hands JAX only the
  contiguous rows that its devices hold under the sharding
  (``jax.make_array_from_process_local_data``). The batch size must be a
  multiple of the mesh size.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % mesh.size:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by the "
                       f"{mesh.size} devices of the mesh")
    rows = [index[0].indices(x.shape[0])[:2] for index in
            sharding.addressable_devices_indices_map(x.shape).values()]
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

  return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pure pytree.

  The optimiser transformation is not part of the state (it is a function):
  pass the same *inner* transformation to :func:`create_train_state` and
  :func:`make_train_step`. For sparse training ``opt_state`` is a
  :class:`sparsejax.optim.MaskedState` holding the mask.

  Attributes:
    step: ``int32`` scalar, the number of optimiser steps taken.
    params: model parameters (pruned entries exactly 0).
    batch_stats: batch-norm running statistics; ``{}`` for models without.
    opt_state: optimiser state.
    rng: ``uint32`` raw key data (``jax.random.key_data``) of the training key;
      constant during training. The augmentation key of step ``t`` is
      ``fold_in(key, t)``.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array

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


def _full_tx(tx: optax.GradientTransformation, opt_state):
  """``tx``, wrapped with :func:`sparsejax.optim.masked` when the state has a mask.

  The mask used by ``update`` is the one in ``opt_state``, so the wrapper built
  here serves every mask of the same shapes: one compiled step for all
  sparsities.
  """
  mask = optim.find_mask(opt_state)
  return tx if mask is None else optim.masked(tx, mask)


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
def _assemble_state(tx, params, batch_stats, mask, train_key) -> TrainState:
  if mask is not None:
    params = masks_lib.apply(params, mask)
    opt_state = optim.masked(tx, mask).init(params)
  else:
    opt_state = tx.init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=opt_state,
                    rng=jax.random.key_data(train_key))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       sample_input: jax.Array, rng: jax.Array,
                       mask: PyTree | Callable[[PyTree], PyTree] | None = None
                       ) -> TrainState:
  """Initialises the model and the optimiser; step 0.

  ``rng`` is split into the init key and the training key; the same ``rng``
  always gives the same state. Initialisation and state assembly are jitted
  (one compilation per model and optimiser), and the function also works
  under ``jax.eval_shape``.

  Args:
    model: a Flax linen module (e.g. from :func:`sparsejax.models.get`).
    tx: the inner optimiser (e.g. :func:`make_optimizer`).
    sample_input: an input batch of the right shape, e.g. ``zeros((1, H, W, C))``.
    rng: a PRNG key (typed or raw ``uint32`` key data).
    mask: ``None`` for dense training; a bool mask pytree parallel to the
      params; or a callable ``params -> mask`` applied to the fresh params
      (e.g. magnitude pruning at initialisation; called outside ``jit``). The
      params are masked (:func:`sparsejax.masks.apply`) and the optimiser state
      is that of ``sparsejax.optim.masked(tx, mask)``.

  Returns:
    A :class:`TrainState` on the default device.
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
  return _assemble_state(tx, params, variables.get("batch_stats", {}), mask,
                         train_key)


# ----------------------------------------------------------------------------
# Optimiser and schedules
# ----------------------------------------------------------------------------


def _cfg(config, name, default=None):
  value = config.get(name, default) if isinstance(config, Mapping) or hasattr(
      config, "get") else getattr(config, name, default)
  return default if value is None else value


def decay_boundaries(decay_epochs: Iterable[float], num_epochs: int) -> list[int]:
  """Epochs at which a multistep schedule decays.

  A value ``v >= 1`` is an epoch; ``0 < v < 1`` is a fraction of
  ``num_epochs``, truncated like the GraSP reference
  (``int(v * num_epochs)``). Returns sorted epochs in ``(0, num_epochs)``.

  Raises:
    ValueError: a value that is not positive.
  """
  epochs = []
  for v in decay_epochs:
    v = float(v)
    if v <= 0:
      raise ValueError(f"lr decay epochs must be positive, got {v}")
    epochs.append(int(v * num_epochs) if v < 1 else int(v))
  return sorted(e for e in set(epochs) if 0 < e < num_epochs)


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of ``config``, in optimiser steps.

  Config fields (attributes or keys):

  * ``learning_rate``: peak learning rate.
  * ``lr_schedule``: ``"multistep"`` (× ``lr_decay_factor`` at each of
    ``lr_decay_epochs``, see :func:`decay_boundaries`), ``"cosine"`` (to
    ``learning_rate * lr_end_factor`` at the end of training) or
    ``"constant"``.
  * ``warmup_epochs``: linear warmup from 0 over this many epochs (may be
    fractional); default 0. Decay epochs stay absolute.
  * ``num_epochs``: length of training.

  Multistep decays happen on epoch boundaries like PyTorch's ``MultiStepLR``
  stepped once per epoch (step ``t`` uses the rate of epoch ``t //
  steps_per_epoch``); warmup and cosine change the rate every step.
  """
  lr = float(_cfg(config, "learning_rate"))
  kind = _cfg(config, "lr_schedule", "constant")
  num_epochs = int(_cfg(config, "num_epochs"))
  total = num_epochs * steps_per_epoch
  warmup = int(round(float(_cfg(config, "warmup_epochs", 0.0)) * steps_per_epoch))
  if not 0 <= warmup <= total:
    raise ValueError(f"warmup_epochs gives {warmup} steps, outside [0, {total}]")

  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "multistep":
    factor = float(_cfg(config, "lr_decay_factor", 0.1))
    epochs = decay_boundaries(_cfg(config, "lr_decay_epochs", ()), num_epochs)
    boundaries = [e * steps_per_epoch for e in epochs]
    # Decays that fall inside the warmup apply from its end on.
    start = lr * factor ** sum(b <= warmup for b in boundaries)
    main = optax.piecewise_constant_schedule(
        start, {b - warmup: factor for b in boundaries if b > warmup})
  elif kind == "cosine":
    end = lr * float(_cfg(config, "lr_end_factor", 0.0))
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1),
                                       alpha=end / lr if lr else 0.0)
  else:
    raise ValueError(f"lr_schedule must be 'multistep', 'cosine' or 'constant', "
                     f"got {kind!r}")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with momentum and weight decay on every parameter, as in PyTorch.

  ``optax.chain(add_decayed_weights(weight_decay), sgd(schedule, momentum,
  nesterov))`` is PyTorch's ``SGD(weight_decay=wd, momentum=m,
  nesterov=...)`` exactly: the decay is added to the gradient before the
  momentum. With a mask (:func:`sparsejax.optim.masked`) pruned entries get
  neither gradient nor decay.

  Config fields: ``momentum`` (default 0.9), ``nesterov`` (default False),
  ``weight_decay`` (default 0) and those of :func:`lr_schedule`.
  """
  schedule = lr_schedule(config, steps_per_epoch)
  momentum = float(_cfg(config, "momentum", 0.9))
  parts = []
  wd = float(_cfg(config, "weight_decay", 0.0))
  if wd:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(optax.sgd(schedule, momentum=momentum or None,
                         nesterov=bool(_cfg(config, "nesterov", False))))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float | jax.Array = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
    one_hot = optax.smooth_labels(one_hot, label_smoothing)
  return optax.softmax_cross_entropy(logits, one_hot)


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    mesh: jax.sharding.Mesh, batch_size: int, mean, std,
                    augment: bool = False, pad: int = 4, flip: bool = True,
                    label_smoothing: float = 0.0) -> Callable:
  """Builds the jitted, data-parallel training step.

  The returned function is::

    step(state, metrics, images, labels, perm, step_in_epoch, act_coef=None)
        -> (state, metrics)

  * ``state``: a :class:`TrainState` replicated on ``mesh`` (dense or masked;
    one compilation each; every mask of the same shapes shares one).
  * ``metrics``: running sums from :func:`init_train_metrics`.
  * ``images``: the whole training set, ``uint8 [N, H, W, C]``, replicated on
    ``mesh``; ``labels``: ``int32 [N]``.
  * ``perm``: the epoch's permutation (:func:`sparsejax.data.epoch_permutation`).
  * ``step_in_epoch``: int, which batch of the permutation to take
    (:func:`sparsejax.data.batch_indices`).
  * ``act_coef``: optional traced scalar passed to the model's activations.

  Inside ``jit``: gather the batch, shard it along ``"data"``, augment with
  ``fold_in(state.key, state.step)`` (random crop with ``pad`` and horizontal
  flip) when ``augment``, normalise with ``mean``/``std``, forward in training
  mode (batch norm over the global batch), cross-entropy with label smoothing,
  gradient, the (masked) optimiser update. ``state`` and ``metrics`` are
  donated.

  Args:
    model: the linen module.
    tx: the inner optimiser given to :func:`create_train_state`.
    mesh: the data-parallel mesh.
    batch_size: global batch size, a multiple of ``mesh.size``.
    mean, std: per-channel normalisation constants.
    augment, pad, flip: data augmentation.
    label_smoothing: label-smoothing factor.
  """
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} is not divisible by the "
                     f"{mesh.size} devices of the mesh")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  in_batch = batch_sharding(mesh)

  def step(state: TrainState, metrics, images, labels, perm, step_in_epoch,
           act_coef=None):
    idx = data_lib.batch_indices(perm, step_in_epoch, batch_size)
    x = jax.lax.with_sharding_constraint(jnp.take(images, idx, axis=0), in_batch)
    y = jax.lax.with_sharding_constraint(jnp.take(labels, idx, axis=0), in_batch)
    key = jax.random.fold_in(state.key, state.step)
    aug_key, dropout_key = jax.random.split(key)
    if augment:
      x = data_lib.augment(aug_key, x, pad=pad, flip=flip)
    x = data_lib.normalize(x, mean, std)

    def loss_fn(params):
      variables = _variables(params, state.batch_stats)
      if state.batch_stats:
        logits, updates = model.apply(
            variables, x, train=True, act_coef=act_coef,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        new_stats = updates["batch_stats"]
      else:
        logits = model.apply(variables, x, train=True, act_coef=act_coef,
                             rngs={"dropout": dropout_key})
        new_stats = state.batch_stats
      loss = jnp.mean(cross_entropy(logits, y, label_smoothing))
      return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    full_tx = _full_tx(tx, state.opt_state)
    updates, opt_state = full_tx.update(grads, state.opt_state, state.params)
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
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0, 1),
                 out_shardings=replicated(mesh))


def make_eval_step(model: nn.Module, *, mesh: jax.sharding.Mesh, mean,
                   std) -> Callable:
  """Builds the jitted eval step ``(state, sums, images, labels, valid) -> sums``.

  ``images`` ``uint8`` and ``labels`` are a (padded) batch sharded with
  :func:`put_batch`; ``valid`` is the bool validity mask of the rows. ``sums``
  holds ``loss_sum`` (float32), ``correct`` and ``count`` (int32) over the
  valid rows. Batch norm runs in inference mode.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def step(state: TrainState, sums, images, labels, valid):
    x = data_lib.normalize(images, mean, std)
    logits = model.apply(state.variables, x, train=False)
    loss = cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {"loss_sum": sums["loss_sum"] + jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": sums["correct"] + jnp.sum(correct).astype(jnp.int32),
            "count": sums["count"] + jnp.sum(valid).astype(jnp.int32)}

  return jax.jit(step, out_shardings=replicated(mesh))


def eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """``batch_size`` rounded up to a multiple of the mesh size."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def evaluate(model: nn.Module, state: TrainState, images: np.ndarray,
             labels: np.ndarray, *, mean, std, batch_size: int = 500,
             mesh: jax.sharding.Mesh | None = None,
             eval_step: Callable | None = None) -> dict[str, float]:
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
    mesh: default :func:`make_mesh` over all devices.
    eval_step: a step from :func:`make_eval_step` to reuse (saves a compile).

  Returns:
    ``{"loss": float, "accuracy": float, "count": int}``.
  """
  mesh = make_mesh() if mesh is None else mesh
  eval_step = eval_step or make_eval_step(model, mesh=mesh, mean=mean, std=std)
  sums = put_replicated({"loss_sum": np.zeros((), np.float32),
                         "correct": np.zeros((), np.int32),
                         "count": np.zeros((), np.int32)}, mesh)
  bs = eval_batch_size(batch_size, mesh)
  for batch_images, batch_labels, valid in data_lib.eval_batches(
      images, labels, bs):
    batch = put_batch((np.asarray(batch_images), np.asarray(batch_labels, np.int32),
                       np.asarray(valid, bool)), mesh)
    sums = eval_step(state, sums, *batch)
  sums = jax.device_get(sums)
  count = int(sums["count"])
  if count == 0:
    raise ValueError("evaluate() got an empty set")
  return {"loss": float(sums["loss_sum"]) / count,
          "accuracy": float(sums["correct"]) / count, "count": count}


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def _abstract(tree: PyTree, sharding) -> PyTree:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                     sharding=sharding), tree)


class CheckpointMismatchError(ValueError):
  """The run directory holds readable checkpoints of a different run."""


def tree_signature(tree: PyTree) -> str:
  """A short hash of a pytree's paths, shapes and dtypes (not its values)."""
  spec = [(path, list(jnp.shape(x)), str(jnp.result_type(x)))
          for path, x in masks_lib.named_leaves(tree)]
  spec.append(str(jax.tree.structure(tree)))
  return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


class Checkpoints:
  """Orbax checkpoints of a run: ``{state, metrics}`` pytree plus JSON meta.

  Wraps ``ocp.CheckpointManager(directory)`` with asynchronous saves, the last
  ``max_to_keep`` checkpoints kept and steps named by the global step.
  :meth:`restore_latest` tries the checkpoints newest first; one that cannot be
  read is reported with a warning naming it, moved (never deleted) into
  ``quarantine_dir`` so that the run can write that step again, and the
  previous one is tried.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               quarantine_dir: str | os.PathLike | None = None,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.quarantine_dir = os.path.abspath(os.fspath(
        quarantine_dir or self.directory.rstrip("/") + ".unreadable"))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._noise_filters = None

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or ``None``."""
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    """The directory of checkpoint ``step``."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, tree: PyTree, meta: dict) -> None:
    """Starts an (asynchronous) save of ``tree`` and ``meta`` as ``step``."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step: int, abstract_tree: PyTree) -> PyTree:
    """Restores the ``state`` item of ``step`` into ``abstract_tree``'s layout."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_tree)))
    return restored["state"]

  def restore_meta(self, step: int) -> dict:
    """Reads the JSON ``meta`` item of ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if not isinstance(meta, Mapping):
      raise ValueError(f"meta is a {type(meta).__name__}, not a JSON object")
    return dict(meta)

  def _quarantine(self, step: int) -> str:
    """Moves the directory of ``step`` into :attr:`quarantine_dir`; returns it."""
    src = self.step_dir(step)
    dst = os.path.join(self.quarantine_dir, str(step))
    k = 1
    while os.path.exists(dst):
      dst = os.path.join(self.quarantine_dir, f"{step}.{k}")
      k += 1
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(self.quarantine_dir, exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"sparsejax_quarantine_{step}")
    self.manager.reload()
    return dst

  def _mute_failed_restore_noise(self) -> None:
    """Silences the fallout of a failed Orbax restore until :meth:`close`.

    When one read of a restore fails, Orbax abandons the other concurrent
    reads: their asyncio tasks end up logged as "Task exception was never
    retrieved" (one page of TensorStore spec each), and TensorStore callbacks
    into the closed event loop raise ``RuntimeError('Event loop is closed')``
    through ``sys.unraisablehook``. The warning of :meth:`restore_latest`
    already says what happened, so exactly those two kinds of report are
    dropped; everything else passes.
    """
    if self._noise_filters is not None:
      return
    previous_hook = sys.unraisablehook

    def hook(unraisable):
      exc = unraisable.exc_value
      if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
      previous_hook(unraisable)

    def abandoned_orbax_task(record: logging.LogRecord) -> bool:
      message = record.getMessage()
      return not (message.startswith("Task exception was never retrieved")
                  and "orbax" in message)

    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addFilter(abandoned_orbax_task)
    sys.unraisablehook = hook
    self._noise_filters = (previous_hook, abandoned_orbax_task)

  def _unmute(self) -> None:
    if self._noise_filters is None:
      return
    gc.collect()  # abandoned tasks report when collected: do it while muted
    previous_hook, task_filter = self._noise_filters
    sys.unraisablehook = previous_hook
    logging.getLogger("asyncio").removeFilter(task_filter)
    self._noise_filters = None

  def _skip(self, step: int, error: Exception) -> None:
    self._mute_failed_restore_noise()
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    moved = self._quarantine(step)
    logger.warning(
        "Checkpoint %s is unreadable (%s); it was moved, not deleted, to %s. "
        "Trying the previous checkpoint.", self.step_dir(step), reason, moved)

  def restore_latest(self, abstract_tree: PyTree,
                     check_meta: Callable[[int, dict], None] | None = None
                     ) -> tuple[int, PyTree, dict] | None:
    """Restores the newest readable checkpoint, or returns ``None``.

    Args:
      abstract_tree: the target structure with shapes, dtypes and shardings.
      check_meta: ``(step, meta) -> None``, called on each readable ``meta``
        before the state is read; an exception it raises (e.g.
        :class:`CheckpointMismatchError` for a checkpoint of another run)
        propagates and nothing is moved.

    Returns:
      ``(step, tree, meta)`` or ``None`` when no checkpoint can be read.
    """
    for step in reversed(self.all_steps()):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._skip(step, e)
        continue
      if check_meta is not None:
        check_meta(step, meta)
      try:
        return step, self.restore(step, abstract_tree), meta
      except Exception as e:  # pylint: disable=broad-except
        self._skip(step, e)
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
    self._unmute()


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------


class MetricsLog:
  """Per-epoch metrics: ``metrics.jsonl`` and TensorBoard events.

  The history of completed epochs travels in every checkpoint; on a resume the
  JSONL file is rewritten from it and TensorBoard discards later events
  (``purge_step``), so an interrupted and resumed run logs exactly the lines
  of one that never stopped. Only process 0 writes.
  """

  def __init__(self, workdir: str, history: list[dict],
               tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.history = [dict(r) for r in history]
    self.active = jax.process_index() == 0
    if self.active:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        for record in self.history:
          f.write(json.dumps(record) + "\n")
      os.replace(tmp, self.path)
    self.writer = None
    if tensorboard and self.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      completed = len(self.history)
      self.writer = SummaryWriter(os.path.join(workdir, "tb"),
                                  purge_step=completed + 1 if completed else None)

  def write(self, record: dict) -> None:
    """Appends one epoch's record to the history, the file and TensorBoard."""
    self.history.append(record)
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.writer is not None:
      epoch = record["epoch"]
      for k, v in record.items():
        if k in ("epoch", "step") or isinstance(v, bool) or not isinstance(
            v, (int, float)):
          continue
        split, _, name = k.partition("_")
        tag = f"{split}/{name}" if split in ("train", "test") and name else k
        self.writer.add_scalar(tag, v, epoch)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


class _StopSignal:
  """Records SIGTERM so that the loop can save at the next step boundary."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class FitResult:
  """What :func:`fit` returns.

  Attributes:
    state: the final train state (replicated on the mesh).
    history: per-epoch metric records, those of earlier sessions included.
    preempted: True when the run stopped early on SIGTERM (a checkpoint of
      the last step was saved; rerun to resume).
    resumed_from: global step restored from a checkpoint, or ``None``.
  """

  state: TrainState
  history: list[dict]
  preempted: bool
  resumed_from: int | None


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


def fit(config, workdir: str | os.PathLike, *, model: nn.Module,
        dataset: data_lib.Dataset,
        mask: PyTree | Callable[[PyTree], PyTree] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        initial_state: TrainState | None = None,
        stop_at_step: int | None = None) -> FitResult:
  """Trains ``model`` on ``dataset``; checkpointed, resumable, logged.

  Resumes automatically from the newest readable checkpoint in
  ``workdir/checkpoints``. Writes ``workdir/metrics.jsonl`` (one JSON record
  per epoch: ``epoch``, ``step``, ``lr``, ``train_loss``,
  ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``sparsity``,
  ``epoch_seconds``, ``steps_per_second``) and TensorBoard events in
  ``workdir/tb``.

  Config fields (attributes or keys of an ``ml_collections.ConfigDict``):
    ``seed``, ``num_epochs``, ``batch_size``, ``eval_batch_size`` (500),
    the optimiser and schedule fields of :func:`make_optimizer`,
    ``label_smoothing`` (0), ``augment`` (``None`` = the dataset's default),
    ``max_to_keep`` (3), ``async_checkpointing`` (True), ``progress_bar``
    (True; shown only on a terminal), ``log_every_steps`` (50: progress-bar
    loss and non-finite check), ``eval_every_epochs`` (1) and
    ``tensorboard`` (True).

  Args:
    config: the run configuration.
    workdir: run directory.
    model: linen module.
    dataset: a :class:`sparsejax.data.Dataset`.
    mask: ``None`` (dense), a mask or a callable ``params -> mask``, see
      :func:`create_train_state`. Not called on resume: the mask comes from
      the checkpoint.
    mesh: default :func:`make_mesh` over all devices.
    initial_state: start from this state instead of
      ``create_train_state(model, tx, sample, key(seed), mask)``, e.g. a
      lottery-ticket rewind point (:func:`sparsejax.lottery.rewind_state`:
      step ``k``, rewound params, fresh optimiser state holding the new
      mask). Training continues from ``initial_state.step`` with the
      schedule and data order of that step. It must have the structure,
      shapes and dtypes of the state ``fit`` would create (sparse iff its
      optimiser state holds a mask); then do not pass ``mask``. Ignored on
      resume, like ``mask``.
    stop_at_step: train only up to this global step, save a checkpoint there
      (also mid-epoch) and return; a later call without it continues exactly
      as if the run had never stopped. ``None``: the whole schedule.

  Returns:
    A :class:`FitResult`.

  Raises:
    FloatingPointError: on a non-finite training loss; the message names the
      epoch and step and the last good checkpoint, which is kept.
    CheckpointMismatchError: ``workdir`` holds checkpoints of a different
      run (another model, mask, optimiser state, batch size, seed or dataset).
    ValueError: a batch size larger than the training set; both ``mask``
      and ``initial_state``, or an ``initial_state`` of another structure; a
      negative ``stop_at_step``.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh() if mesh is None else mesh
  seed = int(_cfg(config, "seed", 0))
  num_epochs = int(_cfg(config, "num_epochs"))
  batch_size = int(_cfg(config, "batch_size"))
  n_train = int(dataset.train_images.shape[0])
  steps_per_epoch = n_train // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the training set "
                     f"({n_train} examples)")
  total_steps = num_epochs * steps_per_epoch
  if stop_at_step is not None and int(stop_at_step) < 0:
    raise ValueError(f"stop_at_step must be >= 0, got {stop_at_step}")
  end_step = (total_steps if stop_at_step is None
              else min(int(stop_at_step), total_steps))
  if initial_state is not None and mask is not None:
    raise ValueError("pass either mask or initial_state (whose optimiser state "
                     "holds the mask), not both")
  augment = _cfg(config, "augment", None)
  augment = bool(dataset.augment if augment is None else augment)
  log_every = max(1, int(_cfg(config, "log_every_steps", 50)))
  eval_every = max(1, int(_cfg(config, "eval_every_epochs", 1)))

  tx = make_optimizer(config, steps_per_epoch)
  schedule = lr_schedule(config, steps_per_epoch)
  sample = jnp.zeros((1,) + tuple(dataset.train_images.shape[1:]), jnp.float32)
  rng = jax.random.key(seed)
  train_step = make_train_step(
      model, tx, mesh=mesh, batch_size=batch_size, mean=dataset.mean,
      std=dataset.std, augment=augment,
      label_smoothing=float(_cfg(config, "label_smoothing", 0.0)))
  eval_step = make_eval_step(model, mesh=mesh, mean=dataset.mean, std=dataset.std)
  epoch_perm = jax.jit(
      functools.partial(data_lib.epoch_permutation, n=n_train),
      out_shardings=replicated(mesh))

  sparse = mask is not None or (initial_state is not None
                                and initial_state.mask is not None)

  def abstract_init():
    return create_train_state(
        model, tx, sample, rng,
        mask=(lambda p: masks_lib.ones_like(p)) if sparse else None)

  abstract = _abstract(
      {"state": jax.eval_shape(abstract_init), "metrics": init_train_metrics()},
      replicated(mesh))
  meta_expected = {"batch_size": batch_size, "num_train": n_train,
                   "steps_per_epoch": steps_per_epoch, "seed": seed,
                   "state_signature": tree_signature(abstract)}
  if initial_state is not None and (tree_signature(initial_state)
                                    != tree_signature(abstract["state"])):
    raise ValueError(
        "initial_state does not have the structure, shapes and dtypes of the "
        "train state of this model and optimiser (dense or with a mask)")

  with contextlib.ExitStack() as cleanup:
    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"),
                        max_to_keep=int(_cfg(config, "max_to_keep", 3)),
                        async_save=bool(_cfg(config, "async_checkpointing", True)))
    cleanup.callback(ckpts.close)

    def check_meta(step, meta):
      for k, v in meta_expected.items():
        if meta.get(k) != v:
          raise CheckpointMismatchError(
              f"checkpoint {ckpts.step_dir(step)} is from a different run "
              f"({k}: {_short(meta.get(k))} there, {_short(v)} here: another "
              "model, mask, optimiser, batch size, seed or dataset). Use a new "
              "workdir, or the config that wrote it.")

    found = ckpts.restore_latest(abstract, check_meta) if ckpts.all_steps() else None
    if found is not None:
      resumed_from, tree, meta = found
      state, metrics = tree["state"], tree["metrics"]
      history = list(meta.get("history", []))
      last_good = (resumed_from, int(meta["epoch"]))
      logger.info("Resumed from checkpoint %s (epoch %d, global step %d).",
                  ckpts.step_dir(resumed_from), meta["epoch"], resumed_from)
    else:
      if ckpts.all_steps() or os.path.isdir(ckpts.quarantine_dir):
        logger.warning("No readable checkpoint in %s; starting from scratch.",
                       ckpts.directory)
      state = put_replicated(
          create_train_state(model, tx, sample, rng, mask=mask)
          if initial_state is None else initial_state, mesh)
      metrics = put_replicated(init_train_metrics(), mesh)
      resumed_from, history, last_good = None, [], None

    step = int(jax.device_get(state.step))
    log = MetricsLog(workdir, history,
                     tensorboard=bool(_cfg(config, "tensorboard", True)))
    cleanup.callback(log.close)
    images = put_replicated(np.asarray(dataset.train_images), mesh)
    labels = put_replicated(np.asarray(dataset.train_labels, np.int32), mesh)
    mask_sparsity = (masks_lib.summary(state.mask).sparsity
                     if state.mask is not None else 0.0)
    show_bar = bool(_cfg(config, "progress_bar", True)) and sys.stderr.isatty()
    bar = tqdm.tqdm(total=total_steps, initial=step, unit="step",
                    disable=not show_bar, dynamic_ncols=True, leave=False)
    cleanup.callback(bar.close)
    stop = cleanup.enter_context(_StopSignal())
    sigterm_at = int(_cfg(config, "debug_sigterm_at_step", -1))
    preempted = False

    def stop_requested() -> bool:
      if jax.process_count() == 1:
        return stop.signum is not None
      return bool(ckpts.manager.reached_preemption(step))

    def check_finite(host_metrics):
      bad = int(host_metrics["first_bad_step"])
      if bad != _NO_BAD_STEP:
        raise FloatingPointError(_non_finite_message(
            bad, steps_per_epoch, last_good, ckpts.directory))

    def save(epochs_done: int):
      ckpts.save(step, {"state": state, "metrics": metrics},
                 dict(meta_expected, epoch=epochs_done, step=step,
                      history=log.history))

    while step < end_step and not preempted:
      epoch = step // steps_per_epoch
      perm = epoch_perm(seed, epoch)
      t0, steps_run = time.perf_counter(), 0
      for k in range(step % steps_per_epoch, steps_per_epoch):
        state, metrics = train_step(state, metrics, images, labels, perm, k)
        step += 1
        steps_run += 1
        bar.update(1)
        if step % log_every == 0:
          host = jax.device_get(metrics)
          check_finite(host)
          bar.set_postfix(epoch=epoch + 1, loss="%.4f" % (
              float(host["loss_sum"]) / max(int(host["steps"]), 1)))
        if step == sigterm_at:
          os.kill(os.getpid(), signal.SIGTERM)
        if k + 1 < steps_per_epoch:
          preempted = stop_requested()
          if preempted or step == end_step:
            check_finite(jax.device_get(metrics))
            save(epoch)
            ckpts.wait()
            if preempted:
              logger.warning(
                  "SIGTERM: saved checkpoint %s (epoch %d, step %d of %d); "
                  "exiting. Rerun the same command to resume.",
                  ckpts.step_dir(step), epoch + 1, k + 1, steps_per_epoch)
            else:
              logger.info("Reached stop_at_step: saved checkpoint %s (epoch %d, "
                          "step %d of %d).", ckpts.step_dir(step), epoch + 1,
                          k + 1, steps_per_epoch)
            break
      if step % steps_per_epoch:  # stopped mid-epoch: no epoch record
        break
      host = jax.device_get(metrics)
      check_finite(host)
      elapsed = time.perf_counter() - t0
      record = {
          "epoch": epoch + 1, "step": step,
          "lr": float(schedule(step - 1)),
          "train_loss": float(host["loss_sum"]) / max(int(host["steps"]), 1),
          "train_accuracy": float(host["correct"]) / max(int(host["count"]), 1),
      }
      if (epoch + 1) % eval_every == 0 or step == total_steps:
        ev = evaluate(model, state, dataset.test_images, dataset.test_labels,
                      mean=dataset.mean, std=dataset.std,
                      batch_size=int(_cfg(config, "eval_batch_size", 500)),
                      mesh=mesh, eval_step=eval_step)
        record.update(test_loss=ev["loss"], test_accuracy=ev["accuracy"])
      record.update(sparsity=mask_sparsity, epoch_seconds=elapsed,
                    steps_per_second=steps_run / max(elapsed, 1e-9))
      metrics = put_replicated(init_train_metrics(), mesh)
      bar.clear()  # keep the log line off the bar's line
      logger.info("epoch %d/%d: %s", epoch + 1, num_epochs, ", ".join(
          f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch",)))
      bar.refresh()
      log.write(record)
      save(epoch + 1)
      last_good = (step, epoch + 1)
      if step < total_steps and stop_requested():
        ckpts.wait()
        logger.warning("SIGTERM: saved checkpoint %s (end of epoch %d); "
                       "exiting. Rerun the same command to resume.",
                       ckpts.step_dir(step), epoch + 1)
        preempted = True
  return FitResult(state=state, history=list(log.history), preempted=preempted,
                   resumed_from=resumed_from)
