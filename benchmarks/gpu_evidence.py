"""The accelerator evidence in one deadline-aware run, on a bare GPU machine.

Usage (from the repository root, no install, no network)::

  PYTHONPATH=. python benchmarks/gpu_evidence.py \\
      --data shared_data/cifar10-jpeg.tar.gz --out $OUT [--budget 480]
  PYTHONPATH=. python benchmarks/gpu_evidence.py --quick --out /tmp/ev   # CPU, < 1 min

Needs only jax, flax, optax, orbax-checkpoint, chex, numpy and tqdm (what
``import sparsejax`` needs). Pillow reads the JPEG archive and PyTorch gives
the comparison step; both are imported only where used, and a figure that
needs a missing one is recorded as skipped. TensorBoard is off
(``fit(config with tensorboard=False)``), so tensorboardX is never imported.

``--data`` is either a directory that :func:`sparsejax.data.load` reads
(``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` inside, or the
extracted folder itself), the official ``cifar-10-python.tar.gz``, or the
JPEG archive ``cifar10-jpeg.tar.gz`` of the shared data folder
(``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``), decoded here in
memory. Without ``--data`` the real run trains on random images (said so in
its line).

Every figure is one JSON line, appended to ``--out`` (a ``.jsonl`` file, or a
directory that gets ``evidence.jsonl``), flushed at once and echoed to stdout,
so a run cut short still reports everything measured so far. Each line has
``section``, ``figure`` and ``t`` (seconds since the start), then either its
numbers, ``"skipped": reason`` or ``"error": message``. Before a figure starts
its cost is estimated from the dense step's compile and step times; what
would not fit in the ``--budget`` seconds left is recorded as
``"skipped": "budget"`` (the figures before the real run also leave it and the
vmap section the time they need), and a watchdog ends the run at the deadline
whatever is running, after a last line ``{"figure": "end", "stopped":
"budget"}`` (``"done"`` when everything ran). In order:

1. ``versions``: jax, jaxlib and library versions, backend, device kind and
   count, CPU name.
2. ``train_step``: compile seconds (first call less one step), ms/step and
   img/s of the train step :func:`sparsejax.train.fit` runs
   (:func:`sparsejax.train.make_train_step`: batch gathered on device from a
   uint8 set, crop and flip, SGD momentum with weight decay) on ResNet-20 at
   batch 128: ``dense``; ``masked`` (:func:`sparsejax.optim.sparse`, 90% ERK);
   ``rigl`` (:func:`sparsejax.dst.rigl_optimizer` at ΔT = 100: the step without a mask
   update and the update step timed apart, amortised as (99 · plain +
   update) / 100); ``bf16`` (the dense step of the model built with
   ``dtype=jnp.bfloat16``).
3. ``pytorch``: the PyTorch twin of ResNet-20 (``cpu_step.torch_resnet20``,
   channels-last, the same optimiser, a fixed float batch) in a subprocess on
   the same device, float32 and bf16 autocast, and JAX's time over it.
4. ``scoring``: SNIP and GraSP per training gradient; 100 SynFlow rounds fused
   in one program against one jitted call per round (as
   ``scoring_cost.py``).
5. ``tost``: ToST's ``ghost`` step against the plain one (as
   ``tost_step.py``).
6. ``real_run``: ResNet-20 on CIFAR-10 through ``fit``, SNIP at 90%, the
   SPEC §8 schedule (160 epochs, SGD momentum 0.9, lr 0.1 × 0.1 at epochs 80
   and 120, batch 128, weight decay 1e-4, crop and flip), stopped and
   checkpointed at the deadline (a rerun with the same ``--workdir``
   resumes it): epochs done, test accuracy so far, projected full-run time.
7. ``vmap``: K = 1, 4, 8 masked runs as one vmapped program (params,
   optimiser state and mask batched, the same batch) against the K runs
   stepped one after another: img/s of each.

``--quick`` runs the same code on the CPU in one to two minutes: a ResNet of one
4-filter block at batch 16, few steps, a real run of two epochs on 256
random images, a 120 s budget; the test suite's check of this script
(``tests/test_gpu_evidence.py``). The last line printed
is ``masked_vs_dense X.XX  rigl_vs_masked X.XX  jax_vs_torch X.XX
vmap8_vs_sequential X.XX`` (time ratios, the last one img/s of the vmapped
program over the sequential runs; ``nan`` where not measured).
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, before the imports

# pylint: disable=g-import-not-at-top,g-bad-import-order
import argparse
from collections.abc import Callable
from concurrent import futures
import contextlib
import dataclasses
import functools
from importlib import metadata
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cpu_step import cpu_model  # stdlib only at its module level
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj

INPUT_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)
#: SPEC §8 (GraSP protocol: decays at 50% and 75%) for ResNet on CIFAR-10.
SPEC8_CONFIG = dict(
  num_epochs=160,
  batch_size=128,
  learning_rate=0.1,
  lr_schedule="multistep",
  lr_decay_epochs=(80, 120),
  lr_decay_factor=0.1,
  momentum=0.9,
  nesterov=False,
  weight_decay=1e-4,
  seed=0,
)
SPARSITY = 0.9
VMAP_KS = (1, 4, 8)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What a run measures: the full evidence run or ``--quick``."""

  model_kwargs: dict
  model_label: str
  batch: int
  steps: int  # steps per timed round
  rounds: int  # median over this many rounds
  images: int  # size of the uint8 set the timed steps gather from
  per_class: int  # scoring images per class
  synflow_rounds: int
  score_repeats: int
  synthetic_train: int  # real run without --data
  synthetic_test: int
  compile_prior: float  # compile seconds assumed before one is measured
  step_prior: float
  real_run_epochs: int | None  # stop the real run after this many epochs


