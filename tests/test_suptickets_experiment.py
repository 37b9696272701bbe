"""experiments.suptickets (SPEC §6) on digits: the runner, its report, its
config checks, and a GraNet + Sup-tickets run of experiments.common."""

from __future__ import annotations

import os

import pytest

from experiments import common
from experiments import suptickets as runner
from experiments import sweep
from experiments.configs import suptickets_cpu
from tests.test_fit_hooks import read_jsonl

# ----------------------------------------------------------------------------
# experiments.suptickets
# ----------------------------------------------------------------------------


def test_suptickets_runner_on_digits(tmp_path):
  config = suptickets_cpu.get_config()
  config.data.name = "digits"
  config.model.name = "mlp"
  config.data.train_subset = None
  config.train.num_epochs = 3
  config.train.batch_size = 32
  config.dst_update_every = 20
  config.sup_cycles = 1
  config.sup_cycle_epochs = 1
  config.methods = ("rigl_sup",)  # plain RigL: test_dst_fit; the pairing below
  config.seeds = (0,)
  out = runner.run(config, str(tmp_path))
  assert out["missing"] == [] and len(out["rows"]) == 1
  assert [(r["method"], r["dst_method"], r["cycle"]) for r in out["cycles"]] == [
    ("rigl_sup", "rigl", 1)
  ]
  cycle = out["cycles"][0]
  sup_dir = tmp_path / "cells" / "rigl_sup_s0.95_seed0"
  final = read_jsonl(sup_dir / "metrics.jsonl")[-1]
  assert final["superposed_test_accuracy"] == cycle["superposed_test_accuracy"] > 0.5
  assert final["ticket_test_accuracy"] == final["test_accuracy"]
  assert final["superposed_sparsity"] == pytest.approx(0.95, abs=1e-3)
  # RigL's updates in the DST phase (steps 20, 40, 60 < 0.75 * 88), then one
  # at the cycle start (step 88): mask churn logged every 20 steps
  churn = {r["step"]: r["mask_churn"] for r in read_jsonl(sup_dir / "steps.jsonl")}
  assert [s for s, c in churn.items() if c > 0] == [40, 60, 80, 100]
  assert "| rigl | rigl_sup | 95% | – |" in out["suptickets_table"]
  for name in (
    "suptickets.csv",
    "suptickets.md",
    "suptickets_vs_cycle.png",
    "results.csv",
    "results.md",
  ):
    assert os.path.getsize(tmp_path / name) > 0
  again = runner.run(config, str(tmp_path))
  assert again["ran"] == [] and again["cycles"] == out["cycles"]


def test_suptickets_report_pairs_each_method_with_plain_dst(tmp_path):
  config = suptickets_cpu.get_config()
  assert runner.pairs(config) == {"rigl_sup": "rigl", "granet_sup": "granet"}
  rows = [
    {"method": m, "sparsity": 0.95, "seed": seed, "test_accuracy": acc}
    for m, accs in (("rigl", (0.80, 0.82)), ("rigl_sup", (0.81, 0.83)))
    for seed, acc in enumerate(accs)
  ]
  cycles = [
    {
      "method": "rigl_sup",
      "dst_method": "rigl",
      "sparsity": 0.95,
      "seed": seed,
      "cycle": c,
      "ticket_test_accuracy": 0.78 + 0.01 * c,
      "superposed_test_accuracy": 0.80 + 0.01 * c + 0.01 * seed,
      "cell": "",
    }
    for seed in (0, 1)
    for c in (1, 2, 3)
  ]
  table = runner.format_table(config, rows, cycles)
  # superposed after cycle 3: 83% and 84%; gains over RigL alone +3 and +2
  assert (
    "| rigl | rigl_sup | 95% | 81.0 ± 1.4 | 81.0 ± 0.0 | 83.5 ± 0.7 | +2.50 ± 0.71 | 2 |" in table
  )
  assert "| granet | granet_sup | 95% | – | – | – | – | 0 |" in table
  runner.plot_cycles(str(tmp_path / "plot.png"), config, rows, cycles)
  assert os.path.getsize(tmp_path / "plot.png") > 0


def test_suptickets_config_checks():
  config = suptickets_cpu.get_config()
  cell = lambda: sweep.cell_config(config, sweep.Cell("rigl_sup", 0.95, 0))
  common.resolve_config(cell())
  config.sup_cycle_epochs = 8
  with pytest.raises(ValueError, match="no DST phase"):
    common.resolve_config(cell())
  config.sup_cycle_epochs = 3
  config.variants.rigl_sup.dst = "none"
  with pytest.raises(ValueError, match="needs a DST method"):
    common.resolve_config(cell())
  config.variants.rigl_sup.dst = "rigl"
  config.sup_lr_shape = "square"
  with pytest.raises(ValueError, match="sup_lr_shape"):
    common.resolve_config(cell())


def test_granet_suptickets_run_logs_its_target_and_reports_the_superposed_model(
  tmp_path, capsys, caplog
):
  from experiments.configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config()
  config.update(
    dst="granet",
    sparsity=0.9,
    dst_update_every=2,
    suptickets=True,
    sup_cycles=1,
    sup_cycle_epochs=1,
    model=dict(name="mlp"),
    data=dict(train_subset=200),
    train=dict(
      num_epochs=2,
      batch_size=32,
      save_sparse=True,
      progress_bar=False,
      tensorboard=False,
      async_checkpointing=False,
    ),
  )
  with caplog.at_level("INFO"):
    result = common.run(config, str(tmp_path))
  logged = [r.getMessage() for r in caplog.records]
  # It used to log "pruner=dense sparsity=0.0".
  start = [m for m in logged if m.startswith("mlp on digits")]
  assert len(start) == 1 and "dst=granet sparsity 0.0 -> 0.9 + suptickets" in start[0]
  assert "pruner=dense" not in start[0]
  # The sparse model file is reported once (it was printed and logged).
  out = capsys.readouterr()
  assert (out.out + out.err).count("sparse model file") == 1
  assert out.out.count("sparse model file") == 1
  assert not any("sparse model file" in m for m in logged)
  # The done line gives the superposed model's accuracy, then the ticket's.
  final = result.history[-1]
  line = common.final_line(result.history)
  assert (
    f"superposed model: test_loss={final['superposed_test_loss']:.4f}, "
    f"test_accuracy={final['superposed_test_accuracy']:.4f} (last ticket: "
    f"test_accuracy={final['test_accuracy']:.4f})"
  ) in line
  assert line.startswith(f"done: train_loss={final['train_loss']:.4f}, ")


def test_describe_sparsity_of_each_kind_of_run():
  from experiments.configs import digits  # pylint: disable=g-import-not-at-top

  config = digits.get_config()
  assert common.describe_sparsity(config) == "pruner=dense sparsity=0.0"
  config.update(pruner="random", sparsity=0.8, dst="rigl")
  assert common.describe_sparsity(config) == "pruner=random sparsity=0.8 dst=rigl"
  config.update(pruner="dense", dst="gmp", dst_initial_sparsity=0.5)
  assert common.describe_sparsity(config) == "dst=gmp sparsity 0.5 -> 0.8"
