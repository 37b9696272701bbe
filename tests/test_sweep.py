"""Tests of ``experiments.prune_at_init`` and ``experiments.sweep`` (digits, MLP)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

REPO = Path(__file__).resolve().parents[1]

from experiments import common  # noqa: E402
from experiments import prune_at_init  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments.configs import digits  # noqa: E402
from experiments.configs import prune_at_init as prune_at_init_config  # noqa: E402
from experiments.configs import sweep_cpu_long  # noqa: E402
from experiments.configs import sweep_cpu_small  # noqa: E402
from experiments.configs import sweep_synflow_paper  # noqa: E402
from sparsejax import data  # noqa: E402
from sparsejax import masks  # noqa: E402
from sparsejax import models  # noqa: E402
from sparsejax import scores  # noqa: E402
from sparsejax import state as state_lib  # noqa: E402
from tests.sigterm_helper import sigterm_at_step  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def digits_config(**overrides) -> ml_collections.ConfigDict:
  """The digits preset, one epoch of 22 steps of 64, no bar, no TensorBoard."""
  config = digits.get_config()
  config.unlock()
  config.update(train=dict(num_epochs=1, batch_size=64, progress_bar=False, tensorboard=False))
  config.update(overrides)
  return config


def sweep_config(**overrides) -> ml_collections.ConfigDict:
  config = digits_config(
    methods=("magnitude", "synflow"), sparsities=(0.9, 0.99), seeds=(0,), density_plot_sparsity=None
  )
  config.update(overrides)
  return config


def read_json(path):
  return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------
# experiments.prune_at_init
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["snip", "synflow"])
def test_prune_at_init_prunes_reports_and_trains(method, tmp_path, capsys):
  config = digits_config(pruner=method, sparsity=0.9, train=dict(seed=3))
  result = prune_at_init.run(config, str(tmp_path))
  assert not result.preempted and len(result.history) == 1

  # The report: exact counts, effective >= nominal, the scoring time.
  pruning = read_json(tmp_path / "pruning.json")
  report = pruning["report"]
  assert pruning["method"] == method and pruning["sparsity"] == 0.9
  assert pruning["scoring_seconds"] > 0
  assert report["kept"] == masks.kept_count(report["total"], 0.9)
  assert report["sparsity"] == pytest.approx(0.9, abs=1e-4)
  assert report["effective_sparsity"] >= report["sparsity"]
  assert report["collapsed"] == []
  assert set(report["layers"]) == {f"Dense_{i}/kernel" for i in range(3)}
  assert sum(l["kept"] for l in report["layers"].values()) == report["kept"]
  text = (tmp_path / "pruning.txt").read_text()
  assert "effective sparsity" in text and "Dense_1/kernel" in text
  assert "effective sparsity" in capsys.readouterr().out  # printed too

  # The trained mask is the method's mask of the initial params, scored on
  # a class-balanced batch of 10 per class drawn with the run's seed (SNIP)
  # or on an all-ones input (SynFlow, 100 rounds).
  ds = data.load("digits")
  model = models.get("mlp", ds.num_classes)
  init = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)), jax.random.key(3)
  )
  params, apply_fn = scores.linen_apply_fn(model, init.variables)
  expected = scores.prune_at_init(
    method,
    params,
    sparsity=0.9,
    apply_fn=apply_fn,
    batches=data.class_balanced_batch(ds, 10, 3),
    input_shape=(8, 8, 1),
  )
  for got, want in zip(jax.tree.leaves(result.state.mask), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  # It trained, and results.json carries the pruning summary.
  results = read_json(tmp_path / "results.json")
  assert results["final"]["test_accuracy"] > 0.3  # chance is 0.1
  assert results["epochs"] == 1 and results["train_seconds"] > 0
  assert results["mask"]["kept"] == report["kept"]
  summary = results["pruning"]["report"]
  assert summary["effective_sparsity"] == report["effective_sparsity"]
  assert "layers" not in summary


def test_prune_at_init_refuses_dense_and_bad_scoring_fields(tmp_path):
  with pytest.raises(ValueError, match="needs a pruning method"):
    prune_at_init.run(digits_config(pruner="dense"), str(tmp_path))
  with pytest.raises(ValueError, match="score_bn_mode"):
    common.resolve_config(digits_config(pruner="snip", score_bn_mode="test"))
  with pytest.raises(ValueError, match="synflow_dtype"):
    common.resolve_config(digits_config(pruner="synflow", synflow_dtype="int8"))
  assert not (tmp_path / "results.json").exists()


def test_prune_at_init_config_is_the_synflow_protocol():
  config = prune_at_init_config.get_config("vgg16,cifar100")
  assert (config.model.name, config.data.name, config.pruner) == ("vgg16", "cifar100", "synflow")
  assert config.optimizer.nesterov and config.optimizer.decay_epochs == (60, 120)
  assert config.optimizer.weight_decay == 5e-4 and config.train.num_epochs == 160
  assert config.score_samples_per_class == 10 and config.pruning_rounds is None


# ----------------------------------------------------------------------------
# experiments.sweep
# ----------------------------------------------------------------------------


def test_grid_has_one_dense_cell_per_seed_and_checks_its_fields():
  config = sweep_config(sparsities=(0.99, 0.0, 0.9), seeds=(0, 1))
  names = [c.name for c in sweep.grid(config)]
  assert names == [
    "dense_s0_seed0",
    "magnitude_s0.9_seed0",
    "synflow_s0.9_seed0",
    "magnitude_s0.99_seed0",
    "synflow_s0.99_seed0",
    "dense_s0_seed1",
    "magnitude_s0.9_seed1",
    "synflow_s0.9_seed1",
    "magnitude_s0.99_seed1",
    "synflow_s0.99_seed1",
  ]
  cell = sweep.cell_config(config, sweep.Cell("synflow", 0.99, 1))
  assert (cell.pruner, cell.sparsity, cell.train.seed) == ("synflow", 0.99, 1)
  assert "methods" not in cell and "seeds" not in cell
  for bad in [
    dict(methods=("snipp",)),
    dict(methods=("dense",)),
    dict(sparsities=(0.9, 0.9)),
    dict(sparsities=(1.0,)),
    dict(seeds=()),
  ]:
    with pytest.raises(ValueError):
      sweep.grid(sweep_config(**bad))


def test_table_marks_collapse_and_missing_cells():
  config = sweep_config(seeds=(0, 1))
  row = dict(collapsed_layers="", effectively_collapsed_layers="")
  rows = [
    dict(row, method="magnitude", sparsity=0.9, seed=0, test_accuracy=0.50),
    dict(row, method="magnitude", sparsity=0.9, seed=1, test_accuracy=0.60),
    dict(
      row,
      method="synflow",
      sparsity=0.9,
      seed=0,
      test_accuracy=0.70,
      effectively_collapsed_layers="Dense_1/kernel",
    ),
    dict(
      row,
      method="magnitude",
      sparsity=0.99,
      seed=0,
      test_accuracy=0.10,
      collapsed_layers="Dense_1/kernel",
      effectively_collapsed_layers="Dense_1/kernel",
    ),
  ]
  lines = sweep.format_table(config, rows).splitlines()
  assert "mean ± std over 2 seeds" in lines[0] and "1 epoch)" in lines[0]
  assert lines[2] == "| sparsity | compression | magnitude | synflow |"
  assert lines[4] == "| 90% | 10× | 55.0 ± 7.1 | 70.0 ± 0.0 † (1/2 seeds) |"
  assert lines[5] == "| 99% | 100× | 10.0 ± 0.0 * (1/2 seeds) | – |"
  assert lines[-2].startswith("* layer collapse")
  assert lines[-1].startswith("† effective layer collapse")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 2 x 2 x 1 sweep, interrupted by SIGTERM in its first cell, then resumed."""
  workdir = tmp_path_factory.mktemp("sweep")
  first = workdir / "cells" / "magnitude_s0.9_seed0"
  with sigterm_at_step(10):
    interrupted = sweep.run(sweep_config(), str(workdir))
  pruned_at = (first / "pruning.json").stat().st_mtime_ns
  with pytest.warns(RuntimeWarning, match="layer collapse"):  # magnitude at 99%
    finished = sweep.run(sweep_config(), str(workdir))
  return workdir, interrupted, finished, pruned_at