FULL = Sizes(
  model_kwargs={},
  model_label="resnet20",
  batch=128,
  steps=20,
  rounds=5,
  images=1024,
  per_class=10,
  synflow_rounds=100,
  score_repeats=5,
  synthetic_train=50_000,
  synthetic_test=10_000,
  compile_prior=30.0,
  step_prior=0.05,
  real_run_epochs=None,
)
QUICK = Sizes(
  model_kwargs=dict(stage_sizes=(1,), num_filters=4),
  model_label="ResNet of one 4-filter block (quick)",
  batch=16,
  steps=2,
  rounds=2,
  images=64,
  per_class=1,
  synflow_rounds=4,
  score_repeats=1,
  synthetic_train=256,
  synthetic_test=64,
  compile_prior=3.0,
  step_prior=0.02,
  real_run_epochs=2,
)


# ----------------------------------------------------------------------------
# The evidence file and the budget
# ----------------------------------------------------------------------------


class Evidence:
  """The JSON-lines record of a run, its budget and its watchdog.

  :meth:`figure` runs one measurement if its estimated cost fits in the time
  left, and writes its line (numbers, ``skipped`` or ``error``). At the
  deadline the watchdog thread writes the ``end`` line and ends the process,
  whatever the main thread is doing (a compilation that takes longer than
  estimated cannot overrun the budget).
  """

  def __init__(self, path: str, budget: float, argv_summary: dict):
    self.path = path
    self.budget = float(budget)
    # Room to write the last line and exit before the budget is up.
    margin = min(5.0, max(0.5, 0.02 * self.budget))
    self.deadline = START + self.budget - margin
    self.results: dict[str, dict] = {}
    self.skipped: list[str] = []
    self.current = "start"
    #: Seconds the later sections need (the real run and the vmapped runs),
    #: kept free by the figures before them.
    self.reserve: Callable[[], float] = lambda: 0.0
    self._lock = threading.Lock()
    self._file = open(path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    self._ended = False
    self.write({"section": "run", "figure": "args", **argv_summary})
    watchdog = threading.Thread(target=self._watch, daemon=True)
    watchdog.start()

  def elapsed(self) -> float:
    return time.monotonic() - START

  def left(self) -> float:
    """Seconds until the deadline."""
    return self.deadline - time.monotonic()

  def write(self, record: dict) -> None:
    """Appends ``record`` (plus ``t``) as one flushed line, echoed to stdout."""
    with self._lock:
      self._write(record)

  def _write(self, record: dict) -> None:
    if self._ended:
      return
    line = json.dumps(_json_safe(dict(record, t=round(self.elapsed(), 3))))
    self._file.write(line + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    print(line, flush=True)

  def figure(
    self, section: str, name: str, need: float, fn: Callable[[], dict], *, reserve: bool = True
  ) -> dict | None:
    """Runs ``fn() -> {numbers}`` if ``need`` seconds are left; writes its line.

    With ``reserve``, the seconds :attr:`reserve` says the later sections
    need are not counted as left. Returns the numbers, or ``None`` when
    skipped or failed.
    """
    head = {"section": section, "figure": name}
    reserved = self.reserve() if reserve else 0.0
    if self.left() - reserved < need:
      self.skipped.append(name)
      self.write(
        {
          **head,
          "skipped": "budget",
          "needed_s": round(need, 1),
          "left_s": round(self.left(), 1),
          "reserved_s": round(reserved, 1),
        }
      )
      return None
    self.current = name
    t0 = time.monotonic()
    try:
      numbers = fn()
    except Exception as e:  # pylint: disable=broad-except
      last = traceback.format_exception_only(type(e), e)[-1].strip()
      self.write({**head, "error": last[:2000], "seconds": round(time.monotonic() - t0, 2)})
      return None
    if "skipped" not in numbers:
      numbers = dict(numbers, seconds=round(time.monotonic() - t0, 2))
    self.write({**head, **numbers})
    if "skipped" in numbers:
      return None
    self.results[name] = numbers
    return numbers

  def end(self, stopped: str, during: str | None = None) -> None:
    """Writes the ``end`` line and prints the summary line (once).

    ``stopped``: ``"done"``, ``"budget"`` (figures skipped, or the deadline)
    or a signal's name; ``during``: the figure cut short, if one was.
    """
    with self._lock:
      if self._ended:
        return
      self._write(
        {
          "section": "end",
          "figure": "end",
          "stopped": stopped,
          "during": during,
          "skipped_for_budget": self.skipped,
          "elapsed_s": round(self.elapsed(), 2),
          "budget_s": self.budget,
        }
      )
      self._ended = True
      self._file.close()
      print(summary_line(self.results), flush=True)

  def _watch(self) -> None:
    while True:
      left = self.left()
      if left <= 0:
        break
      time.sleep(min(left, 0.25))
    if not self._ended:
      self.end("budget", during=self.current)
      os._exit(0)  # pylint: disable=protected-access


def _json_safe(value):
  """NaN and infinities as ``None`` (strict JSON), numpy scalars as numbers."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def summary_line(results: dict[str, dict]) -> str:
  """The last line: the run's main ratios, ``nan`` where not measured."""

  def get(figure, key):
    value = results.get(figure, {}).get(key)
    return float("nan") if value is None else float(value)

  return (
    f"masked_vs_dense {get('masked', 'vs_dense'):.2f}  "
    f"rigl_vs_masked {get('rigl', 'amortised_vs_masked'):.2f}  "
    f"jax_vs_torch {get('torch_f32', 'jax_over_torch'):.2f}  "
    f"vmap8_vs_sequential {get('vmap_k8', 'vmap_over_sequential'):.2f}"
  )


class Costs:
  """Estimated seconds of a figure, from the dense step's measured figures."""

  def __init__(self, sizes: Sizes):
    self.compile = sizes.compile_prior
    self.step = sizes.step_prior
    self.timed_steps = sizes.steps * sizes.rounds + 1
    self.calibrated = False  # the priors until the dense step is measured

  def measured(self, compile_s: float, step_s: float) -> None:
    self.compile, self.step = max(compile_s, 0.05), max(step_s, 1e-4)
    self.calibrated = True

  def of(self, compiles: float, steps: float, fixed: float = 0.0, slack: float = 1.3) -> float:
    """``compiles`` compilations and ``steps`` steps, times ``slack``."""
    return slack * (compiles * self.compile + steps * self.step) + fixed


# ----------------------------------------------------------------------------
# Timed train steps (the program fit runs)
# ----------------------------------------------------------------------------


@functools.cache
def base_optimizer():
  """The SPEC §8 optimiser (:func:`sparsejax.schedules.make_optimizer`), one
  object for every timed step: its state's initialisation compiles once."""
  return spec8_optimizer(390)


def spec8_optimizer(steps_per_epoch: int):
  """The SPEC §8 optimiser of :data:`SPEC8_CONFIG` with ``steps_per_epoch``."""
  c = SPEC8_CONFIG
  lr = sj.schedules.lr_schedule(
    c["learning_rate"],
    num_epochs=c["num_epochs"],
    steps_per_epoch=steps_per_epoch,
    kind=c["lr_schedule"],
    decay_epochs=c["lr_decay_epochs"],
    decay_factor=c["lr_decay_factor"],
  )
  return sj.schedules.make_optimizer(
    lr, momentum=c["momentum"], nesterov=c["nesterov"], weight_decay=c["weight_decay"]
  )


def step_images(sizes: Sizes, mesh):
  """A device-resident random ``uint8`` set and its labels (for timing)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (sizes.images, *INPUT_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 10, (sizes.images,)).astype(np.int32)
  return (sj.mesh.put_replicated(images, mesh), sj.mesh.put_replicated(labels, mesh))


def random_mask(model, seed: int = 1):
  """A random mask keeping 10% of every prunable kernel of ``model``.

  Drawn with numpy: a step's cost does not depend on which weights are kept,
  and this compiles nothing (:func:`sparsejax.masks.random_mask`'s exact
  per-layer top-k compiles for tens of seconds on a small CPU).
  """
  params = jax.eval_shape(
    sj.state.init_variables, model, jnp.zeros((1, *INPUT_SHAPE)), jax.random.key(0)
  )["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p, prunable: (rng.random(p.shape) >= SPARSITY) if prunable else np.ones(p.shape, bool),
    params,
    sj.masks.prunable_tree(params),
  )


class StepRunner:
  """``run(k) -> seconds per step`` of fit's train step on a device set."""

  def __init__(
    self,
    model,
    tx,
    *,
    sizes: Sizes,
    mesh,
    data,
    mask=None,
    loss_fn=None,
    scalars=None,
    seed: int = 0,
    state=None,
  ):
    self.images, self.labels = data
    self.batches = sizes.images // sizes.batch
    if state is None:
      state = sj.state.create_train_state(
        model, tx, jnp.zeros((1, *INPUT_SHAPE)), jax.random.key(seed), mask=mask
      )
    self.carry = sj.mesh.put_replicated(sj.train.init_carry(state), mesh)
    self.step_fn = sj.train.make_train_step(
      model,
      mesh=mesh,
      batch_size=sizes.batch,
      mean=(0.49, 0.48, 0.45),
      std=(0.25, 0.24, 0.26),
      augment=True,
      loss_fn=loss_fn,
      scalars=scalars,
    )
    self.perm = sj.mesh.put_replicated(np.arange(sizes.images), mesh)
    self.i = 0

  def run(self, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      self.carry, _ = self.step_fn(
        self.carry, self.images, self.labels, self.perm, self.i % self.batches
      )
      self.i += 1
    jax.block_until_ready(self.carry)
    return (time.perf_counter() - t0) / k


def time_runner(run: Callable[[int], float], sizes: Sizes, images_per_step: int) -> dict:
  """Compile seconds (first call less one step), median ms/step, img/s."""
  first = run(1)
  per_step = statistics.median(run(sizes.steps) for _ in range(sizes.rounds))
  return {
    "compile_s": round(max(first - per_step, 0.0), 3),
    "ms_per_step": round(per_step * 1e3, 3),
    "img_per_s": round(images_per_step / per_step, 1),
  }


def train_step_figures(ev: Evidence, sizes: Sizes, costs: Costs, mesh, data):
  """Section 2: dense, masked, RigL (amortised) and bf16 train steps."""
  model = sj.models.get("resnet20", 10, **sizes.model_kwargs)
  mask = random_mask(model)
  common = dict(sizes=sizes, mesh=mesh, data=data)
  base = {"model": sizes.model_label, "batch": sizes.batch}

  def dense():
    out = time_runner(StepRunner(model, base_optimizer(), **common).run, sizes, sizes.batch)
    costs.measured(out["compile_s"], out["ms_per_step"] / 1e3)
    return {**base, **out}

  def masked():
    out = time_runner(
      StepRunner(model, base_optimizer(), mask=mask, **common).run, sizes, sizes.batch
    )
    return {
      **base,
      "sparsity": SPARSITY,
      "mask": "random, per layer",
      **out,
      "vs_dense": _ratio(out, ev.results.get("dense")),
    }

  def rigl():
    # start_step far away: every timed step takes the branch without a mask
    # update; update_every=1 from step 0: every step updates the mask.
    plain_tx = sj.dst.rigl_optimizer(
      base_optimizer(), mask, end_step=10**9, update_every=100, start_step=10**8
    )
    update_tx = sj.dst.rigl_optimizer(
      base_optimizer(), mask, end_step=10**9, update_every=1, start_step=0
    )
    plain = time_runner(StepRunner(model, plain_tx, **common).run, sizes, sizes.batch)
    update = time_runner(StepRunner(model, update_tx, **common).run, sizes, sizes.batch)
    amortised = (99 * plain["ms_per_step"] + update["ms_per_step"]) / 100
    static = ev.results.get("masked", {}).get("ms_per_step")
    return {
      **base,
      "delta_t": 100,
      "compile_s": plain["compile_s"],
      "update_compile_s": update["compile_s"],
      "plain_ms_per_step": plain["ms_per_step"],
      "update_ms_per_step": update["ms_per_step"],
      "ms_per_step": round(amortised, 3),
      "img_per_s": round(sizes.batch / amortised * 1e3, 1),
      "amortised_vs_masked": (round(amortised / static, 4) if static else None),
    }

  def bf16():
    bf_model = sj.models.get("resnet20", 10, dtype=jnp.bfloat16, **sizes.model_kwargs)
    out = time_runner(StepRunner(bf_model, base_optimizer(), **common).run, sizes, sizes.batch)
    return {**base, "dtype": "bfloat16", **out, "vs_dense": _ratio(out, ev.results.get("dense"))}

  ev.figure("train_step", "dense", costs.of(1, costs.timed_steps), dense)
  ev.figure("train_step", "masked", costs.of(1, costs.timed_steps), masked)
  ev.figure("train_step", "rigl", costs.of(2.5, 2 * costs.timed_steps), rigl)
  ev.figure("train_step", "bf16", costs.of(1, costs.timed_steps), bf16)


def _ratio(out: dict, reference: dict | None) -> float | None:
  """``out``'s ms/step over ``reference``'s (``None`` without one)."""
  if not reference:
    return None
  return round(out["ms_per_step"] / reference["ms_per_step"], 4)


# ----------------------------------------------------------------------------
# PyTorch, in a subprocess
# ----------------------------------------------------------------------------


def torch_worker(device: str, precision: str, batch: int, steps: int, rounds: int) -> dict:
  """The PyTorch ResNet-20 step on ``device``: ``{compile_s, ms_per_step}``.

  Channels-last, SGD momentum 0.9 with weight decay 1e-4, a fixed float
  batch; ``precision`` ``"bf16"`` runs forward and loss under bfloat16
  autocast. The first step (cuDNN autotuning, allocations) is reported as
  ``compile_s`` like JAX's compilation.
  """
  from cpu_step import torch_resnet20
  import torch
  import torch.nn.functional as F

  torch.backends.cudnn.benchmark = True
  dev = torch.device(device)
  model = torch_resnet20().to(dev, memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(batch, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (batch,), device=dev)
  autocast = (
    torch.autocast(dev.type, dtype=torch.bfloat16)
    if precision == "bf16"
    else contextlib.nullcontext()
  )

  def sync():
    if dev.type == "cuda":
      torch.cuda.synchronize()

  def run(k: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(k):
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
    sync()
    return (time.perf_counter() - t0) / k

  first = run(1)
  per_step = statistics.median(run(steps) for _ in range(rounds))
  name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
  return {
    "torch": torch.__version__,
    "device": name,
    "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
    "compile_s": round(max(first - per_step, 0.0), 3),
    "ms_per_step": round(per_step * 1e3, 3),
    "img_per_s": round(batch / per_step, 1),
  }


def torch_figures(ev: Evidence, sizes: Sizes, costs: Costs, args):
  """Section 3: PyTorch's step, float32 and bf16 autocast, in a subprocess.

  A subprocess keeps PyTorch's CUDA libraries, memory and any crash out of
  the JAX process; the JAX process has preallocated its share of the GPU.
  """
  try:
    torch_version = metadata.version("torch")
  except metadata.PackageNotFoundError:
    torch_version = None
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"

  def one(precision: str, jax_figure: str):

    def fn():
      if torch_version is None:
        return {"skipped": "torch not installed"}
      if jax.default_backend() not in ("gpu", "cpu"):
        return {"skipped": f"JAX runs on {jax.default_backend()}, which PyTorch cannot share"}
      # Ends the worker before the time the later sections need.
      timeout = max(1.0, ev.left() - ev.reserve() - 1.0)
      cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--torch-worker",
        f"{device},{precision}",
        "--batch",
        str(sizes.batch),
      ]
      if args.quick:
        cmd.append("--quick")
      try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
      except subprocess.TimeoutExpired:
        return {"skipped": "budget: the PyTorch worker did not finish"}
      if out.returncode:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"PyTorch worker failed (exit {out.returncode}): " + " | ".join(tail))
      numbers = json.loads(out.stdout.strip().splitlines()[-1])
      ref = ev.results.get(jax_figure)
      numbers["jax_figure"] = jax_figure
      numbers["jax_over_torch"] = (
        round(ref["ms_per_step"] / numbers["ms_per_step"], 4) if ref else None
      )
      if sizes is QUICK:
        numbers["note"] = (
          "quick: JAX's model is the tiny ResNet, PyTorch's "
          "the full ResNet-20; the ratio means nothing"
        )
      return {"precision": precision, "batch": sizes.batch, **numbers}

    return fn

  need = costs.of(0, 3 * costs.timed_steps, fixed=15.0 if not args.quick else 5.0)
  for name, precision, jax_figure in (
    ("torch_f32", "f32", "dense"),
    ("torch_bf16", "bf16", "bf16"),
  ):
    if torch_version is None:  # says so whatever the time left
      ev.figure("pytorch", name, 0.0, one(precision, jax_figure), reserve=False)
    else:
      ev.figure("pytorch", name, need, one(precision, jax_figure))


# ----------------------------------------------------------------------------
# Scoring and ToST
# ----------------------------------------------------------------------------


def median_time(fn, repeats: int) -> tuple[float, float]:
  """``(first call seconds, median seconds of the next repeats)``."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def scoring_figures(ev: Evidence, sizes: Sizes, costs: Costs):
  """Section 4: SNIP and GraSP per gradient; fused vs per-round SynFlow."""
  reps = sizes.score_repeats
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((10 * sizes.per_class, *INPUT_SHAPE)), jnp.float32)
  y = jnp.asarray(np.repeat(np.arange(10, dtype=np.int32), sizes.per_class))
  base = {"model": sizes.model_label, "images": int(x.shape[0])}
  grad = {}
  ctx = {}

  def setup():
    """The scored network, made inside the first figure that runs (its
    initialisation may compile)."""
    if not ctx:
      model = sj.models.get("resnet20", 10, **sizes.model_kwargs)
      variables = sj.state.init_variables(model, jnp.zeros((1, *INPUT_SHAPE)), jax.random.key(0))
      ctx["params"], ctx["apply_fn"] = sj.scores.linen_apply_fn(model, variables)
      ctx["mask"] = sj.masks.ones_like(ctx["params"])
    return ctx["params"], ctx["mask"], ctx["apply_fn"]

  def snip():
    params, mask, apply_fn = setup()

    @jax.jit
    def train_grad(p):
      loss = lambda p_: sj.losses.cross_entropy(apply_fn(p_, x, True), y).mean()
      return jax.grad(loss)(p)

    grad["first"], grad["s"] = median_time(lambda: train_grad(params), reps)
    first, t = median_time(lambda: sj.scores.snip(params, mask, apply_fn, (x, y)), reps)
    return {
      **base,
      "grad_ms": round(grad["s"] * 1e3, 3),
      "ms": round(t * 1e3, 3),
      "compile_s": round(first - t, 3),
      "vs_gradient": round(t / grad["s"], 4),
      "target": "<= 1.3",
    }

  def grasp():
    params, mask, apply_fn = setup()
    first, t = median_time(lambda: sj.scores.grasp(params, mask, apply_fn, (x, y)), reps)
    return {
      **base,
      "ms": round(t * 1e3, 3),
      "compile_s": round(first - t, 3),
      "vs_gradient": round(t / grad["s"], 4) if grad else None,
      "target": "<= 3.5",
    }

  def synflow():
    params, mask, apply_fn = setup()
    rounds, sparsity = sizes.synflow_rounds, 0.98
    first_fused, fused = median_time(
      lambda: sj.scores.synflow(params, mask, apply_fn, INPUT_SHAPE, sparsity, rounds), reps
    )

    @jax.jit
    def one_round(p, m, s):
      scores = sj.scores.synflow_scores(p, m, apply_fn, INPUT_SHAPE)
      return sj.masks.topk_mask(scores, s, within=m)

    schedule = [jnp.float32(1.0 - (1.0 - sparsity) ** (k / rounds)) for k in range(1, rounds + 1)]

    def loop():
      m = mask
      for s in schedule:
        m = one_round(params, m, s)
      return m

    first_loop, looped = median_time(loop, reps)
    return {
      **base,
      "rounds": rounds,
      "fused_ms": round(fused * 1e3, 3),
      "fused_compile_s": round(first_fused - fused, 3),
      "loop_ms": round(looped * 1e3, 3),
      "loop_compile_s": round(first_loop - looped, 3),
      "loop_over_fused": round(looped / fused, 4),
      "target": ">= 3",
    }

  score_steps = reps + 1
  ev.figure("scoring", "snip", costs.of(2, 2 * score_steps), snip)
  ev.figure("scoring", "grasp", costs.of(2.5, 3 * score_steps), grasp)
  ev.figure("scoring", "synflow", costs.of(3, 2 * score_steps * sizes.synflow_rounds), synflow)


def tost_figures(ev: Evidence, sizes: Sizes, costs: Costs, mesh, data):
  """Section 5: ToST's ghost step against the plain one."""
  base = {"model": sizes.model_label, "batch": sizes.batch}

  def one(preset: str):

    def fn():
      recipe = sj.tost.preset(preset)
      model = recipe.model("resnet20", 10, **sizes.model_kwargs)
      runner = StepRunner(
        model,
        base_optimizer(),
        sizes=sizes,
        mesh=mesh,
        data=data,
        loss_fn=recipe.loss_fn(),
        scalars=recipe.scalars(100_000),
      )
      out = time_runner(runner.run, sizes, sizes.batch)
      if preset == "ghost":
        out["ghost_over_plain"] = _ratio(out, ev.results.get("tost_plain"))
      return {**base, "preset": preset, **out}

    return fn

  ev.figure("tost", "tost_plain", costs.of(1, costs.timed_steps), one("none"))
  ev.figure("tost", "tost_ghost", costs.of(1.5, 1.5 * costs.timed_steps), one("ghost"))


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of ``uint8 [N, H, W, C]`` in [0, 1] units."""
  total = np.zeros(images.shape[-1])
  total_sq = np.zeros(images.shape[-1])
  for start in range(0, len(images), 4096):
    block = images[start : start + 4096].reshape(-1, images.shape[-1]).astype(np.float64)
    total += block.sum(0)
    total_sq += np.square(block).sum(0)
  count = max(images.size // images.shape[-1], 1)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return tuple(mean / 255.0), tuple(std / 255.0)


def load_jpeg_cifar10(path: str) -> sj.data.Dataset:
  """CIFAR-10 from the JPEG archive (``train|test/<class>/NNNN.jpg``).

  The archive is read once in order, the JPEGs decoded with Pillow (imported
  here) on a thread pool; files are ordered by class, then name. Mean and
  std are those of the decoded training images.
  """
  from PIL import Image

  files = {"train": [], "test": []}
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = member.name.removeprefix("./").split("/")
      if not member.isfile() or len(parts) != 3 or parts[0] not in files:
        continue
      if parts[1] not in CIFAR10_CLASSES:
        raise sj.data.DatasetFormatError(f"{path}: {member.name} is in no CIFAR-10 class folder")
      files[parts[0]].append(
        (CIFAR10_CLASSES.index(parts[1]), parts[2], tar.extractfile(member).read())
      )

  def decode(blobs, out, start):
    for i, (_, name, blob) in enumerate(blobs):
      with Image.open(io.BytesIO(blob)) as image:
        pixels = np.asarray(image.convert("RGB"))
      if pixels.shape != INPUT_SHAPE:
        raise sj.data.DatasetFormatError(f"{path}: {name} is {pixels.shape}")
      out[start + i] = pixels

  splits = {}
  workers = min(8, os.cpu_count() or 1)
  with futures.ThreadPoolExecutor(workers) as pool:
    for split, blobs in files.items():
      if not blobs:
        raise sj.data.DatasetFormatError(f"{path}: no {split}/<class>/*.jpg files")
      blobs.sort(key=lambda b: (b[0], b[1]))
      images = np.empty((len(blobs), *INPUT_SHAPE), np.uint8)
      chunk = 2000
      jobs = [
        pool.submit(decode, blobs[s : s + chunk], images, s) for s in range(0, len(blobs), chunk)
      ]
      for job in jobs:
        job.result()
      splits[split] = (images, np.array([b[0] for b in blobs], np.int32))
  mean, std = channel_stats(splits["train"][0])
  return sj.data.Dataset(
    name="cifar10",
    num_classes=10,
    train_images=splits["train"][0],
    train_labels=splits["train"][1],
    test_images=splits["test"][0],
    test_labels=splits["test"][1],
    mean=mean,
    std=std,
    augment=True,
  )


def synthetic_cifar10(sizes: Sizes) -> sj.data.Dataset:
  """Random CIFAR-shaped images and labels (no ``--data``)."""
  rng = np.random.default_rng(0)
  make = lambda n: (
    rng.integers(0, 256, (n, *INPUT_SHAPE), dtype=np.uint8),
    rng.integers(0, 10, (n,)).astype(np.int32),
  )
  (tx, ty), (vx, vy) = make(sizes.synthetic_train), make(sizes.synthetic_test)
  mean, std = channel_stats(tx)
  return sj.data.Dataset(
    name="cifar10",
    num_classes=10,
    train_images=tx,
    train_labels=ty,
    test_images=vx,
    test_labels=vy,
    mean=mean,
    std=std,
    augment=True,
  )


def load_data(data: str | None, sizes: Sizes) -> tuple[sj.data.Dataset, str]:
  """``(dataset, description)`` of ``--data`` (see the module doc)."""
  if data is None:
    return synthetic_cifar10(sizes), "synthetic (no --data)"
  if os.path.isdir(data):
    return sj.data.load("cifar10", data), f"cifar-10 python batches in {data}"
  if os.path.basename(data) == "cifar-10-python.tar.gz":
    return (
      sj.data.load("cifar10", os.path.dirname(os.path.abspath(data))),
      f"official archive {data}",
    )
  if os.path.isfile(data):
    return load_jpeg_cifar10(data), f"JPEG archive {data} (JPEG-decoded pixels)"
  raise FileNotFoundError(f"--data {data}: no such file or directory")


def in_background(fn: Callable, *args) -> futures.Future:
  """``fn(*args)`` on a daemon thread (the process does not wait for it at
  exit): its future."""
  future = futures.Future()

  def target():
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)

  threading.Thread(target=target, daemon=True).start()
  return future


def timed_load(data: str | None, sizes: Sizes) -> tuple[sj.data.Dataset, str, float]:
  """:func:`load_data` and its seconds."""
  t0 = time.monotonic()
  dataset, source = load_data(data, sizes)
  return dataset, source, time.monotonic() - t0


# ----------------------------------------------------------------------------
# The real run
# ----------------------------------------------------------------------------


class DeadlineCallback(sj.hooks.Callback):
  """Stops :func:`sparsejax.train.fit` at a wall-clock time, and times it.

  On the host after each step: records the first step's time (compilation
  included) and the latest ``(step, time)``; once ``deadline`` has passed it
  sends this process SIGTERM, which ``fit`` takes as a preemption: it saves
  a checkpoint at the next step boundary and returns.
  """

  every_steps = 1

  def __init__(self, deadline: float):
    self.deadline = deadline
    self.started = time.monotonic()
    self.first: tuple[int, float] | None = None
    self.last: tuple[int, float] | None = None
    self.sent = False

  def __call__(self, step, carry, ctx) -> None:
    now = time.monotonic()
    if self.first is None:
      self.first = (step, now)
    self.last = (step, now)
    if now >= self.deadline and not self.sent:
      self.sent = True
      os.kill(os.getpid(), signal.SIGTERM)


def real_run_need(costs: Costs, args, slack: float = 1.3) -> float:
  """Seconds the real run needs at least: the data (while still loading),
  SNIP, compilations, and a minute of training (a few seconds with
  ``--quick``)."""
  loading = args.data is not None and not args.data_future.done()
  data = 30.0 if loading else 0.0
  return costs.of(3, 100, fixed=data + (3.0 if args.quick else 60.0), slack=slack)


def real_run_figure(
  ev: Evidence, sizes: Sizes, costs: Costs, args, later: Callable[[float], float]
):
  """Section 6: ResNet-20, CIFAR-10, SNIP 90%, SPEC §8, until the deadline.

  ``later(slack)``: the estimated seconds of the vmap section after it; the
  run starts if it fits without slack, and trains until the time it needs
  with slack.
  """
  need = real_run_need(costs, args, 1.0) + later(1.0)

  def fn():
    t0 = time.monotonic()
    dataset, source, load_s = args.data_future.result()
    wait_s = time.monotonic() - t0
    model = sj.models.get("resnet20", dataset.num_classes, **sizes.model_kwargs)
    mesh = sj.mesh.make_mesh(1)
    config = dict(SPEC8_CONFIG)
    options = sj.train.FitOptions(
      tensorboard=False, progress_bar=False, max_to_keep=1, log_every_steps=50
    )
    batch = int(config["batch_size"]) if sizes is FULL else sizes.batch
    config["batch_size"] = batch
    spe = sj.schedules.steps_per_epoch(dataset.num_train, batch)
    total = int(config["num_epochs"]) * spe
    tx = spec8_optimizer(spe)
    sample = jnp.zeros((1, *dataset.image_shape))

    t0 = time.monotonic()
    key = jax.random.key(config["seed"])
    dense = sj.state.create_train_state(model, tx, sample, key)
    params, apply_fn = sj.scores.linen_apply_fn(model, dense.variables)
    batches = sj.data.class_balanced_batch(dataset, 10, config["seed"])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      mask = sj.scores.prune_at_init(
        "snip", params, sparsity=SPARSITY, apply_fn=apply_fn, batches=batches
      )
    mask = jax.block_until_ready(mask)
    snip_s = time.monotonic() - t0

    # Stop training early enough to save, evaluate and leave the later
    # sections their time.
    final = costs.of(0.5, 0, fixed=2.0)
    reserve = later(1.3)
    hook = DeadlineCallback(ev.deadline - reserve - final)
    t_fit = time.monotonic()
    stop_at = None if sizes.real_run_epochs is None else sizes.real_run_epochs * spe
    result = sj.train.fit(
      model,
      dataset,
      args.workdir,
      init=lambda: sj.state.create_train_state(model, tx, sample, key, mask=mask),
      num_epochs=int(config["num_epochs"]),
      batch_size=batch,
      seed=int(config["seed"]),
      mesh=mesh,
      stop_at_step=stop_at,
      callbacks=(hook,),
      options=options,
    )
    fit_s = time.monotonic() - t_fit
    step = int(jax.device_get(result.state.step))
    history = result.history
    out = {
      "model": sizes.model_label,
      "data": source,
      "train_images": dataset.num_train,
      "batch": batch,
      "steps_per_epoch": spe,
      "epochs": int(config["num_epochs"]),
      "mask": f"snip {SPARSITY:.0%} global",
      "schedule": "SPEC §8: SGD momentum 0.9, lr 0.1 x0.1 at 80, 120; wd 1e-4; crop+flip",
      "workdir": args.workdir,
      "data_load_s": round(load_s, 2),
      "data_wait_s": round(wait_s, 2),
      "snip_s": round(snip_s, 2),
      "fit_s": round(fit_s, 2),
      "resumed_from": result.resumed_from,
      "step": step,
      "epochs_done": round(step / spe, 3),
      "stopped_at_deadline": hook.sent,
      "test_accuracy_by_epoch": [[r["epoch"], r.get("test_accuracy")] for r in history],
    }
    if result.preempted and not hook.sent:
      out["stopped_by"] = "SIGTERM from outside"
    if history:
      out["last_epoch_test_accuracy"] = history[-1].get("test_accuracy")
    if hook.first is not None:
      out["first_step_s"] = round(hook.first[1] - hook.started, 2)
    if hook.first and hook.last and hook.last[0] > hook.first[0]:
      per_step = (hook.last[1] - hook.first[1]) / (hook.last[0] - hook.first[0])
      left_steps = total - step
      out.update(
        s_per_step=round(per_step, 5),
        img_per_s=round(batch / per_step, 1),
        projected_full_run_s=round((hook.first[1] - hook.started) + (total - 1) * per_step, 1),
        projected_remaining_s=round(left_steps * per_step, 1),
      )
    if step % spe and ev.left() > reserve:
      ev_now = sj.train.evaluate(
        model,
        result.state,
        dataset.test_images,
        dataset.test_labels,
        mean=dataset.mean,
        std=dataset.std,
        mesh=mesh,
      )
      out["test_accuracy_now"] = ev_now["accuracy"]
    elif history:
      out["test_accuracy_now"] = history[-1].get("test_accuracy")
    if result.preempted and not hook.sent:
      ev.write({"section": "real_run", "figure": "real_run", **out})
      ev.end("SIGTERM", during="real_run")
      sys.exit(0)
    return out

  ev.figure("real_run", "real_run", need, fn, reserve=False)


# ----------------------------------------------------------------------------
# Vmapped sweeps
# ----------------------------------------------------------------------------


def vmap_figures(ev: Evidence, sizes: Sizes, costs: Costs, mesh, data):
  """Section 7: K masked runs vmapped in one program vs stepped in turn."""
  model = sj.models.get("resnet20", 10, **sizes.model_kwargs)
  inner = base_optimizer()
  sample = jnp.zeros((1, *INPUT_SHAPE))
  shared_tx = sj.optim.sparse(inner, random_mask(model, 1))
  images, labels = data
  batches = sizes.images // sizes.batch
  base = {"model": sizes.model_label, "batch": sizes.batch, "sparsity": SPARSITY}
  single = {}

  def states(k: int):
    # One transformation object for all K (the mask it was built with only
    # initialises; updates read the mask in each state), so they stack.
    return [
      sj.state.create_train_state(
        model, inner, sample, jax.random.key(i), mask=random_mask(model, 100 + i)
      ).replace(tx=shared_tx)
      for i in range(k)
    ]

  def one(k: int):

    def fn():
      step = sj.train.make_train_step(
        model,
        mesh=mesh,
        batch_size=sizes.batch,
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        augment=True,
      )
      perm = sj.mesh.put_replicated(np.arange(sizes.images), mesh)
      runs = [sj.mesh.put_replicated(sj.train.init_carry(s), mesh) for s in states(k)]
      stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *runs)]
      vstep = jax.jit(jax.vmap(step, in_axes=(0, None, None, None, None)), donate_argnums=(0,))
      counter = [0]

      def run_vmapped(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
          stacked[0], _ = vstep(stacked[0], images, labels, perm, counter[0] % batches)
          counter[0] += 1
        jax.block_until_ready(stacked[0])
        return (time.perf_counter() - t0) / n

      def run_sequential(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
          for i, r in enumerate(runs):
            runs[i], _ = step(r, images, labels, perm, counter[0] % batches)
          counter[0] += 1
        jax.block_until_ready(runs)
        return (time.perf_counter() - t0) / n

      vm = time_runner(run_vmapped, sizes, k * sizes.batch)
      seq = time_runner(run_sequential, sizes, k * sizes.batch)
      if k == 1:
        single["ms"] = vm["ms_per_step"]
      out = {
        **base,
        "k": k,
        "vmapped_compile_s": vm["compile_s"],
        "vmapped_ms_per_step": vm["ms_per_step"],
        "vmapped_img_per_s": vm["img_per_s"],
        "sequential_ms_per_round": seq["ms_per_step"],
        "sequential_img_per_s": seq["img_per_s"],
        "vmap_over_sequential": round(vm["img_per_s"] / seq["img_per_s"], 4),
      }
      if single.get("ms"):
        out["vmapped_vs_k1_time"] = round(vm["ms_per_step"] / single["ms"], 4)
      return out

    return fn

  for k in VMAP_KS:
    ev.figure("vmap", f"vmap_k{k}", vmap_cost(costs, k), one(k), reserve=False)


def vmap_cost(costs: Costs, k: int, slack: float = 1.3) -> float:
  """Estimated seconds of the K-runs figure: two compilations (the vmapped
  step and the single one), the steps vmapped and in turn."""
  return costs.of(2, 3 * k * costs.timed_steps, slack=slack)


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def versions(ev: Evidence):
  """Section 1: library versions and the device."""

  def fn():
    out = {"python": platform.python_version()}
    for package in (
      "jax",
      "jaxlib",
      "flax",
      "optax",
      "orbax-checkpoint",
      "chex",
      "numpy",
      "torch",
      "pillow",
    ):
      try:
        out[package] = metadata.version(package)
      except metadata.PackageNotFoundError:
        out[package] = None
    for package in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
      with contextlib.suppress(metadata.PackageNotFoundError):
        out[package] = metadata.version(package)
    devices = jax.devices()
    out.update(
      backend=jax.default_backend(),
      platform=devices[0].platform,
      device_kind=devices[0].device_kind,
      device_count=len(devices),
      cpu=cpu_model(),
    )
    with contextlib.suppress(Exception):
      out["platform_version"] = devices[0].client.platform_version
    with contextlib.suppress(Exception):
      stats = devices[0].memory_stats() or {}
      if "bytes_limit" in stats:
        out["device_memory_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    for var in (
      "JAX_PLATFORMS",
      "XLA_PYTHON_CLIENT_PREALLOCATE",
      "XLA_PYTHON_CLIENT_MEM_FRACTION",
      "XLA_FLAGS",
    ):
      out[var] = os.environ.get(var)
    return out

  ev.figure("versions", "versions", 0.0, fn)


def out_path(out: str) -> str:
  """The evidence file of ``--out``: itself if it ends in ``.jsonl``, else
  ``evidence.jsonl`` in that directory (created)."""
  if out.endswith(".jsonl"):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return out
  os.makedirs(out, exist_ok=True)
  return os.path.join(out, "evidence.jsonl")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--data",
    default=None,
    help="CIFAR-10: a directory sparsejax.data.load reads, "
    "cifar-10-python.tar.gz or cifar10-jpeg.tar.gz",
  )
  parser.add_argument("--out", required=True, help="evidence file (.jsonl) or directory")
  parser.add_argument(
    "--budget", type=float, default=None, help="seconds (default 480; 120 with --quick)"
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny model and steps, for CPU and the tests"
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="run directory of the real run (default: real_run/ "
    "next to the evidence file); reuse it to resume",
  )
  parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sizes = QUICK if args.quick else FULL

  if args.torch_worker:  # a subprocess of torch_figures
    device, precision = args.torch_worker.split(",")
    print(
      json.dumps(
        torch_worker(device, precision, args.batch or sizes.batch, sizes.steps, sizes.rounds)
      )
    )
    return

  budget = args.budget if args.budget is not None else (120.0 if args.quick else 480.0)
  path = out_path(args.out)
  if args.workdir is None:
    args.workdir = os.path.join(os.path.dirname(os.path.abspath(path)), "real_run")
  ev = Evidence(
    path,
    budget,
    {
      "quick": args.quick,
      "budget_s": budget,
      "data": args.data,
      "workdir": args.workdir,
      "argv": sys.argv[1:] if argv is None else argv,
    },
  )

  def external_stop(signum, frame):
    del frame
    ev.end(signal.Signals(signum).name, during=ev.current)
    os._exit(0)  # pylint: disable=protected-access

  signal.signal(signal.SIGTERM, external_stop)  # fit installs its own inside

  # The real run's data loads (a JPEG archive decodes) while the figures
  # before it are measured.
  args.data_future = in_background(timed_load, args.data, sizes)
  costs = Costs(sizes)
  vmap_total = lambda slack=1.3: sum(vmap_cost(costs, k, slack) for k in VMAP_KS)

  def reserve() -> float:
    """Once the dense step has calibrated the estimates, the figures before
    the real run leave it and the vmapped runs their time (estimated without
    slack: a reserve too large would skip figures that fit); a real run that
    no longer fits is not protected."""
    if not costs.calibrated:
      return 0.0
    later = real_run_need(costs, args, 1.0) + vmap_total(1.0)
    return later if ev.left() >= later else vmap_total(1.0)

  ev.reserve = reserve
  versions(ev)
  mesh = sj.mesh.make_mesh(1)
  data = step_images(sizes, mesh)
  train_step_figures(ev, sizes, costs, mesh, data)
  torch_figures(ev, sizes, costs, args)
  scoring_figures(ev, sizes, costs)
  tost_figures(ev, sizes, costs, mesh, data)
  real_run_figure(ev, sizes, costs, args, vmap_total)
  vmap_figures(ev, sizes, costs, mesh, data)
  ev.end("budget" if ev.skipped else "done")


if __name__ == "__main__":
  main()
