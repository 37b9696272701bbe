"""Sup-tickets (SPEC §6): the cyclic learning rate, the mask-update schedule,
superposition and re-pruning, recompute_batch_stats, the Superpose callback in
fit (with bitwise resume after a SIGTERM mid-cycle). The runner:
tests/test_suptickets_experiment.py.

On digits (1437 8x8 images, 44 steps of 32 per epoch) with a small conv net
with batch norm, in seconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import data
from sparsejax import dst
from sparsejax import hooks
from sparsejax import masks
from sparsejax import models
from sparsejax import optim
from sparsejax import state
from sparsejax import suptickets
from sparsejax import train
from sparsejax.models import norm
from tests.sigterm_helper import sigterm_at_step
from tests.test_fit_hooks import assert_trees_equal
from tests.test_fit_hooks import read_jsonl
from tests.test_fit_hooks import run
from tests.test_fit_hooks import without_timing

SPE = 44  # 1437 digits // 32


@pytest.fixture(scope="module")
def ds():
  return data.load("digits")


class ConvBN(nn.Module):
  """Conv -> sparsejax BatchNorm -> ReLU -> flax BatchNorm -> Dense."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3))(x)
    x = norm.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    x = nn.relu(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.95)(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def random_mask(params, density, seed=0):
  """Every kernel keeps round(density * size) random entries (numpy: no compile)."""
  rng = np.random.default_rng(seed)

  def leaf(p):
    if p.ndim < 2:
      return np.ones(p.shape, bool)
    keep = np.zeros(p.size, bool)
    keep[rng.permutation(p.size)[: round(density * p.size)]] = True
    return keep.reshape(p.shape)

  return jax.tree.map(leaf, params)


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def test_cyclic_lr_at_chosen_iterations():
  tri = suptickets.cyclic_lr(0.001, 0.005, 10)
  # lr1 at the cycle start, lr2 at mid-cycle, linear in between, every cycle
  for t, want in [
    (0, 0.001),
    (1, 0.0018),
    (5, 0.005),
    (7, 0.0034),
    (9, 0.0018),
    (10, 0.001),
    (15, 0.005),
    (23, 0.0034),
  ]:
    np.testing.assert_allclose(float(tri(t)), want, rtol=1e-5)
  cos = suptickets.cyclic_lr(0.001, 0.005, 10, "cosine")
  for t, want in [
    (0, 0.001),
    (5, 0.005),
    (10, 0.001),
    # half cosines: lr1 + (lr2 - lr1)(1 - cos(pi i / 5)) / 2
    (2, 0.001 + 0.004 * (1 - np.cos(np.pi * 2 / 5)) / 2),
    (8, 0.001 + 0.004 * (1 + np.cos(np.pi * 3 / 5)) / 2),
  ]:
    np.testing.assert_allclose(float(cos(t)), want, rtol=1e-5)
  # traced: one compilation for every step
  np.testing.assert_allclose(jax.jit(tri)(jnp.int32(25)), 0.005, rtol=1e-5)

  plan = suptickets.Plan(num_epochs=10, num_cycles=3, cycle_epochs=2, steps_per_epoch=5)
  assert (plan.dst_epochs, plan.dst_steps, plan.cycle_steps) == (4, 20, 10)
  assert plan.cycle_start_steps == (20, 30, 40)
  assert plan.cycle_end_epochs == (6, 8, 10)
  lr = plan.learning_rate(optax.cosine_decay_schedule(0.1, plan.dst_steps))
  np.testing.assert_allclose(float(lr(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 0.05, rtol=1e-5)
  for t, want in [(20, 0.001), (25, 0.005), (29, 0.0018), (30, 0.001), (45, 0.005), (49, 0.0018)]:
    np.testing.assert_allclose(float(lr(t)), want, rtol=1e-5)


def test_plan_refuses_bad_budgets():
  with pytest.raises(ValueError, match="no DST"):
    suptickets.Plan(num_epochs=24, num_cycles=3, cycle_epochs=8, steps_per_epoch=10)
  with pytest.raises(ValueError, match=">= 1"):
    suptickets.Plan(num_epochs=24, num_cycles=0, cycle_epochs=8, steps_per_epoch=10)
  with pytest.raises(ValueError, match="shape"):
    suptickets.cyclic_lr(0.001, 0.005, 10, "square")


def test_mask_updates_only_in_the_dst_phase_and_one_large_one_per_cycle_start():
  plan = suptickets.Plan(num_epochs=6, num_cycles=2, cycle_epochs=2, steps_per_epoch=5)
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "a": {"kernel": jax.random.normal(keys[0], (20, 10)), "bias": jnp.zeros((10,))},
    "b": {"kernel": jax.random.normal(keys[1], (10, 6))},
  }
  mask = random_mask(params, 0.4)
  params = masks.apply(params, mask)
  # periodic RigL updates at t = 3, 6 (end 8 < dst_steps = 10)
  tx = dst.rigl_optimizer(
    optax.sgd(0.1),
    mask,
    end_step=8,
    update_every=3,
    drop_fraction=0.3,
    extra_updates=plan.mask_updates(),
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  updated_at = []
  for t in range(plan.total_steps):
    old = optim.get_mask(state)
    # gradients only where the mask is off: growth never picks a dropped weight
    noise = jax.random.uniform(jax.random.fold_in(keys[3], t), (26, 10))
    grads = jax.tree.map(
      lambda m, p: jnp.where(
        m,
        0.0,
        1.0 + noise[: p.shape[0], : p.shape[-1]]  # noqa: B023
        if p.ndim > 1
        else 1.0,
      ),
      old,
      params,
    )
    before = int(state.mask_updates)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    if int(state.mask_updates) > before:
      updated_at.append(t)
      new = optim.get_mask(state)
      if t >= plan.dst_steps:  # the large update: half of each layer, exactly
        for name in ("a", "b"):
          n = int(old[name]["kernel"].sum())
          dropped = int((old[name]["kernel"] & ~new[name]["kernel"]).sum())
          assert int(new[name]["kernel"].sum()) == n
          assert dropped == n // 2
        assert bool(new["a"]["bias"].all())
  assert updated_at == [3, 6, 10, 20]
  assert int(state.mask_updates) == 4


# ----------------------------------------------------------------------------
# Superposition and re-pruning
# ----------------------------------------------------------------------------


def test_cumulative_mean_after_k_tickets_is_the_arithmetic_mean():
  keys = jax.random.split(jax.random.key(1), 5)
  tickets = [{"w": jax.random.normal(k, (7, 3)), "b": jax.random.normal(k, (3,))} for k in keys]
  average = jax.tree.map(jnp.zeros_like, tickets[0])
  step = jax.jit(suptickets.superpose)
  for k, ticket in enumerate(tickets, 1):
    average = step(average, ticket, k - 1)
    want = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *tickets[:k])
    for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # EMA with a fixed factor: the first ticket as is, then (1 - b) avg + b ticket
  ema = suptickets.superpose(jax.tree.map(jnp.zeros_like, tickets[0]), tickets[0], 0, ema=0.25)
  np.testing.assert_array_equal(ema["w"], tickets[0]["w"])
  ema = suptickets.superpose(ema, tickets[1], 1, ema=0.25)
  np.testing.assert_allclose(ema["w"], 0.75 * tickets[0]["w"] + 0.25 * tickets[1]["w"], rtol=1e-6)


def test_reprune_keeps_exactly_the_target_count_globally():
  keys = jax.random.split(jax.random.key(2), 3)
  params = {
    "conv": {
      "kernel": jax.random.normal(keys[0], (3, 3, 4, 8)),
      "bias": jax.random.normal(keys[1], (8,)),
    },
    "dense": {"kernel": 3 * jax.random.normal(keys[2], (8, 10))},
  }
  # ties: 40 equal magnitudes straddle the cut
  params["dense"]["kernel"] = params["dense"]["kernel"].at[:4].set(0.5)
  total = 3 * 3 * 4 * 8 + 8 * 10
  for kept in (1, 17, 100, 205):
    pruned, mask = jax.jit(suptickets.reprune)(params, kept)
    assert int(suptickets.prunable_count(mask)) == kept
    assert (
      sum(int((p != 0).sum()) for p in (pruned["conv"]["kernel"], pruned["dense"]["kernel"]))
      <= kept
    )
    assert bool(mask["conv"]["bias"].all())
    np.testing.assert_array_equal(pruned["conv"]["bias"], params["conv"]["bias"])
    # global magnitude: every kept |w| >= every pruned |w|
    flat = np.abs(
      np.concatenate([np.ravel(params["conv"]["kernel"]), np.ravel(params["dense"]["kernel"])])
    )
    keep = np.concatenate([np.ravel(mask["conv"]["kernel"]), np.ravel(mask["dense"]["kernel"])])
    assert flat[keep].min() >= flat[~keep].max()
  assert total == 368


# ----------------------------------------------------------------------------
# recompute_batch_stats
# ----------------------------------------------------------------------------


def _conv_bn(ds):
  """The net, its variables, the images sorted by brightness (the batches'
  statistics differ) and the first conv's outputs on them."""
  model = ConvBN()
  variables = state.init_variables(model, jnp.zeros((1, *ds.image_shape)), jax.random.key(0))
  # running statistics far from the data's, as after weight averaging
  variables["batch_stats"] = jax.tree.map(lambda s: s + 3.0, variables["batch_stats"])
  images = ds.train_images[np.argsort(ds.train_images.mean((1, 2, 3)), kind="stable")]
  x = data.normalize(images, ds.mean, ds.std)
  conv = nn.Conv(8, (3, 3)).apply({"params": variables["params"]["Conv_0"]}, x)
  return model, variables, images, np.asarray(conv, np.float64)


def test_recompute_batch_stats_equals_full_data_mean_and_var(ds):
  model, variables, images, conv = _conv_bn(ds)
  # 1437 = 500 + 500 + 437: the short last batch counts by its size
  stats = train.recompute_batch_stats(
    model, variables, images, mean=ds.mean, std=ds.std, batch_size=500
  )
  first = stats["BatchNorm_0"]  # sparsejax's BatchNorm, momentum 0.8
  np.testing.assert_allclose(first["mean"], conv.mean((0, 1, 2)), rtol=5e-5, atol=1e-5)
  # float32 sums over 92k values (E[x²] − E[x]² per batch, as the layer computes them)
  np.testing.assert_allclose(first["var"], conv.var((0, 1, 2)), rtol=5e-5, atol=1e-5)
  # "average": the size-weighted mean of the batches' variances (update_bn)
  avg = train.recompute_batch_stats(
    model, variables, images, mean=ds.mean, std=ds.std, batch_size=500, variance="average"
  )
  parts = [conv[:500], conv[500:1000], conv[1000:]]
  want = sum(len(p) * p.var((0, 1, 2)) for p in parts) / len(conv)
  np.testing.assert_allclose(avg["BatchNorm_0"]["var"], want, rtol=5e-5, atol=1e-5)
  np.testing.assert_allclose(avg["BatchNorm_0"]["mean"], first["mean"], rtol=1e-6)
  assert np.abs(want / conv.var((0, 1, 2)) - 1).max() > 0.01  # a different thing

  # One batch of everything: flax's BatchNorm (momentum 0.95) after it sees
  # the full-data-normalised activations; both modes agree.
  one = train.recompute_batch_stats(
    model, variables, images, mean=ds.mean, std=ds.std, batch_size=len(conv)
  )
  h = np.maximum((conv - conv.mean((0, 1, 2))) / np.sqrt(conv.var((0, 1, 2)) + 1e-5), 0)
  np.testing.assert_allclose(one["BatchNorm_1"]["mean"], h.mean((0, 1, 2)), rtol=5e-5, atol=1e-5)
  np.testing.assert_allclose(one["BatchNorm_1"]["var"], h.var((0, 1, 2)), rtol=5e-5, atol=1e-5)
  with pytest.raises(ValueError, match="variance"):
    train.recompute_batch_stats(
      model, variables, images, mean=ds.mean, std=ds.std, variance="median"
    )
  assert (
    train.recompute_batch_stats(
      models.get("mlp", 10), {"params": {}}, ds.train_images, mean=ds.mean, std=ds.std
    )
    == {}
  )


# ----------------------------------------------------------------------------
# The Superpose callback in fit
# ----------------------------------------------------------------------------

PLAN = suptickets.Plan(num_epochs=4, num_cycles=2, cycle_epochs=1, steps_per_epoch=SPE)


class Tickets(hooks.Callback):
  """Keeps host copies of the trained params at every epoch end and checks
  that FitContext.evaluate is fit's own evaluation."""

  at_epoch_end = True

  def __init__(self):
    self.params, self.evaluated = {}, {}

  def __call__(self, step, carry, ctx):
    self.params[ctx.epoch] = jax.device_get(carry.state.params)
    self.evaluated[ctx.epoch] = ctx.evaluate(carry.state)


def _sup_fit(ds, workdir, extra_callbacks=()):
  model = ConvBN()
  # The mask as a function of the fresh params (called by the optimiser's init).
  mask_fn = lambda params: random_mask(params, 0.2)
  lr = PLAN.learning_rate(optax.cosine_decay_schedule(0.1, PLAN.dst_steps))
  tx = dst.rigl_optimizer(
    optax.sgd(lr, momentum=0.9),
    mask_fn,
    end_step=PLAN.dst_steps - 20,
    update_every=10,
    extra_updates=PLAN.mask_updates(),
  )
  sup = suptickets.Superpose(PLAN)
  return run(
    ds,
    workdir,
    model,
    tx=tx,
    num_epochs=PLAN.num_epochs,
    hooks=[sup.hook()],
    callbacks=[sup, *extra_callbacks],
  )


@pytest.fixture(scope="module")
def full_run(ds, tmp_path_factory):
  """One uninterrupted run, shared by the tests below: (workdir, result, tickets)."""
  workdir = tmp_path_factory.mktemp("suptickets_full")
  tickets = Tickets()
  return workdir, _sup_fit(ds, workdir, [tickets]), tickets


def test_superpose_callback_in_fit(ds, full_run):
  _, result, tickets = full_run
  sup = result.hook_states["suptickets"]
  history = result.history
  assert [r.get("cycle") for r in history] == [None, None, 1, 2]
  assert int(sup["tickets"]) == 2
  # FitContext.evaluate is fit's evaluation of the same state
  for r in history:
    assert tickets.evaluated[r["epoch"]]["accuracy"] == r["test_accuracy"]
  # the ticket is the trained model; training continued from it
  assert history[2]["ticket_test_accuracy"] == history[2]["test_accuracy"]
  assert_trees_equal(jax.device_get(result.state.params), tickets.params[4])
  # the running average is the mean of the two tickets
  want = jax.tree.map(lambda a, b: (a + b) / 2, tickets.params[3], tickets.params[4])
  for a, b in zip(jax.tree.leaves(sup["average"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # re-pruned to the ticket's exact count, globally by magnitude
  count = int(suptickets.prunable_count(result.state.mask))
  assert int(suptickets.prunable_count(sup["mask"])) == count
  params, mask = suptickets.reprune(sup["average"], count)
  assert_trees_equal(params, sup["params"])
  assert_trees_equal(mask, sup["mask"])
  assert history[-1]["superposed_sparsity"] == pytest.approx(masks.summary(mask).sparsity)
  # batch-norm statistics recomputed on the training data (batch 32)
  stats = train.recompute_batch_stats(
    ConvBN(),
    {"params": params, "batch_stats": result.state.batch_stats},
    ds.train_images,
    mean=ds.mean,
    std=ds.std,
    batch_size=32,
  )
  assert_trees_equal(stats, sup["batch_stats"])
  superposed = result.state.replace(params=params, batch_stats=stats)
  ev = train.evaluate(
    ConvBN(), superposed, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std
  )
  assert history[-1]["superposed_test_accuracy"] == ev["accuracy"]
  assert history[-1]["superposed_test_accuracy"] > 0.5


def test_superpose_resumes_bitwise_after_sigterm_mid_cycle(ds, full_run, tmp_path):
  full_dir, full, _ = full_run
  stop = PLAN.dst_steps + PLAN.cycle_steps + 20  # inside cycle 2
  with sigterm_at_step(stop):
    cut = _sup_fit(ds, tmp_path / "split")
  assert cut.preempted and int(cut.hook_states["suptickets"]["tickets"]) == 1
  resumed = _sup_fit(ds, tmp_path / "split")
  assert resumed.resumed_from == stop and not resumed.preempted
  assert_trees_equal(jax.device_get(full.state), jax.device_get(resumed.state))
  assert_trees_equal(jax.device_get(full.hook_states), jax.device_get(resumed.hook_states))
  assert without_timing(read_jsonl(full_dir / "metrics.jsonl")) == (
    without_timing(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
  )


def test_plan_arguments_are_checked_where_given():
  for field, value in (("num_epochs", 0), ("steps_per_epoch", -3), ("cycle_epochs", 2.5)):
    kwargs = dict(num_epochs=24, num_cycles=2, cycle_epochs=4, steps_per_epoch=10)
    kwargs[field] = value
    with pytest.raises(
      ValueError,
      match=rf"Plan.{field} must be an integer >= 1, "
      rf"got {value}",
    ):
      suptickets.Plan(**kwargs)


@pytest.mark.parametrize(
  "plan, match",
  [
    (
      suptickets.Plan(num_epochs=250, num_cycles=3, cycle_epochs=8, steps_per_epoch=SPE),
      r"the plan has num_epochs=250 but fit trains 4 epochs",
    ),
    (
      suptickets.Plan(num_epochs=4, num_cycles=2, cycle_epochs=1, steps_per_epoch=40),
      r"the plan has steps_per_epoch=40 but fit has 44",
    ),
  ],
)
def test_a_plan_that_is_not_the_fits_is_refused_before_the_first_step(ds, tmp_path, plan, match):
  model = ConvBN()
  params = state.init_variables(model, jnp.zeros((1, *ds.image_shape)), jax.random.key(0))["params"]
  tx = dst.rigl_optimizer(optax.sgd(0.1), random_mask(params, 0.2), end_step=20, update_every=10)
  sup = suptickets.Superpose(plan)
  with pytest.raises(ValueError, match=match):
    run(ds, tmp_path, model, tx=tx, num_epochs=4, hooks=[sup.hook()], callbacks=[sup])
  # Refused before the first step: no checkpoint, no epoch record.
  assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
  assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
