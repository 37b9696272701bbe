"""Tests of sparsejax.lottery and experiments.lottery (SPEC §3): exact IMP
densities, rewinding, the controls, ticket files, the resumable experiment and
the train.fit hooks it uses. Everything runs on the digits dataset with
LeNet-300-100 (50,200 prunable weights) in seconds."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]

from experiments import lottery as exp_lottery  # noqa: E402
from experiments.configs import lottery_cpu_small, lottery_digits, lottery_openlth  # noqa: E402
from experiments import common  # noqa: E402
from sparsejax import budgets, checkpoints, data, lottery, masks, models, optim, schedules, train  # noqa: E402
from sparsejax import mesh as mesh_lib  # noqa: E402
from tests.sigterm_helper import sigterm_at_step  # noqa: E402

#: Prunable weights of the MLP on 8x8 digits: 64*300 + 300*100 + 100*10.
N = 50_200
SAMPLE = jnp.zeros((1, 8, 8, 1))
TIMING_KEYS = ("epoch_seconds", "steps_per_second")


def mlp_config(**overrides):
  """Digits lottery config, small: 2 epochs of 22 steps, rewind to step 5."""
  config = lottery_digits.get_config()
  config.update(dict(num_epochs=2, levels=2, rewind_step=5, progress_bar=False,
                     log_every_steps=11, max_to_keep=5))
  config.update(overrides)
  return config


def mlp_params(seed: int = 0) -> dict:
  """Random host params with the MLP's structure and shapes (no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": (64, 300), "Dense_1": (300, 100), "Dense_2": (100, 10)}
  return {name: {"kernel": rng.normal(size=shape).astype(np.float32),
                 "bias": rng.normal(size=shape[1:]).astype(np.float32)}
          for name, shape in shapes.items()}


def mlp_states(*steps: int):
  """Sparse-format MLP train states (all-ones mask) after each of ``steps``
  SGD steps on digits (one run)."""
  model = models.get("mlp", 10)
  config = dict(learning_rate=0.05, num_epochs=1, lr_schedule="cosine",
                weight_decay=5e-4)
  tx = schedules.make_optimizer(config, 22)
  state = train.create_train_state(model, tx, SAMPLE, jax.random.key(0),
                                   mask=masks.ones_like)
  ds = data.load("digits")
  mesh = mesh_lib.make_mesh(1)
  step = train.make_train_step(model, mesh=mesh, batch_size=64,
                               mean=ds.mean, std=ds.std)
  state = mesh_lib.put_replicated(state, mesh)
  metrics = mesh_lib.put_replicated(train.init_train_metrics(), mesh)
  images = mesh_lib.put_replicated(ds.train_images, mesh)
  labels = mesh_lib.put_replicated(ds.train_labels, mesh)
  perm = mesh_lib.put_replicated(np.asarray(data.epoch_permutation(0, 0, 1437)), mesh)
  states = {0: jax.device_get(state)}
  for k in range(max(steps)):
    state, metrics, _, _ = step(state, metrics, images, labels, perm, k)
    states[k + 1] = jax.device_get(state)  # host copies: the step donates
  return model, tx, [states[n] for n in steps]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  """Bitwise equal leaves, equal structure, shapes and dtypes (a train state's
  static optimiser functions are code of each run, not compared)."""
  assert checkpoints.tree_signature(a) == checkpoints.tree_signature(b)
  assert len(leaves(a)) == len(leaves(b))
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)


def kernels(tree):
  return {p: np.asarray(x) for p, x in masks.named_leaves(tree)
          if p.endswith("kernel")}


def without_timing(history):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def read_history(workdir):
  with open(Path(workdir) / "metrics.jsonl") as f:
    return without_timing([json.loads(line) for line in f if line.strip()])


def checkpoint_params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(workdir) / "checkpoints" / str(step) / "state")[
        "state"]["params"]


# ----------------------------------------------------------------------------
# Pruning levels
# ----------------------------------------------------------------------------


