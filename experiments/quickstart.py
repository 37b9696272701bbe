r"""Quickstart: prune at initialisation, train, print sparsity vs test accuracy.

Runs offline on the digits dataset that ships with scikit-learn, in about a
minute on a laptop CPU::

  python -m experiments.quickstart --config experiments/configs/quickstart.py \
      --workdir runs/quickstart

For every method of ``config.methods`` (pruning at initialisation with
:func:`sparsejax.scores.prune_at_init`: random, magnitude, SNIP, GraSP,
SynFlow) and every sparsity of ``config.sparsities`` the same initial network
is pruned with a global budget and trained with the same schedule and data
order; the test accuracy goes into a markdown table, printed
and written to ``WORKDIR/results.md`` (with ``results.json`` and
``config.json``).

Every run is :func:`sparsejax.train.fit` in ``WORKDIR/runs/<method>_s<sparsity>``
(checkpoints, ``metrics.jsonl``), so an interrupted quickstart resumes where it
stopped and a finished run is not trained again; a workdir written with
another config is refused.
"""

from __future__ import annotations

import os
import time
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from experiments import common
from sparsejax import budgets
from sparsejax import checkpoints
from sparsejax import data
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import models
from sparsejax import schedules
from sparsejax import scores
from sparsejax import state as state_lib
from sparsejax import train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", "runs/quickstart", "Directory for the results.")
config_flags.DEFINE_config_file(
  "config", "experiments/configs/quickstart.py", "Quickstart configuration.", lock_config=True
)


def format_table(methods, sparsities, accuracy: dict, collapsed: dict) -> str:
  """Markdown table: one row per sparsity, one column per method (test acc %).

  A ``*`` marks a mask with a collapsed layer (no active weight left), which
  disconnects the network; a footnote says so.
  """
  lines = ["| sparsity | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
  for s in sparsities:
    cells = [f"{100 * accuracy[(m, s)]:.1f}" + ("*" if collapsed[(m, s)] else "") for m in methods]
    lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
  if any(collapsed.values()):
    lines.append("")
    lines.append("\\* a layer has no active weight left (layer collapse)")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the sweep; returns ``{"table", "runs", "seconds"}`` and writes them.

  Args:
    config: see ``experiments/configs/quickstart.py``.
    workdir: output directory (created).
  """
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  saved = os.path.join(workdir, "config.json")
  if os.path.exists(saved):  # finished runs are reused: the same config only
    checkpoints.check_same_run(common.read_json(saved), config.to_dict(), where=workdir)
  common.write_json(saved, config.to_dict())

  ds = data.load(config.data.name)
  model = models.get(config.model.name, ds.num_classes, **common.model_kwargs(config))
  mesh = mesh_lib.make_mesh()
  tx = common.make_optimizer(
    config, schedules.steps_per_epoch(ds.num_train, config.train.batch_size)
  )
  sample = jnp.zeros((1,) + ds.image_shape, jnp.float32)
  rng = jax.random.key(config.train.seed)
  # Every run trains with sparsejax.train.fit, evaluated once at the end.
  run_config = ml_collections.ConfigDict(config.to_dict())
  run_config.train.update(
    progress_bar=False,
    tensorboard=False,
    max_to_keep=1,
    eval_every_epochs=config.train.num_epochs,
    checkpoint_every_epochs=config.train.num_epochs,
  )

  # One initial network for every run (fit's: the same seed); its params are
  # what gets pruned.
  dense = state_lib.create_train_state(model, tx, sample, rng)
  # Pruning at initialisation (SPEC §2): every method prunes the same initial
  # network with sparsejax.scores.prune_at_init (exact global top-k); SNIP and
  # GraSP score on a class-balanced sample of the training set.
  params, apply_fn = scores.linen_apply_fn(model, dense.variables)
  batches = data.class_balanced_batch(ds, config.score_samples_per_class, config.train.seed)
  mask_key = jax.random.fold_in(rng, 1)
  unknown = set(config.methods) - set(scores.METHODS)
  if unknown:
    raise ValueError(f"quickstart methods are {scores.METHODS}, got {sorted(unknown)}")

  def prune(method: str, sparsity: float):
    with warnings.catch_warnings():  # collapse is marked in the table instead
      warnings.simplefilter("ignore", RuntimeWarning)
      return scores.prune_at_init(
        method,
        params,
        sparsity=sparsity,
        budget=budgets.parse(config.budget),
        key=mask_key,
        apply_fn=apply_fn,
        batches=batches,
        input_shape=ds.image_shape,
      )

  def train_and_test(name: str, mask) -> tuple[float, masks.MaskSummary]:
    init = lambda: state_lib.create_train_state(model, tx, sample, rng, mask=mask)
    result = train.fit(
      model,
      ds,
      os.path.join(workdir, "runs", name),
      init=init,
      mesh=mesh,
      loss_fn=common.default_loss(run_config),
      **common.fit_args(run_config),
    )
    return result.history[-1]["test_accuracy"], masks.summary(result.state.mask)

  accuracy, collapsed, runs = {}, {}, []
  for s in config.sparsities:
    for method in config.methods:
      if s == 0.0 and runs and runs[-1]["sparsity"] == 0.0:
        # Sparsity 0 keeps every weight whatever the method: one dense run.
        accuracy[(method, s)] = runs[-1]["test_accuracy"]
        collapsed[(method, s)] = False
        continue
      t0 = time.perf_counter()
      mask = prune(method, float(s))
      acc, summary = train_and_test(f"{method}_s{s:g}", mask)
      accuracy[(method, s)] = acc
      collapsed[(method, s)] = bool(summary.collapsed)
      runs.append(
        {
          "method": method,
          "sparsity": float(s),
          "actual_sparsity": summary.sparsity,
          "test_accuracy": acc,
          "collapsed_layers": list(summary.collapsed),
          "seconds": time.perf_counter() - t0,
        }
      )
      logging.info(
        "%-9s sparsity %.2f: test accuracy %.4f (%.1fs)", method, s, acc, runs[-1]["seconds"]
      )

  table = format_table(tuple(config.methods), tuple(config.sparsities), accuracy, collapsed)
  seconds = time.perf_counter() - t_start
  result = {"table": table, "runs": runs, "seconds": seconds}
  common.write_json(os.path.join(workdir, common.RESULTS_FILE), result)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config = FLAGS.config
  common.quiet_orbax_info()
  if not jax.config.jax_compilation_cache_dir:
    # Every run is a train.fit with its own jitted steps; the masks are data,
    # so all runs compile to the same (small) programs, compiled once here.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.join(os.path.abspath(FLAGS.workdir), "jax_cache")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  result = run(config, FLAGS.workdir)
  print(
    f"\nTest accuracy (%) of {config.model.name} on {config.data.name} after "
    f"{config.train.num_epochs} epochs, pruned at initialisation "
    f"({config.budget} budget):\n"
  )
  print(result["table"])
  print(
    f"\n{len(result['runs'])} runs in {result['seconds']:.0f} s; results in "
    f"{os.path.abspath(FLAGS.workdir)}"
  )


if __name__ == "__main__":
  common.app_run(main)
