"""ResNet-20 training step on CPU: XLA's default settings vs sparsejax's vs PyTorch.

Usage:
  python benchmarks/cpu_step.py [--batch 128] [--rounds 7] [--steps 3]

Three worker processes, each compiled/warmed up once, then timed interleaved
(round 1: default, sparsejax, torch; round 2: ...), so machine noise hits all
alike; each figure is the median over rounds of the mean step time of
``--steps`` steps.

* ``xla_default``: the jitted train step of ``sparsejax.train`` (forward,
  backward, Nesterov SGD with weight decay, batch-norm statistics, the batch
  gathered on device from a 1,024-image uint8 set), in a process started with
  ``SPARSEJAX_XLA_CPU_DEFAULTS=0``: XLA's own CPU settings and plain
  convolutions.
* ``sparsejax``: the same step with what sparsejax does on CPU
  (``sparsejax/_xla_cpu.py``): the XLA option set by ``import sparsejax`` and
  the models' convolutions with materialised inputs and batch norm as GEMVs
  (applied by ``sparsejax.modeling``).
* ``pytorch``: the same network (CIFAR ResNet-20, option-A-free 1x1
  projection shortcuts with batch norm as in ``sparsejax.models``), eager,
  channels-last, the
  same optimiser, on a fixed float batch; only when ``torch`` is installed
  (``pip install torch``, a benchmark-only extra, never a sparsejax
  dependency).

No augmentation in either (like-for-like compute). Prints the CPU model and
the step times; the last line is
``speedup_vs_xla_default X.XX  ratio_vs_pytorch Y.YY`` (sparsejax's step time
over PyTorch's; ``nan`` without torch). Targets on a 2-core AMD EPYC (Zen 3):
speedup >= 2.5, ratio <= 1.5. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BATCH = 128


def cpu_model() -> str:
  """The CPU's model name (family/model when the name is generic) and cores."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = info.get("model name") or platform.processor() or platform.machine()
  if "cpu family" in info and len(name.split()) <= 3:  # e.g. "AMD EPYC" in a VM
    name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
  flags = info.get("flags", "").split()
  simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
  return f"{name}, {os.cpu_count()} cores" + (f", {simd}" if simd else "")


