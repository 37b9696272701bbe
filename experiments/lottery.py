r"""Lottery tickets: iterative magnitude pruning with rewinding, and its controls.

Usage (the Flax examples convention)::

  python -m experiments.lottery --config experiments/configs/lottery_openlth.py \
      --workdir runs/lth_resnet20

The algorithm is SPEC §3, as in :mod:`sparsejax.lottery`: train, prune the
fraction ``prune_fraction`` of the remaining prunable weights by global
magnitude, rewind the survivors to the rewind point, retrain with a fresh
optimiser state, the same schedule and the same data order; ``levels`` times.
The run directory receives, stage by stage:

1. ``rewind_point/``: dense training from θ_0 up to the rewind step ``k``
   (``rewind_epochs`` epochs if set, else ``rewind_step`` steps; nothing to
   train for ``k = 0``): its state is the rewind point θ_k (OpenLTH's
   "pretraining").
2. ``level_<L>/`` for ``L = 0 .. levels``:

   * ``ticket/``: the level's mask ``m_L`` (all ones at level 0, else
     :func:`sparsejax.lottery.prune_level` of the trained level ``L − 1``)
     and the rewind weights θ_k ⊙ m_L (:func:`sparsejax.lottery.save_ticket`);
   * the level's training from the rewind point (step ``k`` to the end of the
     schedule) with :func:`sparsejax.train.fit`: ``checkpoints/``,
     ``metrics.jsonl``;
   * for ``L >= 1`` the controls named in ``controls``, same schedule and data
     order: ``control_reinit/`` (the same mask on the weights of another
     initialisation, drawn from ``control_seed``) and ``control_reprune/``
     (each layer's mask shuffled: the same per-layer counts at random
     positions, from θ_k).

3. ``results.csv``, ``results.md``, ``results.json`` (one row per level:
   density, test accuracy of the ticket and of each control) and
   ``accuracy_vs_density.png``, rewritten after every level; at the end
   ``ticket/``, the last level's ticket with its test accuracy in
   ``meta.json``: "the LTH mask" that other experiments load with
   :func:`sparsejax.lottery.load_ticket`.

The run directory's signature ``run.json`` (this runner and the config) is
checked before anything is written: a directory of another run is refused,
and a finished experiment rerun with the same config does nothing.

Every training is checkpointed (every epoch and on SIGTERM) and every mask is
saved before it is trained, so rerunning the same command resumes at the level,
the run (ticket or control) and the step where it stopped, and computes
bitwise what an uninterrupted run computes. Test accuracy is that of the final
step of each training (``train.eval_every_epochs`` may skip the others).

Exit status: 0 when every level is done; 143 when stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume); 1 on an error, printed
as one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections

from experiments import common
from experiments import results
from experiments import workdir as workdir_lib
from sparsejax import _paths
from sparsejax import budgets
from sparsejax import checkpoints
from sparsejax import lottery
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import models
from sparsejax import schedules
from sparsejax import state as state_lib
from sparsejax import train

#: The runner named in the signature of the run directory (``run.json``).
RUNNER = "experiments.lottery"
#: Control experiments run beside the ticket at every level >= 1.
CONTROLS = ("reinit", "reprune")
CONTROL_NAMES = {"reinit": "random reinit", "reprune": "random reprune"}


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  """The lottery fields of ``config`` (the ``extra`` of
  :func:`experiments.common.resolve_config`, which checks the rest).

  Raises:
    ValueError: an unknown budget or control; a negative or non-integer
      number of levels; a pruning fraction outside (0, 1); a negative rewind
      point.
  """
  try:
    budget = budgets.parse(config.budget)
  except ValueError:
    budget = None
  if type(budget) not in lottery.BUDGETS:
    raise ValueError(
      "config.budget must be 'global' or 'uniform' for IMP "
      f"(lottery.BUDGETS), got {config.budget!r}"
    )
  if isinstance(config.levels, bool) or not isinstance(config.levels, int) or (config.levels < 0):
    raise ValueError(f"config.levels must be an integer >= 0, got {config.levels!r}")
  lottery.level_sparsity(config.levels, config.prune_fraction)  # checks fraction
  config.controls = tuple(config.controls)
  unknown = [c for c in config.controls if c not in CONTROLS]
  if unknown:
    raise ValueError(f"config.controls may name {CONTROLS}, got {unknown}")
  if config.rewind_step < 0 or (config.rewind_epochs is not None and config.rewind_epochs < 0):
    raise ValueError(
      "the rewind point must not be negative (rewind_step="
      f"{config.rewind_step}, rewind_epochs={config.rewind_epochs})"
    )


def rewind_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The rewind step ``k``: ``round(rewind_epochs · steps_per_epoch)`` if
  ``rewind_epochs`` is set, else ``rewind_step``."""
  if config.rewind_epochs is not None:
    return int(round(float(config.rewind_epochs) * steps_per_epoch))
  return int(config.rewind_step)


