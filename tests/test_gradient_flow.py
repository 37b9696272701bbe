"""sparsejax.gradient_flow: sparse-aware initialisation (statistical tests with
fixed seeds), masked gradient norms checked by hand and against jax.grad, and
the GradientFlow hook inside fit with RigL (digits, seconds)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from sparsejax import budgets
from sparsejax import data
from sparsejax import dst
from sparsejax import gradient_flow as gf
from sparsejax import hooks
from sparsejax import masks
from sparsejax import models
from sparsejax import state
from tests.test_fit_hooks import run as fit_run

SPE = 43  # (1437 - 50 held out) // 32


# ----------------------------------------------------------------------------
# sparse_init
# ----------------------------------------------------------------------------


def _varied_mask(key, shape, min_density=0.05):
  """Output unit o keeps a fraction of its inputs rising from min_density to 1."""
  out = shape[-1]
  density = jnp.linspace(min_density, 1.0, out)
  return jax.random.uniform(key, shape) < density


@pytest.mark.parametrize("shape", [(2048, 48), (5, 5, 64, 48)])
def test_per_unit_variance_follows_the_active_fan_in(shape):
  mask = _varied_mask(jax.random.key(1), shape)
  w = gf.sparse_kernel_init(jax.random.key(2), mask)
  w, m = np.asarray(w).reshape(-1, shape[-1]), np.asarray(mask).reshape(-1, shape[-1])
  assert (w[~m] == 0).all()
  fan_in = m.sum(0)
  assert fan_in.min() > 50
  for o in range(shape[-1]):
    sample = w[m[:, o], o]
    expected = 2.0 / fan_in[o]
    # sample variance of n normals: relative std sqrt(2 / n); 5 sigma
    assert abs(sample.var() / expected - 1) < 5 * np.sqrt(2 / fan_in[o]), o
  # all units together: w * sqrt(fan_in / 2) is standard normal
  z = (w * np.sqrt(fan_in / 2.0))[m]
  assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("mode", gf.MODES)
@pytest.mark.parametrize("distribution", gf.DISTRIBUTIONS)
def test_dense_mask_gives_the_dense_initialiser(mode, distribution):
  shape = (3, 3, 96, 128)
  mine = gf.sparse_kernel_init(
    jax.random.key(0), jnp.ones(shape, bool), scale=2.0, mode=mode, distribution=distribution
  )
  ref = jax.nn.initializers.variance_scaling(2.0, mode, distribution)(jax.random.key(1), shape)
  mine, ref = np.ravel(mine), np.ravel(ref)
  assert mine.var() == pytest.approx(ref.var(), rel=0.02)
  assert stats.ks_2samp(mine, ref).pvalue > 1e-3


def test_dense_mask_matches_the_models_own_initialiser():
  model = models.get("lenet5", 10)
  sample = jnp.zeros((1, 32, 32, 3))
  own = state.init_variables(model, sample, jax.random.key(0))["params"]
  mine = gf.sparse_init(jax.random.key(1), own, masks.ones_like(own), scale=model.init_gain)
  for (path, a), b in zip(masks.named_leaves(own), jax.tree.leaves(mine)):
    a, b = np.ravel(a), np.ravel(b)
    if path.endswith("bias"):
      np.testing.assert_array_equal(a, b)  # untouched (zeros)
    elif a.size >= 2000:
      assert b.var() == pytest.approx(a.var(), rel=0.1), path
      assert stats.ks_2samp(a, b).pvalue > 1e-3, path


def test_units_without_inputs_are_zero_and_inactive_entries_too():
  mask = np.ones((4, 3, 8, 5), bool)
  mask[..., 2] = False  # output unit 2: no active input
  mask[:, :, 3, :] = False  # input unit 3: no active output
  w = np.asarray(gf.sparse_kernel_init(jax.random.key(0), jnp.asarray(mask)))
  assert (w[..., 2] == 0).all() and (w[~mask] == 0).all()
  assert (w[mask] != 0).all()
  for mode in ("fan_out", "fan_avg"):
    w = np.asarray(gf.sparse_kernel_init(jax.random.key(0), jnp.asarray(mask), mode=mode))
    assert (w[:, :, 3, :] == 0).all() and np.isfinite(w).all()


def test_fans_count_the_receptive_field():
  mask = np.zeros((3, 3, 2, 4), bool)
  mask[:, :, 0, 1] = True  # unit 1: 9 active inputs from channel 0
  mask[1, 1, 1, 3] = True  # unit 3: one
  fan_in, fan_out = gf.active_fans(jnp.asarray(mask))
  assert fan_in.shape == (1, 1, 1, 4) and fan_out.shape == (1, 1, 2, 1)
  assert np.ravel(fan_in).tolist() == [0, 9, 0, 1]
  assert np.ravel(fan_out).tolist() == [9, 1]
  w = gf.sparse_kernel_init(jax.random.key(0), jnp.asarray(mask), scale=2.0, distribution="uniform")
  # uniform with variance 2 / 1 on unit 3: |w| <= sqrt(6)
  assert 0 < abs(float(w[1, 1, 1, 3])) <= np.sqrt(6.0)
  assert float(jnp.max(jnp.abs(w[..., 1]))) <= np.sqrt(6.0 / 9) + 1e-6


def test_sparse_init_is_jittable_and_keeps_other_leaves():
  model = models.get("lenet5", 10)
  params = state.init_variables(model, jnp.zeros((1, 16, 16, 3)), jax.random.key(0))["params"]
  mask = jax.tree.map(lambda p: jax.random.bernoulli(jax.random.key(1), 0.1, p.shape), params)
  fn = functools.partial(gf.sparse_init, mode="fan_in", distribution="normal")
  eager = fn(jax.random.key(2), params, mask)
  jitted = jax.jit(fn)(jax.random.key(2), params, mask)
  for (path, a), b, p, m in zip(
    masks.named_leaves(eager),
    jax.tree.leaves(jitted),
    jax.tree.leaves(params),
    jax.tree.leaves(mask),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert a.shape == p.shape and a.dtype == p.dtype
    if p.ndim > 1:
      assert (np.asarray(a)[~np.asarray(m)] == 0).all(), path
    else:
      np.testing.assert_array_equal(a, p)  # biases


def test_sparse_init_raises_the_flow_of_a_sparse_network():
  """SPEC §5's premise on a 95% sparse LeNet-5: the dense initialiser shrinks
  the signal with depth, sparse_init restores it."""
  model = models.get("lenet5", 10)
  params = state.init_variables(model, jnp.zeros((1, 16, 16, 3)), jax.random.key(0))["params"]
  mask = masks.random_mask(jax.random.key(1), params, 0.95, budget=budgets.ERK())
  x = jax.random.normal(jax.random.key(3), (32, 16, 16, 3))
  y = jnp.arange(32) % 10
  norms = jax.jit(lambda p: gf.masked_grad_norms(model, p, (x, y), mask)[0])
  dense_init = norms(params)
  sparse_flow = norms(gf.sparse_init(jax.random.key(2), params, mask))
  assert float(sparse_flow) > 3 * float(dense_init)


def test_bad_arguments_are_refused():
  mask = jnp.ones((4, 4), bool)
  with pytest.raises(ValueError, match="mode"):
    gf.sparse_kernel_init(jax.random.key(0), mask, mode="fan_sum")
  with pytest.raises(ValueError, match="distribution"):
    gf.sparse_kernel_init(jax.random.key(0), mask, distribution="cauchy")
  with pytest.raises(ValueError, match="ndim >= 2"):
    gf.active_fans(jnp.ones((4,), bool))


# ----------------------------------------------------------------------------
# Gradient norms
# ----------------------------------------------------------------------------


class Linear(nn.Module):
  """logits = x @ W (no bias)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(2, use_bias=False, kernel_init=nn.initializers.zeros)(x)


