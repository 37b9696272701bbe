"""Tests of ``experiments.workdir``: a reused workdir never becomes another run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]

from experiments import lottery as exp_lottery  # noqa: E402
from experiments import prune_at_init  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments import train as exp_train  # noqa: E402
from experiments import workdir as workdir_lib  # noqa: E402
from experiments.configs import digits  # noqa: E402
from experiments.configs import lottery_digits  # noqa: E402
from sparsejax import checkpoints  # noqa: E402

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def digits_config(**overrides):
  """Random pruning at 90% of the digits MLP, one epoch of 6 steps of 256."""
  config = digits.get_config()
  config.unlock()
  config.update(
    pruner="random",
    sparsity=0.9,
    train=dict(
      num_epochs=1, batch_size=256, progress_bar=False, tensorboard=False, async_checkpointing=False
    ),
  )
  config.update(overrides)
  return config


def snapshot(directory) -> dict:
  """Every file (relative path: SHA-256 of its bytes) and every folder."""
  out = {}
  for root, _dirs, files in os.walk(directory):
    rel = os.path.relpath(root, directory)
    out[rel + os.sep] = "folder"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished experiments.train run of :func:`digits_config`."""
  workdir = tmp_path_factory.mktemp("train")
  result = exp_train.run(digits_config(), str(workdir))
  assert not result.preempted and (workdir / "results.json").exists()
  return workdir


def test_the_signature_is_the_resolved_config_without_result_independent_fields(finished):
  saved = json.loads((finished / workdir_lib.SIGNATURE_FILE).read_text())
  assert saved["runner"] == "experiments.train"
  assert saved["config"]["optimizer"]["weight_decay"] == 5e-4  # resolved
  assert saved["config"]["sparsity"] == 0.9
  assert not set(workdir_lib.RESULT_INDEPENDENT) & set(workdir_lib.flat(saved["config"]))
  assert saved == json.loads(
    json.dumps(
      workdir_lib.signature("experiments.train", exp_train.resolve_config(digits_config()))
    )
  )


@pytest.mark.parametrize(
  "field, value, there",
  [
    ("sparsity", 0.95, "0.9"),
    ("dst", "set", "'none'"),
    ("optimizer.learning_rate", 0.5, "0.05"),
    ("pruner", "snip", "'random'"),
    ("train.num_epochs", 2, "1"),
    ("train.seed", 3, "0"),
  ],
)
def test_a_changed_result_field_is_refused_and_the_workdir_left_as_it_was(
  finished, field, value, there
):
  before = snapshot(finished)
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    group, _, name = field.rpartition(".")
    overrides = {group: {name: value}} if group else {field: value}
    exp_train.run(digits_config(**overrides), str(finished))
  message = str(info.value)
  assert f"{field}: {there} there, {value!r} here" in message
  assert str(finished) in message and "\n" not in message
  assert "Use a new workdir" in message
  assert snapshot(finished) == before


def test_a_directory_without_run_json_is_checked_against_its_config_json(finished, tmp_path):
  legacy = tmp_path / "legacy"
  shutil.copytree(finished, legacy)
  (legacy / workdir_lib.SIGNATURE_FILE).unlink()
  before = snapshot(legacy)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="sparsity: 0.9 there, 0.95 here"):
    exp_train.run(digits_config(sparsity=0.95), str(legacy))
  assert snapshot(legacy) == before


def test_another_runner_is_refused(finished):
  before = snapshot(finished)
  # The same config: only the runner differs.
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    prune_at_init.run(digits_config(), str(finished))
  assert ("(runner: 'experiments.train' there, 'experiments.prune_at_init' here)") in str(
    info.value
  )
  lottery_config = lottery_digits.get_config()
  lottery_config.update(levels=1, train=dict(num_epochs=1, progress_bar=False))
  with pytest.raises(
    checkpoints.CheckpointMismatchError,
    match="runner: 'experiments.train' there, 'experiments.lottery' here",
  ):
    exp_lottery.run(lottery_config, str(finished))
  with pytest.raises(
    checkpoints.CheckpointMismatchError,
    match="runner: 'experiments.train' there, 'experiments.tost' here",
  ):
    workdir_lib.check(str(finished), "experiments.tost", exp_train.resolve_config(digits_config()))
  assert snapshot(finished) == before


