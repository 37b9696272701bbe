"""Cost of ToST's ghost model: its training step against the plain one.

Usage:
  python benchmarks/tost_step.py [--model resnet20] [--batch 128] [--rounds 7] [--steps 5]

Builds the jitted step of ``sparsejax.train`` twice for the same network: the
plain model with the default loss (preset ``"none"``), and the model of preset
``"ghost"``: the ghost skip paths (two dense 1x1 conv + batch-norm paths per
basic block, scaled by γ), the ReLU/Swish blend (β) and label smoothing (α),
their schedules evaluated inside the step. LRsI runs once before training, so
it is not part of a step. Both use Nesterov SGD with weight decay and gather
their batch on device from a 1,024-image uint8 set, like ``cpu_step.py``.
After compiling both, they are timed interleaved (plain, ghost, plain, ...),
each figure the median over ``--rounds`` of the mean of ``--steps`` steps.

Runs on whatever JAX's default backend is (CPU, GPU, TPU) and prints it. The
last line is ``ghost_step_ratio X.XX`` (ghost step time over plain). Not run
in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_step import cpu_model  # noqa: E402
from cpu_step import jax_worker  # noqa: E402
import jax  # noqa: E402

import sparsejax as sj  # noqa: E402  pylint: disable=g-bad-import-order


def make_run(recipe: sj.tost.ToST, name: str, batch: int, total_steps: int):
  """``run(k) -> seconds per step`` of ``recipe``'s training step."""
  return jax_worker(
    batch,
    recipe.model(name, num_classes=10),
    loss_fn=recipe.loss_fn(),
    scalars=recipe.scalars(total_steps),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  # The schedules' length only sets β, γ and α, traced scalars: the step's
  # cost does not depend on their values.
  total = 100_000
  runs = {
    "plain": make_run(sj.tost.preset("none"), args.model, args.batch, total),
    "ghost": make_run(sj.tost.preset("ghost"), args.model, args.batch, total),
  }
  for run in runs.values():  # compile and warm up
    run(2)
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      times[name].append(run(args.steps))

  device = jax.devices()[0]
  where = cpu_model() if device.platform == "cpu" else device.device_kind
  med = {name: statistics.median(t) for name, t in times.items()}
  print(f"device: {device.platform}, {where}")
  print(
    f"{args.model} train step, batch {args.batch}, median of {args.rounds} "
    f"interleaved rounds of {args.steps} steps"
  )
  for name, t in med.items():
    print(f"  {name:6s} {t * 1e3:8.1f} ms/step")
  print(f"ghost_step_ratio {med['ghost'] / med['plain']:.2f}")


if __name__ == "__main__":
  main()
