r"""Dynamic sparse training: methods x sparsities x seeds, trained and compared.

Usage::

  # the CPU grid on the offline CIFAR-10 copy (ResNet-20; dense, static ERK,
  # SET, RigL, GraNet at 90% and 95%, 3 seeds)
  python -m experiments.dst --config experiments/configs/dst_cpu.py \
      --config.data.dir=/path/to/data --workdir runs/dst_cpu

  # the RigL CIFAR-10 protocol (WRN-22-2), for an accelerator
  python -m experiments.dst --config experiments/configs/dst_rigl_cifar.py \
      --workdir runs/dst_rigl_wrn22

The grid of ``experiments.sweep`` (resumable cell by cell, the same
``results.csv``, ``results.md``, ``accuracy_vs_sparsity.png`` and
``layer_density.png``, the latter from the *trained* masks) whose methods are
the named variants of ``config.variants``: each sets ``config.dst`` (SET,
RigL, GMP, GraNet; :func:`experiments.common.make_dst_optimizer`) and the
starting mask (``pruner``, ``budget``), so static sparse training is the
variant without ``dst``. Every DST cell logs the mask churn (the fraction of
the mask changed) every ``ΔT`` steps to its ``steps.jsonl`` and per epoch to
its ``metrics.jsonl``. The grid and its cells are checked and skipped as in
``experiments.sweep`` (their ``run.json`` names this runner). This runner adds

* ``mask_churn.png``: mask churn per update interval against the step, mean ±
  std over seeds, one line per method and sparsity.
"""

from __future__ import annotations

import json
import os

from etils import epath
import ml_collections

from experiments import common
from experiments import results
from experiments import sweep
from sparsejax import _paths

#: The runner named in the signatures of the grid and its cells.
RUNNER = "experiments.dst"


def churn_series(workdir: str, cells: list[sweep.Cell]) -> dict[str, list]:
  """``{"<method> <sparsity>": [[(step, churn), ...] per seed]}`` of the DST cells."""
  series: dict[str, list] = {}
  for cell in cells:
    path = os.path.join(workdir, "cells", cell.name, "steps.jsonl")
    if not epath.Path(path).exists():
      continue
    with epath.Path(path).open() as f:
      points = [(r["step"], r["mask_churn"]) for r in map(json.loads, f) if "mask_churn" in r]
    if points:
      label = f"{cell.method} {results.fmt_sparsity(cell.sparsity)}"
      series.setdefault(label, []).append(points)
  return series


def run(config: ml_collections.ConfigDict, workdir: str, *, report_only: bool = False) -> dict:
  """:func:`experiments.sweep.run` (signatures naming this runner), then
  ``mask_churn.png`` (not for a grid finished already: nothing is written)."""
  out = sweep.run(config, workdir, report_only=report_only, runner=RUNNER)
  if out["finished"]:
    return out
  series = churn_series(str(_paths.resolve(workdir)), sweep.grid(config))
  if series:
    every = int(config.dst_update_every)
    results.plot_series(
      os.path.join(workdir, "mask_churn.png"),
      series,
      xlabel="training step",
      ylabel=f"mask churn per {every} steps (fraction of entries)",
      title=f"{config.model.name} on {config.data.name}: mask changes",
      logy=True,
    )
  return out


def main(argv):
  sweep.main(argv, run_fn=run)


if __name__ == "__main__":
  sweep.define_flags()
  common.app_run(main)
