"""Tests of sparsejax.lottery (SPEC §3): exact IMP densities, rewinding, the
controls, ticket files and the train.fit arguments IMP uses (a rewound
``init``, ``stop_at_step``). Everything runs on the digits dataset with
LeNet-300-100 (50,200 prunable weights) in seconds. The experiment:
tests/test_lottery_experiment.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]

from sparsejax import budgets  # noqa: E402
from sparsejax import checkpoints  # noqa: E402
from sparsejax import data  # noqa: E402
from sparsejax import lottery  # noqa: E402
from sparsejax import masks  # noqa: E402
from sparsejax import mesh as mesh_lib  # noqa: E402
from sparsejax import models  # noqa: E402
from sparsejax import optim  # noqa: E402
from sparsejax import schedules  # noqa: E402
from sparsejax import state as state_lib  # noqa: E402
from sparsejax import train  # noqa: E402
from tests.fitting import digits_optimizer  # noqa: E402

#: Prunable weights of the MLP on 8x8 digits: 64*300 + 300*100 + 100*10.
N = 50_200
SAMPLE = jnp.zeros((1, 8, 8, 1))
TIMING_KEYS = ("epoch_seconds", "steps_per_second")


def mlp_params(seed: int = 0) -> dict:
  """Random host params with the MLP's structure and shapes (no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = {"Dense_0": (64, 300), "Dense_1": (300, 100), "Dense_2": (100, 10)}
  return {
    name: {
      "kernel": rng.normal(size=shape).astype(np.float32),
      "bias": rng.normal(size=shape[1:]).astype(np.float32),
    }
    for name, shape in shapes.items()
  }


def mlp_states(*steps: int):
  """Sparse-format MLP train states (all-ones mask) after each of ``steps``
  SGD steps on digits (one run)."""
  model = models.get("mlp", 10)
  tx = schedules.make_optimizer(
    schedules.lr_schedule(0.05, num_epochs=1, steps_per_epoch=22, kind="cosine"), weight_decay=5e-4
  )
  state = state_lib.create_train_state(model, tx, SAMPLE, jax.random.key(0), mask=masks.ones_like)
  ds = data.load("digits")
  mesh = mesh_lib.make_mesh(1)
  step = train.make_train_step(model, mesh=mesh, batch_size=64, mean=ds.mean, std=ds.std)
  carry = mesh_lib.put_replicated(train.init_carry(state), mesh)
  images = mesh_lib.put_replicated(ds.train_images, mesh)
  labels = mesh_lib.put_replicated(ds.train_labels, mesh)
  perm = mesh_lib.put_replicated(np.asarray(data.epoch_permutation(0, 0, 1437)), mesh)
  states = {0: jax.device_get(carry.state)}
  for k in range(max(steps)):
    carry, _ = step(carry, images, labels, perm, k)
    states[k + 1] = jax.device_get(carry.state)  # host copies: the step donates
  return model, tx, [states[n] for n in steps]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  """Bitwise equal leaves, equal structure, shapes and dtypes (a train state's
  static optimiser functions are code of each run, not compared)."""
  assert checkpoints.tree_signature(a) == checkpoints.tree_signature(b)
  assert len(leaves(a)) == len(leaves(b))
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)


def kernels(tree):
  return {p: np.asarray(x) for p, x in masks.named_leaves(tree) if p.endswith("kernel")}


def without_timing(history):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def read_history(workdir):
  with open(Path(workdir) / "metrics.jsonl") as f:
    return without_timing([json.loads(line) for line in f if line.strip()])


def checkpoint_params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(workdir) / "checkpoints" / str(step) / "state")["state"]["params"]


# ----------------------------------------------------------------------------
# Pruning levels
# ----------------------------------------------------------------------------


def test_density_after_L_levels_is_exactly_0_8_to_the_L():
  params = mlp_params()
  mask = masks.ones_like(params)
  # round(0.8^L * 50,200): 40,160; 32,128; 25,702.4; 20,561.92; 16,449.536.
  expected = [40_160, 32_128, 25_702, 20_562, 16_450]
  for level, count in enumerate(expected, start=1):
    # Stand-in for the weights trained at level L - 1: every weight moved.
    noise = mlp_params(seed=level)
    trained = masks.apply(jax.tree.map(lambda p, n: p + 0.1 * n, params, noise), mask)
    new = lottery.prune_level(trained, mask, level)
    assert masks.summary(new).kept == count == round(0.8**level * N)
    assert lottery.level_sparsity(level) == pytest.approx(1 - 0.8**level)
    for (path, old_m), new_m, _w in zip(masks.named_leaves(mask), leaves(new), leaves(trained)):
      old_m = np.asarray(old_m)
      assert new_m.dtype == bool
      assert not np.any(new_m & ~old_m), path  # only kept weights survive
      if path.endswith("bias"):
        assert new_m.all(), path  # not prunable
    # Global magnitude over the remaining weights: every survivor is at least
    # as large as every weight removed at this level, whatever its layer.
    kept_mags = [np.abs(w)[m] for w, m in zip(kernels(trained).values(), kernels(new).values())]
    removed = [
      np.abs(w)[o & ~m]
      for w, o, m in zip(kernels(trained).values(), kernels(mask).values(), kernels(new).values())
    ]
    assert np.concatenate(kept_mags).min() >= np.concatenate(removed).max()
    mask = new


