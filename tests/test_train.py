"""Tests of sparsejax.train: smoke training on real data, masks, schedules,
optimiser semantics, checkpoint resume exactness (SIGTERM in process, SIGKILL
of a subprocess), unreadable checkpoints, non-finite losses and 8-device data
parallelism. Everything runs on the shipped digits dataset in seconds."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]

from sparsejax import checkpoints  # noqa: E402
from sparsejax import data  # noqa: E402
from sparsejax import masks  # noqa: E402
from sparsejax import models  # noqa: E402
from sparsejax import optim  # noqa: E402
from sparsejax import schedules  # noqa: E402
from sparsejax import state  # noqa: E402
from sparsejax import train  # noqa: E402
from tests.fitting import digits_fit  # noqa: E402
from tests.fitting import digits_optimizer  # noqa: E402
from tests.fitting import magnitude_mask_fn  # noqa: E402
from tests.sigterm_helper import sigterm_at_step  # noqa: E402

TIMING_KEYS = ("epoch_seconds", "steps_per_second")
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def fit(workdir, **overrides):
  """The digits preset, small: MLP, 3 epochs of 44 steps of 32, 90% magnitude."""
  return digits_fit(workdir, **overrides)


def without_timing(history):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def read_metrics(workdir):
  with open(Path(workdir) / "metrics.jsonl") as f:
    return without_timing([json.loads(line) for line in f if line.strip()])


def checkpoint_steps(workdir):
  root = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def load_checkpoint_state(workdir, step):
  """The raw saved ``state`` item (nested dict of numpy arrays)."""
  path = Path(workdir) / "checkpoints" / str(step) / "state"
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def assert_trees_equal(a, b):
  """Bitwise equal leaves, equal structure, shapes and dtypes (a train state's
  static optimiser functions are code of each run, not compared)."""
  assert checkpoints.tree_signature(a) == checkpoints.tree_signature(b)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 3-epoch run (90% magnitude mask): the baseline."""
  workdir = tmp_path_factory.mktemp("reference")
  config = dict(max_to_keep=5)
  return config, workdir, fit(workdir, **config)


# ----------------------------------------------------------------------------
# Smoke: real data, real accuracy, static mask
# ----------------------------------------------------------------------------


def test_dense_training_beats_chance(tmp_path):
  result = fit(tmp_path, sparsity=None, tensorboard=True, max_to_keep=2)
  assert not result.preempted and result.state.mask is None
  assert len(result.history) == 3
  assert result.history[-1]["test_accuracy"] > 0.85  # chance is 0.1
  assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
  assert read_metrics(tmp_path) == without_timing(result.history)
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert checkpoint_steps(tmp_path) == [88, 132]  # the last 2 of 3 epochs


def test_sparse_training_keeps_mask_and_zeros(reference):
  config, workdir, result = reference
  final = result.history[-1]
  assert final["test_accuracy"] > 0.6  # chance is 0.1
  assert final["sparsity"] == pytest.approx(0.9, abs=1e-4)
  # The mask in the final state is the one chosen at initialisation...
  ds = data.load("digits")
  model = models.get("mlp", 10)
  init = state.create_train_state(
    model, digits_optimizer(3, 44), jnp.zeros((1, 8, 8, 1)), jax.random.key(0)
  )
  initial_mask = magnitude_mask_fn(model, 0.9)(init.params)
  assert_trees_equal(result.state.mask, initial_mask)
  summary = masks.summary(result.state.mask)
  assert summary.kept == masks.kept_count(summary.total, 0.9)
  # ...and every pruned weight is exactly zero after 132 steps of SGD + decay.
  for p, m in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(result.state.mask)):
    p, m = np.asarray(p), np.asarray(m)
    assert np.all(p[~m] == 0.0)
    if p.ndim > 1:  # kernels: the mask is exactly their support
      assert np.count_nonzero(p[m]) == m.sum()
  assert ds.num_train // 32 == 44


