r"""Sup-tickets (SPEC §6): DST alone vs DST with superposed cheap tickets.

Usage::

  # the CPU grid on the offline CIFAR-10 copy (ResNet-20 at 95% sparsity;
  # RigL and GraNet alone and with Sup-tickets in the same 24 epochs; 3 seeds)
  python -m experiments.suptickets --config experiments/configs/suptickets_cpu.py \
      --config.data.dir=/path/to/data --workdir runs/suptickets_cpu

  # the paper's CIFAR protocol (E = 250, M = 3, C = 8, density 0.05), for an
  # accelerator
  python -m experiments.suptickets \
      --config experiments/configs/suptickets_cifar.py:resnet50,cifar100 \
      --workdir runs/suptickets_r50_c100

The grid of ``experiments.sweep`` (resumable cell by cell; ``results.csv``,
``results.md``, the accuracy and layer-density plots) over the named variants
of ``config.variants``: a DST method (``config.dst``) and the same method
with ``suptickets=True`` (:func:`experiments.common.run`: the DST phase, the
cycles, the :class:`sparsejax.suptickets.Superpose` callback). In ``results.*``
the accuracy of a Sup-tickets cell is that of its trained network (the last
ticket). Each Sup-tickets cell's ``metrics.jsonl`` has, at every cycle end,
``cycle``, ``ticket_test_accuracy`` and ``superposed_test_accuracy``; this
runner adds

* ``suptickets.csv``: one row per Sup-tickets cell and cycle (the ticket's
  and the superposed model's test accuracy);
* ``suptickets.md``: per DST method and sparsity, the plain DST run's final
  accuracy, the last ticket's, the final superposed model's and the
  superposed model's gain over plain DST (mean ± std of the per-seed
  differences over the seeds both have);
* ``suptickets_vs_cycle.png``: ticket and superposed accuracy against the
  cycle (mean ± std over seeds), one panel per method and sparsity, the plain
  DST run's final accuracy as a horizontal line.

A Sup-tickets variant is paired with the variant that sets the same fields
without ``suptickets`` and ``sup_*`` (e.g. ``rigl_sup`` with ``rigl``).

The grid and its cells are checked and skipped as in ``experiments.sweep``
(their ``run.json`` names this runner); a finished grid (every cell,
``results.*`` and ``suptickets.*``) is not run again.
"""

from __future__ import annotations

import os

from etils import epath
import ml_collections
import numpy as np

from experiments import common
from experiments import results
from experiments import sweep
from sparsejax import _paths

#: The runner named in the signatures of the grid and its cells.
RUNNER = "experiments.suptickets"
#: The grid's report files (those of experiments.sweep plus this runner's).
REPORT_FILES = (*sweep.REPORT_FILES, "suptickets.csv", "suptickets.md")
#: Columns of ``suptickets.csv``.
CYCLE_FIELDS = (
  "method",
  "dst_method",
  "sparsity",
  "seed",
  "cycle",
  "ticket_test_accuracy",
  "superposed_test_accuracy",
  "cell",
)


def _is_sup_field(name: str) -> bool:
  return name == "suptickets" or name.startswith("sup_")


def pairs(config: ml_collections.ConfigDict) -> dict[str, str | None]:
  """``{Sup-tickets method of config.methods: its plain DST variant (or None)}``."""
  variants = sweep._variants(config)  # pylint: disable=protected-access
  plain = lambda fields: {k: v for k, v in fields.items() if not _is_sup_field(k)}
  out = {}
  for method in config.methods:
    fields = variants.get(method, {})
    if fields.get("suptickets", False):
      out[method] = next(
        (
          m
          for m, f in variants.items()
          if not f.get("suptickets", False) and plain(f) == plain(fields)
        ),
        None,
      )
  return out


def cycle_rows(
  workdir: str, cells: list[sweep.Cell], config: ml_collections.ConfigDict
) -> list[dict]:
  """The ``suptickets.csv`` rows of the finished Sup-tickets cells."""
  paired = pairs(config)
  rows = []
  for cell in cells:
    cell_dir = os.path.join(workdir, "cells", cell.name)
    if cell.method not in paired or not sweep.is_finished(cell_dir):
      continue
    for record in results.read_jsonl(os.path.join(cell_dir, "metrics.jsonl")):
      if "cycle" in record:
        rows.append(
          {
            "method": cell.method,
            "dst_method": paired[cell.method] or "",
            "sparsity": cell.sparsity,
            "seed": cell.seed,
            "cycle": record["cycle"],
            "ticket_test_accuracy": record.get("ticket_test_accuracy"),
            "superposed_test_accuracy": record["superposed_test_accuracy"],
            "cell": cell.name,
          }
        )
  return rows


def _final(rows: list[dict], method: str, sparsity: float) -> dict[int, float]:
  """``{seed: final test accuracy}`` of a method's finished cells."""
  return {
    r["seed"]: r["test_accuracy"]
    for r in rows
    if r["method"] == method and r["sparsity"] == sparsity
  }


def _last_cycle(cycles: list[dict], method: str, sparsity: float, key: str) -> dict[int, float]:
  out: dict[int, tuple[int, float]] = {}
  for r in cycles:
    if r["method"] == method and r["sparsity"] == sparsity and r[key] is not None:
      if r["seed"] not in out or r["cycle"] > out[r["seed"]][0]:
        out[r["seed"]] = (r["cycle"], r[key])
  return {seed: acc for seed, (_, acc) in out.items()}


