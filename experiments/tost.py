r"""ToST on any mask: baseline vs ToST on the same mask, init and data order.

Usage::

  # the CPU grid on the offline CIFAR-10 copy (ResNet-20 at 98% sparsity;
  # masks from random, SNIP, SynFlow and a lottery ticket; 2 seeds)
  python -m experiments.tost --config experiments/configs/tost_cpu.py \
      --config.data.dir=/path/to/data --workdir runs/tost_cpu

  # ToST's released recipe (ResNet-18, 182 epochs), for an accelerator
  python -m experiments.tost --config experiments/configs/tost_cifar.py:cifar10 \
      --workdir runs/tost_r18_c10

  # rebuild the tables and plots from the finished cells only
  python -m experiments.tost --config ... --workdir ... --report_only

The grid: every mask source of ``config.mask_sources`` (a pruner of
:func:`experiments.common.make_mask_fn`: ``random``, ``snip``, ``synflow``,
..., or ``ticket``) at every sparsity of ``config.sparsities``, trained with
every recipe of ``config.recipes`` (``"none"`` is the baseline; the others
are presets of :mod:`sparsejax.tost`, ``"ghost"`` and ``"always_on"``), plus
the recipes of ``config.ablation_recipes`` (one technique at a time) for the
sources of ``config.ablation_sources``; every seed of ``config.seeds``. A
cell is the method ``<source>+<recipe>``, run by
:func:`experiments.common.run` in ``WORKDIR/cells/<source>+<recipe>_s<sparsity>_seed<seed>``
(the cells of :mod:`experiments.sweep`: resumable, skipped once finished,
refused when their training config changed; their ``run.json`` and the
grid's name this runner, so another runner's directory is refused too).

Same mask, init and data order: the mask is scored on the plain model with
the cell's seed (the ghost skip paths are added afterwards, never pruned),
the initial weights are those of the seed (the ghost model's other params
equal the plain model's), and the data order and augmentation follow the
seed. Only the recipe differs.

Tickets: with ``ticket`` among the sources and ``config.ticket`` set, the
runner first runs ``experiments.lottery`` (resumable) in
``WORKDIR/lottery_seed<seed>`` with the grid's training settings, the cell's
seed and the fields of ``config.ticket`` (``levels``, ``prune_fraction``,
``rewind_step``, ...), without controls. The ticket of sparsity ``s`` is that
of the level ``L`` with ``1 - (1 - prune_fraction)^L = s`` (within 0.1%); it
trains from the cell's initialisation, which is the ticket's own init when
the rewind step is 0. With ``config.ticket = None`` the ticket comes from
``config.mask_path`` (for every seed and sparsity).

Outputs in ``WORKDIR``, rebuilt from the finished cells at the end of every
run (and by ``--report_only``): those of :mod:`experiments.sweep`
(``results.csv``, ``results.md``, ``accuracy_vs_sparsity.png``,
``layer_density.png``; one column or line per method) and

* ``tost.md``: test accuracy (%), mean ± std over the seeds, one row per mask
  source and sparsity, one column per recipe; every ToST column also gives the
  difference to the baseline of the same row;
* ``tost_accuracy.png``: accuracy against sparsity (as categories), one panel
  per mask source with its own legend, one line per recipe (± std) in the same
  colour on every panel, the recipes side by side at each sparsity.
"""

from __future__ import annotations

import math
import os

from absl import logging
from etils import epath
import ml_collections
import numpy as np

from experiments import common
from experiments import results
from experiments import sweep
from experiments import workdir as workdir_lib
from sparsejax import _paths
from sparsejax import lottery
from sparsejax import tost

#: The baseline recipe (no ToST technique).
BASELINE = "none"
#: Config fields of the ToST grid (not passed to the cells).
TOST_FIELDS = ("mask_sources", "recipes", "ablation_sources", "ablation_recipes", "ticket")
#: The runner named in the signatures of the grid and its cells.
RUNNER = "experiments.tost"
#: The grid's report files (those of experiments.sweep plus ``tost.md``).
REPORT_FILES = (*sweep.REPORT_FILES, "tost.md")
#: Short names of the recipes in the tables and plots.
LABELS = {"none": "baseline"}


def method_name(source: str, recipe: str) -> str:
  """The grid method of a mask source and a recipe, ``"<source>+<recipe>"``."""
  return f"{source}+{recipe}"