def test_grad_norm_by_hand():
  # W = 0: softmax (1/2, 1/2); one example x = (1, 0) of class 0:
  # dL/dW = x^T (p - onehot) = [[-1/2, 1/2], [0, 0]]
  model = Linear()
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
  batch = (jnp.array([[1.0, 0.0]]), jnp.array([0]))
  total, layers = gf.masked_grad_norms(model, params, batch)
  assert float(total) == pytest.approx(np.sqrt(0.5))
  assert list(layers) == ["Dense_0/kernel"]
  mask = {"Dense_0": {"kernel": jnp.array([[True, False], [True, True]])}}
  total, layers = gf.masked_grad_norms(model, params, batch, mask)
  assert float(total) == pytest.approx(0.5)
  assert float(layers["Dense_0/kernel"]) == pytest.approx(0.5)


def test_grad_norms_match_jax_grad_on_a_masked_mlp():
  model = models.get("mlp", 10, hidden=(16,))
  params = state.init_variables(model, jnp.zeros((1, 8, 8, 1)), jax.random.key(0))["params"]
  mask = masks.random_mask(jax.random.key(1), params, 0.7, budget=budgets.Uniform())
  x = jax.random.normal(jax.random.key(2), (12, 8, 8, 1))
  y = jnp.arange(12) % 10

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  g = jax.grad(loss)(masks.apply(params, mask))
  g = masks.apply(g, mask)
  total, layers = gf.masked_grad_norms(model, params, (x, y), mask)
  assert float(total) == pytest.approx(float(optax.tree.norm(g)), rel=1e-5)
  expected = {p: float(jnp.linalg.norm(v)) for p, v in masks.named_leaves(g) if v.ndim > 1}
  assert {p: float(v) for p, v in layers.items()} == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------
