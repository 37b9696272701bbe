"""Structured sparsity that saves compute: dense vs BCOO vs condensed vs shrunk inference.

Usage:
  python benchmarks/structured_inference.py [--reps 7] [--batches 1,128]
      [--sparsities 0.9,0.95,0.99] [--quick]

For the MLP 784-1024-1024-10 (``sparsejax.models.MLP(hidden=(1024, 1024))``,
28x28x1 inputs) and ResNet-20 (32x32x3) at each sparsity, the mask is the
*constant fan-in* mask of the initial weights' magnitudes
(:func:`sparsejax.condensed.constant_fan_in`: every output unit keeps the same
``k`` inputs, every kernel at that sparsity; no training), and the jitted
evaluation (``train=False``) is timed four ways:

* ``dense``: ``model.apply`` on the masked dense params (masked training's model);
* ``bcoo``: :func:`sparsejax.sparse_inference.apply`, every kernel BCOO
  (the ResNet's convolutions too, ``convs=True``, im2col);
* ``condensed``: :func:`sparsejax.condensed.apply`, every kernel condensed
  (values + indices per unit; the ResNet's convolutions too, ``convs=True``),
  with its default ``gather_max_rows=32`` (larger batches multiply by the
  kernel scattered back to dense);
* ``shrunk``: the smaller dense model of :func:`sparsejax.shrink.shrink`
  (dead units and channels cut out; with untrained masks only the units no
  output path reaches die, mostly at 99%).

The variants of one case are interleaved after compilation (noise hits all
alike); each sample is the mean of enough calls to last ~5 ms, and the table
shows medians, the speedup over dense, the parameter bytes and the largest
logit difference relative to the dense logits. Prints the CPU model first, the
table, then ``speedup_vs_dense X.XX`` last: the condensed MLP at 90%, batch 1
(in ``--quick`` mode too). Not run in CI;
``--quick`` (the MLP alone at 90%, batch 1, 3 reps) is run by
``tests/test_condensed.py``.
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
from sparsejax import condensed  # noqa: E402
from sparsejax import shrink  # noqa: E402
from sparsejax import sparse_inference  # noqa: E402


def _variants(model, x, sparsity):
  """``{name: (fn, variables)}`` and the parameter bytes of each variant."""
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0), x[:1])
  params = variables["params"]
  mask = condensed.constant_fan_in(jax.tree.map(jnp.abs, params), sparsity)
  dense = {**variables, "params": sj.masks.apply(params, mask)}
  bcoo = sparse_inference.sparsify(model, dense, x[:1], convs=True, min_sparsity=0.0, train=False)
  cond = condensed.condense(model, dense, mask, x[:1], convs=True, max_density=1.0, train=False)
  small = shrink.shrink(model, dense, mask, x[:1])
  out = {
    "dense": (jax.jit(lambda v, x: model.apply(v, x, train=False)), dense),
    "bcoo": (jax.jit(lambda v, x: sparse_inference.apply(model, v, x, train=False)), bcoo),
    "condensed": (jax.jit(lambda v, x: condensed.apply(model, v, x, train=False)), cond),
    "shrunk": (jax.jit(lambda v, x: small.model.apply(v, x, train=False)), small.variables),
  }
  nbytes = {
    "dense": condensed.param_nbytes(dense["params"]),
    "bcoo": sparse_inference.param_nbytes(bcoo["params"]),
    "condensed": condensed.param_nbytes(cond["params"]),
    "shrunk": condensed.param_nbytes(small.variables["params"]),
  }
  return out, nbytes, small.report


def _time(variants, x, reps):
  ref = np.asarray(jax.block_until_ready(variants["dense"][0](variants["dense"][1], x)))
  inner, err = {}, {}
  for name, (fn, v) in variants.items():
    got = np.asarray(jax.block_until_ready(fn(v, x)))  # compile
    err[name] = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(v, x))
    inner[name] = max(1, int(0.005 / max(time.perf_counter() - t0, 1e-6)))
  times = {name: [] for name in variants}
  for _ in range(reps):
    for name, (fn, v) in variants.items():
      t0 = time.perf_counter()
      for _ in range(inner[name]):
        y = fn(v, x)
      jax.block_until_ready(y)
      times[name].append((time.perf_counter() - t0) / inner[name])
  return {name: statistics.median(t) for name, t in times.items()}, err


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--batches", default="1,128")
  parser.add_argument("--sparsities", default="0.9,0.95,0.99")
  parser.add_argument(
    "--quick", action="store_true", help="the MLP alone at 90%%, batch 1, 3 reps (a smoke test)"
  )
  args = parser.parse_args()
  if args.quick:
    args.reps, args.batches, args.sparsities = 3, "1", "0.9"
  sparsities = [float(s) for s in args.sparsities.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  rng = np.random.default_rng(0)

  print(
    f"CPU: {cpu_model()}  jax {jax.__version__}  device: "
    f"{jax.devices()[0].device_kind}  reps: {args.reps} (medians)"
  )
  mlp = sj.models.get("mlp", num_classes=10, hidden=(1024, 1024))
  resnet = sj.models.get("resnet20", num_classes=10)
  rows = []
  cases = [("mlp", mlp, (28, 28, 1)), ("resnet20", resnet, (32, 32, 3))]
  for name, model, shape in cases[:1] if args.quick else cases:
    for s in sparsities:
      for batch in batches:
        x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
        variants, nbytes, report = _variants(model, x, s)
        t, err = _time(variants, x, args.reps)
        widths = {g: r["after"] for g, r in report["layers"].items()}
        rows.append(
          dict(model=name, batch=batch, sparsity=s, t=t, err=err, nbytes=nbytes, widths=widths)
        )
        print(
          f"  measured {name} batch {batch} sparsity {s}: "
          + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in t.items()),
          flush=True,
        )

  names = ("dense", "bcoo", "condensed", "shrunk")
  print()
  print(
    "| model | batch | sparsity | "
    + " | ".join(f"{n} ms" for n in names)
    + " | bcoo x | condensed x | shrunk x | params kB (dense / bcoo / condensed / "
    "shrunk) | max rel. logit diff |"
  )
  print("|---|---|---|" + "---|" * (len(names) + 5))
  for r in rows:
    t, b = r["t"], r["nbytes"]
    print(
      f"| {r['model']} | {r['batch']} | {r['sparsity']:.2f} | "
      + " | ".join(f"{1e3 * t[n]:.3f}" for n in names)
      + " | "
      + " | ".join(f"{t['dense'] / t[n]:.2f}" for n in names[1:])
      + " | "
      + " / ".join(f"{b[n] / 1e3:.0f}" for n in names)
      + " | "
      + f"{max(v for k, v in r['err'].items() if k != 'dense'):.1e} |"
    )
  print()
  for r in rows:
    if r["model"] == "mlp" or r["batch"] == batches[0]:
      shrunk = {g: w for g, w in r["widths"].items() if "/" not in g}
      print(
        f"shrunk widths, {r['model']} at {r['sparsity']:.0%}: {shrunk}"
        + (
          ""
          if r["model"] == "mlp"
          else f"; block mids {[w for g, w in r['widths'].items() if '/' in g]}"
        )
      )
  first = next(
    (r for r in rows if r["model"] == "mlp" and r["sparsity"] == 0.9 and r["batch"] == 1), rows[0]
  )
  print(f"speedup_vs_dense {first['t']['dense'] / first['t']['condensed']:.2f}")


if __name__ == "__main__":
  main()