def test_evaluate_counts_every_example_once(reference):
  config, _, result = reference
  ds = data.load("digits")
  model = models.get("mlp", 10)
  full = train.evaluate(
    model, result.state, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std, batch_size=500
  )
  tail = train.evaluate(
    model, result.state, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std, batch_size=7
  )  # 51 + a tail of 3
  assert full["count"] == tail["count"] == 360
  assert full["accuracy"] == tail["accuracy"]
  assert full["loss"] == pytest.approx(tail["loss"], rel=1e-5)
  assert full["accuracy"] == pytest.approx(result.history[-1]["test_accuracy"])


# ----------------------------------------------------------------------------
# Schedules and optimiser
# ----------------------------------------------------------------------------


def test_multistep_schedule_decays_at_epoch_boundaries():
  sched = schedules.lr_schedule(
    0.1,
    kind="multistep",
    num_epochs=160,
    decay_epochs=(60, 120),
    decay_factor=0.1,
    steps_per_epoch=10,
  )
  np.testing.assert_allclose(
    [sched(0), sched(599), sched(600), sched(1199), sched(1200), sched(1599)],
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
    rtol=1e-6,
  )
  # Fractions: the GraSP protocol's 50% / 75%, truncated like the reference.
  assert schedules.decay_boundaries((0.5, 0.75), 160) == [80, 120]
  assert schedules.decay_boundaries((0.5, 0.75), 10) == [5, 7]
  with pytest.raises(ValueError, match="positive"):
    schedules.decay_boundaries((0, 60), 160)


def test_warmup_and_cosine_schedules():
  sched = schedules.lr_schedule(
    0.2, kind="multistep", num_epochs=10, decay_epochs=(5,), warmup_epochs=2, steps_per_epoch=10
  )
  np.testing.assert_allclose(
    [sched(0), sched(10), sched(20), sched(49), sched(50)],
    [0.0, 0.1, 0.2, 0.2, 0.02],
    rtol=1e-6,
    atol=1e-9,
  )
  cos = schedules.lr_schedule(0.2, kind="cosine", num_epochs=10, end_factor=0.1, steps_per_epoch=10)
  np.testing.assert_allclose([cos(0), cos(50), cos(100)], [0.2, 0.11, 0.02], rtol=1e-5)
  with pytest.raises(ValueError, match="lr_schedule"):
    schedules.lr_schedule(0.1, kind="step", num_epochs=1, steps_per_epoch=1)


def test_optimizer_is_pytorch_sgd_with_weight_decay_on_all_params():
  """Two steps against PyTorch's SGD(momentum, nesterov, weight_decay) formulas."""
  tx = schedules.make_optimizer(0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
  params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([0.5])}
  grads = [
    {"kernel": jnp.array([[0.3, 0.1]]), "bias": jnp.array([-0.2])},
    {"kernel": jnp.array([[-0.1, 0.4]]), "bias": jnp.array([0.1])},
  ]
  state = tx.init(params)
  p_ref = jax.tree.map(np.asarray, params)
  buf = None
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    d = jax.tree.map(lambda g, p: np.asarray(g) + 0.01 * p, g, p_ref)
    buf = d if buf is None else jax.tree.map(lambda b, d: 0.9 * b + d, buf, d)
    step = jax.tree.map(lambda d, b: d + 0.9 * b, d, buf)
    p_ref = jax.tree.map(lambda p, s: p - 0.1 * s, p_ref, step)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, p_ref)
  # The state holds the learning rate of its last update (what fit logs).
  assert float(optim.find_hyperparam(state, "learning_rate")) == pytest.approx(0.1)


