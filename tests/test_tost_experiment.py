"""experiments.tost: the baseline-vs-ToST grid on digits (smoke test)."""

from __future__ import annotations

import json
import os

import ml_collections
import pytest

from experiments import common
from experiments import tost as tost_runner
from experiments.configs import tost_cifar
from experiments.configs import tost_cpu


def _config():
  config = tost_cpu.get_config()
  config.data.name = "digits"
  config.model.name = "resnet20"
  config.model.kwargs = ml_collections.ConfigDict(dict(num_filters=4, stage_sizes=(1, 1, 1)))
  config.data.train_subset = 80
  config.train.num_epochs = 2
  config.train.batch_size = 16
  config.train.eval_batch_size = 400
  config.train.async_checkpointing = False
  config.tost_lrsi = ml_collections.ConfigDict(dict(steps=3, batch_size=8))
  config.mask_sources = ("ticket",)  # random masks: tests/test_tost.py
  config.recipes = ("none", "ghost")
  config.ablation_sources = ()
  config.ablation_recipes = ()
  config.sparsities = (0.9,)
  config.seeds = (0,)
  config.ticket = ml_collections.ConfigDict(
    dict(levels=1, prune_fraction=0.9, rewind_step=0, eval_every_epochs=1000)
  )
  return config


def test_tost_grid_on_digits(tmp_path):
  config = _config()
  out = tost_runner.run(config, str(tmp_path))
  assert out["missing"] == [] and len(out["rows"]) == 2
  by_method = {r["method"]: r for r in out["rows"]}
  assert set(by_method) == {"ticket+none", "ticket+ghost"}
  for row in out["rows"]:
    assert row["nominal_sparsity"] == pytest.approx(0.9, abs=2e-3)
  cells = tmp_path / "cells"
  # the same mask for baseline and ToST (ghost params lifted, never pruned)
  for source in ("ticket",):
    base = json.loads((cells / f"{source}+none_s0.9_seed0" / "results.json").read_text())
    ghost = json.loads((cells / f"{source}+ghost_s0.9_seed0" / "results.json").read_text())
    assert base["mask"]["layers"] == ghost["mask"]["layers"]
    assert ghost["tost"]["techniques"] == ["soft_neurons", "ghost_skips", "label_smoothing", "lrsi"]
  ghost_cell = cells / "ticket+ghost_s0.9_seed0"
  lrsi = json.loads((ghost_cell / common.LRSI_FILE).read_text())
  assert len(lrsi["objective"]) == 3 and lrsi["scales"]
  assert not (cells / "ticket+none_s0.9_seed0" / common.LRSI_FILE).exists()
  records = [json.loads(l) for l in (ghost_cell / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["ghost_coef"] == 0.0 and records[-1]["act_coef"] == 0.0
  # the ticket came from the lottery run of the seed
  ticket = json.loads((cells / "ticket+none_s0.9_seed0" / "config.json").read_text())
  assert ticket["mask_path"] == str(tmp_path / "lottery_seed0" / "level_1" / "ticket")
  # the table: one row per mask source, the difference to the baseline
  assert "| ticket | 90% |" in out["table"]
  assert "| mask | sparsity | baseline | ghost |" in out["table"]
  for name in (
    "tost.md",
    "tost_accuracy.png",
    "results.csv",
    "results.md",
    "accuracy_vs_sparsity.png",
  ):
    assert os.path.getsize(tmp_path / name) > 0
  # resumable: a rerun skips every finished cell
  again = tost_runner.run(config, str(tmp_path))
  assert again["ran"] == [] and len(again["skipped"]) == 2


def test_grid_configs_and_errors():
  cpu = tost_cpu.get_config()
  assert len(tost_runner.methods(cpu)) == 16  # 4 x 3 + 4 ablation cells
  assert tost_runner.ticket_level(cpu, 0.98) == 2
  with pytest.raises(ValueError, match="no lottery level has sparsity 0.9"):
    tost_runner.ticket_level(cpu, 0.9)
  released = tost_cifar.get_config("cifar100")
  assert (released.model.name, released.data.name, released.train.num_epochs) == (
    "resnet18",
    "cifar100",
    182,
  )
  assert released.optimizer.decay_epochs == (90, 135) and released.optimizer.weight_decay == 2e-4
  recipe = common.make_tost(
    ml_collections.ConfigDict(
      dict(tost="ghost", tost_soft_neurons=(1.0, 0.0, 0.2, 0.6), tost_lrsi=dict(steps=7))
    )
  )
  assert recipe.soft_neurons.hold == 0.2 and recipe.lrsi.steps == 7
  bad = _config()
  bad.recipes = ("none", "bogus")
  with pytest.raises(ValueError, match="unknown ToST recipe"):
    tost_runner.methods(bad)
  vgg = tost_cpu.get_config()
  vgg.update(tost="ghost", pruner="random", model=dict(name="vgg11"))
  with pytest.raises(ValueError, match="'vgg11' has none"):
    common.resolve_config(vgg)