def split_method(method: str) -> tuple[str, str]:
  """``(source, recipe)`` of a method name."""
  source, recipe = method.split("+", 1)
  return source, recipe


def methods(config: ml_collections.ConfigDict) -> list[str]:
  """The grid's methods: every source x recipe, then the ablation cells.

  Raises:
    ValueError: an unknown recipe or mask source, or an ablation source
      that is not a mask source.
  """
  sources = tuple(config.mask_sources)
  recipes = tuple(config.recipes)
  ablation_sources = tuple(config.ablation_sources or ())
  ablation_recipes = tuple(config.ablation_recipes or ())
  for recipe in (*recipes, *ablation_recipes):
    if recipe not in tost.PRESETS:
      raise ValueError(f"unknown ToST recipe {recipe!r}; valid: {tuple(tost.PRESETS)}")
  for source in sources:
    if source not in common.PRUNERS or source == "dense":
      raise ValueError(f"unknown mask source {source!r}; valid: {common.PRUNERS[1:]}")
  extra = sorted(set(ablation_sources) - set(sources))
  if extra:
    raise ValueError(f"config.ablation_sources {extra} are not in config.mask_sources")
  out = [method_name(s, r) for s in sources for r in recipes]
  out += [method_name(s, r) for s in ablation_sources for r in ablation_recipes if r not in recipes]
  return out


def sweep_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The :mod:`experiments.sweep` grid of ``config``: its methods are the
  variants ``{"pruner": source, "tost": recipe}``."""
  fields = {k: v for k, v in config.to_dict().items() if k not in TOST_FIELDS}
  names = methods(config)
  fields["methods"] = tuple(names)
  fields["variants"] = {}
  for name in names:
    source, recipe = split_method(name)
    fields["variants"][name] = {"pruner": source, "tost": recipe}
  return ml_collections.ConfigDict(fields)


# ----------------------------------------------------------------------------
# Tickets
# ----------------------------------------------------------------------------


def _uses_lottery(config) -> bool:
  return "ticket" in tuple(config.mask_sources) and config.get("ticket") is not None


def ticket_level(config: ml_collections.ConfigDict, sparsity: float) -> int:
  """The lottery level whose sparsity ``1 - (1 - f)^L`` is ``sparsity``.

  Raises:
    ValueError: no level within 0.1% of ``sparsity`` up to ``config.ticket.levels``.
  """
  fraction = float(config.ticket.prune_fraction)
  levels = int(config.ticket.levels)
  level = round(math.log(1 - sparsity) / math.log(1 - fraction))
  if not (1 <= level <= levels and abs(lottery.level_sparsity(level, fraction) - sparsity) <= 1e-3):
    available = [round(lottery.level_sparsity(l, fraction), 4) for l in range(1, levels + 1)]
    raise ValueError(
      f"no lottery level has sparsity {sparsity}: with prune_fraction "
      f"{fraction} the levels reach {available}"
    )
  return level


def lottery_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The ``experiments.lottery`` config of the tickets of ``seed``: the grid's
  training settings (the baseline recipe), ``config.ticket``'s fields, no
  controls."""
  from experiments.configs import lottery_openlth  # pylint: disable=g-import-not-at-top

  out = lottery_openlth.get_config()
  shared = {k: v for k, v in config.to_dict().items() if k in out and k not in TOST_FIELDS}
  out.update(shared)
  out.update(pruner="dense", tost="none", controls=())
  out.train.seed = int(seed)
  for k, v in config.ticket.to_dict().items():  # e.g. eval_every_epochs: config.train's
    (out.train if k in out.train and k not in out else out)[k] = v
  return out


def ticket_dir(workdir: str, config, sparsity: float, seed: int) -> str:
  """The ticket directory of a ``ticket`` cell."""
  if not _uses_lottery(config):
    return config.mask_path
  level = ticket_level(config, sparsity)
  return os.path.join(workdir, f"lottery_seed{seed}", f"level_{level}", "ticket")


