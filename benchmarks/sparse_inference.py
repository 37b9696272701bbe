"""Dense vs sparse (BCOO) inference: time and parameter memory, measured in one run.

Usage:
  python benchmarks/sparse_inference.py [--reps 5] [--mlp-batches 1,128]
      [--resnet-batch 32] [--sparsities 0.9,0.98,0.99]

For an MLP (784-1024-1024-10, ``sparsejax.models.MLP(hidden=(1024, 1024))``
on 28x28x1 inputs) and ResNet-20 (32x32x3) at each sparsity (uniform budget:
every kernel at that sparsity, magnitude mask of the initial weights), times
the jitted evaluation (``train=False``)

* ``dense``: ``model.apply`` on the masked dense params (what masked training
  gives you);
* ``sparse``: :func:`sparsejax.sparse_inference.apply` with every kernel
  BCOO: the MLP's dense layers; ResNet-20's convolutions (im2col times a
  sparse matrix, ``convs=True``) and classifier.

Dense and sparse calls are interleaved after compilation (noise hits both
alike); the table shows medians, the speedup dense / sparse and the bytes of
the params (BCOO: values plus int32 indices). Prints the CPU model first,
then the table, then plain words on where sparse wins, and last
``best_mlp_speedup X.XX``. Not run in CI.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_step import cpu_model  # noqa: E402  (benchmarks/ is on the path)

import sparsejax as sj  # noqa: E402
from sparsejax import sparse_inference  # noqa: E402


def _masked_variables(model, x, sparsity):
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x[:1])
  params = variables["params"]
  mask = sj.masks.topk_mask(jax.tree.map(jnp.abs, params), sparsity, budget=sj.budgets.Uniform())
  return {**variables, "params": sj.masks.apply(params, mask)}


def _time(model, dense_vars, sparse_vars, x, reps):
  dense_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  sparse_fn = jax.jit(lambda v, x: sparse_inference.apply(model, v, x, train=False))
  ref = jax.block_until_ready(dense_fn(dense_vars, x))  # compile
  got = jax.block_until_ready(sparse_fn(sparse_vars, x))
  err = float(jnp.max(jnp.abs(ref - got)) / (jnp.max(jnp.abs(ref)) + 1e-30))
  times = {"dense": [], "sparse": []}
  for _ in range(reps):
    for name, fn, v in (("dense", dense_fn, dense_vars), ("sparse", sparse_fn, sparse_vars)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(v, x))
      times[name].append(time.perf_counter() - t0)
  return statistics.median(times["dense"]), statistics.median(times["sparse"]), err


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--mlp-batches", default="1,128")
  parser.add_argument("--resnet-batch", type=int, default=32)
  parser.add_argument("--sparsities", default="0.9,0.98,0.99")
  args = parser.parse_args()
  sparsities = [float(s) for s in args.sparsities.split(",")]
  rng = np.random.default_rng(0)

  print(
    f"CPU: {cpu_model()}  jax {jax.__version__}  device: "
    f"{jax.devices()[0].device_kind}  reps: {args.reps} (medians)"
  )
  rows = []
  mlp = sj.models.get("mlp", num_classes=10, hidden=(1024, 1024))
  resnet = sj.models.get("resnet20", num_classes=10)
  cases = [("mlp", mlp, (28, 28, 1), int(b), False) for b in args.mlp_batches.split(",")]
  cases.append(("resnet20", resnet, (32, 32, 3), args.resnet_batch, True))
  for name, model, shape, batch, convs in cases:
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    for s in sparsities:
      dense_vars = _masked_variables(model, x, s)
      # min_sparsity=0: every pruned kernel BCOO, also at 90%.
      sparse_vars = sparse_inference.sparsify(
        model, dense_vars, x[:1], convs=convs, min_sparsity=0.0, train=False
      )
      t_dense, t_sparse, err = _time(model, dense_vars, sparse_vars, x, args.reps)
      rows.append(
        dict(
          model=name,
          batch=batch,
          sparsity=s,
          dense_ms=1e3 * t_dense,
          sparse_ms=1e3 * t_sparse,
          speedup=t_dense / t_sparse,
          err=err,
          dense_kb=sparse_inference.param_nbytes(dense_vars["params"]) / 1e3,
          sparse_kb=sparse_inference.param_nbytes(sparse_vars["params"]) / 1e3,
        )
      )
      r = rows[-1]
      print(
        f"  measured {name} batch {batch} sparsity {s}: "
        f"{r['dense_ms']:.2f} vs {r['sparse_ms']:.2f} ms",
        flush=True,
      )

  print()
  print(
    "| model | batch | sparsity | dense ms | sparse ms | speedup | params dense kB "
    "| params BCOO kB | memory | max rel. logit diff |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['batch']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} "
      f"| {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {r['dense_kb']:.0f} "
      f"| {r['sparse_kb']:.0f} | {r['dense_kb'] / r['sparse_kb']:.1f}x smaller "
      f"| {r['err']:.1e} |"
    )
  print()
  wins = [r for r in rows if r["speedup"] > 1.05]
  loses = [r for r in rows if r["speedup"] < 0.95]
  label = lambda r: f"{r['model']} batch {r['batch']} at {r['sparsity']:.0%}"
  print("Sparse is faster for: " + (", ".join(map(label, wins)) or "none") + ".")
  print("Sparse is slower for: " + (", ".join(map(label, loses)) or "none") + ".")
  print(
    "BCOO params are smaller than dense at every sparsity measured (a kept "
    "float32 costs 12 bytes: value + two int32 indices; smaller below density 1/3)."
  )
  best = max((r["speedup"] for r in rows if r["model"] == "mlp"), default=float("nan"))
  print(f"best_mlp_speedup {best:.2f}")


if __name__ == "__main__":
  main()
