"""Dynamic sparse training through sparsejax.train.fit.

On digits (MLP, 44 steps of 32 per epoch): RigL as the optimiser of the
initial state (its mask a pytree or a function of the params), the mask churn
hook and callback in the records, bitwise resume. The grid runner:
tests/test_dst_experiment.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import condensed
from sparsejax import data
from sparsejax import dst
from sparsejax import masks
from sparsejax import models
from sparsejax import state
from tests.test_fit_hooks import SAMPLE  # the same digits/MLP training settings
from tests.test_fit_hooks import run  # the same digits/MLP training settings

SPE = 44


@pytest.fixture(scope="module")
def ds():
  return data.load("digits")


def _random_erk(params):
  return masks.random_mask(jax.random.key(1), params, 0.9, budget=budgets.ERK())


def _rigl(model, ds, update_every=10, mask_fn=False):
  sample = jax.numpy.zeros((1, *ds.image_shape))
  params = state.init_variables(model, sample, jax.random.key(0))["params"]
  mask = _random_erk(params)
  inner = optax.sgd(0.05, momentum=0.9)
  return dst.rigl_optimizer(
    inner, _random_erk if mask_fn else mask, end_step=2 * SPE, update_every=update_every
  ), mask


def _churn():
  churn = dst.MaskChurn(log_every_steps=10)
  return dict(hooks=[churn.hook()], callbacks=[churn.callback()])


def _read(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_fit_trains_rigl_with_churn_records(ds, tmp_path):
  model = models.get("mlp", 10)
  tx, mask = _rigl(model, ds)
  result = run(ds, tmp_path, model, tx=tx, num_epochs=2, **_churn())
  final = result.state.mask
  # exact per-layer counts, pruned weights exactly 0
  assert [int(m.sum()) for m in jax.tree.leaves(final)] == [
    int(m.sum()) for m in jax.tree.leaves(mask)
  ]
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
  # The optimiser's mask as a function of the params (called by init): the
  # same initial state.
  with_fn, _ = _rigl(model, ds, mask_fn=True)
  a = state.create_train_state(model, with_fn, SAMPLE, jax.random.key(0))
  b = state.create_train_state(model, _rigl(model, ds)[0], SAMPLE, jax.random.key(0))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rigl_fit_resumes_bitwise(ds, tmp_path):
  model = models.get("mlp", 10)
  tx, _ = _rigl(model, ds)
  full = run(ds, tmp_path / "full", model, tx=tx, num_epochs=2, **_churn())
  tx, _ = _rigl(model, ds, mask_fn=True)
  run(ds, tmp_path / "split", model, tx=tx, num_epochs=2, stop_at_step=SPE + 15, **_churn())
  tx, _ = _rigl(model, ds, mask_fn=True)
  resumed = run(ds, tmp_path / "split", model, tx=tx, num_epochs=2, **_churn())
  assert resumed.resumed_from == SPE + 15
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(full.hook_states), jax.tree.leaves(resumed.hook_states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  drop = ("epoch_seconds", "steps_per_second")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert strip(_read(tmp_path / "full" / "metrics.jsonl")) == strip(
    _read(tmp_path / "split" / "metrics.jsonl")
  )
  assert _read(tmp_path / "full" / "steps.jsonl") == _read(tmp_path / "split" / "steps.jsonl")


def test_fit_trains_srigl_and_records_the_ablated_fraction(ds, tmp_path):
  model = models.get("mlp", 10)
  params = state.init_variables(model, SAMPLE, jax.random.key(0))["params"]
  mask = masks.random_mask(
    jax.random.key(1), params, 0.9, budget=budgets.ConstantFanIn(budgets.ERK())
  )
  classifier = dataclasses.replace(
    masks.KEEP_CLASSIFIER_DENSE, order=models.layer_order(model, SAMPLE)
  )
  tx = dst.srigl_optimizer(
    optax.sgd(0.05, momentum=0.9), mask, end_step=40, update_every=10, ablatable=classifier
  )
  result = run(ds, tmp_path, model, tx=tx, num_epochs=1, callbacks=[dst.AblatedUnits().callback()])
  final = jax.device_get(result.state.mask)
  condensed.check_constant_fan_in(final)
  assert int(result.state.opt_state.dst.mask_updates) == 3  # t = 10, 20, 30
  record = _read(tmp_path / "metrics.jsonl")[-1]
  assert record["ablated_units"] == pytest.approx(dst.ablated_fraction(final))
  for p, m in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(final)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()
