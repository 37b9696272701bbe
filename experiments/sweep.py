r"""Pruning at initialisation: methods x sparsities x seeds, trained and compared.

Usage::

  python -m experiments.sweep \
      --config experiments/configs/sweep_synflow_paper.py:vgg16,cifar100 \
      --workdir runs/sweep_vgg16_c100

  # the small CPU grid on CIFAR-10 (about 35 minutes on 2 CPU cores)
  python -m experiments.sweep --config experiments/configs/sweep_cpu_small.py \
      --config.data.dir=/path/to/data --workdir runs/sweep_cpu_small

  # rebuild the table and the plots from the finished cells only
  python -m experiments.sweep --config ... --workdir ... --report_only

Every cell of the grid -- a method of ``config.methods`` at a sparsity of
``config.sparsities`` with a seed of ``config.seeds`` -- is one run of
:func:`experiments.common.run`, the code path of ``experiments.prune_at_init``
(prune, report, train with :func:`sparsejax.train.fit`), in
``WORKDIR/cells/<method>_s<sparsity>_seed<seed>/``. Sparsity 0 is one dense
cell per seed, ``dense_s0_seed<seed>``: every method keeps every weight there.
The seed selects the initial network, the data order and augmentation, the
scoring batch of SNIP and GraSP and the random scores.

The cells run in this process, one after another, on a dataset loaded once.
A cell is finished when its ``results.json`` exists: a rerun skips it; an
interrupted cell resumes from its last checkpoint. The sweep directory and
every cell directory hold their signature (``run.json``: the runner and the
config, :mod:`experiments.workdir`); all of them are checked before anything
is written, and a directory written by another runner or with a different
config (any field but those of
:data:`experiments.workdir.RESULT_INDEPENDENT`) is an error rather than a
silently mixed table. A finished grid (every cell and the report) rerun with
the same config trains and writes nothing and says so.

Outputs in ``WORKDIR`` (rebuilt from the finished cells at the end of every
run, and by ``--report_only`` without training):

* ``results.csv``: one row per finished cell (:data:`CSV_FIELDS`);
* ``results.md``: test accuracy (%), one row per sparsity and one column per
  method, mean ± sample standard deviation over the seeds; ``*`` marks a mask
  with a collapsed layer (no weight kept) for some seed, ``†`` one with a
  layer that keeps weights but none on an input-to-output path;
* ``accuracy_vs_sparsity.png``: test accuracy against the compression ratio
  ``1/(1 - s)`` on a log axis (labelled with the sparsity), one line per
  method with a ± std band, the dense baseline as a horizontal line;
* ``layer_density.png``: per-layer density of each method's mask at
  ``config.density_plot_sparsity`` (default: the highest sparsity), log axis.

The command line keeps JAX's persistent compilation cache in
``WORKDIR/jax_cache`` (unless ``JAX_COMPILATION_CACHE_DIR`` names another):
the cells of one model share their compiled train and eval steps.

Exit status as ``experiments.train``: 143 when stopped by SIGTERM (rerun to
resume), 1 with one ``error:`` line on an error.
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
import numpy as np

from experiments import common
from experiments import results
from experiments import workdir as workdir_lib
from sparsejax import _paths
from sparsejax import data
from sparsejax import masks
from sparsejax import models

#: Config fields of the grid (not passed to the cells).
SWEEP_FIELDS = ("methods", "sparsities", "seeds", "density_plot_sparsity", "variants")
#: The runner named in the signatures of a sweep and its cells.
RUNNER = "experiments.sweep"
#: The report files whose presence (with every cell's ``results.json``)
#: means that a sweep is finished.
REPORT_FILES = ("results.csv", "results.md")
#: Columns of ``results.csv``.
CSV_FIELDS = (
  "method",
  "sparsity",
  "seed",
  "test_accuracy",
  "nominal_sparsity",
  "effective_sparsity",
  "collapsed_layers",
  "effectively_collapsed_layers",
  "scoring_seconds",
  "training_seconds",
  "epochs",
  "cell",
)
DENSE = "dense"
COLLAPSED_MARK = "*"
EFFECTIVELY_COLLAPSED_MARK = "†"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid."""

  method: str
  sparsity: float
  seed: int

  @property
  def name(self) -> str:
    """The cell's directory name, ``<method>_s<sparsity>_seed<seed>``."""
    return f"{self.method}_s{self.sparsity:g}_seed{self.seed}"