def test_optimizer_state_carries_the_scheduled_learning_rate():
  lr = schedules.lr_schedule(
    0.1, kind="multistep", num_epochs=2, decay_epochs=(1,), steps_per_epoch=2
  )
  tx = optim.sparse(schedules.make_optimizer(lr), lambda p: masks.ones_like(p))
  params = {"w": jnp.ones(3)}
  opt_state = tx.init(params)
  seen = []
  for _ in range(4):
    _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    seen.append(float(optim.find_hyperparam(opt_state, "learning_rate")))
  np.testing.assert_allclose(seen, [lr(t) for t in range(4)], rtol=1e-6)
  np.testing.assert_allclose(seen, [0.1, 0.1, 0.01, 0.01], rtol=1e-6)
  assert optim.find_hyperparam(optax.sgd(0.1).init(params), "learning_rate") is None


def test_create_train_state_masks_params_and_optimizer():
  model = models.get("mlp", 10, hidden=(16,))
  tx = schedules.make_optimizer(0.1)
  x = jnp.zeros((1, 8, 8, 1))
  dense = state.create_train_state(model, tx, x, jax.random.key(0))
  mask_fn = jax.jit(lambda p: masks.topk_mask(jax.tree.map(jnp.abs, p), 0.5))
  mask = mask_fn(dense.params)
  sparse = state.create_train_state(model, tx, x, jax.random.key(0), mask=mask)
  # The same from optim.sparse with the mask function, called by init.
  held = state.create_train_state(model, optim.sparse(tx, mask_fn), x, jax.random.key(0))
  assert_trees_equal(held.mask, mask)
  assert_trees_equal(held.params, sparse.params)
  assert_trees_equal(held.opt_state, sparse.opt_state)
  with pytest.raises(ValueError, match="already holds a mask"):
    state.create_train_state(model, optim.sparse(tx, mask_fn), x, jax.random.key(0), mask=mask)
  assert dense.mask is None and int(sparse.step) == 0
  assert_trees_equal(sparse.mask, mask)
  assert_trees_equal(sparse.params, masks.apply(dense.params, mask))
  assert isinstance(sparse.opt_state, optim.MaskedState)
  bad = jax.tree.map(lambda m: m[..., :1], mask)
  with pytest.raises(ValueError, match="shape"):
    state.create_train_state(model, tx, x, jax.random.key(0), mask=bad)


# ----------------------------------------------------------------------------
# Resume exactness
# ----------------------------------------------------------------------------


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(reference, tmp_path):
  config, ref_dir, ref = reference
  with sigterm_at_step(50):
    stopped = fit(tmp_path, max_to_keep=5)
  # SIGTERM arrived at step 50 (epoch 2, step 6 of 44): saved there, exited.
  assert stopped.preempted
  assert checkpoint_steps(tmp_path) == [44, 50]
  assert len(read_metrics(tmp_path)) == 1
  resumed = fit(tmp_path, max_to_keep=5)
  assert resumed.resumed_from == 50 and not resumed.preempted
  assert without_timing(resumed.history) == without_timing(ref.history)
  assert read_metrics(tmp_path) == read_metrics(ref_dir)
  assert_trees_equal(resumed.state, ref.state)  # params, stats, opt state, rng
  assert_trees_equal(load_checkpoint_state(tmp_path, 132), load_checkpoint_state(ref_dir, 132))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  """Kills a digits fit (``python -m tests.fitting``) with SIGKILL after its
  first epoch."""
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    [sys.executable, "-m", "tests.fitting", str(killed), "8"],
    cwd=REPO,
    env=SUBPROCESS_ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  first = killed / "checkpoints" / "44"  # renamed into place when committed
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if first.exists():
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"
  steps = checkpoint_steps(killed)
  assert steps and max(steps) < 8 * 44  # killed mid-way, with a checkpoint

  resumed = fit(killed, num_epochs=8, max_to_keep=10)
  assert resumed.resumed_from is not None and resumed.resumed_from < 8 * 44
  uninterrupted = fit(tmp_path / "uninterrupted", num_epochs=8, max_to_keep=10)
  assert uninterrupted.resumed_from is None
  assert len(resumed.history) == 8
  assert without_timing(resumed.history) == without_timing(uninterrupted.history)
  assert read_metrics(killed) == read_metrics(tmp_path / "uninterrupted")
  assert_trees_equal(resumed.state, uninterrupted.state)


