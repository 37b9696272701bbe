"""Tests of experiments.lottery (SPEC §3): the resumable IMP experiment, its
table, plot and ticket, the exported ticket in experiments.train, its configs
and command line. On digits with LeNet-300-100 (50,200 prunable weights)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from experiments import common  # noqa: E402
from experiments import lottery as exp_lottery  # noqa: E402
from experiments.configs import lottery_cpu_small  # noqa: E402
from experiments.configs import lottery_digits  # noqa: E402
from experiments.configs import lottery_openlth  # noqa: E402
from sparsejax import lottery  # noqa: E402
from sparsejax import masks  # noqa: E402
from tests.sigterm_helper import sigterm_at_step  # noqa: E402
from tests.test_lottery import N  # noqa: E402
from tests.test_lottery import assert_trees_equal  # noqa: E402
from tests.test_lottery import checkpoint_params  # noqa: E402
from tests.test_lottery import leaves  # noqa: E402
from tests.test_lottery import read_history  # noqa: E402


def mlp_config(**overrides):
  """Digits lottery config, small: 2 epochs of 22 steps, rewind to step 5."""
  config = lottery_digits.get_config()
  config.update(
    levels=2,
    rewind_step=5,
    train=dict(num_epochs=2, progress_bar=False, log_every_steps=11, max_to_keep=5),
  )
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: levels 0..2, rewind to step 5, both controls."""
  workdir = tmp_path_factory.mktemp("lottery")
  config = mlp_config()
  return config, workdir, exp_lottery.run(config, str(workdir))


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
  config.update(
    pruner="ticket",
    mask_path=result.ticket_dir,
    train=dict(num_epochs=1, progress_bar=False, tensorboard=False),
  )
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
  assert_trees_equal(
    lottery.load_ticket(again.ticket_dir)[0], lottery.load_ticket(result.ticket_dir)[0]
  )
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
  steps = sorted(
    int(p.name) for p in (tmp_path / "level_1" / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert steps == [22, 30]
  resumed = exp_lottery.run(mlp_config(controls=()), str(tmp_path))
  assert not resumed.preempted
  assert [r["ticket"] for r in resumed.rows] == [r["ticket"] for r in ref.rows]
  assert read_history(tmp_path / "level_1") == read_history(ref_dir / "level_1")
  for level in (1, 2):
    assert_trees_equal(
      lottery.load_ticket(tmp_path / f"level_{level}" / "ticket")[0],
      lottery.load_ticket(ref_dir / f"level_{level}" / "ticket")[0],
    )
  for a, b in zip(
    lottery.load_ticket(resumed.ticket_dir)[:2], lottery.load_ticket(ref.ticket_dir)[:2]
  ):
    assert_trees_equal(a, b)


# ----------------------------------------------------------------------------
# Configs and command line
# ----------------------------------------------------------------------------


def test_openlth_config_is_the_reference_protocol():
  config = common.resolve_config(lottery_openlth.get_config(), exp_lottery.check_config)
  assert (config.model.name, config.data.name) == ("resnet20", "cifar10")
  assert (config.train.num_epochs, config.train.batch_size, config.optimizer.learning_rate) == (
    160,
    128,
    0.1,
  )
  assert config.optimizer.momentum == 0.9 and not config.optimizer.nesterov
  assert config.optimizer.weight_decay == 1e-4 and config.budget == "global"
  assert config.prune_fraction == 0.2 and config.levels >= 10
  assert config.rewind_step == 500 and config.rewind_epochs is None
  assert config.controls == ("reinit", "reprune")
  assert "pruner" not in config and "sparsity" not in config
  sched = common.lr_schedule(config, steps_per_epoch=390)
  np.testing.assert_allclose(
    [sched(80 * 390 - 1), sched(80 * 390), sched(120 * 390)], [0.1, 0.01, 0.001], rtol=1e-6
  )
  assert exp_lottery.rewind_steps(config, 390) == 500
  config.rewind_epochs = 1.0
  assert exp_lottery.rewind_steps(config, 390) == 390

  small = common.resolve_config(lottery_cpu_small.get_config(), exp_lottery.check_config)
  assert (small.model.name, small.data.name) == ("resnet20", "cifar10")
  assert 3 <= small.levels <= 4 and small.data.train_subset is not None
  assert small.train.eval_every_epochs > small.train.num_epochs
  assert not small.train.tensorboard and not small.train.progress_bar


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("levels", -1, "levels"),
    ("prune_fraction", 0.0, "fraction"),
    ("controls", ("reinit", "shuffle"), "controls"),
    ("budget", "erk", "budget"),
    ("rewind_step", -5, "rewind"),
    ("prunable", "all", "prunable"),
  ],
)
def test_bad_config_values_are_refused(field, value, match):
  config = lottery_digits.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    common.resolve_config(config, exp_lottery.check_config)


def test_command_line_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.lottery",
      "--config",
      "experiments/configs/lottery_digits.py",
      "--workdir",
      str(tmp_path),
      "--config.levels=0",
      "--config.train.num_epochs=1",
      "--config.controls=()",
      "--config.train.progress_bar=false",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = lines.index("| level | density (%) | ticket |")
  assert lines[header + 2].startswith("| 0 | 100.00 | ")
  assert lottery.load_ticket(tmp_path / "ticket")[2]["density"] == 1.0
