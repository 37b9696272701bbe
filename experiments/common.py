"""What the experiment runners share: config checks, the mask, one training run.

* :func:`resolve_config` fills in derived defaults and refuses bad values.
* :func:`make_mask_fn` is the one place where an experiment turns
  ``config.pruner`` into a mask: any method of
  :func:`sparsejax.scores.prune_at_init`, scored on the freshly initialised
  network, followed by the diagnostics report of
  :func:`sparsejax.diagnostics.report` (nominal and effective sparsity,
  per-layer density, layer collapse), printed and saved with the run.
* :func:`make_prunable` turns ``config.prunable`` into a
  :class:`sparsejax.masks.Prunable` ordered by the model's forward layer order,
  for every runner.
* :func:`run` is one training run (load data, build the model, prune, train
  with :func:`sparsejax.train.fit`, write ``results.json``); ``experiments.train``,
  ``experiments.prune_at_init`` and every cell of ``experiments.sweep`` are
  this function.
* :func:`cli_main` runs a command-line entry point with the shared exit
  statuses and one-line error messages.

Files of a run directory: ``run.json`` (its signature: the runner and the
resolved config without the fields that cannot change the result, written
first and checked by every later call, :mod:`experiments.workdir`),
``config.json`` (the resolved config),
``pruning.json`` and ``pruning.txt`` (the mask report; not for dense runs),
``metrics.jsonl``, ``tb/`` (when ``config.train.tensorboard``), ``checkpoints/`` and,
once training has finished, ``results.json`` and, with ``config.train.save_sparse``,
``model.sparse`` (:func:`save_sparse_model`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from experiments import workdir as workdir_lib
from sparsejax import _paths
from sparsejax import budgets
from sparsejax import data
from sparsejax import diagnostics
from sparsejax import dst
from sparsejax import losses
from sparsejax import lottery
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import metrics_log
from sparsejax import models
from sparsejax import schedules
from sparsejax import scores
from sparsejax import sparse_io
from sparsejax import state as state_lib
from sparsejax import suptickets
from sparsejax import tost
from sparsejax import train
from sparsejax.models import activations

PyTree = Any

#: ``config.pruner`` values: ``"dense"`` (no mask), a method of
#: :func:`sparsejax.scores.prune_at_init`, or ``"ticket"``: the mask of a
#: lottery ticket saved by ``experiments.lottery`` (``config.mask_path``).
PRUNERS = ("dense", "ticket", *scores.METHODS, *(f"iterative_{m}" for m in scores.METHODS))
#: Methods that score with training data (a class-balanced batch).
DATA_METHODS = ("snip", "grasp")
#: ``config.prunable`` presets, without a layer order: resolve them for a model
#: with :func:`make_prunable` (the "first"/"last" presets refuse to run without).
PRUNABLE = {
  "kernels": masks.KERNELS,
  "keep_first": masks.KEEP_FIRST_DENSE,
  "keep_classifier": masks.KEEP_CLASSIFIER_DENSE,
  "keep_first_and_classifier": masks.KEEP_FIRST_AND_CLASSIFIER_DENSE,
}
#: Exit status of a run stopped by SIGTERM after saving its checkpoint.
EXIT_PREEMPTED = 143

#: ``config.model.dtype`` values: the models' computation dtype (see
#: :func:`model_kwargs`).
DTYPES = ("float32", "bfloat16")

PRUNING_FILE = "pruning.json"
#: LRsI's scales and objective curve (ToST runs with LRsI).
LRSI_FILE = "lrsi.json"
RESULTS_FILE = workdir_lib.RESULTS_FILE
SPARSE_FILE = "model.sparse"


def define_flags(workdir_help: str = "Directory for checkpoints, logs and results."):
  """Defines ``--workdir`` and ``--config`` (a locked config file).

  Called by each entry point under ``if __name__ == "__main__"``, so that
  importing the runners (e.g. in tests) defines no flags.
  """
  flags.DEFINE_string("workdir", None, workdir_help)
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model's constructor fields: ``config.model.kwargs`` and ``config.model.dtype``.

  ``config.model.dtype`` (default ``"float32"``) becomes the model's ``dtype``: with
  ``"bfloat16"`` the convolutions, matrix products and activations compute
  in bfloat16 (mixed precision) while the parameters, the optimiser state, the
  batch-norm statistics, the logits and the loss stay float32 (the models
  cast their logits to float32; :mod:`sparsejax.losses` computes in float32).

  Example: ``models.get(config.model.name, 10, **model_kwargs(config))``.

  Raises:
    ValueError: ``config.model.dtype`` not in :data:`DTYPES`, or a ``dtype`` in
      ``config.model.kwargs`` (``config.model.dtype`` is the one switch).
  """
  dtype = config.model.get("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {DTYPES}, got {dtype!r}")
  kwargs = config.model.kwargs.to_dict() if "kwargs" in config.model else {}
  if "dtype" in kwargs:
    raise ValueError(
      "set the model's computation dtype with config.model.dtype, not config.model.kwargs.dtype"
    )
  kwargs["dtype"] = jnp.dtype(dtype)
  return kwargs


def base_method(pruner: str) -> str:
  """``"snip"`` for ``"snip"`` and ``"iterative_snip"``."""
  return pruner.removeprefix("iterative_")