def test_rerun_of_finished_run_is_a_no_op(reference):
  config, workdir, ref = reference
  again = fit(workdir, **config)
  assert again.resumed_from == 132
  assert without_timing(again.history) == without_timing(ref.history)
  assert_trees_equal(again.state, ref.state)


# ----------------------------------------------------------------------------
# Error paths
# ----------------------------------------------------------------------------


def test_unreadable_checkpoint_is_reported_skipped_and_kept(reference, tmp_path, caplog):
  config, ref_dir, ref = reference
  # SIGTERM at the last step of epoch 2: the epoch completes, saves and exits.
  with sigterm_at_step(88):
    first = fit(tmp_path, max_to_keep=5)
  assert first.preempted and len(first.history) == 2
  assert checkpoint_steps(tmp_path) == [44, 88]
  latest = tmp_path / "checkpoints" / "88"
  corrupted = {}
  for path in sorted(latest.rglob("*")):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"not a checkpoint\x00" * 4)
      corrupted[str(path.relative_to(latest))] = path.read_bytes()
  assert corrupted

  with caplog.at_level(logging.WARNING, logger="sparsejax.checkpoints"):
    resumed = fit(tmp_path, max_to_keep=5)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(str(latest) in w and "unreadable" in w for w in warnings), warnings
  assert resumed.resumed_from == 44
  # Never deleted: moved aside with its files as they were.
  kept = tmp_path / "checkpoints.unreadable" / "88"
  assert kept.is_dir()
  for rel, content in corrupted.items():
    assert (kept / rel).read_bytes() == content
  # Recomputed from epoch 1: the same result as the uninterrupted run.
  assert without_timing(resumed.history) == without_timing(ref.history)
  assert_trees_equal(resumed.state, ref.state)
  assert checkpoint_steps(tmp_path) == [44, 88, 132]


_QUARANTINE_SCRIPT = textwrap.dedent("""
    import glob, os, sys, tempfile
    import jax.numpy as jnp
    from sparsejax import checkpoints
    tree = {f"w{i}": jnp.full((50, 10), i, jnp.float32) for i in range(96)}
    for run in range(10):
      root = os.path.join(tempfile.mkdtemp(), "checkpoints")
      ck = checkpoints.Checkpoints(root, async_save=False)
      for step in (1, 2):
        ck.save(step, tree, {"step": step})
      ck.close()
      for path in glob.glob(os.path.join(root, "2", "**", "d", "*"), recursive=True):
        os.truncate(path, 10)  # the newest checkpoint's array data, cut short
      ck = checkpoints.Checkpoints(root, async_save=False)
      step, _, _ = ck.restore_latest(checkpoints.abstract(tree))
      ck.close()
      assert step == 1, step
    """)


def test_quarantined_checkpoint_prints_one_warning_line():
  # The reads abandoned by the failing one used to print pages of "Event loop
  # is closed" and "Task exception was never retrieved" tracebacks.
  proc = subprocess.run(
    [sys.executable, "-c", _QUARANTINE_SCRIPT],
    cwd=REPO,
    env=SUBPROCESS_ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 10, proc.stderr[-3000:]
  assert all("is unreadable" in l and "moved, not deleted" in l for l in lines)
  for noise in ("Traceback", "Exception ignored", "Task exception", "Event loop"):
    assert noise not in proc.stderr


def test_checkpoint_of_another_run_is_refused_and_left_alone(reference):
  config, workdir, _ = reference
  before = checkpoint_steps(workdir)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="batch_size"):
    fit(workdir, batch_size=64, max_to_keep=5)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="state_signature"):
    fit(workdir, sparsity=None, max_to_keep=5)
  assert checkpoint_steps(workdir) == before
  assert not (Path(workdir) / "checkpoints.unreadable").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  fit(tmp_path, num_epochs=1)
  assert checkpoint_steps(tmp_path) == [44]
  with pytest.raises(FloatingPointError) as err:
    fit(tmp_path, optimizer=dict(learning_rate=1e30))
  message = str(err.value)
  assert "Non-finite training loss at epoch 2" in message
  assert "last good checkpoint (epoch 1, global step 44)" in message
  assert checkpoint_steps(tmp_path) == [44]  # nothing written for the NaN state
  assert len(read_metrics(tmp_path)) == 1
  # The kept checkpoint is intact: a sane rerun resumes from it.
  resumed = fit(tmp_path, num_epochs=2)
  assert resumed.resumed_from == 44 and len(resumed.history) == 2