def grid(config: ml_collections.ConfigDict) -> list[Cell]:
  """The cells of ``config``: by seed, then ascending sparsity, then method.

  Raises:
    ValueError: no or unknown methods, duplicated methods, sparsities or
      seeds, or a sparsity outside [0, 1).
  """
  methods, sparsities = tuple(config.methods), tuple(config.sparsities)
  seeds = tuple(int(s) for s in config.seeds)
  for name, values in (("methods", methods), ("sparsities", sparsities), ("seeds", seeds)):
    if not values or len(set(values)) != len(values):
      raise ValueError(f"config.{name} must be non-empty without duplicates, got {values}")
  variants = _variants(config)
  bad = [m for m in methods if m not in variants and (m not in common.PRUNERS or m == DENSE)]
  if bad:
    raise ValueError(
      f"unknown methods {bad}; valid: {common.PRUNERS[1:]} or a "
      f"name of config.variants {tuple(variants)}"
    )
  for s in sparsities:
    masks.check_sparsity(s, "config.sparsities")
  cells = []
  for seed in seeds:
    for s in sorted(float(s) for s in sparsities):
      if s == 0.0:
        cells.append(Cell(DENSE, 0.0, seed))
      else:
        cells.extend(Cell(m, s, seed) for m in methods)
  return cells


