r"""Trains any registry model on any dataset, dense or with a static mask.

Usage (the Flax examples convention)::

  python -m experiments.train --config experiments/configs/default.py \
      --workdir runs/resnet20_mag90 \
      --config.pruner=magnitude --config.sparsity=0.9 --config.budget=global

The mask is chosen once at initialisation by a data-free method of
:mod:`sparsejax.scores` (``random`` or ``magnitude``) and kept fixed: it lives
in the optimiser state (:func:`sparsejax.optim.masked`), so pruned weights stay
exactly zero. Training is :func:`sparsejax.train.fit`: checkpoints every epoch
and on SIGTERM, automatic resume, ``metrics.jsonl`` and TensorBoard events.

The run directory receives ``config.json`` (the resolved config),
``metrics.jsonl``, ``tb/``, ``checkpoints/`` and, at the end,
``results.json`` (final metrics and the per-layer mask summary).

Exit status: 0 when training completed; 143 when stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume); 1 on an error, printed
as one ``error:`` line plus the loader's details where there are any (rerun
with ``--verbosity=1`` for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from sparsejax import data
from sparsejax import masks
from sparsejax import models
from sparsejax import scores
from sparsejax import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", lock_config=True)

PRUNERS = ("dense", "random", "magnitude")
PRUNABLE = {
    "kernels": masks.KERNELS,
    "keep_first": masks.KEEP_FIRST_DENSE,
    "keep_classifier": masks.KEEP_CLASSIFIER_DENSE,
    "keep_first_and_classifier": masks.KEEP_FIRST_AND_CLASSIFIER_DENSE,
}
#: Exit status of a run stopped by SIGTERM after saving its checkpoint.
EXIT_PREEMPTED = 143


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with derived defaults filled in and values checked.

  ``weight_decay=None`` becomes the SPEC §8 value for the model family (5e-4
  for VGG, 1e-4 otherwise).

  Raises:
    ValueError: an unknown pruner, prunable preset or model name, or a
      sparsity outside [0, 1).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if config.pruner not in PRUNERS:
    raise ValueError(f"config.pruner must be one of {PRUNERS}, got {config.pruner!r}")
  if config.prunable not in PRUNABLE:
    raise ValueError(f"config.prunable must be one of {tuple(PRUNABLE)}, got "
                     f"{config.prunable!r}")
  if config.model not in models.names():
    raise ValueError(f"unknown model {config.model!r}; valid names are: "
                     f"{', '.join(models.names())}")
  if config.pruner != "dense":
    masks.check_sparsity(config.sparsity)
  if config.weight_decay is None:
    config.weight_decay = 5e-4 if config.model.startswith("vgg") else 1e-4
  return config


def make_mask_fn(config: ml_collections.ConfigDict):
  """The ``params -> mask`` function of ``config.pruner`` (``None`` if dense).

  The mask is computed by :func:`sparsejax.scores.prune_at_init` (which warns
  on layer collapse); the random scores use ``fold_in(key(seed), 1)``.
  """
  if config.pruner == "dense":
    return None
  key = jax.random.fold_in(jax.random.key(config.seed), 1)
  prunable = PRUNABLE[config.prunable]

  def mask_fn(params):
    return scores.prune_at_init(
        config.pruner, params, sparsity=float(config.sparsity),
        budget=config.budget, key=key, prunable=prunable)

  return mask_fn


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> train.FitResult:
  """Loads data and model, builds the mask, trains; writes the run files.

  Args:
    config: a config as in ``experiments/configs/default.py``.
    workdir: the run directory (created; an existing run resumes).

  Returns:
    The :class:`sparsejax.train.FitResult`.
  """
  if config.distributed:
    jax.distributed.initialize()
  config = resolve_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), config.to_dict())

  dataset = data.load(config.dataset, config.data_dir,
                      train_subset=config.train_subset)
  model = models.get(config.model, dataset.num_classes,
                     **config.model_kwargs.to_dict())
  mesh = train.make_mesh(config.num_devices)
  logging.info("%s on %s (%d train / %d test), pruner=%s sparsity=%s budget=%s, "
               "%d device(s)", config.model, dataset.name, dataset.num_train,
               dataset.num_test, config.pruner,
               config.sparsity if config.pruner != "dense" else 0.0,
               config.budget, mesh.size)
  result = train.fit(config, workdir, model=model, dataset=dataset,
                     mask=make_mask_fn(config), mesh=mesh)
  if not result.preempted:
    mask = result.state.mask
    summary = masks.summary(mask if mask is not None
                            else masks.ones_like(result.state.params))
    _write_json(os.path.join(workdir, "results.json"), {
        "final": result.history[-1] if result.history else {},
        "mask": summary.as_dict(),
        "epochs": len(result.history),
    })
  return result


def quiet_orbax_info() -> None:
  """Drops Orbax's per-save INFO lines from the absl log (warnings stay)."""

  def keep(record) -> bool:
    return (record.levelno >= logging.converter.STANDARD_WARNING
            or f"{os.sep}orbax{os.sep}" not in record.pathname)

  logging.get_absl_handler().addFilter(keep)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  quiet_orbax_info()
  try:
    result = run(FLAGS.config, FLAGS.workdir)
  except (FileNotFoundError, data.DatasetFormatError, FloatingPointError,
          ValueError) as e:
    logging.debug("experiments.train failed", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if result.preempted:
    print("Stopped by SIGTERM after saving a checkpoint; rerun the same command "
          "to resume.", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
  final = result.history[-1] if result.history else {}
  print("done: " + ", ".join(
      f"{k}={final[k]:.4f}" for k in ("train_loss", "test_loss", "test_accuracy")
      if k in final))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