def test_a_finished_rerun_does_nothing_also_with_result_independent_changes(finished, capsys):
  before = snapshot(finished)
  history = [json.loads(l) for l in (finished / "metrics.jsonl").read_text().splitlines()]
  for overrides in (
    {},
    dict(
      train=dict(progress_bar=True, tensorboard=True, max_to_keep=1, log_every_steps=3),
      data=dict(dir="/elsewhere"),
    ),
  ):
    capsys.readouterr()
    result = exp_train.run(digits_config(**overrides), str(finished))
    assert not result.preempted and result.history == history
    assert capsys.readouterr().out == (
      f"already finished: {finished} (results.json); nothing to do\n"
    )
    assert snapshot(finished) == before


def test_the_cli_refuses_another_config_in_one_line(finished):
  before = snapshot(finished)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config",
      "experiments/configs/digits.py",
      "--workdir",
      str(finished),
      "--config.train.num_epochs=1",
      "--config.train.batch_size=256",
      "--config.pruner=random",
      "--config.sparsity=0.95",
    ],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [
    f"error: {finished} is from another run (sparsity: 0.9 there, 0.95 here). "
    "Use a new workdir, or the config that wrote it."
  ]
  assert "Traceback" not in proc.stderr
  assert snapshot(finished) == before


def _one_cell_sweep(**overrides):
  config = digits_config(
    methods=("random",), sparsities=(0.9,), seeds=(0,), density_plot_sparsity=None
  )
  config.update(overrides)
  return config


def test_a_sweep_cell_of_another_run_is_refused_before_anything_is_written(finished, tmp_path):
  workdir = tmp_path / "sweep"
  cell = workdir / "cells" / "random_s0.9_seed0"
  # The cell's config, but written by experiments.train.
  shutil.copytree(finished, cell)
  before = snapshot(workdir)
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    sweep.run(_one_cell_sweep(), str(workdir))
  assert str(cell) in str(info.value)
  assert "runner: 'experiments.train' there, 'experiments.sweep' here" in str(info.value)
  assert snapshot(workdir) == before
  # A cell written with another training config, found by --report_only too.
  signature = json.loads((cell / workdir_lib.SIGNATURE_FILE).read_text())
  signature.update(runner="experiments.sweep")
  signature["config"]["optimizer"]["learning_rate"] = 0.5
  (cell / workdir_lib.SIGNATURE_FILE).write_text(json.dumps(signature))
  before = snapshot(workdir)
  with pytest.raises(
    checkpoints.CheckpointMismatchError, match="optimizer.learning_rate: 0.5 there, 0.05 here"
  ):
    sweep.run(_one_cell_sweep(), str(workdir), report_only=True)
  assert snapshot(workdir) == before


def test_a_finished_sweep_rerun_does_nothing(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  first = sweep.run(_one_cell_sweep(), str(workdir))
  assert first["ran"] == ["random_s0.9_seed0"] and not first["finished"]
  cell = json.loads(
    (workdir / "cells" / "random_s0.9_seed0" / workdir_lib.SIGNATURE_FILE).read_text()
  )
  assert cell["runner"] == "experiments.sweep"
  before = snapshot(workdir)
  capsys.readouterr()
  again = sweep.run(_one_cell_sweep(train=dict(progress_bar=True)), str(workdir))
  assert again["finished"] and again["ran"] == []
  assert again["skipped"] == ["random_s0.9_seed0"]
  assert again["table"] == first["table"]
  assert capsys.readouterr().out == (
    f"already finished: {workdir} (1 cells and results.csv, results.md); nothing to do\n"
  )
  assert snapshot(workdir) == before
  # Another grid in the same directory is refused, the directory untouched.
  with pytest.raises(
    checkpoints.CheckpointMismatchError, match=r"sparsities: \[0.9\] there, \[0.9, 0.95\] here"
  ):
    sweep.run(_one_cell_sweep(sparsities=(0.9, 0.95)), str(workdir))
  assert snapshot(workdir) == before
  # --report_only still rebuilds the report.
  (workdir / "results.md").unlink()
  sweep.run(_one_cell_sweep(), str(workdir), report_only=True)
  assert (workdir / "results.md").read_text() == first["table"] + "\n"


def test_a_dst_schedule_without_any_mask_update_is_refused_before_the_claim(tmp_path):
  # One epoch of 5 steps: RigL's first update at step 100 would never come
  # (before, the run trained a fixed mask and reported it as RigL).
  workdir = tmp_path / "w"
  with pytest.raises(
    ValueError,
    match=r"config.dst_update_every=100 leaves no mask "
    r"update before config.dst_end=0.75 of training \(step 4 of 5",
  ):
    exp_train.run(digits_config(dst="rigl"), str(workdir))
  assert not workdir.exists()  # nothing written: the fixed config may use it
  result = exp_train.run(digits_config(dst="rigl", dst_update_every=2), str(workdir))
  assert not result.preempted and (workdir / "results.json").exists()