def test_prune_level_budgets_prunable_and_errors():
  model = models.get("mlp", 10)
  params = mlp_params()
  ones = masks.ones_like(params)
  # Layer-wise IMP: every layer keeps round(0.64 * its size) at level 2.
  level_1 = lottery.prune_level(params, ones, 1, budget=budgets.Uniform())
  uniform = lottery.prune_level(params, level_1, 2, budget=budgets.Uniform())
  for layer in masks.summary(uniform).layers:
    assert layer.kept == round(0.64 * layer.total), layer.path
  # A dense classifier is not counted: N = 64*300 + 300*100.
  keep_classifier = masks.Prunable(keep_last_dense=True, order=models.layer_order(model, SAMPLE))
  m = lottery.prune_level(params, ones, 1, prunable=keep_classifier)
  assert np.asarray(m["Dense_2"]["kernel"]).all()
  assert masks.summary(m, keep_classifier).kept == round(0.8 * 49_200)
  # Another fraction: 50% per level.
  half = lottery.prune_level(params, ones, 1, 0.5)
  assert masks.summary(lottery.prune_level(params, half, 2, 0.5)).kept == N // 4
  with pytest.raises(ValueError, match="pass the mask of level 1"):
    lottery.prune_level(params, lottery.prune_level(params, half, 2, 0.5), 2)
  with pytest.raises(ValueError, match="fraction"):
    lottery.prune_level(params, ones, 1, fraction=1.0)
  with pytest.raises(ValueError, match="level"):
    lottery.level_sparsity(-1)
  with pytest.raises(ValueError, match="budget"):
    lottery.prune_level(params, ones, 1, budget=budgets.ERK())
  with pytest.raises(ValueError, match="budgets.parse"):  # a string is refused
    lottery.prune_level(params, ones, 1, budget="uniform")


def test_random_reprune_keeps_per_layer_counts_at_new_positions():
  params = mlp_params()
  mask = lottery.prune_level(params, lottery.prune_level(params, masks.ones_like(params), 1), 2)
  a = lottery.random_reprune_mask(jax.random.key(0), mask)
  b = lottery.random_reprune_mask(jax.random.key(1), mask)
  assert_trees_equal(a, lottery.random_reprune_mask(jax.random.key(0), mask))
  for (path, m), ma, mb in zip(masks.named_leaves(mask), leaves(a), leaves(b)):
    m = np.asarray(m)
    assert ma.dtype == bool and ma.shape == m.shape
    assert ma.sum() == m.sum() and mb.sum() == m.sum(), path  # exact counts
    if path.endswith("bias"):
      assert ma.all()  # all-True leaves are unchanged
    else:  # random positions: a share of the ticket's equal to the density
      overlap = (ma & m).sum() / m.sum()
      assert abs(overlap - m.mean()) < 0.03, (path, overlap, m.mean())
      assert not np.array_equal(ma, mb)


# ----------------------------------------------------------------------------
# Rewinding
# ----------------------------------------------------------------------------


def test_rewind_restores_the_rewind_point_exactly():
  model, tx, (init, point, trained) = mlp_states(0, 3, 9)  # rewind point θ_3
  mask = lottery.prune_level(trained.params, masks.ones_like(trained.params), 1)
  start = lottery.rewind_state(point, mask)
  # Survivors: bitwise the values at the rewind point; pruned: exactly 0.
  for p_start, p_point, m in zip(leaves(start.params), leaves(point.params), leaves(mask)):
    np.testing.assert_array_equal(p_start[m], p_point[m])
    assert np.all(p_start[~m] == 0.0) and np.signbit(p_start[~m]).sum() == 0
  assert_trees_equal(start.params, lottery.rewind(point.params, mask))
  # Same step, key and statistics; fresh optimiser state holding the mask:
  # zero momentum, the schedule still at step 3.
  assert int(start.step) == 3
  np.testing.assert_array_equal(start.rng, point.rng)
  assert_trees_equal(start.mask, mask)
  get = optax.tree_utils.tree_get
  assert any(np.any(x != 0) for x in leaves(get(point.opt_state, "trace")))
  assert all(np.all(x == 0) for x in leaves(get(start.opt_state, "trace")))
  counts = optax.tree_utils.tree_get_all_with_path(start.opt_state, "count")
  assert counts and all(int(c) == 3 for _, c in counts)
  assert checkpoints.tree_signature(start) == checkpoints.tree_signature(point)
  # At step 0 the fresh state is exactly a new optimiser's state.
  at_init = lottery.rewind_state(init, mask)
  assert_trees_equal(at_init.opt_state, optim.sparse(tx, mask).init(at_init.params))
  # The random re-initialisation control: other weights under the same mask.
  other = state_lib.init_variables(model, SAMPLE, jax.random.key(7))["params"]
  reinit = lottery.rewind_state(point, mask, params=other)
  assert_trees_equal(reinit.params, masks.apply(other, mask))
  assert int(reinit.step) == 3
  dense = point.replace(opt_state=point.opt_state.inner_state)  # no mask
  with pytest.raises(ValueError, match="mask"):
    lottery.rewind_state(dense, mask)


