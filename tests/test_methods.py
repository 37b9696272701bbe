"""Tests of sparsejax.methods: the registry, sub-configs, each method's parts
on tiny models (masks equal to the direct library calls, exact counts), IMP's
level loop and schedules (sparsejax.lottery.imp), composition and build.

Library only: no test here imports ``experiments``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import dst
from sparsejax import gradient_flow
from sparsejax import hooks as hooks_lib
from sparsejax import losses
from sparsejax import lottery
from sparsejax import masks
from sparsejax import methods
from sparsejax import models
from sparsejax import optim
from sparsejax import scores
from sparsejax import state as state_lib
from sparsejax import suptickets
from sparsejax import tost
from sparsejax import train
from sparsejax.models import activations

ALL = (
  "dense",
  "random",
  "magnitude",
  "snip",
  "grasp",
  "synflow",
  "ticket",
  "imp",
  "set",
  "rigl",
  "srigl",
  "gmp",
  "granet",
  "suptickets",
  "tost",
  "sparse_init",
)
SHAPE = (4, 4, 1)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny():
  """A tiny MLP on 4x4x1 inputs (16*24 + 24*12 + 12*3 = 708 prunable) and data."""
  model = models.get("mlp", 3, hidden=(24, 12))
  variables = state_lib.init_variables(model, jnp.zeros((1, *SHAPE)), jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, *SHAPE)).astype(np.float32)
  y = np.arange(12) % 3
  return model, variables["params"], (jnp.asarray(x), jnp.asarray(y))


# ----------------------------------------------------------------------------
# Registry and sub-configs
# ----------------------------------------------------------------------------


def test_registry_names_get_and_from_config():
  assert tuple(methods.names()) == ALL
  assert methods.get("rigl", update_every=10) == methods.RigL(update_every=10)
  assert methods.from_config({"name": "magnitude", "sparsity": 0.5}) == (methods.Magnitude(0.5))
  sup = methods.from_config("suptickets", {"dst": {"name": "granet", "sparsity": 0.8}, "cycles": 2})
  assert sup.dst == methods.GraNet(sparsity=0.8) and sup.cycles == 2
  assert methods.from_config("suptickets", {"dst": "set"}).dst == methods.SET()
  composed = methods.from_config(
    "compose", {"methods": [{"name": "random", "sparsity": 0.9, "budget": "erk"}, "rigl"]}
  )
  assert composed == methods.compose(methods.Random(0.9, budget="erk"), methods.RigL())
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(
    {"name": "imp", "schedule": "explicit", "sparsities": [0.5, 0.75]}
  )
  assert methods.from_config(cfg).sparsities == (0.5, 0.75)


def test_from_config_names_every_unknown_field_and_the_valid_ones():
  with pytest.raises(ValueError) as e:
    methods.from_config("rigl", {"alpah": 0.3, "every": 2})
  msg = str(e.value)
  assert "['alpah', 'every']" in msg and "'alpha'" in msg and "'update_every'" in msg
  with pytest.raises(ValueError, match="unknown method 'rgl'"):
    methods.get("rgl")
  with pytest.raises(ValueError, match="needs a 'name'"):
    methods.from_config({"sparsity": 0.5})


def test_register_a_new_method_without_any_runner_change():
  @methods.register("_test_half")
  @dataclasses.dataclass(frozen=True)
  class Half(methods.Method):
    kind = "mask"
    sparsity: float = 0.5

    def initial_mask(self, ctx, params, mask=None):
      return scores.prune_at_init("magnitude", params, sparsity=self.sparsity)

  try:
    assert "_test_half" in methods.names()
    method = methods.from_config("_test_half", {"sparsity": 0.25})
    mask = method.initial_mask(methods.Context(), {"w": jnp.arange(8.0).reshape(2, 4)})
    assert int(mask["w"].sum()) == 6
    with pytest.raises(ValueError, match="already registered"):
      methods.register("_test_half")(Half)
  finally:
    methods._REGISTRY.pop("_test_half")  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "cls, kwargs, match",
  [
    (methods.Magnitude, dict(sparsity=1.0), r"Magnitude.sparsity must be in \[0, 1\)"),
    (methods.Random, dict(budget="erkk"), "Random.budget"),
    (methods.SNIP, dict(rounds=0), "SNIP.rounds must be an integer >= 1"),
    (methods.SNIP, dict(bn_mode="test"), "SNIP.bn_mode must be one of"),
    (methods.GraSP, dict(temperature=0), "GraSP.temperature"),
    (methods.SynFlow, dict(dtype="float16"), "SynFlow.dtype"),
    (
      methods.Magnitude,
      dict(budget="2:4", sparsity=0.9),
      r"Magnitude.sparsity must be None or 0.5",
    ),
    (methods.Ticket, {}, "Ticket.path"),
    (methods.IMP, dict(schedule="cubic"), "IMP.schedule must be one of"),
    (methods.IMP, dict(schedule="linear", levels=10), "final_sparsity"),
    (methods.IMP, dict(schedule="explicit", sparsities=(0.5, 0.4)), "must not decrease"),
    (methods.IMP, dict(fraction=1.0), r"fraction must be in \(0, 1\)"),
    (
      methods.IMP,
      dict(rewind_step=5, prune_from_step=5),
      "IMP.prune_from_step must be an integer >= 6",
    ),
    (methods.IMP, dict(budget="erk"), "IMP.budget must be .global. or .uniform."),
    (methods.RigL, dict(update_every=0), "RigL.update_every must be an integer >= 1"),
    (methods.RigL, dict(end=0.0), r"RigL.end must be in \(0, 1\]"),
    (methods.SET, dict(alpha=1.5), r"SET.alpha must be in \[0, 1\]"),
    (methods.SET, dict(drop_schedule="linear"), "SET.drop_schedule"),
    (methods.RigL, dict(nm="2-4"), "RigL.nm"),
    (methods.GMP, dict(initial_sparsity=0.95, sparsity=0.9), "GMP.initial_sparsity"),
    (methods.GMP, dict(budget="2:4"), "N:M"),
    (methods.GraNet, dict(prune_epochs=(1.0,)), r"GraNet.prune_epochs must be \(start, end\)"),
    (methods.SupTickets, dict(dst=methods.Magnitude()), "SupTickets.dst must be a DST"),
    (methods.SupTickets, dict(cycles=0), "SupTickets.cycles"),
    (methods.SupTickets, dict(lr_shape="saw"), "SupTickets.lr_shape"),
    (methods.SupTickets, dict(ema=0.0), r"SupTickets.ema must be in \(0, 1\]"),
    (methods.SupTickets, dict(bn_variance="x"), "SupTickets.bn_variance"),
    (methods.ToST, dict(preset="ghosts"), "ToST.preset must be one of"),
    (methods.ToST, dict(soft_neurons=(1.0, 0.0)), r"ToST.soft_neurons must be"),
    (methods.ToST, dict(preset="ghost", lrsi={"stpes": 3}), r"ToST.lrsi has unknown"),
    (methods.SparseInit, dict(mode="fan"), "SparseInit.mode"),
    (methods.SparseInit, dict(scale=-1.0), "SparseInit.scale"),
  ],
)
def test_fields_are_checked_when_a_method_is_built(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(**kwargs)


# ----------------------------------------------------------------------------
# Masks: equal to the direct library calls, exact counts
# ----------------------------------------------------------------------------


def _direct(name, params, model, batch, **kw):
  _, apply_fn = scores.linen_apply_fn(model, {"params": params})
  return scores.prune_at_init(name, params, apply_fn=apply_fn, **kw)


@pytest.mark.parametrize(
  "method, name, kw",
  [
    (methods.Random(0.8), "random", {}),
    (methods.Random(0.8, budget="erk"), "random", dict(budget=budgets.ERK())),
    (methods.Magnitude(0.7, budget="uniform"), "magnitude", dict(budget=budgets.Uniform())),
    (methods.Magnitude(0.7, rounds=3), "iterative_magnitude", dict(rounds=3)),
    (methods.SNIP(0.9), "snip", {}),
    (methods.SNIP(0.9, rounds=2), "snip", dict(rounds=2)),
    (methods.GraSP(0.6, temperature=100.0), "grasp", dict(temperature=100.0)),
    (methods.SynFlow(0.95, rounds=5), "synflow", dict(rounds=5)),
  ],
)
def test_prune_at_init_masks_equal_the_library_call(tiny, method, name, kw):
  model, params, batch = tiny
  ctx = methods.Context(seed=3, model=model, input_shape=SHAPE, batches=batch)
  mask = method.initial_mask(ctx, params)
  sparsity = method.sparsity
  if name == "random":
    kw["key"] = jax.random.fold_in(jax.random.key(3), methods.MASK_KEY)
  if name in ("snip", "grasp"):
    kw["batches"] = batch
  if name == "synflow":
    kw["input_shape"] = SHAPE
  assert_trees_equal(mask, _direct(name, params, model, batch, sparsity=sparsity, **kw))
  summary = masks.summary(mask)
  if method.budget == "global":
    assert summary.kept == masks.kept_count(708, sparsity)
  else:
    layer_s = masks.layer_sparsities(params, sparsity, method.budget_object)
    for layer in summary.layers:
      assert layer.kept == masks.kept_count(layer.total, layer_s[layer.path])


def test_dense_has_no_mask_and_ticket_loads_the_saved_mask(tiny, tmp_path):
  _, params, _ = tiny
  ctx = methods.Context()
  assert methods.Dense().initial_mask(ctx, params) is None
  mask = methods.Magnitude(0.5).initial_mask(ctx, params)
  lottery.save_ticket(tmp_path / "t", mask, masks.apply(params, mask))
  assert_trees_equal(methods.Ticket(str(tmp_path / "t")).initial_mask(ctx, params), mask)
  with pytest.raises(ValueError, match="makes its own starting mask"):
    methods.Ticket(str(tmp_path / "t")).initial_mask(ctx, params, mask)


# ----------------------------------------------------------------------------
# IMP
# ----------------------------------------------------------------------------


def test_imp_schedules_give_exact_per_level_counts():
  n = 708
  geo = methods.IMP(levels=5).sparsities_per_level()
  assert geo == tuple(lottery.level_sparsity(l) for l in range(6))
  assert methods.IMP().sparsities_per_level()[-1] == lottery.level_sparsity(20)
  lin = methods.IMP(schedule="linear", levels=100, final_sparsity=0.99)
  s = lin.sparsities_per_level()
  assert len(s) == 101 and s[0] == 0.0 and s[50] == 0.495 and s[100] == 0.99
  assert [masks.kept_count(n, v) for v in s[:4]] == [708, 701, 694, 687]
  assert masks.kept_count(n, s[-1]) == 7
  explicit = methods.IMP(schedule="explicit", sparsities=[0.5, 0.9, 0.9])
  assert explicit.sparsities_per_level() == (0.0, 0.5, 0.9, 0.9)


def _sgd_train_fn(model, data, total_steps, log):
  """``train_fn`` of lottery.imp: full-batch steps of ``state.tx``; logs calls."""
  x, y = data

  @jax.jit
  def step(state):
    def loss(p):
      return jnp.mean(losses.cross_entropy(model.apply({"params": p}, x), y))

    grads = jax.grad(loss)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return state.replace(
      step=state.step + 1, opt_state=opt_state, params=optax.apply_updates(state.params, updates)
    )

  def train_fn(name, state, stop):
    stop = total_steps if stop is None else stop
    log.append((name, int(state.step), stop, state.params, state.mask))
    while int(state.step) < stop:
      state = step(state)
    log[-1] = log[-1] + (state.params,)
    return state

  return train_fn


def test_imp_linear_100_levels_prunes_the_step_k_weights(tiny):
  """The MNIST-1D lottery-ticket notebook's protocol shape: 100 levels of a
  linear schedule, each level pruned from the weights of step p < T."""
  model, _, data = tiny
  tx = optax.sgd(0.1, momentum=0.9)
  init = state_lib.create_train_state(
    model, tx, jnp.zeros((1, *SHAPE)), jax.random.key(0), mask=masks.ones_like
  )
  imp = methods.IMP(
    schedule="linear", levels=100, final_sparsity=0.99, rewind_step=1, prune_from_step=3
  )
  log = []
  seen = []
  result = imp.run(
    init,
    _sgd_train_fn(model, data, 5, log),
    methods.Context(),
    callback=lambda level, state: seen.append((level.level, int(state.step))),
  )
  s = imp.sparsities_per_level()
  assert [l.kept for l in result.levels] == [masks.kept_count(708, v) for v in s]
  assert [l.total for l in result.levels] == [708] * 101
  assert [l.sparsity for l in result.levels] == list(s)
  assert seen == [(l, 5) for l in range(101)]
  # Calls: the rewind point 0 -> 1, then each level 1 -> 3 and 3 -> 5.
  assert [(n, a, b) for n, a, b, *_ in log[:3]] == [
    ("rewind_point", 0, 1),
    ("level_0", 1, 3),
    ("level_0", 3, 5),
  ]
  assert len(log) == 1 + 2 * 100 + 1  # the last level is not pruned from
  assert [(n, a, b) for n, a, b, *_ in log[-2:]] == [("level_99", 3, 5), ("level_100", 1, 5)]
  point = result.point
  for level in (1, 50, 100):
    start, mid = log[1 + 2 * level], log[1 + 2 * (level - 1)]
    mask = result.levels[level].mask
    # Rewound to θ_1 ⊙ m_L, pruned from the previous level's step-3 weights.
    assert start[1] == 1
    assert_trees_equal(start[3], masks.apply(point.params, mask))
    assert_trees_equal(start[4], mask)
    expected = lottery.prune_to(mid[5], result.levels[level - 1].mask, s[level])
    assert_trees_equal(mask, expected)
  # Not the final weights: pruning level 1 from θ_T^0 gives another mask.
  final0 = log[2][5]
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(lottery.prune_to(final0, result.levels[0].mask, s[1])),
      jax.tree.leaves(result.levels[1].mask),
    )
  )


def test_imp_geometric_masks_equal_prune_level_of_the_final_weights(tiny):
  model, _, data = tiny
  init = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, *SHAPE)), jax.random.key(1), mask=masks.ones_like
  )
  log = []
  result = methods.IMP(levels=3).run(init, _sgd_train_fn(model, data, 4, log))
  assert [(n, a, b) for n, a, b, *_ in log] == [(f"level_{l}", 0, 4) for l in range(4)]
  mask = result.levels[0].mask
  for level in (1, 2, 3):
    mask = lottery.prune_level(log[level - 1][5], mask, level)
    assert_trees_equal(result.levels[level].mask, mask)
    assert result.levels[level].kept == masks.kept_count(708, lottery.level_sparsity(level))


def test_imp_resumes_from_known_masks_without_the_step_p_weights(tiny):
  model, _, data = tiny
  init = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, *SHAPE)), jax.random.key(2), mask=masks.ones_like
  )
  imp = methods.IMP(levels=3, rewind_step=1, prune_from_step=2)
  first = imp.run(init, _sgd_train_fn(model, data, 4, []))
  known = {l.level: l.mask for l in first.levels[:3]}  # levels 0..2 saved
  log = []
  again = imp.run(init, _sgd_train_fn(model, data, 4, log), known_masks=known)
  assert [(n, a, b) for n, a, b, *_ in log] == [
    ("rewind_point", 0, 1),
    ("level_0", 1, 4),
    ("level_1", 1, 4),
    ("level_2", 1, 2),
    ("level_2", 2, 4),
    ("level_3", 1, 4),
  ]
  for a, b in zip(first.levels, again.levels):
    assert_trees_equal(a.mask, b.mask)
    assert a.kept == b.kept


def test_imp_refuses_a_train_fn_that_stops_elsewhere_and_bad_schedules(tiny):
  model, _, _ = tiny
  init = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, *SHAPE)), jax.random.key(1), mask=masks.ones_like
  )
  with pytest.raises(ValueError, match="returned a state at step 0, not 2"):
    lottery.imp(init, lambda name, state, stop: state, (0.0, 0.5), rewind_step=2)
  with pytest.raises(ValueError, match="start with level 0 at 0.0"):
    lottery.imp(init, lambda name, state, stop: state, (0.2, 0.5))
  dense = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, *SHAPE)), jax.random.key(1)
  )
  with pytest.raises(ValueError, match="must hold a mask"):
    lottery.imp(dense, lambda name, state, stop: state, (0.0, 0.5))


# ----------------------------------------------------------------------------
# DST and Sup-tickets
# ----------------------------------------------------------------------------


def _run_tx(tx, params, steps):
  """``steps`` updates of ``tx`` with fixed pseudo-random gradients."""
  update = jax.jit(tx.update)
  grads_of = jax.jit(
    lambda t: jax.tree.map(
      lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(7), t), p.shape), params
    )
  )
  state = tx.init(params)
  for t in range(steps):
    updates, state = update(grads_of(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_dst_optimizers_equal_the_library_calls(tiny):
  """RigL and GMP here; SET, GraNet and RigL under Sup-tickets below."""
  _, params, _ = tiny
  ctx = methods.Context(seed=2, steps_per_epoch=5, num_epochs=4)  # 20 steps
  inner = optax.sgd(0.05, momentum=0.9)
  start = methods.Random(0.8, budget="erk").initial_mask(ctx, params)
  rigl = methods.RigL(update_every=3, alpha=0.4, end=0.5)
  direct = dst.rigl_optimizer(
    inner,
    start,
    end_step=10,
    drop_fraction=dst.cosine_drop_fraction(0.4, 10),
    update_every=3,
    seed=2,
  )
  a, b = _run_tx(rigl.optimizer(inner, start, ctx), params, 12), _run_tx(direct, params, 12)
  assert_trees_equal(a, b)
  assert int(b[1].mask_updates) == 3
  gmp = methods.GMP(sparsity=0.9, prune_epochs=(0.2, 0.5), update_every=2)
  ones = gmp.initial_mask(ctx, params)
  assert_trees_equal(ones, masks.ones_like(params))
  got = _run_tx(gmp.optimizer(inner, ones, ctx), params, 12)
  assert_trees_equal(
    got,
    _run_tx(
      dst.gmp_optimizer(
        inner, ones, final_sparsity=0.9, start_step=4, end_step=10, update_every=2, seed=2
      ),
      params,
      12,
    ),
  )
  assert masks.summary(optim.get_mask(got[1])).kept == masks.kept_count(708, 0.9)
  granet = methods.GraNet(sparsity=0.9, initial_sparsity=0.5)
  assert_trees_equal(
    granet.initial_mask(ctx, params),
    masks.random_mask(
      jax.random.fold_in(jax.random.key(2), methods.DST_MASK_KEY), params, 0.5, budget=budgets.ERK()
    ),
  )
  (churn,) = rigl.hooks(ctx)
  assert isinstance(churn, hooks_lib.StepHook) and churn.name == "dst"
  (churn_cb,) = rigl.callbacks(ctx)
  assert churn_cb.at_epoch_end
  with pytest.raises(ValueError, match="needs a starting mask"):
    rigl.initial_mask(ctx, params)
  with pytest.raises(ValueError, match="within the 20 steps"):
    methods.GMP(prune_epochs=(0.0, 5.0)).optimizer(inner, ones, ctx)


def test_suptickets_parts(tiny):
  _, params, _ = tiny
  ctx = methods.Context(seed=1, steps_per_epoch=5, num_epochs=10, prunable=masks.KERNELS)
  sup = methods.SupTickets(
    dst=methods.RigL(update_every=3), cycles=2, cycle_epochs=3, lr_shape="cosine", ema=0.5
  )
  plan = sup.plan(ctx)
  assert plan == suptickets.Plan(10, 2, 3, 5) and sup.phase(ctx).num_epochs == 4
  base = lambda epochs: optax.cosine_decay_schedule(0.1, epochs * 5)
  lr = sup.learning_rate(base, ctx)
  expected = plan.learning_rate(base(4), 0.001, 0.005, "cosine")
  assert [float(lr(t)) for t in range(50)] == [float(expected(t)) for t in range(50)]
  churn_cb, hook = sup.callbacks(ctx)
  assert isinstance(hook, suptickets.Superpose) and hook.plan == plan and hook.ema == 0.5
  assert churn_cb.at_epoch_end
  churn, sup_state = sup.hooks(ctx)
  assert churn.name == "dst" and sup_state.name == hook.hook().name
  start = methods.Random(0.8, budget="erk").initial_mask(ctx, params)
  inner = optax.sgd(0.05)
  got = _run_tx(sup.optimizer(inner, start, ctx), params, 40)
  # 15 // 3 = 4 periodic updates (steps 3..12), then the cycle starts 20, 35.
  assert int(got[1].mask_updates) == 6


# ----------------------------------------------------------------------------
# Recipes, composition, build
# ----------------------------------------------------------------------------


def test_tost_parts_delegate_to_the_recipe():
  method = methods.ToST("ghost", lrsi={"steps": 7})
  recipe = method.recipe
  assert recipe == tost.preset("ghost", lrsi=tost.LRsI(steps=7))
  ghost = method.model(models.get("resnet20", 10))
  assert ghost.ghost_skips is True and ghost.act is not activations.relu
  assert type(ghost) is type(tost.ghost_model("resnet20", 10))
  with pytest.raises(ValueError, match="ghost skip connections"):
    method.model(models.get("vgg11", 10))
  assert methods.ToST("soft_neurons").model(models.get("vgg11", 10)).act is not (activations.relu)
  s = method.scalars(100)
  assert sorted(s) == sorted(recipe.scalars(100))
  assert all(float(s[k](t)) == float(recipe.scalars(100)[k](t)) for k in s for t in (0, 10, 30, 60))
  assert method.loss_fn() is not None and methods.ToST().loss_fn() is None
  (hook,) = method.callbacks(methods.Context())
  assert isinstance(hook, tost.LRsICallback) and hook.settings.steps == 7
  assert method.hooks(methods.Context()) == ()
  ramp = methods.ToST(soft_neurons=(1.0, 0.0, 0.2, 0.4))
  assert ramp.recipe.soft_neurons == tost.Ramp(1.0, 0.0, 0.2, 0.4)
  params = {
    "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))},
    "ghost_in": {"kernel": jnp.ones((1, 1, 1, 2))},
  }
  plain = method.score_params(params)
  assert list(plain) == ["Conv_0"]
  lifted = method.lift_mask(masks.ones_like(plain), params)
  assert bool(lifted["ghost_in"]["kernel"].all())


def test_composed_ghost_tost_scores_the_plain_params():
  params = {
    "Dense_0": {"kernel": jnp.arange(8.0).reshape(2, 4)},
    "ghost_in": {"kernel": jnp.full((2, 4), 100.0)},
  }
  method = methods.compose(methods.Magnitude(0.5), methods.ToST("ghost_skips"))
  mask = method.initial_mask(methods.Context(), params)
  assert mask["Dense_0"]["kernel"].astype(int).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
  assert bool(mask["ghost_in"]["kernel"].all())


def test_sparse_init_redraws_by_active_fan_in(tiny):
  model, params, _ = tiny
  ctx = methods.Context(seed=5, model=model)
  mask = methods.Magnitude(0.9).initial_mask(ctx, params)
  got = methods.SparseInit().reinit(ctx, params, mask)
  want = masks.apply(
    gradient_flow.sparse_init(
      jax.random.fold_in(jax.random.key(5), methods.SPARSE_INIT_KEY),
      params,
      mask,
      scale=model.init_gain,
    ),
    mask,
  )
  assert_trees_equal(got, want)


def test_compose_refuses_conflicts():
  with pytest.raises(ValueError, match="at most one mask method"):
    methods.compose(methods.Random(), methods.SNIP())
  with pytest.raises(ValueError, match="at most one dst method"):
    methods.compose(methods.RigL(), methods.SupTickets())
  with pytest.raises(ValueError, match="ToST with a DST method"):
    methods.compose(methods.Random(), methods.RigL(), methods.ToST("ghost"))
  with pytest.raises(ValueError, match="IMP runs alone"):
    methods.compose(methods.IMP(), methods.SparseInit())
  with pytest.raises(ValueError, match="makes its own starting mask"):
    methods.compose(methods.Random(), methods.GMP()).initial_mask(
      methods.Context(), {"w": jnp.ones((4, 4))}
    )


def test_build_fixed_mask_with_sparse_init_and_a_dst_run(tiny):
  model, _, batch = tiny
  ctx = methods.Context(seed=0, model=model, input_shape=SHAPE, steps_per_epoch=4, num_epochs=2)
  inner = optax.sgd(0.1)
  built = methods.build(
    methods.compose(methods.Magnitude(0.75), methods.SparseInit()), model, inner, ctx
  )
  state = built.init()
  params0 = state_lib.create_train_state(
    model, inner, jnp.zeros((1, *SHAPE)), jax.random.key(0)
  ).params
  mask = methods.Magnitude(0.75).initial_mask(ctx, params0)
  assert_trees_equal(state.mask, mask)
  assert_trees_equal(state.params, methods.SparseInit().reinit(ctx, params0, mask))
  assert set(built.fit_kwargs()) == {"model", "init", "scalars", "loss_fn", "hooks", "callbacks"}
  # fit traces init for the checkpoint layout: the same layout, no scoring.
  layout = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
  assert layout(jax.eval_shape(built.init)) == layout(state)
  rigl = methods.build(
    methods.compose(methods.Random(0.5), methods.RigL(update_every=2)), model, inner, ctx
  )
  rstate = rigl.init()
  assert int(rstate.opt_state.mask_updates) == 0  # the DST optimiser holds the mask
  assert_trees_equal(rstate.mask, methods.Random(0.5).initial_mask(ctx, params0))
  assert len(rigl.hooks) == 1 and len(rigl.callbacks) == 1
  fixed = methods.build(methods.SNIP(0.5), model, inner, dataclasses.replace(ctx, batches=batch))
  fstate = fixed.init()
  assert isinstance(fstate.opt_state, optim.MaskedState)
  assert masks.summary(fstate.mask).kept == masks.kept_count(708, 0.5)
  dense = methods.build(methods.Dense(), model, inner, ctx).init()
  assert dense.mask is None


def test_registry_mlp_residual_and_pytorch_initialisation():
  x = jax.random.normal(jax.random.key(1), (5, *SHAPE))
  torch_like = models.get("mlp", 3, hidden=(64, 64), initializer="pytorch")
  params = state_lib.init_variables(torch_like, x, jax.random.key(0))["params"]
  for name, fan_in in (("Dense_0", 16), ("Dense_1", 64), ("Dense_2", 64)):
    bound = 1 / fan_in**0.5  # U(±1/sqrt(fan_in)), kernel and bias
    assert 0.8 * bound < float(jnp.max(jnp.abs(params[name]["kernel"]))) <= bound
    assert 0 < float(jnp.max(jnp.abs(params[name]["bias"]))) <= bound
  residual = models.get("mlp", 3, hidden=(8, 8), residual=True)  # 16 -> 8 -> 8 (+)
  params = state_lib.init_variables(residual, x, jax.random.key(0))["params"]
  params["Dense_1"] = jax.tree.map(jnp.zeros_like, params["Dense_1"])
  flat = x.reshape(5, -1)
  h = jax.nn.relu(flat @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  want = h @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"]  # h + relu(0)
  np.testing.assert_allclose(
    jax.jit(residual.apply)({"params": params}, x), want, rtol=1e-5, atol=1e-6
  )
  plain = models.get("mlp", 3, hidden=(8, 8))
  assert not np.allclose(jax.jit(plain.apply)({"params": params}, x), want)
  with pytest.raises(ValueError, match="MLP.initializer must be one of"):
    models.get("mlp", 3, initializer="torch").init(jax.random.key(0), x)


def test_build_gives_fit_a_run_that_trains_the_method(tmp_path):
  """One fit: Magnitude + SparseInit, the mask and weights of build."""
  from sparsejax import data  # pylint: disable=g-import-not-at-top
  from sparsejax import schedules  # pylint: disable=g-import-not-at-top

  ds = data.load("digits")
  model = models.get("mlp", 10, hidden=(32,))
  spe = schedules.steps_per_epoch(ds.num_train, 256)
  ctx = methods.Context(
    seed=0, model=model, input_shape=ds.image_shape, steps_per_epoch=spe, num_epochs=1
  )
  method = methods.compose(methods.Magnitude(0.8), methods.SparseInit())
  built = methods.build(method, model, schedules.make_optimizer(0.05), ctx)
  options = train.FitOptions(progress_bar=False, tensorboard=False)
  result = train.fit(
    dataset=ds,
    workdir=tmp_path,
    num_epochs=1,
    batch_size=256,
    options=options,
    **built.fit_kwargs(),
  )
  assert_trees_equal(result.state.mask, built.init().mask)
  assert masks.summary(result.state.mask).kept == masks.kept_count(64 * 32 + 320, 0.8)
  assert result.history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_default_config_round_trips_through_from_config():
  for name in methods.names():
    config = methods.default_config(name)
    assert sorted(config) == sorted(methods.fields(name))
    if name != "ticket":  # a ticket needs its path
      assert methods.from_config(name, config) == methods.get(name)
  sup = methods.default_config("suptickets")
  assert sup["dst"]["name"] == "rigl" and sup["dst"]["alpha"] == 0.3
  assert methods.default_config("granet")["budget"] == "erk"
  rigl_nm = methods.from_config("rigl", dict(methods.default_config("rigl"), nm="2:4"))
  assert rigl_nm.nm == "2:4"


def test_srigl_equals_the_library_call_and_keeps_the_classifier(tiny):
  model, params, _ = tiny
  ctx = methods.Context(
    seed=2, model=model, input_shape=SHAPE, steps_per_epoch=5, num_epochs=4
  )  # 20 steps
  start = methods.Random(0.8, budget="cfi-erk").initial_mask(ctx, params)
  assert_trees_equal(
    start,
    methods.Random(0.8, budget=budgets.ConstantFanIn(budgets.ERK())).initial_mask(ctx, params),
  )
  inner = optax.sgd(0.05, momentum=0.9)
  srigl = methods.SRigL(update_every=3, alpha=0.4, end=0.5, ablation_threshold=0.3)
  order = models.layer_order(model, jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))
  direct = dst.srigl_optimizer(
    inner,
    start,
    end_step=10,
    drop_fraction=dst.cosine_drop_fraction(0.4, 10),
    update_every=3,
    seed=2,
    ablation_threshold=0.3,
    ablatable=dataclasses.replace(masks.KEEP_CLASSIFIER_DENSE, order=order),
  )
  a, b = _run_tx(srigl.optimizer(inner, start, ctx), params, 12), _run_tx(direct, params, 12)
  assert_trees_equal(a, b)
  assert int(b[1].dst.mask_updates) == 3
  assert len(srigl.callbacks(ctx)) == 2 and len(srigl.hooks(ctx)) == 1
  with pytest.raises(ValueError, match="SRigL.ablation_threshold"):
    methods.SRigL(ablation_threshold=1.5)
  with pytest.raises(ValueError, match="needs a starting mask"):
    srigl.initial_mask(ctx, params)
