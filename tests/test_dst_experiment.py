"""The DST grid runner (experiments.dst) on digits, its config checks and the
mask-churn plot (experiments.results)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from experiments import dst as dst_runner
from experiments.configs import dst_cpu


def _read(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_dst_grid_runner_on_digits(tmp_path):
  config = dst_cpu.get_config()
  config.data.name = "digits"
  config.model.name = "mlp"
  config.data.train_subset = None
  config.train.num_epochs = 2
  config.train.batch_size = 32
  config.dst_update_every = 20
  config.sparsities = (0.0, 0.9)
  config.seeds = (0,)
  out = dst_runner.run(config, str(tmp_path))
  assert out["missing"] == [] and len(out["rows"]) == 5
  by_method = {r["method"]: r for r in out["rows"]}
  assert set(by_method) == {"dense", "static", "set", "rigl", "granet"}
  for method in ("static", "set", "rigl", "granet"):
    assert by_method[method]["nominal_sparsity"] == pytest.approx(0.9, abs=1e-3)
  assert "| 90% | 10× |" in out["table"]
  for name in (
    "results.csv",
    "results.md",
    "accuracy_vs_sparsity.png",
    "layer_density.png",
    "mask_churn.png",
  ):
    assert os.path.getsize(tmp_path / name) > 0
  # static never moves; the DST cells log their churn
  static = _read(tmp_path / "cells" / "static_s0.9_seed0" / "metrics.jsonl")
  assert "mask_churn" not in static[-1]
  rigl = _read(tmp_path / "cells" / "rigl_s0.9_seed0" / "metrics.jsonl")
  assert rigl[0]["mask_churn"] > 0
  granet = _read(tmp_path / "cells" / "granet_s0.9_seed0" / "steps.jsonl")
  assert len(granet) == 2 * (1437 // 32) // 20
  # a rerun skips every finished cell
  again = dst_runner.run(config, str(tmp_path))
  assert again["ran"] == [] and len(again["skipped"]) == 5


def test_dst_config_errors():
  from experiments import common  # pylint: disable=g-import-not-at-top

  config = dst_cpu.get_config()
  config.dst = "rigl"
  config.pruner = "dense"
  with pytest.raises(ValueError, match="starting mask"):
    common.resolve_config(config)
  config.dst = "granet"
  config.pruner = "random"
  with pytest.raises(ValueError, match="pruner='dense'"):
    common.resolve_config(config)
  config.dst = "bogus"
  with pytest.raises(ValueError, match="config.dst must be one of"):
    common.resolve_config(config)


def test_mask_churn_plot_leaves_zero_churn_out_of_the_log_axis(tmp_path):
  from experiments import results  # pylint: disable=g-import-not-at-top

  # Two seeds: churn until step 40, none after the last mask update.
  runs = [
    [(20, 0.02), (40, 0.01), (60, 0.0), (80, 0.0)],
    [(20, 0.04), (40, 0.01), (60, 0.0), (80, 0.0)],
  ]
  xs, mean, band = results.curve(runs, logy=True)
  assert xs == [20, 40, 60, 80]
  np.testing.assert_allclose(mean[:2], [0.03, 0.01])
  assert np.isnan(mean[2:]).all()
  # Seed spread: the band's lower edge at step 20 is 0.03 - 0.014 > 0; at
  # step 40 both seeds agree (std 0): band = the mean.
  assert (band[:, :2] > 0).all() and np.isnan(band[:, 2:]).all()
  _, lin_mean, _ = results.curve(runs)  # linear axis: zeros drawn
  np.testing.assert_allclose(lin_mean, [0.03, 0.01, 0.0, 0.0])
  fig = results.plot_series(
    str(tmp_path / "mask_churn.png"), {"rigl 90%": runs}, xlabel="step", ylabel="churn", logy=True
  )
  (line,) = fig.axes[0].get_lines()
  drawn = np.asarray(line.get_ydata(), float)
  assert np.isnan(drawn[2:]).all() and (drawn[:2] > 0).all()
  assert fig.axes[0].get_ylim()[0] > 1e-3  # no spike down to the axis edge