def test_ticket_files_round_trip(tmp_path):
  params = mlp_params()
  mask = lottery.prune_level(params, masks.ones_like(params), 1)
  rewound = lottery.rewind(params, mask)
  assert not lottery.ticket_exists(tmp_path / "t")
  lottery.save_ticket(tmp_path / "t", mask, rewound, {"level": 1, "model": "mlp"})
  assert lottery.ticket_exists(tmp_path / "t")
  loaded_mask, loaded_params, meta = lottery.load_ticket(tmp_path / "t")
  assert meta == {"level": 1, "model": "mlp"}
  assert_trees_equal(loaded_mask, mask)
  assert_trees_equal(loaded_params, rewound)
  assert all(x.dtype == bool for x in leaves(loaded_mask))
  # The loaded mask is a valid mask for the same model's params.
  masks.check_mask(loaded_mask, params)
  with pytest.raises(FileNotFoundError, match="no lottery ticket"):
    lottery.load_ticket(tmp_path)
  with pytest.raises(ValueError, match="nested dicts"):
    lottery.save_ticket(tmp_path / "list", [np.ones(3, bool)], [np.ones(3)])


# ----------------------------------------------------------------------------
# The train.fit arguments of IMP: a rewound init and stop_at_step
# ----------------------------------------------------------------------------


def test_fit_stop_at_step_then_resume_is_bitwise_uninterrupted(tmp_path):
  ds = data.load("digits")
  model = models.get("mlp", 10)
  tx = digits_optimizer(2, 22)  # the digits recipe: 2 epochs of 22 steps of 64

  def fit(workdir, init=None, **kwargs):
    init = init or (
      lambda: state_lib.create_train_state(
        model, tx, SAMPLE, jax.random.key(0), mask=masks.ones_like
      )
    )
    return train.fit(
      model,
      ds,
      tmp_path / workdir,
      init=init,
      num_epochs=2,
      batch_size=64,
      options=train.FitOptions(
        progress_bar=False,
        tensorboard=False,
        max_to_keep=5,
        log_every_steps=11,
        eval_batch_size=512,
      ),
      **kwargs,
    )

  # The rewind point: the dense run stopped at step 5, mid-epoch.
  first = fit("part", stop_at_step=5)
  assert first.resumed_from is None and int(first.state.step) == 5
  part = fit("part", stop_at_step=5)
  assert part.resumed_from == 5 and int(part.state.step) == 5
  assert part.history == [] and not part.preempted
  rest = fit("part")  # the same run continued to the end of the schedule
  whole = fit("whole")
  assert rest.resumed_from == 5 and int(rest.state.step) == 44
  assert without_timing(rest.history) == without_timing(whole.history)
  assert_trees_equal(rest.state, whole.state)
  # A level: init is the state rewound under a mask; it trains from step 5
  # with the schedule and data order of step 5.
  mask = lottery.prune_level(whole.state.params, whole.state.mask, 1)
  level = fit("level", init=lottery.rewind_state(jax.device_get(part.state), mask))
  assert level.resumed_from is None and int(level.state.step) == 44
  assert [r["step"] for r in level.history] == [22, 44]
  assert_trees_equal(level.state.mask, mask)
  # An init of another layout: refused by the checkpoint's signature, or as
  # another model's before anything runs.
  dense = whole.state.replace(opt_state=optax.sgd(0.1).init(whole.state.params), tx=optax.sgd(0.1))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="state_signature"):
    fit("whole", init=dense)
  other = state_lib.create_train_state(
    models.get("mlp", 10, hidden=(8,)), tx, SAMPLE, jax.random.key(0)
  )
  with pytest.raises(ValueError, match="params and batch statistics of this model"):
    fit("x", init=other)
