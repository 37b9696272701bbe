"""Cost of the masked optimiser: masked vs dense train step, measured in one run.

Usage:
  python benchmarks/step_overhead.py [--model resnet20] [--batch 128] [--reps 30]

Builds the same jitted train step (forward, backward, SGD-momentum with weight
decay, apply) twice: with ``optax`` alone and with ``sparsejax.optim.sparse``
around it at 90% sparsity. The two are timed interleaved (dense, masked, dense,
...) after compilation so that machine noise hits both alike, and the script
prints the median step-time ratio masked / dense. Target: at most 1.03.
"""

import argparse
import statistics
import time

import jax
import optax

import sparsejax as sj


def make_step(model, tx):

  def loss_fn(params, batch_stats, x, y):
    logits, new_state = sj.modeling.apply_model(
      model, {"params": params, "batch_stats": batch_stats}, x, train=True
    )
    loss = sj.losses.cross_entropy(logits, y).mean()
    return loss, new_state["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--sparsity", type=float, default=0.9)
  args = parser.parse_args()

  model = sj.models.get(args.model, num_classes=10)
  key = jax.random.key(0)
  x = jax.random.normal(key, (args.batch, 32, 32, 3))
  y = jax.random.randint(key, (args.batch,), 0, 10)
  variables = model.init(key, x[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  mask = sj.masks.topk_mask(
    jax.tree.map(lambda p: jax.random.normal(key, p.shape), params), args.sparsity
  )

  def inner():
    return optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

  runs = {}
  for name, tx, p0 in (
    ("dense", inner(), params),
    ("masked", sj.optim.sparse(inner(), mask), sj.masks.apply(params, mask)),
  ):
    step = make_step(model, tx)
    carry = (p0, batch_stats, tx.init(p0))
    out = step(*carry, x, y)  # compile
    jax.block_until_ready(out)
    runs[name] = [step, out[:3], []]

  for _ in range(args.reps):
    for name in ("dense", "masked"):
      step, carry, times = runs[name]
      t0 = time.perf_counter()
      out = step(*carry, x, y)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
      runs[name][1] = out[:3]

  dense = statistics.median(runs["dense"][2])
  masked = statistics.median(runs["masked"][2])
  print(
    f"device: {jax.devices()[0].device_kind}  model: {args.model}  "
    f"batch: {args.batch}  sparsity: {args.sparsity}  reps: {args.reps}"
  )
  print(f"dense step   median {dense * 1e3:8.2f} ms")
  print(f"masked step  median {masked * 1e3:8.2f} ms")
  ratio = masked / dense
  print(
    f"ratio masked/dense: {ratio:.3f}  (target <= 1.03: {'met' if ratio <= 1.03 else 'NOT met'})"
  )


if __name__ == "__main__":
  main()
