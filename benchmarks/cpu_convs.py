"""Where the CPU gap to PyTorch is: ResNet-20's convolutions, one by one.

Usage:
  python benchmarks/cpu_convs.py [--batch 128] [--reps 15] [--rounds 2]

``benchmarks/cpu_step.py`` times the whole training step. This script times
each convolution shape of a CIFAR ResNet-20 (batch 128, NHWC / channels-last)
on its own, in JAX with sparsejax's CPU settings (``import sparsejax`` first)
and in PyTorch eager, so that the part of the step's gap that lies in the
convolutions can be told from the rest (batch norm, ReLU, the optimiser):

* ``fwd``: the convolution;
* ``dx``: its input gradient (``jax.vjp`` w.r.t. the input; PyTorch's
  ``torch.nn.grad.conv2d_input``); not for the stem, whose input needs none;
* ``dw``: its kernel gradient (``jax.vjp`` w.r.t. the kernel; PyTorch's
  ``torch.nn.grad.conv2d_weight``).

A JAX figure is the whole compiled program: the convolution and the layout
copies XLA:CPU puts around it (for ``dw``: the input to ``[C, H, W, N]``, the
output gradient to ``[H, W, N, C]``), as in the training step.

Each library runs in its own process, one process at a time (both
libraries' worker threads spin for a while after a call, which slows the
other down when they share a process), ``--rounds`` times alternately; each
figure is the median over rounds of the median of ``--reps`` calls.
``total`` weighs each shape by how often ResNet-20 has it. Prints the CPU
model; the last line is ``conv_ratio_vs_pytorch X.XX  conv_ms_per_step Y.Y``
(JAX's total over PyTorch's, and JAX's total in ms). Needs ``torch`` (the
``bench`` extra). Not run in CI.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_step import cpu_model  # noqa: E402
from cpu_step import jax_versus_torch  # noqa: E402
import jax  # noqa: E402
from jax import lax  # noqa: E402

import sparsejax  # noqa: E402,F401  pylint: disable=unused-import,g-bad-import-order

# (count in ResNet-20, spatial size, in channels, out channels, kernel, stride,
#  whether the input needs a gradient: not the stem's, the image)
SHAPES = (
  (1, 32, 3, 16, 3, 1, False),  # stem
  (6, 32, 16, 16, 3, 1, True),  # stage 1
  (1, 32, 16, 32, 3, 2, True),  # stage 2, first conv
  (1, 32, 16, 32, 1, 2, True),  # stage 2, projection shortcut
  (5, 16, 32, 32, 3, 1, True),  # stage 2
  (1, 16, 32, 64, 3, 2, True),  # stage 3, first conv
  (1, 16, 32, 64, 1, 2, True),  # stage 3, projection shortcut
  (5, 8, 64, 64, 3, 1, True),  # stage 3
)
PARTS = ("fwd", "dx", "dw")


def jax_ops(batch, size, cin, cout, k, stride):
  """``{part: () -> None}`` for one JAX convolution shape (jitted, warmed up)."""
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (batch, size, size, cin))
  w = jax.random.normal(key_w, (k, k, cin, cout))
  pad = ((k // 2, k // 2),) * 2  # PyTorch's padding, for like-for-like shapes

  def conv(x, w):
    return lax.conv_general_dilated(
      x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  g = jax.random.normal(key_x, conv(x, w).shape)
  fns = {
    "fwd": jax.jit(conv),
    "dx": jax.jit(lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0]),
    "dw": jax.jit(lambda x, w, g: jax.vjp(lambda b: conv(x, b), w)[1](g)[0]),
  }
  args = {"fwd": (x, w), "dx": (x, w, g), "dw": (x, w, g)}
  ops = {}
  for part, fn in fns.items():
    fn(*args[part]).block_until_ready()
    ops[part] = lambda fn=fn, a=args[part]: fn(*a).block_until_ready()
  return ops


def torch_ops(batch, size, cin, cout, k, stride):
  """``{part: () -> None}`` for the same shape in PyTorch eager, channels-last."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import grad as nn_grad  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  cl = torch.channels_last
  x = torch.randn(batch, cin, size, size).to(memory_format=cl)
  w = torch.randn(cout, cin, k, k).to(memory_format=cl)
  with torch.no_grad():
    g = torch.randn_like(F.conv2d(x, w, stride=stride, padding=k // 2))
  g = g.to(memory_format=cl)

  def fwd():
    with torch.no_grad():
      F.conv2d(x, w, stride=stride, padding=k // 2)

  def dx():
    nn_grad.conv2d_input(x.shape, w, g, stride=stride, padding=k // 2)

  def dw():
    nn_grad.conv2d_weight(x, w.shape, g, stride=stride, padding=k // 2)

  ops = {"fwd": fwd, "dx": dx, "dw": dw}
  for op in ops.values():
    op()
  return ops


def timed(op) -> float:
  t0 = time.perf_counter()
  op()
  return time.perf_counter() - t0


def worker(lib: str, batch: int, reps: int) -> dict:
  """``{"count size cin cout k stride part": ms}``: medians of ``reps`` calls."""
  make = jax_ops if lib == "jax" else torch_ops
  if lib == "torch":
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(len(os.sched_getaffinity(0)))
  out = {}
  for count, size, cin, cout, k, stride, with_dx in SHAPES:
    ops = make(batch, size, cin, cout, k, stride)
    for part in PARTS if with_dx else ("fwd", "dw"):
      out[f"{count} {size} {cin} {cout} {k} {stride} {part}"] = 1e3 * statistics.median(
        timed(ops[part]) for _ in range(reps)
      )
  return out


def main():
  args, med = jax_versus_torch(__file__, __doc__.splitlines()[0], worker, reps=15, rounds=2)

  print(f"cpu: {cpu_model()}")
  print(
    f"ResNet-20 convolutions, batch {args.batch}, NHWC / channels-last, ms: "
    f"median over {args.rounds} alternating runs of the median of {args.reps} calls"
  )
  print(f"  {'count x shape':28s}" + "".join(f"{p + ' jax':>9s}{p + ' torch':>10s}" for p in PARTS))
  totals = {"jax": 0.0, "torch": 0.0}
  for count, size, cin, cout, k, stride, _ in SHAPES:
    row = f"  {f'{count} x {size}x{size}x{cin}->{cout} k{k} s{stride}':28s}"
    for part in PARTS:
      key = f"{count} {size} {cin} {cout} {k} {stride} {part}"
      if key not in med["jax"]:
        row += f"{'-':>9s}{'-':>10s}"
        continue
      row += f"{med['jax'][key]:9.2f}{med['torch'][key]:10.2f}"
      for lib in totals:
        totals[lib] += count * med[lib][key]
    print(row)
  print(f"  total per step: jax {totals['jax']:.1f} ms, torch {totals['torch']:.1f} ms")
  print(
    f"conv_ratio_vs_pytorch {totals['jax'] / totals['torch']:.2f}  "
    f"conv_ms_per_step {totals['jax']:.1f}"
  )


if __name__ == "__main__":
  main()