def resolve_config(
  config: ml_collections.ConfigDict,
  extra: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with derived defaults filled in and values checked.

  The one config check of every runner. ``weight_decay=None`` becomes the
  SPEC §8 value for the model family (5e-4 for VGG, 1e-4 otherwise). The
  pruning fields (``pruner``, ``sparsity``, ``score_bn_mode``,
  ``synflow_dtype``) are checked when the config has them (the lottery
  config has no ``pruner``).

  Args:
    config: a runner config.
    extra: the runner's own checks (and normalisation) of its own fields,
      applied to the copy, e.g. ``experiments.lottery.check_config``.

  Raises:
    ValueError: an unknown pruner, prunable preset, model name, scoring
      batch-norm mode, SynFlow or model dtype, a sparsity outside [0, 1), a bad
      ``act_coef_schedule``, or what ``extra`` refuses.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.name not in models.names():
    raise ValueError(
      f"unknown model {config.model.name!r}; valid names are: {', '.join(models.names())}"
    )
  model_kwargs(config)  # checks config.model.dtype
  if config.prunable not in PRUNABLE:
    raise ValueError(f"config.prunable must be one of {tuple(PRUNABLE)}, got {config.prunable!r}")
  if "pruner" in config:
    _check_pruning(config)
  if config.get("dst", "none") != "none":
    _check_dst(config)
  if config.get("suptickets", False):
    _check_suptickets(config)
  if config.get("act_coef_schedule") is not None:
    act_coef_schedule(config, 1)  # checks the values
  if "tost" in config:
    _check_tost(config)
  if config.optimizer.weight_decay is None:
    config.optimizer.weight_decay = 5e-4 if config.model.name.startswith("vgg") else 1e-4
  if config.train.get("save_sparse_compression", "none") not in sparse_io.COMPRESSIONS:
    raise ValueError(
      f"config.train.save_sparse_compression must be one of "
      f"{sparse_io.COMPRESSIONS}, got {config.train.save_sparse_compression!r}"
    )
  if extra is not None:
    extra(config)
  return config


def _check_pruning(config: ml_collections.ConfigDict) -> None:
  if config.pruner not in PRUNERS:
    raise ValueError(f"config.pruner must be one of {PRUNERS}, got {config.pruner!r}")
  if config.pruner == "ticket":
    if not config.mask_path or not lottery.ticket_exists(config.mask_path):
      raise ValueError(
        "config.pruner='ticket' needs config.mask_path, a ticket directory "
        f"written by experiments.lottery (got {config.mask_path!r})"
      )
    _check_ticket_sparsity(config)
  elif config.pruner != "dense":
    masks.check_sparsity(config.sparsity)
    config_budget(config)
  if config.score_bn_mode not in (None, *scores.BN_MODES):
    raise ValueError(
      f"config.score_bn_mode must be None, 'train' or 'eval', got {config.score_bn_mode!r}"
    )
  if config.synflow_dtype not in ("float32", "float64"):
    raise ValueError(
      f"config.synflow_dtype must be 'float32' or 'float64', got {config.synflow_dtype!r}"
    )


def config_budget(config: ml_collections.ConfigDict) -> budgets.Budget:
  """The budget object of ``config.budget`` (a command-line name such as
  ``"erk"`` or ``"2:4"``, :func:`sparsejax.budgets.parse`)."""
  try:
    return budgets.parse(config.budget)
  except ValueError as e:
    raise ValueError(f"config.budget: {e}") from None


def ticket_sparsity(directory: str) -> float:
  """The sparsity of the ticket in ``directory``: ``1 - density`` of its
  ``meta.json`` (``experiments.lottery``), else of its mask's kernels."""
  mask, _, meta = lottery.load_ticket(directory)
  if "density" in meta:
    return 1.0 - float(meta["density"])
  return masks.summary(mask).sparsity


def _check_ticket_sparsity(config: ml_collections.ConfigDict) -> None:
  """``config.sparsity`` of a ticket run: ``None`` becomes the ticket's; a value
  must be the ticket's within 1e-3 (and is then replaced by it), so that
  ``config.json`` records the sparsity that trains."""
  ticket = ticket_sparsity(config.mask_path)
  if config.sparsity is not None and abs(float(config.sparsity) - ticket) > 1e-3:
    raise ValueError(
      f"config.sparsity={config.sparsity} differs from the sparsity {ticket:.4f} "
      f"of the ticket in {config.mask_path}: with config.pruner='ticket' set "
      f"config.sparsity=None (the ticket's) or {ticket:.4f}"
    )
  config.sparsity = ticket


def _check_range(
  name: str,
  value,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
  what: str = "",
) -> None:
  """Raises ``config.<name> must be in [low, high]...`` unless ``value`` is there."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok:
    v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"config.{name} must be in {interval}{what}, got {value!r}")


def _check_prune_epochs(config: ml_collections.ConfigDict) -> None:
  """GMP/GraNet's ``dst_prune_epochs = (start, end)``: epochs (>= 1) or fractions
  of training (< 1, as :func:`_epoch_step` reads them), start before end, end
  within ``train.num_epochs``."""
  spec = tuple(config.dst_prune_epochs)
  n = int(config.train.num_epochs)
  form = (
    "epochs (>= 1) or fractions of training (< 1) with 0 <= start < end "
    f"<= config.train.num_epochs = {n}"
  )
  if len(spec) != 2 or any(
    isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in spec
  ):
    raise ValueError(f"config.dst_prune_epochs must be (start, end), {form}; got {spec!r}")
  start, end = (float(v) * n if 0 < v < 1 else float(v) for v in spec)
  if end > n:
    raise ValueError(
      f"config.dst_prune_epochs={spec} ends at epoch {end:g}, after "
      f"training (config.train.num_epochs = {n}): give {form}"
    )
  if start >= end:
    raise ValueError(
      f"config.dst_prune_epochs={spec} starts at epoch {start:g}, "
      f"not before its end at epoch {end:g}: give {form}"
    )


#: ``config.dst`` values (SPEC §4): ``"none"`` keeps the mask of ``pruner``.
DST_METHODS = ("none", "set", "rigl", "gmp", "granet")


def _check_dst(config: ml_collections.ConfigDict) -> None:
  if config.dst not in DST_METHODS:
    raise ValueError(f"config.dst must be one of {DST_METHODS}, got {config.dst!r}")
  if config.dst in ("set", "rigl") and config.pruner == "dense":
    raise ValueError(
      f"config.dst={config.dst!r} needs a starting mask: set "
      "config.pruner (the reference: 'random' with budget 'erk')"
    )
  if config.dst in ("gmp", "granet"):
    if config.pruner != "dense":
      raise ValueError(
        f"config.dst={config.dst!r} starts dense or from a random "
        "mask at config.dst_initial_sparsity: set config.pruner='dense'"
      )
    masks.check_sparsity(config.dst_initial_sparsity, "config.dst_initial_sparsity")
    masks.check_sparsity(config.sparsity)
    _check_prune_epochs(config)
    if isinstance(config_budget(config), budgets.NM):
      raise ValueError(
        f"config.dst={config.dst!r} prunes globally along a schedule and cannot "
        f"keep an N:M budget ({config.budget!r}); use config.dst='rigl' or "
        "'set' (they keep N:M) or a pruner with that budget"
      )
  if config.dst_drop_schedule not in ("cosine", "constant"):
    raise ValueError(
      f"config.dst_drop_schedule must be 'cosine' or 'constant', got {config.dst_drop_schedule!r}"
    )
  every = config.dst_update_every
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(
      f"config.dst_update_every must be an integer >= 1 (steps between mask updates), got {every!r}"
    )
  _check_range("dst_end", config.dst_end, 0, 1, low_open=True, what=" (a fraction of training)")
  _check_range(
    "dst_alpha", config.dst_alpha, 0, 1, what=" (the fraction of each layer dropped and regrown)"
  )


def _check_suptickets(config: ml_collections.ConfigDict) -> None:
  if config.get("dst", "none") == "none":
    raise ValueError(
      "config.suptickets needs a DST method: set config.dst (granet, rigl, set or gmp)"
    )
  cycles, cycle_epochs = int(config.sup_cycles), int(config.sup_cycle_epochs)
  if cycles < 1 or cycle_epochs < 1:
    raise ValueError(
      f"config.sup_cycles and config.sup_cycle_epochs must be >= 1, got {cycles} and {cycle_epochs}"
    )
  phase = int(config.train.num_epochs) - cycles * cycle_epochs
  if phase < 1:
    raise ValueError(
      f"config.sup_cycles x config.sup_cycle_epochs = "
      f"{cycles * cycle_epochs} leave no DST phase in "
      f"config.train.num_epochs = {config.train.num_epochs}"
    )
  if config.dst in ("gmp", "granet") and any(
    float(v) >= 1 and float(v) > phase for v in config.dst_prune_epochs
  ):
    raise ValueError(
      f"config.dst_prune_epochs {tuple(config.dst_prune_epochs)} end "
      f"after the DST phase ({phase} epochs)"
    )
  if float(config.sup_lr1) <= 0 or float(config.sup_lr2) <= 0:
    raise ValueError("config.sup_lr1 and config.sup_lr2 must be positive")
  if config.sup_lr_shape not in suptickets.LR_SHAPES:
    raise ValueError(
      f"config.sup_lr_shape must be one of {suptickets.LR_SHAPES}, got {config.sup_lr_shape!r}"
    )
  if not 0 < float(config.sup_fraction) <= 1:
    raise ValueError(f"config.sup_fraction must be in (0, 1], got {config.sup_fraction}")
  if config.sup_ema is not None and not 0 < float(config.sup_ema) <= 1:
    raise ValueError(f"config.sup_ema must be None or in (0, 1], got {config.sup_ema}")
  if config.sup_bn_variance not in train.BN_VARIANCE_MODES:
    raise ValueError(
      f"config.sup_bn_variance must be one of "
      f"{train.BN_VARIANCE_MODES}, got {config.sup_bn_variance!r}"
    )


def suptickets_plan(config: ml_collections.ConfigDict, steps_per_epoch: int) -> suptickets.Plan:
  """The :class:`sparsejax.suptickets.Plan` of ``config`` (``sup_cycles``,
  ``sup_cycle_epochs`` within ``train.num_epochs``)."""
  return suptickets.Plan(
    num_epochs=int(config.train.num_epochs),
    num_cycles=int(config.sup_cycles),
    cycle_epochs=int(config.sup_cycle_epochs),
    steps_per_epoch=steps_per_epoch,
  )


#: ``config.tost_<field>`` schedules: the :class:`sparsejax.tost.ToST` fields.
TOST_SCHEDULES = ("soft_neurons", "ghost_skips", "label_smoothing")


def make_tost(config: ml_collections.ConfigDict) -> tost.ToST:
  """The ToST recipe of ``config``: the preset ``config.tost`` (``"none"`` when
  absent), with the schedules ``config.tost_<technique>`` (a given schedule
  switches its technique on) and the LRsI settings ``config.tost_lrsi``.

  Raises:
    ValueError: an unknown preset, a schedule that is not four numbers or
      not a valid :class:`sparsejax.tost.Ramp`, an unknown LRsI field.
  """
  recipe = tost.preset(config.get("tost", "none") or "none")
  overrides = {}
  for field in TOST_SCHEDULES:
    spec = config.get(f"tost_{field}")
    if spec is not None:
      if len(spec) != 4:
        raise ValueError(f"config.tost_{field} must be (start, end, hold, stop), got {spec!r}")
      overrides[field] = tost.Ramp(*(float(v) for v in spec))
  lrsi_fields = config.get("tost_lrsi")
  lrsi_fields = dict(
    lrsi_fields.to_dict() if hasattr(lrsi_fields, "to_dict") else lrsi_fields or {}
  )
  if recipe.lrsi is not None and lrsi_fields:
    known = {f.name for f in dataclasses.fields(tost.LRsI)}
    unknown = sorted(set(lrsi_fields) - known)
    if unknown:
      raise ValueError(f"config.tost_lrsi has unknown fields {unknown}; valid: {sorted(known)}")
    overrides["lrsi"] = dataclasses.replace(recipe.lrsi, **lrsi_fields)
  return dataclasses.replace(recipe, **overrides)


def _check_tost(config: ml_collections.ConfigDict) -> None:
  recipe = make_tost(config)
  if not recipe.techniques:
    return
  if recipe.ghost_skips is not None and not tost.supports_ghost_skips(config.model.name):
    tost.ghost_model(config.model.name, 2)  # raises the documented error
  if config.get("dst", "none") != "none":
    raise ValueError("config.tost with config.dst is not supported: ToST trains a fixed mask")
  if recipe.soft_neurons is not None and config.get("act_coef_schedule") is not None:
    raise ValueError(
      "config.act_coef_schedule and ToST's soft neurons both set "
      "the activation blend: use config.tost_soft_neurons"
    )
  if recipe.label_smoothing is not None and config.optimizer.get("label_smoothing"):
    raise ValueError(
      "config.optimizer.label_smoothing and ToST's label smoothing are both "
      "set: use config.tost_label_smoothing"
    )


def check_dst_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """Refuses a DST schedule under which no mask update would run.

  The steps are known only with the data: SET/RigL update every
  ``dst_update_every`` steps from that step on, until ``dst_end`` of
  training; GraNet regrows from the first step of ``dst_prune_epochs`` until
  ``dst_end``. (The library refuses the same, naming its own arguments.)

  Raises:
    ValueError: naming the config fields, their values and the steps.
  """
  method = config.get("dst", "none")
  if method == "none":
    return
  total = int(config.train.num_epochs) * steps_per_epoch
  end = round(float(config.dst_end) * total)
  every = int(config.dst_update_every)
  if method in ("set", "rigl") and end <= every:
    raise ValueError(
      f"config.dst_update_every={every} leaves no mask update before "
      f"config.dst_end={config.dst_end} of training (step {end} of {total}, "
      f"{steps_per_epoch} per epoch): set config.dst_update_every below {end} "
      "or train longer"
    )
  if method == "granet":
    start = _epoch_step(
      float(config.dst_prune_epochs[0]), int(config.train.num_epochs), steps_per_epoch
    )
    if end <= start:
      raise ValueError(
        f"config.dst_end={config.dst_end} (step {end} of {total}) is not after "
        f"the start of config.dst_prune_epochs={tuple(config.dst_prune_epochs)} "
        f"(step {start}): GraNet would never regrow; set config.dst_end later"
      )


def _epoch_step(value: float, num_epochs: int, steps_per_epoch: int) -> int:
  """A point of training given in epochs (>= 1) or as a fraction (< 1), in steps."""
  epochs = value * num_epochs if 0 < value < 1 else value
  return round(epochs * steps_per_epoch)


def make_dst_optimizer(
  config: ml_collections.ConfigDict,
  inner,
  params: PyTree,
  mask: PyTree | None,
  prunable,
  steps_per_epoch: int,
  extra_updates: dst.ExtraUpdates = (),
):
  """The dynamic-sparse-training optimiser of ``config.dst`` around ``inner``.

  * ``set`` / ``rigl``: :func:`sparsejax.dst.set_optimizer` /
    :func:`~sparsejax.dst.rigl_optimizer`
    from ``mask`` (the ``pruner`` mask), every ``dst_update_every`` steps until
    ``dst_end`` of training, drop fraction ``dst_alpha`` with a cosine decay
    to 0 at that point (``dst_drop_schedule="cosine"``, RigL) or constant.
    With an ``"N:M"`` ``config.budget`` the updates keep the mask N:M
    (``nm=budgets.parse(config.budget)``).
  * ``gmp`` / ``granet``: :func:`sparsejax.dst.gmp_optimizer` /
    :func:`~sparsejax.dst.granet_optimizer`
    from dense (``dst_initial_sparsity = 0``) or a random mask at that
    sparsity under ``config.budget``, pruned to ``config.sparsity`` along the
    cubic schedule between ``dst_prune_epochs`` (epochs, or fractions of
    training); GraNet regrows with fraction ``dst_alpha`` decayed by cosine
    until ``dst_end``.

  ``extra_updates`` (e.g. Sup-tickets' cycle starts) go to the method (see
  :func:`sparsejax.dst.dynamic_sparse`).

  Returns:
    ``(tx, initial_mask)``.
  """
  total = int(config.train.num_epochs) * steps_per_epoch
  end = round(float(config.dst_end) * total)
  every = int(config.dst_update_every)
  common_kw = dict(
    update_every=every,
    skip_update=bool(config.dst_skip_update),
    prunable=prunable,
    seed=int(config.train.seed),
    extra_updates=tuple(extra_updates),
  )
  if config.dst in ("set", "rigl"):
    fraction = (
      dst.cosine_drop_fraction(float(config.dst_alpha), end)
      if config.dst_drop_schedule == "cosine"
      else float(config.dst_alpha)
    )
    method = dst.set_optimizer if config.dst == "set" else dst.rigl_optimizer
    budget = config_budget(config)
    nm = budget if isinstance(budget, budgets.NM) else None
    kw = dict(drop_fraction=fraction, end_step=end, nm=nm, **common_kw)
    return method(inner, mask, **kw), mask
  s0 = float(config.dst_initial_sparsity)
  initial = (
    masks.ones_like(params)
    if s0 == 0
    else masks.random_mask(
      jax.random.fold_in(jax.random.key(config.train.seed), 2),
      params,
      s0,
      budget=config_budget(config),
      prunable=prunable,
    )
  )
  start, stop = (
    _epoch_step(float(v), int(config.train.num_epochs), steps_per_epoch)
    for v in config.dst_prune_epochs
  )
  kw = dict(
    final_sparsity=float(config.sparsity),
    initial_sparsity=s0,
    start_step=start,
    end_step=stop,
    **common_kw,
  )
  if config.dst == "gmp":
    return dst.gmp_optimizer(inner, initial, **kw), initial
  return dst.granet_optimizer(
    inner, initial, regrow_end_step=end, alpha=float(config.dst_alpha), **kw
  ), initial


def act_coef_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The ``act_coef`` schedule of ``config.act_coef_schedule``, or ``None``.

  ``config.act_coef_schedule = (start, end, hold_epochs, ramp_epochs)``: the
  activation-blend coefficient (:func:`sparsejax.models.activations.blend`,
  ReLU at 0, Swish at 1) is ``start`` for ``hold_epochs`` epochs, then
  linear to ``end`` over ``ramp_epochs``
  (:func:`sparsejax.schedules.hold_then_ramp`, in steps).

  Raises:
    ValueError: not four numbers, or negative epochs.
  """
  spec = config.get("act_coef_schedule")
  if spec is None:
    return None
  if len(spec) != 4:
    raise ValueError(
      f"config.act_coef_schedule must be (start, end, hold_epochs, ramp_epochs), got {spec!r}"
    )
  start, end, hold, ramp = (float(v) for v in spec)
  return schedules.hold_then_ramp(
    start, end, round(hold * steps_per_epoch), round(ramp * steps_per_epoch)
  )


def make_prunable(name: str, model, input_shape) -> masks.Prunable:
  """The ``config.prunable`` preset ``name`` for ``model``, in forward order.

  The one place where a runner turns a preset name into a
  :class:`sparsejax.masks.Prunable`: the keep-dense presets get the model's
  forward layer order (:func:`sparsejax.models.layer_order`), which decides the
  "first" layer (the stem conv of a ResNet) and the classifier whatever the key
  order of the params (a jitted init sorts them, so ``'BasicBlock_0'``
  precedes the stem ``'Conv_0'``).

  Args:
    name: a key of :data:`PRUNABLE`, e.g. ``"keep_first"``.
    model: the unbound linen model.
    input_shape: shape of one example, e.g. ``(32, 32, 3)``.

  Returns:
    The preset with ``order`` set (unchanged for ``"kernels"``).

  Raises:
    ValueError: an unknown preset name.
  """
  if name not in PRUNABLE:
    raise ValueError(f"config.prunable must be one of {tuple(PRUNABLE)}, got {name!r}")
  preset = PRUNABLE[name]
  if not (preset.keep_first_dense or preset.keep_last_dense):
    return preset
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return dataclasses.replace(preset, order=models.layer_order(model, x))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON atomically (process 0 only); ``path`` may be any
  ``etils.epath`` location."""
  if jax.process_index() != 0:
    return
  _paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in ``path`` (any ``etils.epath`` location)."""
  return json.loads(epath.Path(path).read_text())


# ----------------------------------------------------------------------------
# The mask
# ----------------------------------------------------------------------------


def _getter(sub: ml_collections.ConfigDict):
  """``get(name, default)`` of ``sub``: ``default`` for a missing or None field."""

  def get(name, default):
    value = sub.get(name, default)
    return default if value is None else value

  return get


def lr_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int | None = None
):
  """:func:`sparsejax.schedules.lr_schedule` of ``config.optimizer``
  (``learning_rate``, ``schedule``, ``warmup_epochs``, ``decay_factor``,
  ``decay_epochs``, ``end_factor``) over ``num_epochs`` (default
  ``config.train.num_epochs``)."""
  get = _getter(config.optimizer)
  return schedules.lr_schedule(
    float(config.optimizer.learning_rate),
    num_epochs=int(config.train.num_epochs if num_epochs is None else num_epochs),
    steps_per_epoch=steps_per_epoch,
    kind=get("schedule", "constant"),
    warmup_epochs=float(get("warmup_epochs", 0.0)),
    decay_factor=float(get("decay_factor", 0.1)),
    decay_epochs=tuple(get("decay_epochs", ())),
    end_factor=float(get("end_factor", 0.0)),
  )


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, schedule=None):
  """:func:`sparsejax.schedules.make_optimizer` of ``config.optimizer``
  (``momentum``, ``nesterov``, ``weight_decay``) with
  ``schedule`` (default :func:`lr_schedule` of the config)."""
  get = _getter(config.optimizer)
  if schedule is None:
    schedule = lr_schedule(config, steps_per_epoch)
  return schedules.make_optimizer(
    schedule,
    momentum=float(get("momentum", 0.9)),
    nesterov=bool(get("nesterov", False)),
    weight_decay=float(get("weight_decay", 0.0)),
  )


