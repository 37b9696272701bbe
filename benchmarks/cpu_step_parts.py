"""Where the CPU gap to PyTorch is, inside the ResNet-20 training gradient.

Usage:
  python benchmarks/cpu_step_parts.py [--batch 128] [--reps 9] [--rounds 3]

``benchmarks/cpu_convs.py`` times each convolution on its own. This script
splits the whole training gradient (forward in training mode, cross-entropy,
backward) of the same network, in place, by what each run leaves out:

* ``forward``: the loss alone (JAX: a jitted forward; PyTorch: under
  ``torch.no_grad()``, so that neither keeps residuals for a backward pass);
* ``backward without kernel gradients``: the gradient with every
  convolution kernel held fixed (JAX: ``lax.stop_gradient`` on the 4-D
  params; PyTorch: ``requires_grad_(False)`` on the ``Conv2d`` weights), minus
  ``forward``;
* ``kernel gradients``: the full gradient minus the one without kernel
  gradients, i.e. what the convolutions' kernel gradients cost in the step.

JAX runs with sparsejax's CPU settings (``import sparsejax``; the models'
convolutions and batch norm as ``sparsejax.modeling.apply_model`` applies them), PyTorch eager channels-last, each library in
its own process, one at a time, ``--rounds`` times alternately; a figure is
the median over rounds of the median of ``--reps`` calls. Prints the CPU
model; the last line is
``ratio_forward X.XX  ratio_backward_rest Y.YY  ratio_kernel_gradients Z.ZZ``
(JAX's time over PyTorch's for each part). Needs ``torch`` (the ``bench``
extra). Not run in CI.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_step import cpu_model  # noqa: E402
from cpu_step import jax_versus_torch  # noqa: E402
from cpu_step import torch_resnet20  # noqa: E402


def jax_runs(batch: int) -> dict:
  """``{run: callable}`` for the sparsejax ResNet-20: ``"full"`` (the gradient),
  ``"frozen"`` (the gradient with the convolution kernels held fixed) and
  ``"forward"`` (the loss alone)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import sparsejax as sj  # pylint: disable=g-import-not-at-top

  model = sj.models.get("resnet20", num_classes=10)
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.standard_normal((batch, 32, 32, 3)), jax.numpy.float32)
  y = jax.numpy.asarray(rng.integers(0, 10, (batch,)), jax.numpy.int32)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  params, stats = variables["params"], variables["batch_stats"]

  def loss(p, frozen: bool):
    if frozen:  # no kernel gradient for any convolution
      p = jax.tree.map(lambda a: jax.lax.stop_gradient(a) if a.ndim == 4 else a, p)
    logits, _ = sj.modeling.apply_model(model, {"params": p, "batch_stats": stats}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  fns = {
    "full": jax.jit(lambda p: jax.grad(loss)(p, False)),
    "frozen": jax.jit(lambda p: jax.grad(loss)(p, True)),
    "forward": jax.jit(lambda p: loss(p, False)),
  }
  return {name: (lambda f=f: jax.block_until_ready(f(params))) for name, f in fns.items()}


def torch_runs(batch: int) -> dict:
  """The same three runs in PyTorch eager."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = torch_resnet20()
  x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))
  convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

  def gradient(frozen: bool):
    for w in convs:
      w.requires_grad_(not frozen)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()

  def forward():
    with torch.no_grad():
      F.cross_entropy(model(x), y)

  return {"full": lambda: gradient(False), "frozen": lambda: gradient(True), "forward": forward}


def worker(lib: str, batch: int, reps: int) -> dict:
  """``{run: ms}``: medians of ``reps`` calls after two warm-up calls."""
  runs = jax_runs(batch) if lib == "jax" else torch_runs(batch)
  out = {}
  for name, run in runs.items():
    run()
    run()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    out[name] = 1e3 * statistics.median(times)
  return out


def main():
  args, med = jax_versus_torch(__file__, __doc__.splitlines()[0], worker, reps=9, rounds=3)
  parts = {
    lib: {
      "forward": m["forward"],
      "backward without kernel gradients": m["frozen"] - m["forward"],
      "kernel gradients": m["full"] - m["frozen"],
      "whole gradient": m["full"],
    }
    for lib, m in med.items()
  }

  print(f"cpu: {cpu_model()}")
  print(
    f"ResNet-20 training gradient, batch {args.batch}, ms: median over "
    f"{args.rounds} alternating runs of the median of {args.reps} calls"
  )
  print(f"  {'part':36s}{'jax':>9s}{'torch':>9s}{'gap':>9s}{'ratio':>8s}")
  for part in parts["jax"]:
    j, t = parts["jax"][part], parts["torch"][part]
    print(f"  {part:36s}{j:9.1f}{t:9.1f}{j - t:9.1f}{j / t:8.2f}")
  ratio = {part: parts["jax"][part] / parts["torch"][part] for part in parts["jax"]}
  print(
    f"ratio_forward {ratio['forward']:.2f}  "
    f"ratio_backward_rest {ratio['backward without kernel gradients']:.2f}  "
    f"ratio_kernel_gradients {ratio['kernel gradients']:.2f}"
  )


if __name__ == "__main__":
  main()
