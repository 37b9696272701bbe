"""Gradient error of bfloat16 mixed precision against float32, on one batch.

Usage:
  python benchmarks/bf16_gradient.py [--model resnet20] [--batch 128] [--seeds 3]

For each seed: one He-initialised model, one batch of standard-normal
CIFAR-shaped images (what the normalised inputs look like) with random
labels, and the training gradient (batch norm in training mode, mean
cross-entropy) of the same float32 parameters computed twice: with the
model's ``dtype=jnp.float32`` and with ``dtype=jnp.bfloat16`` (float32
parameters, batch-norm statistics, logits and loss; ``config.dtype`` of the
runners). Prints the relative error ``|g_bf16 - g_f32| / |g_f32|`` of the
whole gradient (global norms), its cosine with the float32 gradient, the
worst per-tensor relative error, and the CPU.
"""

import argparse
import platform
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def gradient(model, variables, x, y):
  def loss(params):
    logits, _ = sj.modeling.apply_model(model, {**variables, "params": params}, x, train=True)
    return sj.losses.cross_entropy(logits, y).mean()

  return jax.jit(jax.grad(loss))(variables["params"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args()
  f32 = sj.models.get(args.model, 10)
  bf16 = sj.models.get(args.model, 10, dtype=jnp.bfloat16)
  for seed in range(args.seeds):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    variables = sj.state.init_variables(f32, x[:1], jax.random.key(seed))
    g32 = gradient(f32, variables, x, y)
    g16 = gradient(bf16, variables, x, y)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    a = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])
    b = jnp.concatenate([g.ravel() for g in jax.tree.leaves(g16)])
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    worst = max(
      float(jnp.linalg.norm(q - p) / jnp.linalg.norm(p))
      for p, q in zip(jax.tree.leaves(g32), jax.tree.leaves(g16))
      if float(jnp.linalg.norm(p)) > 0
    )
    print(f"seed {seed}: relative error {rel:.4f}, cosine {cos:.6f}, worst tensor {worst:.4f}")
  print(
    f"{args.model}, batch {args.batch}, jax {jax.__version__}, "
    f"{jax.default_backend()}: {cpu_name()}, {jax.device_count()} device(s)"
  )


if __name__ == "__main__":
  main()