def run_lotteries(config, workdir: str) -> bool:
  """Runs (or resumes) the lottery of every seed; ``True`` if SIGTERM stopped it."""
  from experiments import lottery as lottery_runner  # pylint: disable=g-import-not-at-top

  for s in sorted({float(v) for v in config.sparsities} - {0.0}):
    ticket_level(config, s)  # refuse a sparsity no level reaches, before training
  for seed in config.seeds:
    out = os.path.join(workdir, f"lottery_seed{seed}")
    print(f"lottery tickets, seed {seed}: {out}", flush=True)
    if lottery_runner.run(lottery_config(config, seed), out).preempted:
      return True
  return False


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _recipes(config) -> list[str]:
  seen = []
  for m in methods(config):
    recipe = split_method(m)[1]
    if recipe not in seen:
      seen.append(recipe)
  return seen


def format_table(config: ml_collections.ConfigDict, rows: list[dict]) -> str:
  """``tost.md`` (see the module doc)."""
  recipes = _recipes(config)
  by_key: dict[tuple, list[float]] = {}
  for r in rows:
    if r["method"] == sweep.DENSE:
      continue
    source, recipe = split_method(r["method"])
    by_key.setdefault((source, r["sparsity"], recipe), []).append(100 * r["test_accuracy"])
  body = []
  for source in config.mask_sources:
    for s in sorted({float(v) for v in config.sparsities} - {0.0}):
      base = by_key.get((source, s, BASELINE))
      cells = []
      for recipe in recipes:
        found = by_key.get((source, s, recipe), [])
        text = results.fmt_mean_std(found)
        if found and base and recipe != BASELINE:
          text += f" ({np.mean(found) - np.mean(base):+.1f})"
        if found and len(found) < len(config.seeds):
          text += f" ({len(found)}/{len(config.seeds)} seeds)"
        cells.append(text)
      body.append([source, results.fmt_sparsity(s), *cells])
  subset = (
    f"{config.data.train_subset} training images"
    if config.data.train_subset
    else "the full training set"
  )
  spread = (
    f"mean ± std over {len(config.seeds)} seeds"
    if len(config.seeds) > 1
    else f"seed {config.seeds[0]}"
  )
  dense = [100 * r["test_accuracy"] for r in rows if r["method"] == sweep.DENSE]
  lines = [
    f"Test accuracy (%) of {config.model.name} on {config.data.name} ({subset}, "
    f"{results.epochs_text(config.train.num_epochs)}), baseline vs ToST on the "
    f"same mask, init and data order; {spread}; in brackets the "
    "difference to the baseline.",
    "",
    results.markdown_table(["mask", "sparsity", *(LABELS.get(r, r) for r in recipes)], body),
  ]
  if dense:
    lines += ["", f"Dense baseline: {results.fmt_mean_std(dense)}."]
  return "\n".join(lines)


def plot(path: str, config: ml_collections.ConfigDict, rows: list[dict]) -> None:
  """``tost_accuracy.png`` (see the module doc)."""
  sources = list(config.mask_sources)
  fig = results.figure(4 * len(sources) + 1, 4)
  axes = np.atleast_1d(fig.subplots(1, len(sources), sharey=True))
  sparsities = sorted({float(v) for v in config.sparsities} - {0.0})
  recipes = _recipes(config)
  colours = {r: f"C{k % 10}" for k, r in enumerate(recipes)}  # same on every panel

  for ax, source in zip(axes, sources):
    found = {
      (recipe, s): [
        100 * r["test_accuracy"]
        for r in rows
        if r["method"] == method_name(source, recipe) and r["sparsity"] == s
      ]
      for recipe in recipes
      for s in sparsities
    }
    # Sparsities as categories; the recipes of this panel side by side at each
    # one, so that their error bars do not hide each other.
    present = [rc for rc in recipes if any(found[rc, s] for s in sparsities)]
    step = min(0.08, 0.8 / max(len(present), 1))
    for k, recipe in enumerate(present):
      points = [
        (i + step * (k - (len(present) - 1) / 2), *results.mean_std(found[recipe, s]))
        for i, s in enumerate(sparsities)
        if found[recipe, s]
      ]
      x, mean, std = (np.array(v) for v in zip(*points))
      ax.errorbar(
        x,
        mean,
        yerr=std,
        marker="o",
        capsize=3,
        color=colours[recipe],
        label=LABELS.get(recipe, recipe),
      )
    ax.set_xticks(range(len(sparsities)), [results.fmt_sparsity(s) for s in sparsities])
    ax.set_xlim(-0.5, max(len(sparsities), 1) - 0.5)
    ax.minorticks_off()
    ax.set_title(f"{source} mask")
    ax.set_xlabel("sparsity")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="x-small")
  axes[0].set_ylabel("test accuracy (%)")
  fig.suptitle(
    f"{config.model.name} on {config.data.name}, "
    f"{results.epochs_text(config.train.num_epochs)}: baseline vs ToST"
  )
  results.save_figure(fig, path)