# ----------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------

MULTI_DEVICE_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from sparsejax import data, masks, mesh as mesh_lib, models, schedules, state as state_lib, train

    assert jax.device_count() == 8, jax.devices()

    class ConvBN(nn.Module):
      # Batch norm makes the global-batch semantics of sharded training visible.
      num_classes: int = 10
      @nn.compact
      def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes)(x)

    ds = data.load("digits")
    tx = schedules.make_optimizer(0.05, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4)
    options = train.FitOptions(progress_bar=False, tensorboard=False,
                               eval_batch_size=100)
    out = {}
    for n in (8, 1):
      mesh = mesh_lib.make_mesh(n)
      model = ConvBN()
      state = state_lib.create_train_state(model, tx, jnp.zeros((1, 8, 8, 1)),
                                           jax.random.key(0))
      mask = masks.topk_mask(jax.tree.map(jnp.abs, state.params), 0.7)
      state = state_lib.create_train_state(
          model, tx, jnp.zeros((1, 8, 8, 1)), jax.random.key(0), mask=mask)
      carry = mesh_lib.put_replicated(train.init_carry(state), mesh)
      step = train.make_train_step(model, mesh=mesh, batch_size=64,
                                   mean=ds.mean, std=ds.std, augment=True)
      images = mesh_lib.put_replicated(ds.train_images, mesh)
      labels = mesh_lib.put_replicated(ds.train_labels, mesh)
      perm = mesh_lib.put_replicated(np.asarray(data.epoch_permutation(0, 0, 1437)), mesh)
      if n == 8:
        hlo = step.lower(carry, images, labels, perm, 0).compile().as_text()
        out["all_reduce"] = "all-reduce" in hlo
      losses = []
      for k in range(6):
        before = float(carry.metrics["loss_sum"])
        carry, _ = step(carry, images, labels, perm, k)
        losses.append(float(carry.metrics["loss_sum"]) - before)
      state = carry.state
      out[n] = {"losses": losses,
                "devices": len(state.params["Dense_0"]["kernel"].sharding.device_set),
                "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(
                    (state.params, state.batch_stats, state.opt_state))]}
      mlp = models.get("mlp", 10)
      init = state_lib.create_train_state(mlp, tx, jnp.zeros((1, 8, 8, 1)),
                                          jax.random.key(0))
      result = train.fit(mlp, ds, sys.argv[1] + f"/fit{n}", init=init,
                         num_epochs=1, batch_size=64, mesh=mesh, options=options)
      out[n]["fit"] = result.history[-1]
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one_device(tmp_path):
  env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT") :])
  eight, one = out["8"], out["1"]
  assert out["all_reduce"]  # gradients really are reduced across devices
  assert eight["devices"] == 8 and one["devices"] == 1
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
  # Float32 sums in another order (per-device partial gradients, then an
  # all-reduce): entries that are small differences of large terms differ by
  # a few 1e-6 after 6 steps (XLA's Eigen convolutions accumulate the kernel
  # gradient per device), so the absolute tolerance is 1e-5.
  for a, b in zip(eight["leaves"], one["leaves"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for key in ("train_loss", "test_loss", "test_accuracy"):
    assert eight["fit"][key] == pytest.approx(one["fit"][key], rel=1e-4, abs=1e-6)