def test_sweep_resumes_an_interrupted_cell(swept):
  workdir, interrupted, finished, pruned_at = swept
  first = workdir / "cells" / "magnitude_s0.9_seed0"
  assert interrupted["preempted"] and interrupted["ran"] == []
  assert interrupted["rows"] == [] and len(interrupted["missing"]) == 4
  assert not finished["preempted"] and finished["missing"] == []
  assert finished["ran"] == [
    "magnitude_s0.9_seed0",
    "synflow_s0.9_seed0",
    "magnitude_s0.99_seed0",
    "synflow_s0.99_seed0",
  ]
  # Resumed from the SIGTERM checkpoint: the mask was not scored again.
  assert (first / "pruning.json").stat().st_mtime_ns == pruned_at
  metrics = (first / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in metrics] == [22]


def test_sweep_writes_csv_table_and_plots(swept):
  workdir, _, finished, _ = swept
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], float(r["sparsity"]), int(r["seed"])) for r in rows] == [
    ("magnitude", 0.9, 0),
    ("synflow", 0.9, 0),
    ("magnitude", 0.99, 0),
    ("synflow", 0.99, 0),
  ]
  assert tuple(rows[0]) == sweep.CSV_FIELDS
  for r in rows:
    assert float(r["nominal_sparsity"]) == pytest.approx(float(r["sparsity"]), abs=1e-4)
    assert float(r["effective_sparsity"]) >= float(r["nominal_sparsity"]) - 1e-9
    assert float(r["scoring_seconds"]) > 0 and float(r["training_seconds"]) > 0
    assert int(r["epochs"]) == 1
    cell = read_json(workdir / "cells" / r["cell"] / "results.json")
    assert float(r["test_accuracy"]) == cell["final"]["test_accuracy"]
  assert float(rows[1]["test_accuracy"]) > 0.5  # SynFlow, 90% sparse, trained
  # Global magnitude at 99% empties the MLP's middle layer (a real collapse):
  # reported in the CSV and marked in the table, and the cell still trained.
  assert rows[2]["collapsed_layers"] == "Dense_1/kernel"
  assert float(rows[2]["effective_sparsity"]) == 1.0

  table = (workdir / "results.md").read_text()
  assert table == finished["table"] + "\n"
  lines = table.splitlines()
  assert lines[2] == "| sparsity | compression | magnitude | synflow |"
  acc = {(r["method"], r["sparsity"]): 100 * float(r["test_accuracy"]) for r in rows}
  assert lines[4].startswith(f"| 90% | 10× | {acc[('magnitude', '0.9')]:.1f}")
  assert lines[5].startswith("| 99% | 100× |")
  assert lines[5].split("|")[3].strip().endswith(sweep.COLLAPSED_MARK)
  assert lines[-1].startswith("* layer collapse")
  for name in ("accuracy_vs_sparsity.png", "layer_density.png"):
    png = (workdir / name).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_sweep_rerun_skips_finished_cells(swept):
  workdir, _, finished, _ = swept
  results = sorted((workdir / "cells").glob("*/results.json"))
  before = [p.stat().st_mtime_ns for p in results]
  again = sweep.run(sweep_config(), str(workdir))
  assert again["ran"] == [] and again["skipped"] == finished["ran"]
  assert [p.stat().st_mtime_ns for p in results] == before
  assert again["table"] == finished["table"]