def test_density_after_L_levels_is_exactly_0_8_to_the_L():
  params = mlp_params()
  mask = masks.ones_like(params)
  # round(0.8^L * 50,200): 40,160; 32,128; 25,702.4; 20,561.92; 16,449.536.
  expected = [40_160, 32_128, 25_702, 20_562, 16_450]
  for level, count in enumerate(expected, start=1):
    # Stand-in for the weights trained at level L - 1: every weight moved.
    noise = mlp_params(seed=level)
    trained = masks.apply(jax.tree.map(lambda p, n: p + 0.1 * n, params, noise),
                          mask)
    new = lottery.prune_level(trained, mask, level)
    assert masks.summary(new).kept == count == round(0.8 ** level * N)
    assert lottery.level_sparsity(level) == pytest.approx(1 - 0.8 ** level)
    for (path, old_m), new_m, w in zip(masks.named_leaves(mask), leaves(new),
                                       leaves(trained)):
      old_m = np.asarray(old_m)
      assert new_m.dtype == bool
      assert not np.any(new_m & ~old_m), path  # only kept weights survive
      if path.endswith("bias"):
        assert new_m.all(), path  # not prunable
    # Global magnitude over the remaining weights: every survivor is at least
    # as large as every weight removed at this level, whatever its layer.
    kept_mags = [np.abs(w)[m] for w, m in zip(kernels(trained).values(),
                                               kernels(new).values())]
    removed = [np.abs(w)[o & ~m] for w, o, m in zip(
        kernels(trained).values(), kernels(mask).values(), kernels(new).values())]
    assert np.concatenate(kept_mags).min() >= np.concatenate(removed).max()
    mask = new


def test_prune_level_budgets_prunable_and_errors():
  model = models.get("mlp", 10)
  params = mlp_params()
  ones = masks.ones_like(params)
  # Layer-wise IMP: every layer keeps round(0.64 * its size) at level 2.
  level_1 = lottery.prune_level(params, ones, 1, budget=budgets.Uniform())
  uniform = lottery.prune_level(params, level_1, 2, budget=budgets.Uniform())
  for layer in masks.summary(uniform).layers:
    assert layer.kept == round(0.64 * layer.total), layer.path
  # A dense classifier is not counted: N = 64*300 + 300*100.
  keep_classifier = masks.Prunable(keep_last_dense=True,
                                   order=models.layer_order(model, SAMPLE))
  m = lottery.prune_level(params, ones, 1, prunable=keep_classifier)
  assert np.asarray(m["Dense_2"]["kernel"]).all()
  assert masks.summary(m, keep_classifier).kept == round(0.8 * 49_200)
  # Another fraction: 50% per level.
  half = lottery.prune_level(params, ones, 1, 0.5)
  assert masks.summary(lottery.prune_level(params, half, 2, 0.5)).kept == N // 4
  with pytest.raises(ValueError, match="pass the mask of level 1"):
    lottery.prune_level(params, lottery.prune_level(params, half, 2, 0.5), 2)
  with pytest.raises(ValueError, match="fraction"):
    lottery.prune_level(params, ones, 1, fraction=1.0)
  with pytest.raises(ValueError, match="level"):
    lottery.level_sparsity(-1)
  with pytest.raises(ValueError, match="budget"):
    lottery.prune_level(params, ones, 1, budget=budgets.ERK())
  with pytest.raises(ValueError, match="budgets.parse"):  # a string is refused
    lottery.prune_level(params, ones, 1, budget="uniform")


def test_random_reprune_keeps_per_layer_counts_at_new_positions():
  params = mlp_params()
  mask = lottery.prune_level(params, lottery.prune_level(
      params, masks.ones_like(params), 1), 2)
  a = lottery.random_reprune_mask(jax.random.key(0), mask)
  b = lottery.random_reprune_mask(jax.random.key(1), mask)
  assert_trees_equal(a, lottery.random_reprune_mask(jax.random.key(0), mask))
  for (path, m), ma, mb in zip(masks.named_leaves(mask), leaves(a), leaves(b)):
    m = np.asarray(m)
    assert ma.dtype == bool and ma.shape == m.shape
    assert ma.sum() == m.sum() and mb.sum() == m.sum(), path  # exact counts
    if path.endswith("bias"):
      assert ma.all()  # all-True leaves are unchanged
    else:  # random positions: a share of the ticket's equal to the density
      overlap = (ma & m).sum() / m.sum()
      assert abs(overlap - m.mean()) < 0.03, (path, overlap, m.mean())
      assert not np.array_equal(ma, mb)


# ----------------------------------------------------------------------------
# Rewinding
# ----------------------------------------------------------------------------