def make_prunable(config: ml_collections.ConfigDict, model, sample: jax.Array) -> masks.Prunable:
  """The ``config.prunable`` preset, ordered by the model's layer order
  (:func:`experiments.common.make_prunable`, the one place every runner uses).

  The order decides which layer is "first" and which the classifier also for
  params restored from checkpoints, whose dicts come back with sorted keys.
  """
  return common.make_prunable(config.prunable, model, sample.shape[1:])


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def format_table(rows: list[dict], controls) -> str:
  """Markdown table: level, density, test accuracy (%) of ticket and controls."""
  return results.markdown_table(
    ["level", "density (%)", "ticket", *(CONTROL_NAMES[c] for c in controls)],
    (
      [
        str(r["level"]),
        f"{100 * r['density']:.2f}",
        _percent(r["ticket"]),
        *(_percent(r.get(c)) for c in controls),
      ]
      for r in rows
    ),
  )


def plot_accuracy_vs_density(rows: list[dict], controls, path: str, title: str = "") -> None:
  """Test accuracy vs remaining density (log scale, decreasing to the right).

  One line for the ticket (from the dense level 0 on) and one per control
  (levels >= 1); the dense accuracy is a dashed reference line.
  """
  from matplotlib.ticker import NullFormatter  # pylint: disable=g-import-not-at-top

  fig = results.figure(6.4, 4.2)
  ax = fig.subplots()
  density = [100 * r["density"] for r in rows]
  ax.plot(density, [100 * r["ticket"] for r in rows], "o-", label="ticket (IMP)")
  for c, marker in zip(controls, ("s--", "^--")):
    points = [(100 * r["density"], 100 * r[c]) for r in rows if r.get(c) is not None]
    if points:
      ax.plot(*zip(*points), marker, label=CONTROL_NAMES[c])
  ax.axhline(100 * rows[0]["ticket"], color="gray", lw=0.8, ls=":", label="dense")
  ax.set_xscale("log")
  ax.set_xticks(density, [f"{d:.3g}" for d in density], rotation=60 if len(density) > 8 else 0)
  ax.xaxis.set_minor_formatter(NullFormatter())
  if len(density) > 1:
    ax.set_xlim(density[0] * 1.15, density[-1] / 1.15)  # reversed
  ax.set_xlabel("remaining density of the prunable weights (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  results.save_figure(fig, path)


def write_results(workdir: str, rows: list[dict], config) -> None:
  """Writes ``results.{csv,md,json}`` and ``accuracy_vs_density.png``."""
  if jax.process_index() != 0:
    return
  controls = tuple(config.controls)
  fields = ["level", "kept", "total", "density", "ticket", *controls]
  results.write_csv(os.path.join(workdir, "results.csv"), rows, fields)
  table = format_table(rows, controls)
  with epath.Path(os.path.join(workdir, "results.md")).open("w") as f:
    f.write(table + "\n")
  common.write_json(os.path.join(workdir, "results.json"), {"levels": rows, "table": table})
  plot_accuracy_vs_density(
    rows,
    controls,
    os.path.join(workdir, "accuracy_vs_density.png"),
    title=f"{config.model.name} on {config.data.name}: IMP, "
    f"{100 * config.prune_fraction:g}% per level",
  )


# ----------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------


def control_state(
  control: str, key: jax.Array, point: state_lib.TrainState, mask, model, sample: jax.Array
) -> state_lib.TrainState:
  """The state a control starts from, at the rewind point with ``mask``'s level.

  * ``"reinit"``: ``mask`` on the weights (and batch-norm statistics) of
    another initialisation, ``init_variables(model, sample, key)``;
  * ``"reprune"``: ``random_reprune_mask(key, mask)`` (each layer's mask shuffled)
    on the rewind weights θ_k.

  Both with a fresh optimiser state at step ``k``
  (:func:`sparsejax.lottery.rewind_state`).
  """
  if control == "reinit":
    variables = state_lib.init_variables(model, sample, key)
    return lottery.rewind_state(
      point, mask, params=variables["params"], batch_stats=variables.get("batch_stats", {})
    )
  return lottery.rewind_state(point, lottery.random_reprune_mask(key, mask))


@dataclasses.dataclass
class LotteryResult:
  """What :func:`run` returns.

  Attributes:
    rows: one dict per finished level: ``level``, ``kept``, ``total``,
      ``density`` (of the prunable weights), ``ticket`` and each control's
      final test accuracy (``None`` where not run).
    preempted: stopped by SIGTERM after saving; rerun to resume.
    ticket_dir: the exported ticket of the last level (``None`` until done).
  """

  rows: list[dict]
  preempted: bool
  ticket_dir: str | None


def run(config: ml_collections.ConfigDict, workdir: str) -> LotteryResult:
  """Runs (or resumes) the lottery-ticket experiment; writes its files.

  The run first claims ``workdir`` (:func:`experiments.workdir.claim`): a
  directory of another run (another runner, or a config that differs in a
  field that can change the result) is refused before anything is written;
  a finished experiment (its final ``ticket/``) is not run again: its rows
  are read back from ``results.json``.

  Args:
    config: see ``experiments/configs/lottery_openlth.py``.
    workdir: the run directory (created; an existing run resumes).

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: ``workdir`` holds another
      run.
  """
  config = common.resolve_config(config, check_config)
  workdir = str(_paths.resolve(workdir))
  final_ticket = os.path.join(workdir, "ticket")
  if workdir_lib.claim(
    workdir, RUNNER, config, done=(os.path.join("ticket", lottery.TICKET_META),)
  ):
    rows = common.read_json(os.path.join(workdir, "results.json"))["levels"]
    return LotteryResult(rows, False, final_ticket)
  common.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  dataset = common.load_dataset(config)
  model = models.get(config.model.name, dataset.num_classes, **common.model_kwargs(config))
  mesh = mesh_lib.make_mesh(config.train.num_devices)
  sample = jnp.zeros((1,) + dataset.image_shape, jnp.float32)
  prunable = make_prunable(config, model, sample)
  steps_per_epoch = schedules.steps_per_epoch(dataset.num_train, config.train.batch_size)
  k = rewind_steps(config, steps_per_epoch)
  if k >= config.train.num_epochs * steps_per_epoch:
    raise ValueError(
      f"the rewind step {k} leaves nothing to train in "
      f"{config.train.num_epochs} epochs of {steps_per_epoch} steps"
    )
  logging.info(
    "IMP: %s on %s (%d train), %d levels of %g%%, rewind to step %d, controls %s",
    config.model.name,
    dataset.name,
    dataset.num_train,
    config.levels,
    100 * config.prune_fraction,
    k,
    config.controls or "off",
  )

  def fit(subdir, init, **kwargs) -> train.FitResult:
    return train.fit(
      model,
      dataset,
      os.path.join(workdir, subdir),
      init=init,
      mesh=mesh,
      loss_fn=common.default_loss(config),
      **common.fit_args(config),
      **kwargs,
    )

  # The rewind point: dense training (in the sparse format, all-ones mask, so
  # that every level shares one state structure) stopped at step k.
  tx = common.make_optimizer(config, steps_per_epoch)
  point = fit(
    "rewind_point",
    lambda: state_lib.create_train_state(
      model, tx, sample, jax.random.key(int(config.train.seed)), mask=masks.ones_like
    ),
    stop_at_step=k,
  )
  if point.preempted:
    return LotteryResult([], True, None)
  point = point.state
  if int(point.step) != k:
    raise ValueError(
      f"{workdir}/rewind_point holds step {int(point.step)}, not "
      f"the rewind step {k}: a run of another config; use a new "
      "workdir"
    )
  control_key = jax.random.key(config.control_seed)
  meta = {
    "model": config.model.name,
    "model_kwargs": config.model.kwargs.to_dict(),
    "dataset": config.data.name,
    "train_subset": config.data.train_subset,
    "seed": config.train.seed,
    "prune_fraction": config.prune_fraction,
    "budget": config.budget,
    "prunable": config.prunable,
    "rewind_step": k,
  }

  rows: list[dict] = []
  mask, trained = None, None
  for level in range(config.levels + 1):
    level_dir = os.path.join(workdir, f"level_{level}")
    ticket_dir = os.path.join(level_dir, "ticket")
    found = lottery.ticket_exists(ticket_dir)
    if found:
      mask, _, saved = lottery.load_ticket(ticket_dir)
      expected = dict(meta, level=level)
      checkpoints.check_same_run(saved, expected, where=ticket_dir, fields=expected)
    else:
      mask = (
        masks.ones_like(point.params)
        if level == 0
        else lottery.prune_level(
          trained,
          mask,
          level,
          config.prune_fraction,
          prunable=prunable,
          budget=budgets.parse(config.budget),
        )
      )
    summary = masks.summary(mask, prunable)
    row = {
      "level": level,
      "kept": summary.kept,
      "total": summary.total,
      "density": 1.0 - summary.sparsity,
    }
    if not found:
      lottery.save_ticket(ticket_dir, mask, lottery.rewind(point.params, mask), dict(meta, **row))
    if summary.collapsed:
      logging.warning("level %d: layer collapse in %s", level, list(summary.collapsed))

    result = fit(f"level_{level}", lottery.rewind_state(point, mask))
    if result.preempted:
      return LotteryResult(rows, True, None)
    row["ticket"] = result.history[-1]["test_accuracy"]
    trained = result.state.params
    if config.train.get("save_sparse", False):  # WORKDIR/level_L/model.sparse
      row["sparse_file_nbytes"] = (
        common.save_sparse_model(
          result.state,
          os.path.join(workdir, f"level_{level}"),
          config.train.get("save_sparse_compression", "none"),
          metadata={"model": config.model.name, "level": level},
        )
        or {}
      ).get("nbytes")

    controls = config.controls if level >= 1 else ()
    for control in controls:
      key = jax.random.fold_in(jax.random.fold_in(control_key, CONTROLS.index(control)), level)
      ctrl = fit(
        os.path.join(f"level_{level}", f"control_{control}"),
        control_state(control, key, point, mask, model, sample),
      )
      if ctrl.preempted:
        return LotteryResult(rows, True, None)
      row[control] = ctrl.history[-1]["test_accuracy"]
    rows.append(row)
    write_results(workdir, rows, config)
    logging.info(
      "level %d: density %.4f, test accuracy %s",
      level,
      row["density"],
      ", ".join(
        f"{name} {row[name]:.4f}" for name in ("ticket", *CONTROLS) if row.get(name) is not None
      ),
    )

  final = {field: rows[-1][field] for field in ("level", "kept", "total", "density")}
  ticket_dir = lottery.save_ticket(
    final_ticket,
    mask,
    lottery.rewind(point.params, mask),
    dict(meta, **final, test_accuracy=rows[-1]["ticket"]),
  )
  return LotteryResult(rows, False, ticket_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  result = common.cli_main(lambda: run(config, workdir), lambda r: r.preempted)
  print(
    f"\nTest accuracy (%) of {config.model.name} on {config.data.name}, iterative "
    "magnitude pruning with rewinding:\n"
  )
  print(format_table(result.rows, tuple(config.controls)))
  print(f"\nResults in {_paths.resolve(workdir)}; the last level's ticket in {result.ticket_dir}")


if __name__ == "__main__":
  common.define_flags()
  common.app_run(main)