def test_sweep_refuses_a_changed_training_config(swept):
  workdir, _, _, _ = swept
  with pytest.raises(ValueError, match="learning_rate"):
    sweep.run(sweep_config(optimizer=dict(learning_rate=0.01)), str(workdir), report_only=True)


def test_report_only_cli_rebuilds_the_table_and_plots(swept):
  workdir, _, finished, _ = swept
  outputs = ["results.csv", "results.md", "accuracy_vs_sparsity.png", "layer_density.png"]
  csv_before = (workdir / "results.csv").read_text()
  for name in outputs:
    (workdir / name).unlink()
  # The grid of sweep_config() as a config file; data_dir points nowhere:
  # --report_only reads only the cells.
  config_file = workdir / "sweep_config.py"
  config_file.write_text(
    "from experiments.configs import digits\n\n\n"
    "def get_config():\n"
    "  config = digits.get_config()\n"
    "  config.update(dict(methods=('magnitude', 'synflow'),\n"
    "                     sparsities=(0.9, 0.99), seeds=(0,),\n"
    "                     density_plot_sparsity=None))\n"
    "  config.train.update(dict(num_epochs=1, batch_size=64, progress_bar=False,\n"
    "                           tensorboard=False))\n"
    "  return config\n"
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.sweep",
      "--config",
      str(config_file),
      "--workdir",
      str(workdir),
      "--report_only",
      "--config.data.dir=/nonexistent",
    ],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert finished["table"] in proc.stdout
  assert "4 of 4 cells finished (0 run now, 0 skipped)" in proc.stdout
  assert (workdir / "results.csv").read_text() == csv_before
  assert (workdir / "results.md").read_text() == finished["table"] + "\n"
  for name in outputs[2:]:
    assert (workdir / name).read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------
# Sweep configs
# ----------------------------------------------------------------------------


def test_synflow_paper_grid():
  config = sweep_synflow_paper.get_config("vgg16,cifar100")
  assert (config.model.name, config.data.name) == ("vgg16", "cifar100")
  assert config.methods == ("random", "magnitude", "snip", "grasp", "synflow")
  assert config.sparsities[0] == 0.0 and config.sparsities[-1] == 0.999
  assert config.seeds == (0, 1, 2) and config.train.num_epochs == 160
  assert config.optimizer.nesterov and config.optimizer.decay_epochs == (60, 120)
  assert config.optimizer.weight_decay == 5e-4 and config.train.batch_size == 128
  resnet = sweep_synflow_paper.get_config("resnet18,cifar10")
  assert resnet.optimizer.weight_decay == 1e-4
  assert len(sweep.grid(resnet)) == 3 * (1 + 5 * 9)


def test_cpu_small_grid():
  config = sweep_cpu_small.get_config()
  assert (config.model.name, config.data.name, config.data.dir) == ("resnet20", "cifar10", None)
  assert config.sparsities == (0.9, 0.99, 0.999) and config.seeds == (0,)
  assert len(sweep.grid(config)) == 15
  assert config.train.eval_every_epochs == config.train.num_epochs
  assert not config.train.tensorboard and not config.train.progress_bar
  assert config.data.train_subset < 50_000


def test_cpu_long_grid():
  config = sweep_cpu_long.get_config()
  assert config.methods == ("snip", "grasp", "synflow")
  assert config.sparsities == (0.99, 0.999) and config.seeds == (0, 1, 2)
  assert len(sweep.grid(config)) == 18
  # About 4x the 218 steps of the small grid; tested once, at the end.
  assert config.data.train_subset // config.train.batch_size * config.train.num_epochs == 936
  assert config.train.eval_every_epochs == config.train.num_epochs == 3