def _variants(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """``config.variants``: ``{method name: {config field: value}}`` (may be absent)."""
  variants = config.get("variants")
  return {} if variants is None else {k: dict(v) for k, v in variants.items()}


def cell_config(config: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
  """The run config of ``cell``: ``config`` without the grid fields, with the
  cell's sparsity and seed (``train.seed``), and its method: a pruner (``pruner=method``) or
  a named variant of ``config.variants``, whose fields are set instead (e.g.
  ``{"pruner": "random", "budget": "erk", "dst": "rigl"}``)."""
  fields = {k: v for k, v in config.to_dict().items() if k not in SWEEP_FIELDS}
  variants = _variants(config)
  if cell.method in variants:
    unknown = sorted(set(variants[cell.method]) - set(fields))
    if unknown:
      raise ValueError(f"variant {cell.method!r} sets unknown config fields {unknown}")
    fields.update(variants[cell.method])
  else:
    fields["pruner"] = cell.method
  fields["sparsity"] = cell.sparsity
  fields["train"] = dict(fields["train"], seed=cell.seed)
  return ml_collections.ConfigDict(fields)


def check_cell(cell_dir: str, runner: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a started cell that holds another run; writes nothing.

  The cell's config is resolved (:func:`experiments.common.resolve_config`)
  only when the cell has a signature to compare with: a fresh cell's may
  not resolve yet (e.g. a ticket still to be found).

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: (a ``ValueError``) naming
      the differing fields (:func:`experiments.workdir.check`).
  """
  if workdir_lib.recorded(cell_dir) is not None:
    workdir_lib.check(cell_dir, runner, common.resolve_config(config))


def claim_grid(
  workdir: str,
  runner: str,
  config: ml_collections.ConfigDict,
  cells: list[tuple[str, ml_collections.ConfigDict]],
  *,
  report_files=REPORT_FILES,
  report_only: bool = False,
) -> bool:
  """Checks a grid's directory and every cell's before writing, then claims it.

  Args:
    workdir: the grid directory.
    runner: the grid runner's name (also the runner of its cells).
    config: the grid config, as given.
    cells: ``(cell directory, cell config)`` of every cell.
    report_files: the grid's report files (relative to ``workdir``).
    report_only: check only; the directory is not claimed (the report is
      rebuilt from whatever cells are finished).

  Returns:
    Whether the grid is finished (every cell's ``results.json`` and the
    report files present): then nothing was written.

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: the grid directory or a
      cell directory holds another run.
  """
  workdir_lib.check(workdir, runner, config)
  for cell_dir, cell_cfg in cells:
    check_cell(cell_dir, runner, cell_cfg)
  if report_only:
    epath.Path(os.path.join(workdir, "cells")).mkdir(parents=True, exist_ok=True)
    return False
  done = [os.path.relpath(os.path.join(d, common.RESULTS_FILE), workdir) for d, _ in cells] + list(
    report_files
  )
  finished = workdir_lib.claim(
    workdir,
    runner,
    config,
    done=done,
    done_text=f"{len(cells)} cells and {', '.join(report_files)}",
  )
  if not finished:
    epath.Path(os.path.join(workdir, "cells")).mkdir(parents=True, exist_ok=True)
  return finished


def is_finished(cell_dir: str) -> bool:
  return epath.Path(os.path.join(cell_dir, common.RESULTS_FILE)).exists()


# ----------------------------------------------------------------------------
# Collecting results
# ----------------------------------------------------------------------------


def cell_row(cell: Cell, cell_dir: str) -> dict:
  """The ``results.csv`` row of a finished cell (sparsities as fractions,
  accuracy in [0, 1], layer lists joined by ``;``).

  The mask diagnostics are those of the trained mask: for a static mask the
  scoring report (``pruning.json``: effective sparsity, collapsed layers);
  for dynamic sparse training, whose mask moved, the final mask's summary
  (its collapsed layers; effective sparsity not computed: nominal).
  """
  run = common.read_json(os.path.join(cell_dir, common.RESULTS_FILE))
  dynamic = _is_dynamic(cell_dir)
  pruning = run["pruning"] or {}
  report = {} if dynamic else pruning.get("report", {})
  nominal = run["mask"]["sparsity"]
  collapsed = run["mask"].get("collapsed", []) if dynamic else report.get("collapsed", [])
  return {
    "method": cell.method,
    "sparsity": cell.sparsity,
    "seed": cell.seed,
    "test_accuracy": run["final"]["test_accuracy"],
    "nominal_sparsity": nominal,
    "effective_sparsity": report.get("effective_sparsity", nominal),
    "collapsed_layers": ";".join(collapsed),
    "effectively_collapsed_layers": ";".join(report.get("effectively_collapsed", [])),
    "scoring_seconds": pruning.get("scoring_seconds", 0.0),
    "training_seconds": run["train_seconds"],
    "epochs": run["epochs"],
    "cell": cell.name,
  }


def _is_dynamic(cell_dir: str) -> bool:
  """Whether the cell trained with dynamic sparse training (its mask moved)."""
  config = common.read_json(os.path.join(cell_dir, "config.json"))
  return config.get("dst", "none") != "none"


def layer_densities(cell_dir: str) -> dict[str, float]:
  """``{layer path: nominal density}`` of a pruned cell's trained mask (the
  scoring report's, or for dynamic sparse training the final mask's)."""
  if _is_dynamic(cell_dir):
    layers = common.read_json(os.path.join(cell_dir, common.RESULTS_FILE))["mask"]["layers"]
    return {p: 1 - layer["sparsity"] for p, layer in layers.items() if p.endswith("kernel")}
  report = common.read_json(os.path.join(cell_dir, common.PRUNING_FILE))["report"]
  return {p: layer["density"] for p, layer in report["layers"].items()}


def format_table(config: ml_collections.ConfigDict, rows: list[dict]) -> str:
  """The markdown table of ``results.md`` (see the module doc)."""
  methods, seeds = tuple(config.methods), tuple(config.seeds)
  by_key: dict[tuple[str, float], list[dict]] = {}
  for r in rows:
    by_key.setdefault((r["method"], r["sparsity"]), []).append(r)

  def cell_text(key) -> str:
    found = by_key.get(key, [])
    if not found:
      return "–"
    mean, std = results.mean_std([100 * r["test_accuracy"] for r in found])
    text = f"{mean:.1f} ± {std:.1f}" if len(seeds) > 1 else f"{mean:.1f}"
    if any(r["collapsed_layers"] for r in found):
      text += " " + COLLAPSED_MARK
    elif any(r["effectively_collapsed_layers"] for r in found):
      text += " " + EFFECTIVELY_COLLAPSED_MARK
    if len(found) < len(seeds):
      text += f" ({len(found)}/{len(seeds)} seeds)"
    return text

  subset = (
    f"{config.data.train_subset} training images"
    if config.data.train_subset
    else "the full training set"
  )
  spread = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
  how = (
    "with the methods of the config's variants"
    if _variants(config)
    else f"pruned at initialisation with a {config.budget} budget"
  )
  lines = [
    f"Test accuracy (%) of {config.model.name} on {config.data.name} ({subset}, "
    f"{results.epochs_text(config.train.num_epochs)}), {how}; {spread}.",
    "",
    "| sparsity | compression | " + " | ".join(methods) + " |",
    "|---:|---:|" + "---:|" * len(methods),
  ]
  for s in sorted({float(s) for s in config.sparsities}):
    if s == 0.0:
      cells = [cell_text((DENSE, 0.0))] * len(methods)
      label = "0% (dense)"
    else:
      cells = [cell_text((m, s)) for m in methods]
      label = results.fmt_sparsity(s)
    lines.append(f"| {label} | {results.fmt_compression(s)} | " + " | ".join(cells) + " |")
  notes = []
  if any(r["collapsed_layers"] for r in rows):
    notes.append(
      f"{COLLAPSED_MARK} layer collapse: some layer kept no weight (for at least one seed)."
    )
  if any(r["effectively_collapsed_layers"] and not r["collapsed_layers"] for r in rows):
    notes.append(
      f"{EFFECTIVELY_COLLAPSED_MARK} effective layer collapse: some "
      "layer keeps weights but none on an input-to-output path."
    )
  if notes:
    lines += [""] + notes
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot state)
# ----------------------------------------------------------------------------


def plot_accuracy(path: str, config: ml_collections.ConfigDict, rows: list[dict]) -> None:
  """``accuracy_vs_sparsity.png`` (see the module doc)."""
  fig = results.figure(7, 4.5)
  ax = fig.subplots()
  sparsities = sorted({r["sparsity"] for r in rows if r["method"] != DENSE})
  for method in config.methods:
    points = []
    for s in sparsities:
      found = [r for r in rows if r["method"] == method and r["sparsity"] == s]
      if found:
        mean, std = results.mean_std([100 * r["test_accuracy"] for r in found])
        collapsed = any(r["collapsed_layers"] for r in found)
        points.append((1 / (1 - s), mean, std, collapsed))
    if not points:
      continue
    x, mean, std, collapsed = (np.array(v) for v in zip(*points))
    (line,) = ax.plot(x, mean, marker="o", label=method)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.plot(
      x[collapsed], mean[collapsed], linestyle="none", marker="x", markersize=10, color="black"
    )
  dense = [100 * r["test_accuracy"] for r in rows if r["method"] == DENSE]
  if dense:
    mean, std = results.mean_std(dense)
    ax.axhline(mean, color="black", linestyle="--", label=f"dense ({mean:.1f}%)")
    if std:
      ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
  if any(r["collapsed_layers"] for r in rows if r["method"] != DENSE):
    ax.plot([], [], linestyle="none", marker="x", color="black", label="layer collapse")
  ticks = [1 / (1 - s) for s in sparsities]
  if len(set(ticks)) == 1:  # one sparsity: give the log axis a width of its own
    ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
  ax.set_xscale("log")
  ax.set_xticks(
    ticks, [f"{results.fmt_sparsity(s)}\n({results.fmt_compression(s)})" for s in sparsities]
  )
  ax.minorticks_off()
  ax.set_xlabel("sparsity (compression ratio 1/(1 − s), log scale)")
  ax.set_ylabel("test accuracy (%)")
  seeds = len(config.seeds)
  ax.set_title(
    f"{config.model.name} on {config.data.name}, {results.epochs_text(config.train.num_epochs)}"
    + (f", mean ± std over {seeds} seeds" if seeds > 1 else "")
  )
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  results.save_figure(fig, path)


def plot_layer_density(
  path: str,
  config: ml_collections.ConfigDict,
  densities: dict[str, list[dict[str, float]]],
  sparsity: float,
) -> None:
  """``layer_density.png``: mean per-layer density over seeds, per method.

  Layers that keep no weight are drawn at the bottom of the log axis (a
  dotted line labelled "0 (collapsed)").
  """
  fig = results.figure(max(7, 0.35 * len(next(iter(densities.values()))[0]) + 2), 5)
  ax = fig.subplots()
  # Forward order (stem first, classifier last), not the sorted key order.
  model = models.get(config.model.name, 10, **common.model_kwargs(config))
  sample = jnp.zeros((1, *data.IMAGE_SHAPES[data.canonical_name(config.data.name)]))
  forward = {p: i for i, p in enumerate(models.layer_order(model, sample))}
  layers = sorted(next(iter(densities.values()))[0], key=lambda p: forward.get(p, len(forward)))
  means = {m: np.mean([[d[p] for p in layers] for d in ds], axis=0) for m, ds in densities.items()}
  positive = np.concatenate([v[v > 0] for v in means.values()])
  floor = (positive.min() if positive.size else 1.0) / 3
  x = np.arange(len(layers))
  for method, mean in means.items():
    ax.plot(x, np.maximum(mean, floor), marker="o", markersize=4, label=method)
  if any(np.any(mean == 0) for mean in means.values()):
    ax.axhline(floor, color="gray", linestyle=":", label="0 (collapsed)")
  ax.axhline(
    1 - sparsity,
    color="black",
    linestyle="--",
    linewidth=0.8,
    label=f"overall density {1 - sparsity:.3g}",
  )
  ax.set_yscale("log")
  ax.set_xticks(x, [p.removesuffix("/kernel") for p in layers], rotation=90, fontsize="small")
  ax.set_ylabel("density (fraction of weights kept)")
  ax.set_title(
    f"Per-layer density of {config.model.name} masks at sparsity {results.fmt_sparsity(sparsity)}"
  )
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize="small")
  results.save_figure(fig, path)


# ----------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------


def write_report(
  config: ml_collections.ConfigDict, workdir: str, cells: list[Cell], write: bool = True
) -> dict:
  """Writes ``results.csv``, ``results.md`` and the plots from the finished
  cells (nothing with ``write=False``); returns ``{"rows", "table",
  "missing"}``."""
  finished = [c for c in cells if is_finished(os.path.join(workdir, "cells", c.name))]
  rows = [cell_row(c, os.path.join(workdir, "cells", c.name)) for c in finished]
  table = format_table(config, rows)
  report = {"rows": rows, "table": table, "missing": [c.name for c in cells if c not in finished]}
  if not write:
    return report
  results.write_csv(os.path.join(workdir, "results.csv"), rows, CSV_FIELDS)
  with epath.Path(os.path.join(workdir, "results.md")).open("w") as f:
    f.write(table + "\n")
  if rows:
    plot_accuracy(os.path.join(workdir, "accuracy_vs_sparsity.png"), config, rows)
  pruned = [c for c in finished if c.method != DENSE]
  if pruned:
    s = config.density_plot_sparsity
    s = max(c.sparsity for c in pruned) if s is None else float(s)
    densities = {}
    for method in config.methods:
      found = [
        layer_densities(os.path.join(workdir, "cells", c.name))
        for c in pruned
        if c.method == method and c.sparsity == s
      ]
      if found:
        densities[method] = found
    if densities:
      plot_layer_density(os.path.join(workdir, "layer_density.png"), config, densities, s)
  return report


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  report_only: bool = False,
  runner: str = RUNNER,
  report_files=REPORT_FILES,
) -> dict:
  """Runs the unfinished cells of the grid, then writes the table and plots.

  The sweep directory and every started cell are checked first
  (:func:`claim_grid`); a finished grid is left as it is.

  Args:
    config: a sweep config (``experiments/configs/sweep_*.py``): the fields
      of ``default.py`` for every cell plus ``methods``, ``sparsities``,
      ``seeds`` and ``density_plot_sparsity``.
    workdir: the sweep directory (created).
    report_only: run nothing (the data need not be present); rebuild the
      outputs from the finished cells.
    runner: the name in the signatures of the directory and its cells (a
      grid runner built on this one, e.g. ``experiments.dst``, gives its own).
    report_files: the report files that, with every cell finished, make the
      grid finished (a runner built on this one adds its own).

  Returns:
    ``{"rows", "table", "missing", "ran", "skipped", "preempted",
    "finished"}``: the CSV rows, the markdown table, the unfinished cells,
    the cells run and the finished cells skipped by this call, whether
    SIGTERM stopped it, and whether the grid was finished already (nothing
    written).
  """
  cells = grid(config)
  workdir = str(_paths.resolve(workdir))
  cell_dir = lambda cell: os.path.join(workdir, "cells", cell.name)
  if claim_grid(
    workdir,
    runner,
    config,
    [(cell_dir(c), cell_config(config, c)) for c in cells],
    report_files=report_files,
    report_only=report_only,
  ):
    report = write_report(config, workdir, cells, write=False)
    return dict(report, ran=[], skipped=[c.name for c in cells], preempted=False, finished=True)
  ran, skipped, preempted = [], [], False
  if not report_only:
    common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    dataset = common.load_dataset(config)
    for i, cell in enumerate(cells, 1):
      if is_finished(cell_dir(cell)):
        logging.info("cell %d/%d %s: finished already, skipped", i, len(cells), cell.name)
        skipped.append(cell.name)
        continue
      print(f"cell {i}/{len(cells)}: {cell.name}", flush=True)
      result = common.run(cell_config(config, cell), cell_dir(cell), dataset=dataset, runner=runner)
      if result.preempted:
        preempted = True
        break
      ran.append(cell.name)
      row = cell_row(cell, cell_dir(cell))
      print(
        f"cell {i}/{len(cells)}: {cell.name}: test accuracy "
        f"{100 * row['test_accuracy']:.2f}% (scoring "
        f"{row['scoring_seconds']:.1f} s, training "
        f"{row['training_seconds']:.0f} s)",
        flush=True,
      )
  report = write_report(config, workdir, cells)
  return dict(report, ran=ran, skipped=skipped, preempted=preempted, finished=False)


def main(argv, run_fn=run):
  """The command line of a grid runner (``run_fn``: :func:`run` or one built on it)."""
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if not jax.config.jax_compilation_cache_dir:
    # Every cell builds its train and eval steps anew (sparsejax.train.fit);
    # the masks are data, so cells of one model compile to the same programs,
    # which the persistent cache then compiles once.
    jax.config.update("jax_compilation_cache_dir", str(_paths.resolve(workdir) / "jax_cache"))
  result = common.cli_main(
    lambda: run_fn(config, workdir, report_only=flags.FLAGS.report_only), lambda r: r["preempted"]
  )
  print(f"\n{result['table']}\n")
  done = len(result["rows"])
  print(
    f"{done} of {done + len(result['missing'])} cells finished "
    f"({len(result['ran'])} run now, {len(result['skipped'])} skipped); "
    f"results in {_paths.resolve(workdir)}"
  )


def define_flags() -> None:
  """``--config``, ``--workdir`` and ``--report_only`` of a grid runner."""
  common.define_flags("Directory of the sweep (cells, table, plots).")
  flags.DEFINE_bool(
    "report_only",
    False,
    "Rebuild results.csv, results.md and the plots from the finished cells; train nothing.",
  )


if __name__ == "__main__":
  define_flags()
  common.app_run(main)