def test_rewind_restores_the_rewind_point_exactly():
  model, tx, (init, point, trained) = mlp_states(0, 3, 9)  # rewind point θ_3
  mask = lottery.prune_level(trained.params, masks.ones_like(trained.params), 1)
  start = lottery.rewind_state(point, mask)
  # Survivors: bitwise the values at the rewind point; pruned: exactly 0.
  for p_start, p_point, m in zip(leaves(start.params), leaves(point.params),
                                 leaves(mask)):
    np.testing.assert_array_equal(p_start[m], p_point[m])
    assert np.all(p_start[~m] == 0.0) and np.signbit(p_start[~m]).sum() == 0
  assert_trees_equal(start.params, lottery.rewind(point.params, mask))
  # Same step, key and statistics; fresh optimiser state holding the mask:
  # zero momentum, the schedule still at step 3.
  assert int(start.step) == 3
  np.testing.assert_array_equal(start.rng, point.rng)
  assert_trees_equal(start.mask, mask)
  get = optax.tree_utils.tree_get
  assert any(np.any(x != 0) for x in leaves(get(point.opt_state, "trace")))
  assert all(np.all(x == 0) for x in leaves(get(start.opt_state, "trace")))
  assert int(get(start.opt_state, "count")) == 3
  assert checkpoints.tree_signature(start) == checkpoints.tree_signature(point)
  # At step 0 the fresh state is exactly a new optimiser's state.
  at_init = lottery.rewind_state(init, mask)
  assert_trees_equal(at_init.opt_state, optim.masked(tx, mask).init(at_init.params))
  # The random re-initialisation control: other weights under the same mask.
  other = train.init_variables(model, SAMPLE, jax.random.key(7))["params"]
  reinit = lottery.rewind_state(point, mask, params=other)
  assert_trees_equal(reinit.params, masks.apply(other, mask))
  assert int(reinit.step) == 3
  dense = point.replace(opt_state=point.opt_state.inner_state)  # no mask
  with pytest.raises(ValueError, match="mask"):
    lottery.rewind_state(dense, mask)