def alternate_workers(script: str, libs, argv, rounds: int) -> dict:
  """``{lib: [result of each round]}``: runs ``script --worker lib *argv`` for
  each of ``libs`` in turn, ``rounds`` times, one process at a time (no thread
  interference between libraries), JAX on the CPU; a result is the JSON of the
  worker's last line of output. Exits with the worker's stderr if one fails."""
  results = {lib: [] for lib in libs}
  for _ in range(rounds):
    for lib in libs:
      out = subprocess.run(
        [sys.executable, script, "--worker", lib, *argv],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
      )
      if out.returncode:
        sys.exit(f"the {lib} worker failed:\n{out.stderr}")
      results[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
  return results


def jax_versus_torch(script: str, description: str, worker, *, reps: int, rounds: int):
  """The command line of the JAX-versus-PyTorch diagnostics (``cpu_convs.py``,
  ``cpu_step_parts.py``): ``--batch``, ``--reps`` (default ``reps``),
  ``--rounds`` (default ``rounds``).

  In a worker process (``--worker jax|torch``) prints the JSON of
  ``worker(lib, batch, reps)`` (a flat ``{key: ms}``) and exits. Otherwise
  runs both workers alternately (:func:`alternate_workers`) and returns
  ``(args, {lib: {key: median over rounds}})``; exits with a hint when torch
  is missing.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--reps", type=int, default=reps)
  parser.add_argument("--rounds", type=int, default=rounds)
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.batch, args.reps)))
    sys.exit(0)
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit(f"benchmarks/{os.path.basename(script)} needs torch: pip install -e '.[bench]'")
  runs = alternate_workers(
    script, ("jax", "torch"), ("--batch", str(args.batch), "--reps", str(args.reps)), args.rounds
  )
  return args, {
    lib: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for lib, rs in runs.items()
  }


def jax_worker(batch: int, model=None, *, loss_fn=None, scalars=None):
  """Returns ``run(k) -> seconds per step`` for sparsejax.train's step.

  ``model`` defaults to the sparsejax ResNet-20 (10 classes); ``loss_fn`` and
  ``scalars`` are passed to ``sparsejax.train.make_train_step``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import sparsejax as sj  # pylint: disable=g-import-not-at-top

  if model is None:
    model = sj.models.get("resnet20", num_classes=10)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
  mesh = sj.mesh.make_mesh(1)
  rng = np.random.default_rng(0)
  images = sj.mesh.put_replicated(rng.integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8), mesh)
  labels = sj.mesh.put_replicated(rng.integers(0, 10, (1024,)).astype(np.int32), mesh)
  sample = jax.numpy.zeros((1, 32, 32, 3))
  state = sj.state.create_train_state(model, tx, sample, jax.random.key(0))
  train_carry = sj.mesh.put_replicated(sj.train.init_carry(state), mesh)
  step = sj.train.make_train_step(
    model,
    mesh=mesh,
    batch_size=batch,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    loss_fn=loss_fn,
    scalars=scalars,
  )
  perm = jax.numpy.arange(1024)
  carry = [train_carry, 0]

  def run(k: int) -> float:
    train_carry, i = carry
    t0 = time.perf_counter()
    for _ in range(k):
      train_carry, _ = step(train_carry, images, labels, perm, i % (1024 // batch))
      i += 1
    jax.block_until_ready(train_carry)
    carry[:] = [train_carry, i]
    return (time.perf_counter() - t0) / k

  return run


def torch_resnet20():
  """The PyTorch twin of ``sparsejax.models`` ResNet-20, channels-last."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.b1 = nn.BatchNorm2d(cout)
      self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b2 = nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
      return F.relu(out + (x if self.proj is None else self.proj(x)))

  class ResNet20(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
      )
      blocks, cin = [], 16
      for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
          blocks.append(Block(cin, cout, stride if i == 0 else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, 10)

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

  torch.manual_seed(0)
  return ResNet20().to(memory_format=torch.channels_last)


def torch_worker(batch: int):
  """Returns ``run(k) -> seconds per step`` for the PyTorch eager step."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = torch_resnet20()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
  x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,))

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      opt.zero_grad(set_to_none=True)
      F.cross_entropy(model(x), y).backward()
      opt.step()
    return (time.perf_counter() - t0) / k

  return run


def serve(kind: str, batch: int):
  """Worker loop: warm up, then answer each ``k`` on stdin with a time."""
  run = jax_worker(batch) if kind == "jax" else torch_worker(batch)
  run(2)  # compile / warm up
  print("ready", flush=True)
  for line in sys.stdin:
    print(f"{run(int(line)):.6f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=BATCH)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return serve(args.worker, args.batch)

  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

    have_torch = True
  except ImportError:
    have_torch = False
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if os.environ.get("XLA_FLAGS"):
    sys.exit("benchmarks/cpu_step.py compares XLA settings: unset XLA_FLAGS first")
  envs = {
    "xla_default": dict(base, SPARSEJAX_XLA_CPU_DEFAULTS="0"),
    "sparsejax": dict(base, SPARSEJAX_XLA_CPU_DEFAULTS="1"),
  }
  if have_torch:
    envs["pytorch"] = base
  workers = {}
  for name, env in envs.items():
    kind = "torch" if name == "pytorch" else "jax"
    workers[name] = subprocess.Popen(
      [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )
  try:
    for name, proc in workers.items():  # compile one at a time, then time
      if proc.stdout.readline().strip() != "ready":
        sys.exit(f"worker {name} failed to start")
    times = {name: [] for name in workers}
    for _ in range(args.rounds):
      for name, proc in workers.items():
        proc.stdin.write(f"{args.steps}\n")
        proc.stdin.flush()
        times[name].append(float(proc.stdout.readline()))
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()

  med = {name: statistics.median(t) for name, t in times.items()}
  print(f"cpu: {cpu_model()}")
  print(
    f"ResNet-20 train step, batch {args.batch}, median of {args.rounds} "
    f"interleaved rounds of {args.steps} steps"
  )
  for name, t in med.items():
    print(f"  {name:12s} {t * 1e3:8.1f} ms/step")
  speedup = med["xla_default"] / med["sparsejax"]
  ratio = med["sparsejax"] / med["pytorch"] if have_torch else float("nan")
  print(f"speedup_vs_xla_default {speedup:.2f}  ratio_vs_pytorch {ratio:.2f}")


if __name__ == "__main__":
  main()