def format_table(config: ml_collections.ConfigDict, rows: list[dict], cycles: list[dict]) -> str:
  """The markdown table of ``suptickets.md`` (see the module doc)."""
  pct = lambda d: [100 * v for v in d.values()]
  lines = []
  for method, base in pairs(config).items():
    for s in sorted({c.sparsity for c in sweep.grid(config) if c.method == method}):
      plain = _final(rows, base, s) if base else {}
      ticket = _last_cycle(cycles, method, s, "ticket_test_accuracy")
      sup = _last_cycle(cycles, method, s, "superposed_test_accuracy")
      common_seeds = sorted(set(plain) & set(sup))
      gain = [100 * (sup[k] - plain[k]) for k in common_seeds]
      gain_text = (
        "–"
        if not gain
        else (f"{np.mean(gain):+.2f}" + (f" ± {np.std(gain, ddof=1):.2f}" if len(gain) > 1 else ""))
      )
      lines.append(
        [
          base or "–",
          method,
          results.fmt_sparsity(s),
          results.fmt_mean_std(pct(plain)),
          results.fmt_mean_std(pct(ticket)),
          results.fmt_mean_std(pct(sup)),
          gain_text,
          str(len(sup)),
        ]
      )
  seeds = len(config.seeds)
  head = (
    f"Test accuracy (%) of {config.model.name} on {config.data.name} "
    f"({config.data.train_subset or 'all'} training images, "
    f"{results.epochs_text(config.train.num_epochs)} for every run; Sup-tickets: "
    f"{config.sup_cycles} cycle{'s' if config.sup_cycles != 1 else ''} of "
    f"{results.epochs_text(config.sup_cycle_epochs)} at the end); "
    f"mean ± std over {seeds} seeds. Gain: superposed − DST alone, "
    "per seed, in points."
  )
  return (
    head
    + "\n\n"
    + results.markdown_table(
      [
        "DST alone",
        "Sup-tickets",
        "sparsity",
        "DST final",
        "last ticket",
        "superposed",
        "gain",
        "seeds",
      ],
      lines,
    )
  )


def plot_cycles(
  path: str, config: ml_collections.ConfigDict, rows: list[dict], cycles: list[dict]
) -> None:
  """``suptickets_vs_cycle.png`` (see the module doc)."""
  panels = sorted(
    {(r["method"], r["sparsity"]) for r in cycles},
    key=lambda p: (list(config.methods).index(p[0]), p[1]),
  )
  if not panels:
    return
  paired = pairs(config)
  fig = results.figure(4.5 * len(panels), 4)
  axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
  for ax, (method, s) in zip(axes, panels):
    for key, label in (
      ("ticket_test_accuracy", "ticket"),
      ("superposed_test_accuracy", "superposed"),
    ):
      by_cycle: dict[int, list[float]] = {}
      for r in cycles:
        if r["method"] == method and r["sparsity"] == s and r[key] is not None:
          by_cycle.setdefault(r["cycle"], []).append(100 * r[key])
      if not by_cycle:
        continue
      x = sorted(by_cycle)
      stats = [results.mean_std(by_cycle[c]) for c in x]
      mean = np.array([m for m, _ in stats])
      std = np.array([d for _, d in stats])
      (line,) = ax.plot(x, mean, marker="o", label=label)
      ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    plain = _final(rows, paired.get(method), s) if paired.get(method) else {}
    if plain:
      mean, std = results.mean_std(100 * v for v in plain.values())
      ax.axhline(mean, color="black", linestyle="--", label=f"{paired[method]} alone ({mean:.1f}%)")
      if std:
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
    ax.set_xticks(range(1, int(config.sup_cycles) + 1))
    ax.set_xlabel("cycle")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{method}, {results.fmt_sparsity(s)} sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  fig.suptitle(
    f"Sup-tickets: {config.model.name} on {config.data.name}"
    + (f", mean ± std over {len(config.seeds)} seeds" if len(config.seeds) > 1 else "")
  )
  results.save_figure(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str, *, report_only: bool = False) -> dict:
  """:func:`experiments.sweep.run`, then ``suptickets.csv``, ``.md`` and the plot.

  The signatures of the grid and its cells name this runner; a grid finished
  already (every cell and :data:`REPORT_FILES`) is left as it is (the tables
  are read back, nothing is written).

  Returns:
    The dict of :func:`experiments.sweep.run` with ``cycles`` (the
    ``suptickets.csv`` rows) and ``suptickets_table`` added.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if not pairs(config):
    raise ValueError(
      "no Sup-tickets method in config.methods: give one a variant with suptickets=True"
    )
  out = sweep.run(
    config, workdir, report_only=report_only, runner=RUNNER, report_files=REPORT_FILES
  )
  workdir = str(_paths.resolve(workdir))
  cells = sweep.grid(config)
  cycles = cycle_rows(workdir, cells, config)
  table = format_table(config, out["rows"], cycles)
  if not out["finished"]:
    results.write_csv(os.path.join(workdir, "suptickets.csv"), cycles, CYCLE_FIELDS)
    with epath.Path(os.path.join(workdir, "suptickets.md")).open("w") as f:
      f.write(table + "\n")
    plot_cycles(os.path.join(workdir, "suptickets_vs_cycle.png"), config, out["rows"], cycles)
  return dict(out, cycles=cycles, suptickets_table=table, table=out["table"] + "\n\n" + table)


def main(argv):
  sweep.main(argv, run_fn=run)


if __name__ == "__main__":
  sweep.define_flags()
  common.app_run(main)