# The hook inside fit
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
  return gf.held_out_split(data.load("digits"), 5)


def _read(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def test_held_out_split(split):
  rest, (x, y) = split
  assert rest.num_train == 1437 - 50 and x.shape == (50, 8, 8, 1)
  assert np.bincount(np.asarray(y)).tolist() == [5] * 10
  assert x.dtype == jnp.float32


def test_update_steps_on_host_and_traced():
  steps = gf.UpdateSteps(10, start_step=5, end_step=40)
  host = [t for t in range(60) if steps(t)]
  assert host == [5, 15, 25, 35]
  traced = jax.jit(jax.vmap(steps))(jnp.arange(60))
  assert np.flatnonzero(np.asarray(traced)).tolist() == host


def test_hook_logs_flow_and_before_after_rigl_updates(split, tmp_path):
  rest, batch = split
  model = models.get("mlp", 10)
  params = state.init_variables(model, jnp.zeros((1, 8, 8, 1)), jax.random.key(0))["params"]
  mask = masks.random_mask(jax.random.key(1), params, 0.9, budget=budgets.ERK())
  tx = dst.rigl_optimizer(optax.sgd(0.05, momentum=0.9), mask, end_step=70, update_every=10)
  flow = gf.GradientFlow(model, batch, every=25, update_steps=gf.UpdateSteps(10, end_step=70))
  result = fit_run(
    rest,
    tmp_path,
    model,
    tx=tx,
    num_epochs=2,
    hooks=[flow.hook()],
    callbacks=[flow.callback()],
    stop_at_step=75,
  )
  records = _read(tmp_path / "steps.jsonl")
  updates = [11, 21, 31, 41, 51, 61]
  assert [r["step"] for r in records] == sorted({1, 25, 50, 75, *updates})
  by_step = {r["step"]: r for r in records}
  # the flow at initialisation: the record of step 1, "before"
  initial = state.create_train_state(model, tx, jnp.zeros((1, 8, 8, 1)), jax.random.key(0))
  g0, layers0 = gf.masked_grad_norms(model, initial.params, batch, initial.mask)
  assert by_step[1]["grad_norm_before"] == pytest.approx(float(g0), rel=1e-5)
  for p, v in layers0.items():
    assert by_step[1][f"grad_norm_before/{p}"] == pytest.approx(float(v), rel=1e-5)
  # the last record: the final state
  g, _ = gf.masked_grad_norms(model, result.state.params, batch, result.state.mask)
  assert by_step[75]["grad_norm"] == pytest.approx(float(g), rel=1e-5)
  # a RigL update changes the mask and the flow (skip_update: only the mask)
  for s in updates:
    r = by_step[s]
    assert r["mask_change"] > 0
    assert r["grad_norm"] != pytest.approx(r["grad_norm_before"], rel=1e-4)
  for s in (1, 25, 50, 75):
    assert by_step[s]["mask_change"] == 0
  # consecutive records: "before" of step s is "after" of step s - 1
  assert by_step[25]["grad_norm_before"] != by_step[25]["grad_norm"]
  assert all(np.isfinite(v) for r in records for v in r.values())


def test_hook_on_dense_training(split, tmp_path):
  rest, batch = split
  model = models.get("mlp", 10)
  flow = gf.GradientFlow(model, batch, every=20)
  result = fit_run(
    rest, tmp_path, model, num_epochs=1, hooks=[flow.hook()], callbacks=[flow.callback()]
  )
  records = _read(tmp_path / "steps.jsonl")
  assert [r["step"] for r in records] == [1, 20, 40]
  assert all(r["mask_change"] == 0 and r["grad_norm"] > 0 for r in records)
  assert result.history[-1]["test_accuracy"] > 0.5
  # the epoch record: the latest measurement (step 40 of the 43 of the epoch)
  assert result.history[-1]["grad_norm"] == pytest.approx(records[-1]["grad_norm"])
  assert float(result.hook_states["gradient_flow"]["grad_norm"]) == pytest.approx(
    records[-1]["grad_norm"]
  )


def test_logs_at_and_state_before_are_general(split, tmp_path):
  """Any hook may choose its logged steps and see the state before the step."""
  rest, _ = split

  def update(hook_state, state, info):
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, state.params, info.state_before.params))
    return hook_state, state, {"before_step": info.state_before.step, "moved": moved}

  probe = hooks.StepHook(update=update, name="probe", logs_at=lambda step: step in (3, 7))
  fit_run(rest, tmp_path, models.get("mlp", 10), num_epochs=1, hooks=[probe])
  records = _read(tmp_path / "steps.jsonl")
  assert [(r["step"], r["before_step"]) for r in records] == [(3, 2), (7, 6)]
  assert all(r["moved"] > 0 for r in records)


