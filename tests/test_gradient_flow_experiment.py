"""experiments.gradient_flow end to end on digits (MLP, one short epoch):
every method's cell, the table, the plots, the resume (a rerun skips)."""

from __future__ import annotations

import math
import os

import pytest

from experiments import gradient_flow as runner
from experiments.configs import gradient_flow_cpu
from experiments.configs import gradient_flow_lenet5


def test_grid_on_digits(tmp_path):
  config = gradient_flow_cpu.get_config()
  config.data.name = "digits"
  config.model.name = "mlp"
  config.data.train_subset = None
  config.train.num_epochs = 1
  config.train.batch_size = 64
  config.flow_examples_per_class = 5
  config.flow_every = 5
  config.prune_every = 4
  config.dst_update_every = 4
  config.seeds = (0,)
  out = runner.run(config, str(tmp_path))
  assert out["missing"] == [] and len(out["rows"]) == len(runner.METHODS)
  rows = {r["method"]: r for r in out["rows"]}
  sparse = ("pruned", "lottery", "scratch", "scratch_plus", "rigl", "rigl_plus")
  for method, r in rows.items():
    assert 0 <= r["test_accuracy"] <= 1 and math.isfinite(r["train_loss"])
    assert r["grad_norm_init"] > 0, method
    if method in sparse:
      assert r["sparsity"] == pytest.approx(0.95, abs=2e-3), method
  # the same initial network and mask: the pruned run starts dense from θ_0,
  # the lottery ticket from θ_0 ⊙ m; Scratch from another θ'_0
  assert rows["pruned"]["grad_norm_init"] == pytest.approx(rows["dense"]["grad_norm_init"])
  assert rows["pruned"]["dist_final_to_pruned"] == 0
  assert rows["lottery"]["dist_init_to_pruned"] < rows["scratch"]["dist_init_to_pruned"]
  assert rows["small_dense"]["dist_final_to_pruned"] is None
  dense_weights = rows["dense"]["weights"]
  assert abs(rows["small_dense"]["weights"] - 0.05 * dense_weights) < 0.01 * dense_weights
  # sparse_init raises the flow at initialisation (SPEC §5 claim 1's premise)
  assert rows["scratch_plus"]["grad_norm_init"] > rows["scratch"]["grad_norm_init"]
  assert rows["rigl_plus"]["grad_norm_init"] > rows["rigl"]["grad_norm_init"]
  for method in ("rigl", "rigl_plus"):
    assert rows[method]["update_flow_ratio"] > 0
  for name in ("results.csv", "results.md", "gradient_flow.png", "mask_updates.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| Scratch+ |" in out["table"]
  for method in runner.METHODS:
    for sub in ("initial", "final"):
      assert (tmp_path / "cells" / f"{method}_seed0" / sub / "ticket.npz").exists()
  again = runner.run(config, str(tmp_path))
  assert again["ran"] == [] and len(again["skipped"]) == len(runner.METHODS)


def test_configs():
  paper = gradient_flow_lenet5.get_config()
  assert (paper.model.name, paper.sparsity, paper.train.num_epochs) == ("lenet5", 0.95, 25)
  assert (paper.prune_start, paper.prune_end, paper.prune_every) == (3000, 7000, 100)
  assert (
    paper.optimizer.learning_rate,
    paper.optimizer.schedule,
    paper.optimizer.weight_decay,
  ) == (0.05, "cosine", 5e-4)
  cpu = gradient_flow_cpu.get_config()
  assert (cpu.data.train_subset, cpu.train.num_epochs, len(cpu.seeds)) == (6000, 20, 3)
  runner.check_config(cpu)
  cpu.methods = ("dense", "lottery")
  with pytest.raises(ValueError, match="add 'pruned'"):
    runner.check_config(cpu)
  cpu.methods = ("dense", "bogus")
  with pytest.raises(ValueError, match="config.methods"):
    runner.check_config(cpu)


def test_small_dense_needs_a_fractional_width():
  config = gradient_flow_cpu.get_config()
  config.model.name = "resnet20"
  with pytest.raises(ValueError, match="fractional width"):
    runner.small_dense_kwargs(config, 10, (32, 32, 3))
  config.model.name = "lenet5"
  kwargs = runner.small_dense_kwargs(config, 10, (32, 32, 3))
  assert 0.1 < kwargs["width"] < 0.4
