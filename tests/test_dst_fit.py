"""Dynamic sparse training through sparsejax.train.fit and experiments.dst.

On digits (MLP, 44 steps of 32 per epoch): RigL as the injected optimiser,
the mask churn in the records, bitwise resume, and the grid runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from experiments import dst as dst_runner
from tests.test_fit_hooks import config  # the same digits/MLP training settings
from experiments.configs import dst_cpu
from sparsejax import budgets, data, dst, masks, models, optim, train

SPE = 44


@pytest.fixture(scope="module")
def ds():
  return data.load("digits")


def _rigl(model, ds, update_every=10):
  sample = jax.numpy.zeros((1, *ds.image_shape))
  params = train.init_variables(model, sample, jax.random.key(0))["params"]
  mask = masks.random_mask(jax.random.key(1), params, 0.9, budget=budgets.ERK())
  inner = optax.sgd(0.05, momentum=0.9)
  return dst.rigl_optimizer(inner, mask, end_step=2 * SPE, update_every=update_every), mask


def _read(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_fit_trains_rigl_with_churn_records(ds, tmp_path):
  model = models.get("mlp", 10)
  tx, mask = _rigl(model, ds)
  result = train.fit(config(num_epochs=2), tmp_path, model=model, dataset=ds, tx=tx,
                     hooks=[dst.MaskChurn(log_every_steps=10)])
  final = result.state.mask
  # exact per-layer counts, pruned weights exactly 0
  assert [int(m.sum()) for m in jax.tree.leaves(final)] == [
      int(m.sum()) for m in jax.tree.leaves(mask)]
  for p, m in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(final)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()
  # updates at t = 10, 20, ..., 80 (< end 88): 8
  assert int(result.state.opt_state.mask_updates) == 8
  records = _read(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in records] == [1, 2]
  density = 1 - masks.summary(mask).sparsity
  for r in records:
    # 4 updates per epoch, each moving at most 2 * 0.3 * (active weights)
    assert 0 < r["mask_churn"] <= 4 * 2 * 0.3 * density
    assert r["sparsity"] == pytest.approx(1 - density)
  steps = _read(tmp_path / "steps.jsonl")
  assert [r["step"] for r in steps] == list(range(10, 2 * SPE + 1, 10))
  # the record at s covers steps t = s - 10 .. s - 1: the first holds no
  # update (the first is at t = 10), each later one exactly one
  assert steps[0]["mask_churn"] == 0
  assert all(r["mask_churn"] > 0 for r in steps[1:])
  assert result.history[-1]["test_accuracy"] > 0.5


def test_rigl_fit_resumes_bitwise(ds, tmp_path):
  model = models.get("mlp", 10)
  hooks = lambda: [dst.MaskChurn(log_every_steps=10)]
  tx, _ = _rigl(model, ds)
  full = train.fit(config(num_epochs=2), tmp_path / "full", model=model, dataset=ds,
                   tx=tx, hooks=hooks())
  tx, _ = _rigl(model, ds)
  train.fit(config(num_epochs=2), tmp_path / "split", model=model, dataset=ds, tx=tx,
            hooks=hooks(), stop_at_step=SPE + 15)
  tx, _ = _rigl(model, ds)
  resumed = train.fit(config(num_epochs=2), tmp_path / "split", model=model, dataset=ds,
                      tx=tx, hooks=hooks())
  assert resumed.resumed_from == SPE + 15
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(full.hook_states), jax.tree.leaves(resumed.hook_states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  drop = ("epoch_seconds", "steps_per_second")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert strip(_read(tmp_path / "full" / "metrics.jsonl")) == strip(
      _read(tmp_path / "split" / "metrics.jsonl"))
  assert _read(tmp_path / "full" / "steps.jsonl") == _read(
      tmp_path / "split" / "steps.jsonl")


def test_dst_grid_runner_on_digits(tmp_path):
  config = dst_cpu.get_config()
  config.dataset = "digits"
  config.model = "mlp"
  config.train_subset = None
  config.num_epochs = 2
  config.batch_size = 32
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
  for name in ("results.csv", "results.md", "accuracy_vs_sparsity.png",
               "layer_density.png", "mask_churn.png"):
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
  runs = [[(20, 0.02), (40, 0.01), (60, 0.0), (80, 0.0)],
          [(20, 0.04), (40, 0.01), (60, 0.0), (80, 0.0)]]
  xs, mean, band = results.curve(runs, logy=True)
  assert xs == [20, 40, 60, 80]
  np.testing.assert_allclose(mean[:2], [0.03, 0.01])
  assert np.isnan(mean[2:]).all()
  # Seed spread: the band's lower edge at step 20 is 0.03 - 0.014 > 0; at
  # step 40 both seeds agree (std 0): band = the mean.
  assert (band[:, :2] > 0).all() and np.isnan(band[:, 2:]).all()
  _, lin_mean, _ = results.curve(runs)  # linear axis: zeros drawn
  np.testing.assert_allclose(lin_mean, [0.03, 0.01, 0.0, 0.0])
  fig = results.plot_series(str(tmp_path / "mask_churn.png"), {"rigl 90%": runs},
                            xlabel="step", ylabel="churn", logy=True)
  (line,) = fig.axes[0].get_lines()
  drawn = np.asarray(line.get_ydata(), float)
  assert np.isnan(drawn[2:]).all() and (drawn[:2] > 0).all()
  assert fig.axes[0].get_ylim()[0] > 1e-3  # no spike down to the axis edge