def test_hook_resumes_bitwise(split, tmp_path):
  rest, batch = split
  model = models.get("mlp", 10)

  def run(workdir, **kw):
    params = state.init_variables(model, jnp.zeros((1, 8, 8, 1)), jax.random.key(0))["params"]
    mask = masks.random_mask(jax.random.key(1), params, 0.9, budget=budgets.ERK())
    tx = dst.rigl_optimizer(optax.sgd(0.05, momentum=0.9), mask, end_step=70, update_every=10)
    flow = gf.GradientFlow(model, batch, every=25, update_steps=gf.UpdateSteps(10, end_step=70))
    return fit_run(
      rest,
      workdir,
      model,
      tx=tx,
      num_epochs=2,
      hooks=[flow.hook()],
      callbacks=[flow.callback()],
      **kw,
    )

  run(tmp_path / "full")
  run(tmp_path / "split", stop_at_step=SPE + 7)
  resumed = run(tmp_path / "split")
  assert resumed.resumed_from == SPE + 7
  assert _read(tmp_path / "full" / "steps.jsonl") == _read(tmp_path / "split" / "steps.jsonl")
  drop = ("epoch_seconds", "steps_per_second")
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert strip(_read(tmp_path / "full" / "metrics.jsonl")) == strip(
    _read(tmp_path / "split" / "metrics.jsonl")
  )


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: gf.UpdateSteps(0), r"UpdateSteps.update_every must be an integer >= 1, got 0"),
    (
      lambda: gf.UpdateSteps(100, end_step=50),
      r"UpdateSteps.end_step must be after start_step \(100\), got 50",
    ),
    (
      lambda: gf.UpdateSteps(10, start_step=-1),
      r"UpdateSteps.start_step must be an integer >= 0, got -1",
    ),
    (
      lambda: gf.sparse_kernel_init(jax.random.key(0), jnp.ones((2, 2), bool), scale=-2.0),
      r"scale must be in \(0, inf\), got -2.0",
    ),
    (
      lambda: gf.GradientFlow(None, (jnp.zeros((1, 2)), jnp.zeros(1)), every=0),
      r"every must be an integer >= 1, got 0",
    ),
  ],
)
def test_gradient_flow_arguments_are_checked_where_given(build, match):
  with pytest.raises(ValueError, match=match):
    build()