def test_ticket_files_round_trip(tmp_path):
  params = mlp_params()
  mask = lottery.prune_level(params, masks.ones_like(params), 1)
  rewound = lottery.rewind(params, mask)
  assert not lottery.ticket_exists(tmp_path / "t")
  lottery.save_ticket(tmp_path / "t", mask, rewound, {"level": 1, "model": "mlp"})
  assert lottery.ticket_exists(tmp_path / "t")
  loaded_mask, loaded_params, meta = lottery.load_ticket(tmp_path / "t")
  assert meta == {"level": 1, "model": "mlp"}
  assert_trees_equal(loaded_mask, mask)
  assert_trees_equal(loaded_params, rewound)
  assert all(x.dtype == bool for x in leaves(loaded_mask))
  # The loaded mask is a valid mask for the same model's params.
  masks.check_mask(loaded_mask, params)
  with pytest.raises(FileNotFoundError, match="no lottery ticket"):
    lottery.load_ticket(tmp_path)
  with pytest.raises(ValueError, match="nested dicts"):
    lottery.save_ticket(tmp_path / "list", [np.ones(3, bool)], [np.ones(3)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: levels 0..2, rewind to step 5, both controls."""
  workdir = tmp_path_factory.mktemp("lottery")
  config = mlp_config()
  return config, workdir, exp_lottery.run(config, str(workdir))


# ----------------------------------------------------------------------------
# The train.fit hooks: initial_state and stop_at_step
# ----------------------------------------------------------------------------


def test_fit_stop_at_step_then_resume_is_bitwise_uninterrupted(reference,
                                                               tmp_path):
  config, ref_dir, _ = reference
  ds = data.load("digits")
  model = models.get("mlp", 10)
  config = common.resolve_config(config, exp_lottery.check_config)

  def fit(workdir, **kwargs):
    return train.fit(config, tmp_path / workdir, model=model, dataset=ds,
                     mask=masks.ones_like, **kwargs)

  # The experiment's rewind point: the dense run stopped at step 5, mid-epoch.
  shutil.copytree(ref_dir / "rewind_point", tmp_path / "part")
  part = fit("part", stop_at_step=5)
  assert part.resumed_from == 5 and int(part.state.step) == 5
  assert part.history == [] and not part.preempted
  rest = fit("part")  # the same run continued to the end of the schedule
  whole = fit("whole")
  assert rest.resumed_from == 5 and int(rest.state.step) == 44
  assert without_timing(rest.history) == without_timing(whole.history)
  assert_trees_equal(rest.state, whole.state)
  # initial_state: a state of another structure, or with a mask, is refused.
  with pytest.raises(ValueError, match="either mask or initial_state"):
    fit("x", initial_state=whole.state)
  dense = whole.state.replace(opt_state=whole.state.opt_state.inner_state)
  with pytest.raises(ValueError, match="structure"):
    train.fit(config, tmp_path / "x", model=model, dataset=ds,
              initial_state=dense.replace(opt_state=optax.sgd(0.1).init(
                  dense.params)))


# ----------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------


def test_experiment_writes_table_plot_and_ticket(reference):
  config, workdir, result = reference
  assert not result.preempted
  rows = result.rows
  assert [r["level"] for r in rows] == [0, 1, 2]
  assert [r["kept"] for r in rows] == [N, 40_160, 32_128]
  assert [r["density"] for r in rows] == pytest.approx([1.0, 0.8, 0.64])
  for r in rows:
    assert r["ticket"] > 0.5  # chance is 0.1
    for control in ("reinit", "reprune"):
      assert (r.get(control) is None) == (r["level"] == 0)
      assert r["level"] == 0 or r[control] > 0.5
  with open(workdir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["kept"]) for r in table] == [N, 40_160, 32_128]
  assert float(table[2]["reprune"]) == rows[2]["reprune"]
  md = (workdir / "results.md").read_text().splitlines()
  assert md[0] == "| level | density (%) | ticket | random reinit | random reprune |"
  assert md[2].startswith("| 0 | 100.00 | ") and md[2].endswith(" | - | - |")
  assert md[4].startswith("| 2 | 64.00 | ")
  assert (workdir / "accuracy_vs_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((workdir / "results.json").read_text())["levels"] == rows
  for level in (1, 2):
    for control in ("control_reinit", "control_reprune"):
      assert (workdir / f"level_{level}" / control / "metrics.jsonl").exists()
  assert not (workdir / "level_0" / "control_reinit").exists()

  # Every level starts from the rewind point θ_5: the ticket's weights are
  # bitwise θ_5 on the survivors, 0 elsewhere, and training resumes at step 5.
  theta_k = checkpoint_params(workdir / "rewind_point", 5)
  for level in (1, 2):
    mask, params, meta = lottery.load_ticket(workdir / f"level_{level}" / "ticket")
    assert meta["level"] == level and meta["rewind_step"] == 5
    assert_trees_equal(params, masks.apply(theta_k, mask))
  assert [r["step"] for r in read_history(workdir / "level_1")] == [22, 44]
  # The masks are nested: level 2 only keeps weights that level 1 kept.
  m1 = lottery.load_ticket(workdir / "level_1" / "ticket")[0]
  m2 = lottery.load_ticket(workdir / "level_2" / "ticket")[0]
  assert not any(np.any(b & ~a) for a, b in zip(leaves(m1), leaves(m2)))

  # The exported winning ticket: the last level's mask and rewind weights.
  mask, params, meta = lottery.load_ticket(result.ticket_dir)
  assert result.ticket_dir == str(workdir / "ticket")
  assert_trees_equal(mask, m2)
  assert_trees_equal(params, masks.apply(theta_k, m2))
  assert meta["model"] == "mlp" and meta["dataset"] == "digits"
  assert meta["level"] == 2 and meta["density"] == pytest.approx(0.64)
  assert meta["kept"] == 32_128 and meta["test_accuracy"] == rows[2]["ticket"]


def test_exported_ticket_trains_as_the_lth_mask_in_experiments_train(reference, tmp_path):
  from experiments import common
  from experiments.configs import digits as digits_config

  _, workdir, result = reference
  config = digits_config.get_config()
  config.update(dict(pruner="ticket", mask_path=result.ticket_dir, num_epochs=1,
                     progress_bar=False, tensorboard=False))
  config.sparsity = None  # the ticket's
  resolved = common.resolve_config(config)
  assert resolved.sparsity == pytest.approx(1 - 32_128 / N)
  run = common.run(resolved, str(tmp_path / "lth"))
  ticket_mask = lottery.load_ticket(result.ticket_dir)[0]
  assert_trees_equal(run.state.mask, ticket_mask)
  saved = json.loads((tmp_path / "lth" / "pruning.json").read_text())
  assert saved["method"] == "ticket"
  assert saved["sparsity"] == pytest.approx(1 - 32_128 / N)
  config.mask_path = str(tmp_path / "no_ticket_here")
  with pytest.raises(ValueError, match="needs config.mask_path, a ticket directory"):
    common.resolve_config(config)


def test_rerun_of_a_finished_experiment_is_a_no_op(reference):
  config, workdir, result = reference
  again = exp_lottery.run(config, str(workdir))
  assert again.rows == result.rows
  assert_trees_equal(lottery.load_ticket(again.ticket_dir)[0],
                     lottery.load_ticket(result.ticket_dir)[0])
  with pytest.raises(ValueError, match="another run"):
    exp_lottery.run(mlp_config(prune_fraction=0.5), str(workdir))


def test_interrupted_level_resumes_to_the_same_mask(reference, tmp_path):
  _, ref_dir, ref = reference
  # A run whose rewind point and level 0 are done (those of the reference).
  for done in ("rewind_point", "level_0"):
    shutil.copytree(ref_dir / done, tmp_path / done)
  # SIGTERM in the middle of level 1 (global step 30: epoch 2, step 8 of 22).
  with sigterm_at_step(30):
    stopped = exp_lottery.run(mlp_config(controls=()), str(tmp_path))
  assert stopped.preempted and stopped.ticket_dir is None
  assert len(stopped.rows) == 1
  steps = sorted(int(p.name) for p in (tmp_path / "level_1" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [22, 30]
  resumed = exp_lottery.run(mlp_config(controls=()), str(tmp_path))
  assert not resumed.preempted
  assert [r["ticket"] for r in resumed.rows] == [r["ticket"] for r in ref.rows]
  assert read_history(tmp_path / "level_1") == read_history(ref_dir / "level_1")
  for level in (1, 2):
    assert_trees_equal(
        lottery.load_ticket(tmp_path / f"level_{level}" / "ticket")[0],
        lottery.load_ticket(ref_dir / f"level_{level}" / "ticket")[0])
  for a, b in zip(lottery.load_ticket(resumed.ticket_dir)[:2],
                  lottery.load_ticket(ref.ticket_dir)[:2]):
    assert_trees_equal(a, b)


# ----------------------------------------------------------------------------
# Configs and command line
# ----------------------------------------------------------------------------


def test_openlth_config_is_the_reference_protocol():
  config = common.resolve_config(lottery_openlth.get_config(), exp_lottery.check_config)
  assert (config.model, config.dataset) == ("resnet20", "cifar10")
  assert (config.num_epochs, config.batch_size, config.learning_rate) == (160, 128, 0.1)
  assert config.momentum == 0.9 and not config.nesterov
  assert config.weight_decay == 1e-4 and config.budget == "global"
  assert config.prune_fraction == 0.2 and config.levels >= 10
  assert config.rewind_step == 500 and config.rewind_epochs is None
  assert config.controls == ("reinit", "reprune")
  assert "pruner" not in config and "sparsity" not in config
  sched = schedules.lr_schedule(config, steps_per_epoch=390)
  np.testing.assert_allclose(
      [sched(80 * 390 - 1), sched(80 * 390), sched(120 * 390)],
      [0.1, 0.01, 0.001], rtol=1e-6)
  assert exp_lottery.rewind_steps(config, 390) == 500
  config.rewind_epochs = 1.0
  assert exp_lottery.rewind_steps(config, 390) == 390

  small = common.resolve_config(lottery_cpu_small.get_config(),
                                 exp_lottery.check_config)
  assert (small.model, small.dataset) == ("resnet20", "cifar10")
  assert 3 <= small.levels <= 4 and small.train_subset is not None
  assert small.eval_every_epochs > small.num_epochs
  assert not small.tensorboard and not small.progress_bar


@pytest.mark.parametrize("field, value, match", [
    ("levels", -1, "levels"), ("prune_fraction", 0.0, "fraction"),
    ("controls", ("reinit", "shuffle"), "controls"), ("budget", "erk", "budget"),
    ("rewind_step", -5, "rewind"), ("prunable", "all", "prunable")])
def test_bad_config_values_are_refused(field, value, match):
  config = lottery_digits.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    common.resolve_config(config, exp_lottery.check_config)


def test_command_line_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.lottery", "--config",
       "experiments/configs/lottery_digits.py", "--workdir", str(tmp_path),
       "--config.levels=0", "--config.num_epochs=1", "--config.controls=()",
       "--config.progress_bar=false"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = lines.index("| level | density (%) | ticket |")
  assert lines[header + 2].startswith("| 0 | 100.00 | ")
  assert lottery.load_ticket(tmp_path / "ticket")[2]["density"] == 1.0