def write_report(config, workdir: str, cells: list[sweep.Cell], write: bool = True) -> dict:
  """The sweep's outputs plus ``tost.md`` and ``tost_accuracy.png`` (nothing
  written with ``write=False``)."""
  out = sweep.write_report(sweep_config(config), workdir, cells, write=write)
  table = format_table(config, out["rows"])
  if not write:
    return dict(out, table=table)
  with epath.Path(os.path.join(workdir, "tost.md")).open("w") as f:
    f.write(table + "\n")
  if out["rows"]:
    plot(os.path.join(workdir, "tost_accuracy.png"), config, out["rows"])
  return dict(out, table=table)


# ----------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------


def cell_config(config, workdir: str, cell: sweep.Cell) -> ml_collections.ConfigDict:
  """The run config of ``cell`` (a ``ticket`` cell gets its ticket directory)."""
  cfg = sweep.cell_config(sweep_config(config), cell)
  if cfg.pruner == "ticket":
    cfg.mask_path = ticket_dir(workdir, config, cell.sparsity, cell.seed)
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str, *, report_only: bool = False) -> dict:
  """Runs the lotteries (if any) and the unfinished cells; writes the report.

  The grid directory, every started cell and every started lottery are
  checked before anything is written (:func:`experiments.sweep.claim_grid`);
  a grid finished already (every cell and :data:`REPORT_FILES`) is left as
  it is.

  Returns:
    ``{"rows", "table", "missing", "ran", "skipped", "preempted",
    "finished"}`` as :func:`experiments.sweep.run`; ``table`` is ``tost.md``.
  """
  from experiments import lottery as lottery_runner  # pylint: disable=g-import-not-at-top

  grid_config = sweep_config(config)
  cells = sweep.grid(grid_config)
  workdir = str(_paths.resolve(workdir))
  if _uses_lottery(config):
    for seed in config.seeds:
      workdir_lib.check(
        os.path.join(workdir, f"lottery_seed{seed}"),
        lottery_runner.RUNNER,
        common.resolve_config(lottery_config(config, seed), lottery_runner.check_config),
      )
  cell_dir = lambda cell: os.path.join(workdir, "cells", cell.name)
  if sweep.claim_grid(
    workdir,
    RUNNER,
    config,
    [(cell_dir(c), cell_config(config, workdir, c)) for c in cells],
    report_files=REPORT_FILES,
    report_only=report_only,
  ):
    report = write_report(config, workdir, cells, write=False)
    return dict(report, ran=[], skipped=[c.name for c in cells], preempted=False, finished=True)
  ran, skipped, preempted = [], [], False
  if not report_only:
    common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    if _uses_lottery(config):
      preempted = run_lotteries(config, workdir)
    dataset = None if preempted else common.load_dataset(config)
    for i, cell in enumerate(cells if not preempted else [], 1):
      if sweep.is_finished(cell_dir(cell)):
        logging.info("cell %d/%d %s: finished already, skipped", i, len(cells), cell.name)
        skipped.append(cell.name)
        continue
      print(f"cell {i}/{len(cells)}: {cell.name}", flush=True)
      result = common.run(
        cell_config(config, workdir, cell), cell_dir(cell), dataset=dataset, runner=RUNNER
      )
      if result.preempted:
        preempted = True
        break
      ran.append(cell.name)
      row = sweep.cell_row(cell, cell_dir(cell))
      print(
        f"cell {i}/{len(cells)}: {cell.name}: test accuracy "
        f"{100 * row['test_accuracy']:.2f}% (training "
        f"{row['training_seconds']:.0f} s)",
        flush=True,
      )
  report = write_report(config, workdir, cells)
  return dict(report, ran=ran, skipped=skipped, preempted=preempted, finished=False)


def main(argv):
  sweep.main(argv, run_fn=run)


if __name__ == "__main__":
  sweep.define_flags()
  common.app_run(main)
