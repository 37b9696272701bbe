"""Cost of the pruning-at-initialisation scores on ResNet-20 (SPEC §2).

Measures, in one run, on a CIFAR-shaped batch of random images (10 per class):

* SNIP time / one training gradient          (target <= 1.3)
* GraSP time / one training gradient         (target <= 3.5)
* SynFlow, n rounds as one compiled program vs the same n rounds dispatched
  from a Python loop                         (target fused >= 3x faster),
  against two loops: one compiled call per round (what a careful JAX user
  writes: only the per-call dispatch is saved by fusing), and every operation
  dispatched on its own (``jax.disable_jit``, the execution model of the
  PyTorch reference code).

Every function is compiled first; each time is then the median of several
repeats ending in ``jax.block_until_ready`` (the op-by-op loop: one repeat).
On CPU the fused loop depends on ``sparsejax._conv_layout``: without it XLA
runs the convolutions of a loop body with a slow generic kernel and the fused
rounds are 3-5x slower than the per-round calls. Not run in CI.

Usage::

  python benchmarks/scoring_cost.py            # 100 images, 100 rounds, 5 repeats
  python benchmarks/scoring_cost.py --small    # 20 images, 10 rounds, 2 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from sparsejax import masks
from sparsejax import models
from sparsejax import scores

INPUT_SHAPE = (32, 32, 3)


def median_time(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` after one compiling call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--small", action="store_true", help="quick run: 2 images per class, 10 rounds, 2 repeats"
  )
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--per-class", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--sparsity", type=float, default=0.98)
  args = parser.parse_args(argv)
  per_class = args.per_class or (2 if args.small else 10)
  rounds = args.rounds or (10 if args.small else 100)
  repeats = args.repeats or (2 if args.small else 5)

  model = models.get(args.model, 10)
  key_init, key_x = jax.random.split(jax.random.key(0))
  variables = model.init(key_init, jnp.zeros((1, *INPUT_SHAPE)))
  params, apply_fn = scores.linen_apply_fn(model, variables)
  mask = masks.ones_like(params)
  x = jax.random.normal(key_x, (10 * per_class, *INPUT_SHAPE))
  y = jnp.repeat(jnp.arange(10), per_class)
  n = masks.summary(mask).total
  print(
    f"{args.model}: {n} prunable weights, batch {x.shape[0]}, "
    f"{rounds} SynFlow rounds, median of {repeats}, device {jax.devices()[0]}"
  )

  # One training gradient: cross-entropy, batch norm in train mode.
  @jax.jit
  def train_grad(p):
    loss = lambda p_: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(p_, x, True), y
    ).mean()
    return jax.grad(loss)(p)

  t_grad = median_time(lambda: train_grad(params), repeats)
  t_snip = median_time(lambda: scores.snip(params, mask, apply_fn, (x, y)), repeats)
  t_grasp = median_time(lambda: scores.grasp(params, mask, apply_fn, (x, y)), repeats)

  t_fused = median_time(
    lambda: scores.synflow(params, mask, apply_fn, INPUT_SHAPE, args.sparsity, rounds), repeats
  )

  def one_round(p, m, sparsity):
    s = scores.synflow_scores(p, m, apply_fn, INPUT_SHAPE)
    return masks.topk_mask(s, sparsity, within=m)

  jit_round = jax.jit(one_round)

  density = 1.0 - args.sparsity
  schedule = [jnp.float32(1.0 - density ** (k / rounds)) for k in range(1, rounds + 1)]

  def python_loop(round_fn):
    m = mask
    for s in schedule:
      m = round_fn(params, m, s)
    return m

  t_loop = median_time(lambda: python_loop(jit_round), repeats)
  with jax.disable_jit():
    t_eager = median_time(lambda: python_loop(one_round), 1)

  rows = [
    ("SNIP / training gradient", t_snip / t_grad, "<= 1.3", t_snip / t_grad <= 1.3),
    ("GraSP / training gradient", t_grasp / t_grad, "<= 3.5", t_grasp / t_grad <= 3.5),
    (
      f"SynFlow {rounds} rounds: jit-per-round loop / fused",
      t_loop / t_fused,
      ">= 3",
      t_loop / t_fused >= 3.0,
    ),
    (
      f"SynFlow {rounds} rounds: op-by-op loop / fused",
      t_eager / t_fused,
      ">= 3",
      t_eager / t_fused >= 3.0,
    ),
  ]
  print(f"training gradient {t_grad * 1e3:9.2f} ms")
  print(f"SNIP              {t_snip * 1e3:9.2f} ms")
  print(f"GraSP             {t_grasp * 1e3:9.2f} ms")
  print(f"SynFlow fused     {t_fused * 1e3:9.2f} ms")
  print(f"SynFlow loop      {t_loop * 1e3:9.2f} ms  (one jitted call per round)")
  print(f"SynFlow op-by-op  {t_eager * 1e3:9.2f} ms  (jax.disable_jit)")
  for name, ratio, target, ok in rows:
    print(f"{name:<50} {ratio:6.2f}  target {target:<6} {'ok' if ok else 'MISSED'}")
  return {name: ratio for name, ratio, _, _ in rows}


if __name__ == "__main__":
  main()