def fit_options(config: ml_collections.ConfigDict) -> train.FitOptions:
  """The :class:`sparsejax.train.FitOptions` of ``config.train``'s loop fields
  and ``config.data.augment``."""
  given = {**config.train.to_dict(), "augment": config.data.get("augment")}
  fields = {f.name: given.get(f.name) for f in dataclasses.fields(train.FitOptions)}
  return train.FitOptions(**{k: v for k, v in fields.items() if v is not None})


def fit_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``num_epochs``, ``batch_size``, ``seed`` (``config.train``) and ``options``
  (:func:`fit_options`) of :func:`sparsejax.train.fit`."""
  return dict(
    num_epochs=int(config.train.num_epochs),
    batch_size=int(config.train.batch_size),
    seed=int(config.train.get("seed", 0) or 0),
    options=fit_options(config),
  )


def default_loss(config: ml_collections.ConfigDict):
  """The training loss of the config: cross-entropy with
  ``config.optimizer.label_smoothing`` (default 0)."""
  return losses.smoothed_cross_entropy(float(config.optimizer.get("label_smoothing", 0.0) or 0.0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_state(model, input_shape) -> dict:
  """The non-trainable collections of a freshly initialised ``model``.

  These are the batch-norm statistics (mean 0, variance 1), which do not
  depend on the initialisation key; the params are dropped.
  """
  variables = state_lib.init_variables(model, jnp.zeros((1, *input_shape)), jax.random.key(0))
  return {k: v for k, v in variables.items() if k != "params"}


def _method_kwargs(config: ml_collections.ConfigDict, dataset: data.Dataset) -> dict:
  """The keyword arguments of :func:`sparsejax.scores.prune_at_init` that
  ``config.pruner`` takes, from the config (SPEC §2 defaults where ``None``)."""
  method = base_method(config.pruner)
  kwargs = {}
  if config.pruning_rounds is not None:
    kwargs["rounds"] = int(config.pruning_rounds)
  if method == "random":
    kwargs["key"] = jax.random.fold_in(jax.random.key(config.train.seed), 1)
  if method in ("snip", "grasp", "synflow") and config.score_bn_mode is not None:
    kwargs["bn_mode"] = config.score_bn_mode
  if method in DATA_METHODS:
    kwargs["batches"] = data.class_balanced_batch(
      dataset, int(config.score_samples_per_class), int(config.train.seed)
    )
  if method == "grasp":
    kwargs["temperature"] = float(config.grasp_temperature)
  if method == "synflow":
    kwargs["input_shape"] = dataset.image_shape
    kwargs["dtype"] = jnp.dtype(config.synflow_dtype)
  return kwargs


def make_mask_fn(
  config: ml_collections.ConfigDict,
  model,
  dataset: data.Dataset,
  workdir: str | None = None,
  *,
  trained_model=None,
) -> Callable[[PyTree], PyTree] | None:
  """The ``params -> mask`` function of ``config.pruner``; ``None`` if dense.

  Given the freshly initialised params (as :func:`sparsejax.train.fit`'s
  ``init`` calls it on a fresh start; not when a run resumes from a
  checkpoint, and traced params, of fit's layout trace, get the all-ones
  mask without scoring), the function

  1. prunes with :func:`sparsejax.scores.prune_at_init` (``config.pruner``,
     ``sparsity``, ``budget``, ``prunable``, ``pruning_rounds``): the model
     is :func:`sparsejax.scores.linen_apply_fn` of the params and the initial
     batch-norm statistics; SNIP and GraSP score on
     ``data.class_balanced_batch(dataset, config.score_samples_per_class,
     config.train.seed)``; SynFlow feeds an all-ones input of the image shape;
     ``random`` uses the key ``fold_in(key(seed), 1)``; ``score_bn_mode``,
     ``grasp_temperature`` and ``synflow_dtype`` are passed to the methods
     that take them;
  2. times it: ``scoring_seconds`` is the wall time of step 1 until the mask
     is ready, compilation included;
  3. prints the :func:`sparsejax.diagnostics.report` table (nominal and
     effective sparsity, per-layer density, collapsed layers) and, with a
     ``workdir``, writes it to ``workdir/pruning.txt`` and, with the method,
     sparsity, budget, prunable preset and ``scoring_seconds``, to
     ``workdir/pruning.json``.

  A collapsed mask is reported (and :func:`~sparsejax.scores.prune_at_init`
  warns), never refused: the run trains it like any other.

  ``trained_model``: the model that trains, when it is ``model`` with ToST's
  ghost skips (:func:`sparsejax.tost.ghost_model`): the function then takes
  its params, scores their plain part (:func:`sparsejax.tost.export`) on
  ``model`` and returns the mask lifted to the ghost params
  (:func:`sparsejax.tost.lift_mask`, ghost leaves all ``True``), so the mask
  is the one the baseline gets.
  """
  if config.pruner == "dense":
    return None
  if trained_model is not None:
    plain_fn = make_mask_fn(config, model, dataset, workdir)
    return lambda params: tost.lift_mask(plain_fn(tost.export(params)), params)
  input_shape = dataset.image_shape
  prunable = make_prunable(config.prunable, model, input_shape)

  def mask_fn(params: PyTree) -> PyTree:
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
      # Traced for a layout (fit's jax.eval_shape of its init): the all-ones
      # mask has the mask's layout, without scoring.
      return masks.ones_like(params)
    variables = {"params": params, **_initial_state(model, input_shape)}
    params, apply_fn = scores.linen_apply_fn(model, variables)
    start = time.perf_counter()
    if config.pruner == "ticket":
      mask = jax.tree.map(jnp.asarray, lottery.load_ticket(config.mask_path)[0])
      masks.check_mask(mask, params)  # names the first path of another model
    else:
      mask = scores.prune_at_init(
        config.pruner,
        params,
        sparsity=float(config.sparsity),
        budget=config_budget(config),
        prunable=prunable,
        apply_fn=apply_fn,
        **_method_kwargs(config, dataset),
      )
    mask = jax.block_until_ready(mask)
    seconds = time.perf_counter() - start
    report = diagnostics.report(mask, params, apply_fn, input_shape, prunable)
    if config.pruner == "ticket":
      header = f"lottery-ticket mask of {config.mask_path}"
    else:
      header = (
        f"{config.pruner} at sparsity {config.sparsity} ({config.budget} "
        f"budget, prunable={config.prunable}): scored in {seconds:.1f} s"
      )
    print(f"{header}\n{report}", flush=True)
    logging.info(
      "%s; sparsity %.4f, effective %.4f, collapsed %s",
      header,
      report["sparsity"],
      report["effective_sparsity"],
      report["collapsed"] or "none",
    )
    if workdir is not None and jax.process_index() == 0:
      epath.Path(workdir, "pruning.txt").write_text(f"{header}\n{report}\n")
      write_json(
        os.path.join(workdir, PRUNING_FILE),
        {
          "method": config.pruner,
          "sparsity": float(report["sparsity"] if config.pruner == "ticket" else config.sparsity),
          "budget": config.budget,
          "prunable": config.prunable,
          "scoring_seconds": seconds,
          "report": dict(report),
        },
      )
    return mask

  return mask_fn


# ----------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------


def load_dataset(config: ml_collections.ConfigDict) -> data.Dataset:
  """``config.data.name`` from ``config.data.dir``, keeping ``config.data.train_subset``."""
  return data.load(config.data.name, config.data.dir, train_subset=config.data.train_subset)


def describe_sparsity(config: ml_collections.ConfigDict) -> str:
  """How ``config`` makes the network sparse, for the log line of :func:`run`.

  ``"pruner=snip sparsity=0.9"``; a lottery ticket as ``"pruner=ticket
  (<mask_path>)"``; dense as ``"pruner=dense sparsity=0.0"``; with a DST method
  its name, for GMP/GraNet from ``dst_initial_sparsity`` to the target
  (``"dst=granet sparsity 0.0 -> 0.9"``); with Sup-tickets ``"+ suptickets"``.
  """
  dst_method = config.get("dst", "none")
  if dst_method in ("gmp", "granet"):
    text = f"dst={dst_method} sparsity {float(config.dst_initial_sparsity)} -> {config.sparsity}"
  else:
    if config.pruner == "ticket":
      text = f"pruner=ticket ({config.mask_path})"
    else:
      text = (
        f"pruner={config.pruner} sparsity={config.sparsity if config.pruner != 'dense' else 0.0}"
      )
    if dst_method != "none":
      text += f" dst={dst_method}"
  if config.get("suptickets", False):
    text += " + suptickets"
  return text


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  dataset: data.Dataset | None = None,
  runner: str = "experiments.train",
) -> train.FitResult:
  """Loads data and model, prunes, trains; writes the run files.

  The run first claims ``workdir`` (:func:`experiments.workdir.claim`): a
  directory of another run (another runner, or a config that differs in a
  field that can change the result) is refused before anything is written
  there; a finished run (``results.json``) is left as it is and not trained
  again. An unfinished run directory resumes (:func:`sparsejax.train.fit`):
  the mask then comes from the checkpoint and is not scored again.

  When training finishes, ``results.json`` holds ``final`` (the last epoch's
  metrics), ``epochs``, ``train_seconds`` (the summed training time of the
  epochs, evaluation excluded), ``mask`` (the per-layer summary of the trained
  mask, :meth:`sparsejax.masks.MaskSummary.as_dict`) and ``pruning``
  (``pruning.json`` without its per-layer table; ``None`` for dense runs
  and for a run resumed from a directory without ``pruning.json``) and, with
  ``config.train.save_sparse``, ``sparse_file`` (:func:`save_sparse_model`).

  Args:
    config: a config as in ``experiments/configs/default.py``.
    workdir: the run directory (created).
    dataset: the data of ``config`` when already loaded (a sweep loads it
      once); default :func:`load_dataset`.
    runner: the runner's name in the directory's signature (``run.json``):
      ``experiments.train``, ``experiments.prune_at_init`` or the grid
      runner of a cell.

  Returns:
    The :class:`sparsejax.train.FitResult`; for a finished run, one without
    a ``state`` (``None``) whose ``history`` is read from ``metrics.jsonl``.

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: ``workdir`` holds another
      run.
  """
  config = resolve_config(config)
  workdir = str(_paths.resolve(workdir))
  # Everything that needs the data is checked before the claim writes run.json,
  # so a refused config leaves the workdir as it was (and free for the fix).
  workdir_lib.check(workdir, runner, config)
  if not workdir_lib.is_finished(workdir, (workdir_lib.RESULTS_FILE,)):
    dataset = load_dataset(config) if dataset is None else dataset
    check_dst_schedule(
      config, schedules.steps_per_epoch(dataset.num_train, config.train.batch_size)
    )
  if workdir_lib.claim(workdir, runner, config):
    return finished_result(workdir)
  write_json(os.path.join(workdir, "config.json"), config.to_dict())

  spe = schedules.steps_per_epoch(dataset.num_train, config.train.batch_size)
  act_coef = act_coef_schedule(config, spe)
  kwargs = model_kwargs(config)
  if act_coef is not None:
    kwargs["act"] = activations.blend()
  model = models.get(config.model.name, dataset.num_classes, **kwargs)
  # ToST: the model that trains (blend activation, ghost skips), its scalars,
  # loss and LRsI; the mask is scored on the plain `model`.
  recipe = make_tost(config)
  scalars = {} if act_coef is None else {"act_coef": act_coef}
  trained = model
  if recipe.techniques:
    trained = recipe.model(config.model.name, dataset.num_classes, **kwargs)
    scalars.update(recipe.scalars(int(config.train.num_epochs) * spe))
  mesh = mesh_lib.make_mesh(config.train.num_devices)
  logging.info(
    "%s on %s (%d train / %d test), %s, budget=%s, %d device(s)",
    config.model.name,
    dataset.name,
    dataset.num_train,
    dataset.num_test,
    describe_sparsity(config),
    config.budget,
    mesh.size,
  )
  mask_fn = make_mask_fn(
    config,
    model,
    dataset,
    workdir,
    trained_model=trained if recipe.ghost_skips is not None else None,
  )
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  key = jax.random.key(int(config.train.seed))
  callbacks = recipe.callbacks()
  fit_kwargs = dict(callbacks=callbacks, loss_fn=recipe.loss_fn() or default_loss(config))
  if config.get("dst", "none") != "none":
    fit_kwargs.update(_dst_fit_kwargs(config, model, dataset, mask_fn, workdir))
    tx = fit_kwargs.pop("tx")
    init = lambda: state_lib.create_train_state(trained, tx, sample, key)
  else:
    inner = make_optimizer(config, spe)
    init = lambda: state_lib.create_train_state(trained, inner, sample, key, mask=mask_fn)
  result = train.fit(
    trained,
    dataset,
    workdir,
    init=init,
    mesh=mesh,
    scalars=scalars or None,
    **fit_args(config),
    **fit_kwargs,
  )
  lrsi_info = [
    cb.info for cb in callbacks if isinstance(cb, tost.LRsICallback) and cb.info is not None
  ]
  if lrsi_info:
    info = lrsi_info[0]
    write_json(
      os.path.join(workdir, LRSI_FILE),
      {
        "objective_before": info["objective_before"],
        "objective_after": info["objective_after"],
        "scales": info["scales"],
        "seconds": info["seconds"],
        **{k: info[k].tolist() for k in ("objective", "grad_norm", "loss_after_step")},
      },
    )
  if not result.preempted:
    mask = result.state.mask
    summary = masks.summary(mask if mask is not None else masks.ones_like(result.state.params))
    sparse_file = (
      save_sparse_model(
        result.state,
        workdir,
        config.train.get("save_sparse_compression", "none"),
        metadata={"model": config.model.name, "dataset": dataset.name},
      )
      if config.train.get("save_sparse", False)
      else None
    )
    pruning = None
    pruning_file = os.path.join(workdir, PRUNING_FILE)
    if config.pruner != "dense" and epath.Path(pruning_file).exists():
      pruning = read_json(pruning_file)
      pruning["report"] = {k: v for k, v in pruning["report"].items() if k != "layers"}
    write_json(
      os.path.join(workdir, RESULTS_FILE),
      {
        "final": result.history[-1] if result.history else {},
        "epochs": len(result.history),
        "train_seconds": sum(r["epoch_seconds"] for r in result.history),
        "mask": summary.as_dict(),
        "pruning": pruning,
        **({"sparse_file": sparse_file} if sparse_file is not None else {}),
        "tost": {"preset": config.get("tost", "none"), "techniques": list(recipe.techniques)},
      },
    )
  return result


def finished_result(workdir: str) -> train.FitResult:
  """The :class:`sparsejax.train.FitResult` of the finished run in ``workdir``,
  read from its files: ``history`` from ``metrics.jsonl``, no ``state``."""
  history = metrics_log.read_jsonl(os.path.join(workdir, metrics_log.METRICS_FILE))
  return train.FitResult(state=None, history=history, preempted=False, resumed_from=None)


def _dir_nbytes(path: epath.Path) -> int:
  return sum((root / f).stat().length for root, _, files in path.walk() for f in files)


def save_sparse_model(
  state: state_lib.TrainState, workdir: str, compression: str = "none", metadata: dict | None = None
) -> dict | None:
  """Writes ``workdir/model.sparse`` and prints its size against dense storage.

  The file (:func:`sparsejax.sparse_io.save`) holds ``{"params": ...,
  "batch_stats": ...}``: the params under the trained mask as kept values and
  bit-packed mask, the batch-norm statistics (and a dense run's params) as
  they are; load it with ``sparse_io.load(path, target=variables)``.

  Returns:
    (process 0; ``None`` elsewhere) the file's
    :meth:`sparsejax.sparse_io.FileInfo.as_dict` plus ``checkpoint_nbytes``:
    the size of the last Orbax checkpoint (the whole train state, optimiser
    moments and mask included; ``None`` without one).
  """
  if jax.process_index() != 0:
    return None
  tree = {"params": state.params}
  mask = state.mask if state.mask is not None else masks.ones_like(state.params)
  full_mask = {"params": mask}
  if state.batch_stats:
    tree["batch_stats"] = state.batch_stats
    full_mask["batch_stats"] = masks.ones_like(state.batch_stats)
  info = sparse_io.save(
    os.path.join(workdir, SPARSE_FILE),
    jax.device_get(tree),
    jax.device_get(full_mask),
    metadata=metadata,
    compression=compression,
  )
  ckpt_root = epath.Path(workdir, "checkpoints")
  steps = [d.name for d in ckpt_root.iterdir() if d.name.isdigit()] if ckpt_root.is_dir() else []
  ckpt = _dir_nbytes(ckpt_root / max(steps, key=int)) if steps else None
  line = f"sparse model file {info}"
  if ckpt is not None:
    line += f"; the last checkpoint (train state with optimiser) is {ckpt / 1e6:.3f} MB"
  print(line, flush=True)
  return {**info.as_dict(), "checkpoint_nbytes": ckpt}


def _dst_fit_kwargs(config, model, dataset, mask_fn, workdir) -> dict:
  """``fit`` arguments of a DST run: the optimiser holding its mask (``tx``),
  the churn hook and callback (and Sup-tickets' superposition).

  With ``config.suptickets`` (SPEC §6): the learning rate and the DST
  schedules of the config over the DST phase (``num_epochs − sup_cycles ·
  sup_cycle_epochs`` epochs), then the cyclic rate
  (:meth:`sparsejax.suptickets.Plan.learning_rate`); the large
  drop-and-regrow at each cycle start as an extra mask update of the
  method; and the :class:`sparsejax.suptickets.Superpose` hook (re-pruning
  over the same prunable leaves).

  The starting mask is computed on the params ``fit`` will initialise (the
  same model, input and seed: :func:`sparsejax.state.create_train_state` is
  deterministic), so a pruning-at-initialisation start scores the very
  network that trains.
  """
  steps = schedules.steps_per_epoch(dataset.num_train, config.train.batch_size)
  sup = bool(config.get("suptickets", False))
  if sup:
    # The DST method's normal schedules over the DST phase, then the cycles.
    plan = suptickets_plan(config, steps)
    phase = ml_collections.ConfigDict(config.to_dict())
    phase.train.num_epochs = plan.dst_epochs
    lr = plan.learning_rate(
      lr_schedule(phase, steps), float(config.sup_lr1), float(config.sup_lr2), config.sup_lr_shape
    )
    inner = make_optimizer(config, steps, schedule=lr)
  else:
    phase, inner = config, make_optimizer(config, steps)
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  params = state_lib.create_train_state(
    model, inner, sample, jax.random.key(int(config.train.seed))
  ).params
  prunable = make_prunable(config.prunable, model, dataset.image_shape)
  mask = mask_fn(params) if mask_fn is not None else None
  extra = plan.mask_updates(float(config.sup_fraction), prunable) if sup else ()
  tx, initial = make_dst_optimizer(phase, inner, params, mask, prunable, steps, extra_updates=extra)
  if config.dst in ("gmp", "granet") and workdir is not None:
    write_json(
      os.path.join(workdir, "dst.json"),
      {
        "method": config.dst,
        "initial_sparsity": float(config.dst_initial_sparsity),
        "initial_mask": masks.summary(initial, prunable).as_dict(),
      },
    )
  churn = dst.MaskChurn(log_every_steps=int(config.dst_update_every))
  hooks, callbacks = [churn.hook()], [churn.callback()]
  if sup:
    sup_cb = suptickets.Superpose(
      plan,
      ema=config.sup_ema,
      prunable=prunable,
      bn_batch_size=config.sup_bn_batch_size,
      bn_variance=config.sup_bn_variance,
    )
    hooks.append(sup_cb.hook())
    callbacks.append(sup_cb)
  return dict(tx=tx, hooks=tuple(hooks), callbacks=tuple(callbacks))


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def quiet_orbax_info() -> None:
  """Drops Orbax's per-save INFO lines from the absl log (warnings stay)."""

  def keep(record) -> bool:
    return (
      record.levelno >= logging.converter.STANDARD_WARNING
      or f"{os.sep}orbax{os.sep}" not in record.pathname
    )

  logging.get_absl_handler().addFilter(keep)


def initialize_distributed() -> None:
  """``jax.distributed.initialize()``; on failure one ``error:`` line, exit 1.

  Without a cluster JAX detects (a Cloud TPU pod slice, SLURM, Open MPI, ...)
  there is no coordinator address and JAX raises a ``ValueError``; the line
  names what to set instead of a traceback.
  """
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    logging.debug("jax.distributed.initialize() failed", exc_info=True)
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(
      "error: --config.train.distributed=true but jax.distributed.initialize() "
      f"failed ({reason}): start every process on a cluster that JAX "
      "detects (a Cloud TPU pod slice, SLURM, Open MPI, GKE), or drop "
      "--config.train.distributed to train on this host's devices",
      file=sys.stderr,
    )
    sys.exit(1)


def cli_main(fn: Callable[[], Any], preempted: Callable[[Any], bool]) -> Any:
  """Runs an entry point's ``fn()`` with the shared exit statuses.

  Exit status 1 with one ``error:`` line (plus the loader's details where
  there are any) on a missing or corrupt dataset, a non-finite loss or a bad
  config value (``--verbosity=1`` logs the traceback); 143 when
  ``preempted(result)`` (stopped by SIGTERM after saving a checkpoint).
  Calls ``jax.distributed.initialize()`` first when ``--config.train.distributed``
  (:func:`initialize_distributed`: exit status 1 with one ``error:`` line when
  no cluster is found).

  Returns:
    ``fn()``'s result otherwise.
  """
  quiet_orbax_info()
  if flags.FLAGS.config.train.distributed:
    initialize_distributed()
  try:
    result = fn()
  except (FileNotFoundError, data.DatasetFormatError, FloatingPointError, ValueError) as e:
    logging.debug("failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if preempted(result):
    print(
      "Stopped by SIGTERM after saving a checkpoint; rerun the same command to resume.",
      file=sys.stderr,
    )
    sys.exit(EXIT_PREEMPTED)
  return result


class _NoneOrParser(flags.ArgumentParser):
  """Parses ``"None"`` as ``None`` and anything else with ``base``."""

  def __init__(self, base: flags.ArgumentParser):
    self.base = base

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip() == "None":
      return None
    return self.base.parse(argument)

  def flag_type(self) -> str:
    return self.base.flag_type()


def allow_none_overrides() -> None:
  """Lets ``--config.<field>=None`` set an int, float, bool or str field to ``None``.

  ml_collections parses an override with the field's type, so an optional
  field (``config_dict.placeholder(int)`` such as ``data.train_subset``, or a
  preset's value of one) could not be reset from the command line; the
  literal ``None`` now resets any of them (a string field can no longer be
  set to the text "None"). Called by :func:`app_run` before the flags are
  parsed.
  """
  for field_type, base in (
    (int, flags.IntegerParser()),
    (float, flags.FloatParser()),
    (bool, flags.BooleanParser()),
    (str, flags.ArgumentParser()),
  ):
    config_flags.register_flag_parser_for_type(field_type, _NoneOrParser(base))


def app_run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` with the runners' command-line conventions.

  ``--help`` shows ``__main__``'s docstring as written: absl's usage text
  %-formats it (each ``%s`` becomes the program path, so "95% sparsity"
  printed as "95/path/to/runner.pyparsity"), so its ``%`` are doubled first,
  which that formatting turns back. ``--config.<field>=None`` resets a field
  (:func:`allow_none_overrides`).
  """
  module = sys.modules["__main__"]
  if module.__doc__:
    module.__doc__ = module.__doc__.replace("%", "%%")
  allow_none_overrides()
  app.run(main)


def make_main(run_fn: Callable[[ml_collections.ConfigDict, str], train.FitResult]):
  """The absl ``main`` of a runner: ``run_fn(--config, --workdir)`` under
  :func:`cli_main`, then the :func:`final_line` of its history."""

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError("Too many command-line arguments.")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    result = cli_main(lambda: run_fn(config, workdir), lambda r: r.preempted)
    print(final_line(result.history))

  return main


def final_line(history: list[dict]) -> str:
  """``"done: train_loss=..., test_loss=..., test_accuracy=..."``.

  For a Sup-tickets run, whose result is the superposed model
  (:class:`sparsejax.suptickets.Superpose`), the test metrics are the
  superposed model's, followed by the last ticket's accuracy.
  """
  final = history[-1] if history else {}
  if "superposed_test_accuracy" in final:
    return (
      f"done: train_loss={final['train_loss']:.4f}, superposed model: "
      f"test_loss={final['superposed_test_loss']:.4f}, "
      f"test_accuracy={final['superposed_test_accuracy']:.4f} (last ticket: "
      f"test_accuracy={final['test_accuracy']:.4f})"
    )
  return "done: " + ", ".join(
    f"{k}={final[k]:.4f}" for k in ("train_loss", "test_loss", "test_accuracy") if k in final
  )
