"""Dynamic sparse training (sparsejax.dst, SPEC §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import dst
from sparsejax import masks
from sparsejax import optim


def _b(*xs):
  return jnp.array(xs, bool)


# ----------------------------------------------------------------------------
# One layer, by hand
# ----------------------------------------------------------------------------


def test_drop_and_grow_by_hand():
  mask = _b(1, 1, 1, 0, 0, 0)
  w = jnp.array([0.5, -0.1, 0.3, 0.0, 0.0, 0.0])
  g = jnp.array([0.0, 0.0, 0.0, 0.2, 0.9, 0.2])
  # n_active = 3, k = floor(0.34 * 3) = 1: drop |w| = 0.1 (index 1), grow the
  # largest |g| among {1, 3, 4, 5}: index 4.
  new, grown = dst.drop_and_grow(mask, w, g, 0.34)
  np.testing.assert_array_equal(new, _b(1, 0, 1, 0, 1, 0))
  np.testing.assert_array_equal(grown, _b(0, 0, 0, 0, 1, 0))


def test_drop_and_grow_ties_go_to_the_lower_flat_index():
  mask = _b(1, 1, 1, 1, 0, 0, 0, 0)
  w = jnp.array([0.2, 0.2, 0.2, 0.2, 0, 0, 0, 0])
  g = jnp.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  # k = 2: the four equal magnitudes keep indices 0 and 1; of the four equal
  # growth scores, indices 4 and 5 grow.
  new, grown = dst.drop_and_grow(mask, w, g, 0.5)
  np.testing.assert_array_equal(new, _b(1, 1, 0, 0, 1, 1, 0, 0))
  np.testing.assert_array_equal(grown, _b(0, 0, 0, 0, 1, 1, 0, 0))


def test_a_just_dropped_weight_can_regrow():
  mask = _b(1, 1, 1, 0, 0)
  w = jnp.array([0.5, 0.1, 0.3, 0.0, 0.0])
  g = jnp.array([0.0, 5.0, 0.0, 0.1, 0.2])
  new, grown = dst.drop_and_grow(mask, w, g, 0.34)
  np.testing.assert_array_equal(new, mask)
  assert not grown.any()


def test_drop_and_grow_nan_growth_scores_rank_last():
  mask = _b(1, 1, 0, 0)
  w = jnp.array([0.5, 0.1, 0.0, 0.0])
  g = jnp.array([0.0, 0.0, jnp.nan, 0.0])
  new, _ = dst.drop_and_grow(mask, w, g, 0.5)  # k = 1: index 1 drops
  # candidates {1, 2, 3}: scores 0, NaN, 0 -> index 1 (lowest index, score 0)
  np.testing.assert_array_equal(new, _b(1, 1, 0, 0))


def test_schedules():
  f = dst.cosine_drop_fraction(0.3, 100)
  np.testing.assert_allclose([f(0), f(50), f(100), f(150)], [0.3, 0.15, 0.0, 0.0], atol=1e-7)
  s = dst.cubic_sparsity(0.5, 0.9, 10, 20)
  np.testing.assert_allclose(
    [s(0), s(10), s(15), s(20), s(30)], [0.5, 0.5, 0.9 - 0.4 * 0.125, 0.9, 0.9], rtol=1e-6
  )
  on = [bool(dst.is_update_step(t, update_every=3, start_step=2, end_step=9)) for t in range(12)]
  assert [t for t, o in enumerate(on) if o] == [2, 5, 8]


# ----------------------------------------------------------------------------
# Inside an optax loop
# ----------------------------------------------------------------------------


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
    "dense1": {"kernel": jax.random.normal(k1, (20, 30)), "bias": jnp.zeros(30)},
    "dense2": {"kernel": jax.random.normal(k2, (30, 10)), "bias": jax.random.normal(k3, (10,))},
  }


def _counts(mask):
  return [int(m.sum()) for m in jax.tree.leaves(mask)]


def _loop(tx, params, n, *, seed=1):
  """n updates with random (dense) gradients; returns params, state, masks."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  seen = []
  for key in jax.random.split(jax.random.key(seed), n):
    params, state = step(params, state, key)
    seen.append(optim.get_mask(state))
  return params, state, seen


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_counts_preserved_and_pruned_exactly_zero_over_100_updates(method):
  params = _params()
  mask = masks.random_mask(jax.random.key(2), params, 0.8, budget=budgets.ERK())
  params = masks.apply(params, mask)
  inner = optax.sgd(0.05, momentum=0.9)
  kw = dict(update_every=1, start_step=0)
  tx = (
    dst.set_optimizer(inner, mask, drop_fraction=0.3, **kw)
    if method == "set"
    else dst.rigl_optimizer(inner, mask, end_step=1000, **kw)
  )
  params, state, seen = _loop(tx, params, 100)
  assert int(state.mask_updates) == 100
  for m in seen:
    assert _counts(m) == _counts(mask)
    assert m["dense1"]["bias"].all() and m["dense2"]["bias"].all()
  final = optim.get_mask(state)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()
  # the mask actually moved
  churn = float(dst.mask_churn(mask, final))
  assert churn > 0.05


def test_rigl_update_by_hand_with_skipped_weight_update():
  params = {"w": jnp.array([[0.5, -0.1, 0.3], [0.0, 0.0, 0.0]])}
  mask = {"w": jnp.array([[1, 1, 1], [0, 0, 0]], bool)}
  grads = {"w": jnp.array([[1.0, 0.0, 1.0], [0.2, 0.9, 0.2]])}
  tx = dst.rigl_optimizer(
    optax.sgd(0.1), mask, end_step=100, drop_fraction=0.34, update_every=1, start_step=0
  )
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(optim.get_mask(state)["w"], [[1, 0, 1], [0, 1, 0]])
  # skipped weight update: survivors unchanged, dropped and grown exactly 0
  np.testing.assert_array_equal(new["w"], params["w"] * jnp.array([[1, 0, 1], [0, 0, 0]]))
  assert int(state.count) == 1 and int(state.mask_updates) == 1


def test_rigl_update_applied_when_not_skipped():
  params = {"w": jnp.array([[0.5, -0.1, 0.3], [0.0, 0.0, 0.0]])}
  mask = {"w": jnp.array([[1, 1, 1], [0, 0, 0]], bool)}
  grads = {"w": jnp.array([[1.0, 0.0, 1.0], [0.2, 0.9, 0.2]])}
  tx = dst.rigl_optimizer(
    optax.sgd(0.1),
    mask,
    end_step=100,
    drop_fraction=0.34,
    update_every=1,
    start_step=0,
    skip_update=False,
  )
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["w"], [[0.4, 0.0, 0.2], [0.0, 0.0, 0.0]], atol=1e-7)


def test_no_mask_update_between_update_steps():
  params = _params()
  mask = masks.random_mask(jax.random.key(2), params, 0.8, budget=budgets.Uniform())
  tx = dst.set_optimizer(optax.sgd(0.1), mask, update_every=5, end_step=12)
  _, state, seen = _loop(tx, masks.apply(params, mask), 20)
  changed = [i for i in range(20) if float(dst.mask_churn(seen[i - 1] if i else mask, seen[i])) > 0]
  assert changed == [5, 10]  # t = 5 and 10; none at 0 (start = ΔT) or >= 12
  assert int(state.mask_updates) == 2


@pytest.mark.parametrize(
  "name,inner,moment_fields",
  [
    ("momentum", optax.sgd(0.1, momentum=0.9), ("trace",)),
    ("adam", optax.adam(1e-2), ("mu", "nu")),
  ],
)
def test_regrown_weights_zero_with_zero_moments(name, inner, moment_fields):
  del name
  # 2-D: the default prunability predicate only takes kernels (ndim > 1).
  params = {"w": jnp.array([[0.5, -0.1, 0.3], [0.0, 0.0, 0.0]])}
  mask = {"w": jnp.array([[1, 1, 1], [0, 0, 0]], bool)}
  tx = dst.rigl_optimizer(
    inner, mask, end_step=100, drop_fraction=0.34, update_every=1, start_step=0
  )
  state = tx.init(params)
  # Pretend every moment is 1 (e.g. left over from earlier activity).
  state = state._replace(
    masked=state.masked._replace(
      inner_state=jax.tree.map(
        lambda x: jnp.ones_like(x) if jnp.shape(x) == (2, 3) else x, state.masked.inner_state
      )
    )
  )
  grads = {"w": jnp.array([[1.0, 0.0, 1.0], [0.2, 0.9, 0.2]])}
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert float(new["w"][1, 1]) == 0.0 and bool(optim.get_mask(state)["w"][1, 1])
  found = 0
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(state.masked.inner_state)[0]:
    if jnp.shape(leaf) == (2, 3) and any(
      getattr(k, "name", None) in moment_fields for k in leaf_path
    ):
      found += 1
      assert float(leaf[1, 1]) == 0.0  # grown: reset
      assert float(leaf[0, 0]) != 0.0  # kept: untouched
  assert found == len(moment_fields)


@pytest.mark.parametrize(
  "inner",
  [
    optax.sgd(0.1, momentum=0.9, nesterov=True),
    optax.adamw(1e-2, weight_decay=1e-2),
    optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)),
    optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
  ],
  ids=["nesterov", "adamw", "chain", "inject_hyperparams"],
)
def test_works_with_common_optimisers(inner):
  params = _params()
  mask = masks.random_mask(jax.random.key(3), params, 0.7, budget=budgets.ERK())
  tx = dst.rigl_optimizer(inner, mask, end_step=50, update_every=2, start_step=0)
  params, state, _ = _loop(tx, masks.apply(params, mask), 10)
  final = optim.get_mask(state)
  assert _counts(final) == _counts(mask)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    assert np.isfinite(np.asarray(p)).all()
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()


def test_nan_gradient_at_pruned_position_never_reaches_kept_weights():
  params = _params()
  mask = masks.random_mask(jax.random.key(4), params, 0.8, budget=budgets.Uniform())
  params = masks.apply(params, mask)
  tx = dst.set_optimizer(optax.adam(1e-2), mask, update_every=3, start_step=0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(7):
    m = optim.get_mask(state)
    grads = jax.tree.map(lambda p, mm: jnp.where(mm, 0.1, jnp.nan), params, m)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_one_trace_and_no_host_callbacks():
  params = _params()
  mask = masks.random_mask(jax.random.key(2), params, 0.8)
  tx = dst.rigl_optimizer(
    optax.sgd(0.1, momentum=0.9), mask, end_step=100, update_every=2, start_step=0
  )
  traces = []

  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(6):  # 3 mask updates, 3 plain steps
    params, state = jitted(params, state, grads)
  assert len(traces) == 1 and int(state.mask_updates) == 3
  jaxpr = str(jax.make_jaxpr(step)(params, state, grads))
  assert "cond" in jaxpr and "callback" not in jaxpr


# ----------------------------------------------------------------------------
# Gradual magnitude pruning and GraNet
# ----------------------------------------------------------------------------


def test_gmp_follows_the_cubic_schedule_step_by_step():
  params = _params()
  mask = masks.ones_like(params)
  n = 20 * 30 + 30 * 10  # prunable entries
  tx = dst.gmp_optimizer(
    optax.sgd(0.01), mask, final_sparsity=0.9, start_step=0, end_step=10, update_every=1
  )
  _, state, seen = _loop(tx, params, 14)
  s = dst.cubic_sparsity(0.0, 0.9, 0, 10)
  for t, m in enumerate(seen):
    kept = int(m["dense1"]["kernel"].sum() + m["dense2"]["kernel"].sum())
    assert kept == max(1, round((1 - float(s(min(t, 10)))) * n)), t
    assert m["dense1"]["bias"].all()
  assert int(state.mask_updates) == 11  # t = 0..10


def test_granet_prunes_then_regrows_at_constant_density():
  params = _params()
  mask = masks.random_mask(jax.random.key(5), params, 0.5, budget=budgets.ERK())
  n = 20 * 30 + 30 * 10
  tx = dst.granet_optimizer(
    optax.sgd(0.01),
    mask,
    initial_sparsity=0.5,
    final_sparsity=0.8,
    start_step=0,
    end_step=4,
    regrow_end_step=10,
    update_every=2,
  )
  _, state, seen = _loop(tx, masks.apply(params, mask), 12)
  kernels = lambda m: int(m["dense1"]["kernel"].sum() + m["dense2"]["kernel"].sum())
  s = dst.cubic_sparsity(0.5, 0.8, 0, 4)
  assert kernels(seen[0]) == round((1 - float(s(0))) * n)
  assert kernels(seen[2]) == round((1 - float(s(2))) * n)
  assert kernels(seen[4]) == round(0.2 * n)
  # after pruning ends: regrowth only, counts per layer constant, mask moves
  assert _counts(seen[6]) == _counts(seen[4]) == _counts(seen[8])
  assert float(dst.mask_churn(seen[4], seen[6])) > 0
  assert int(state.mask_updates) == 5  # t = 0, 2, 4, 6, 8


def test_dst_state_works_with_optim_helpers():
  params = _params()
  mask = masks.random_mask(jax.random.key(2), params, 0.8)
  tx = dst.set_optimizer(optax.sgd(0.1, momentum=0.9), mask)
  state = tx.init(params)
  assert optim.find_mask(state) is not None
  np.testing.assert_array_equal(optim.get_mask(state)["dense1"]["kernel"], mask["dense1"]["kernel"])
  with pytest.raises(ValueError, match="update_every"):
    dst.set_optimizer(optax.sgd(0.1), mask, update_every=0)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state)


def test_flax_nnx_optimizer():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  mask = masks.random_mask(jax.random.key(1), params, 0.75, budget=budgets.Uniform())
  nnx.update(model, masks.apply(params, mask))
  optimizer = nnx.Optimizer(
    model,
    dst.rigl_optimizer(
      optax.sgd(0.1, momentum=0.9), mask, end_step=100, update_every=2, start_step=0
    ),
    wrt=nnx.Param,
  )
  x = jax.random.normal(jax.random.key(2), (32, 8))
  y = jnp.arange(32) % 4

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)

  for _ in range(6):
    step(model, optimizer)
  final = optim.get_mask(optimizer.opt_state)
  assert int(optimizer.opt_state.mask_updates[...]) == 3
  # l1 bias, l1 kernel (25% of 8x16), l2 bias, l2 kernel (25% of 16x4)
  assert _counts(final) == _counts(mask) == [16, 32, 4, 16]
  assert float(dst.mask_churn(mask, final)) > 0
  for p, m in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(final)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()


# ----------------------------------------------------------------------------
# Issue #23: exact drop counts, GraNet's restart at 0, the untouched optimiser
# state of a mask-update step, argument checks
# ----------------------------------------------------------------------------


def test_drop_count_is_exact_when_the_product_is_an_integer():
  # RigL at T_end / 2 with alpha = 0.3: f = 0.15 is 0.149999991 in float32 and
  # a plain floor(f * 20) drops 2 weights, not 3.
  f = dst.cosine_drop_fraction(0.3, 200)(100)
  assert float(f) * 20 < 3
  assert int(dst.drop_count(f, 20)) == 3
  mask = jnp.arange(40) < 20
  w = jnp.where(mask, jnp.arange(1.0, 41.0), 0.0)
  new, grown = dst.drop_and_grow(mask, w, jnp.arange(40.0), f)
  assert int(grown.sum()) == 3 and int(new.sum()) == 20
  # Every boundary j / n (float32) for n up to 96: exactly j.
  n = np.concatenate([np.full(m + 1, m) for m in range(1, 97)])
  j = np.concatenate([np.arange(m + 1) for m in range(1, 97)])
  fractions = (j / n).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(jax.vmap(dst.drop_count))(fractions, n), j)
  # Off the boundaries it is the plain floor.
  assert int(dst.drop_count(0.149, 20)) == 2
  assert int(dst.drop_count(0.3, 5)) == 1
  jitted = jax.jit(dst.drop_count)
  assert int(jitted(jnp.float32(0.7), jnp.int32(10))) == 7  # float32 0.7 < 0.7


def _granet_case(skip_update=True):
  """One prunable 2x2 kernel, magnitude pruning to 50% at step 2, then a regrowth
  of k = 1 whose largest gradient is on a weight that step 2's pruning removed."""
  params = {"w": jnp.array([[4.0, 3.0], [2.0, 1.0]])}
  regrow = lambda t: jnp.where(t >= 2, 0.5, 0.0)
  tx = dst.gmp_optimizer(
    optax.sgd(0.1, momentum=0.9),
    masks.ones_like(params),
    final_sparsity=0.5,
    start_step=1,
    end_step=2,
    update_every=1,
    regrow_fraction=regrow,
    regrow_end_step=10,
    skip_update=skip_update,
  )
  state = tx.init(params)
  g = {"w": jnp.array([[1.0, 1.0], [1.0, 1.0]])}
  for _ in range(2):  # t = 0 (no update), t = 1 (sparsity 0: nothing changes)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  # t = 2: keep 2 of 4 by |w| (4 - .., 3 - ..); regrowth drops the weaker
  # of those (index 1) and grows the largest |g| among the rest: index 3,
  # pruned by this very step.
  g2 = {"w": jnp.array([[0.0, 0.0], [0.5, 9.0]])}
  before = state
  u, state = tx.update(g2, state, params)
  return params, before, optax.apply_updates(params, u), state


def test_granet_weight_pruned_and_regrown_in_one_step_restarts_at_zero():
  old_params, before, params, state = _granet_case()
  mask = optim.get_mask(state)["w"]
  np.testing.assert_array_equal(mask, [[True, False], [False, True]])
  trace = state.masked.inner_state[0].trace["w"]
  assert float(params["w"][1, 1]) == 0.0  # was 1 - 0.2 - ...: restarts at 0
  assert float(trace[1, 1]) == 0.0
  # The survivor keeps its value and momentum (the step is skipped).
  assert float(params["w"][0, 0]) == float(old_params["w"][0, 0])
  assert float(trace[0, 0]) == float(before.masked.inner_state[0].trace["w"][0, 0])


def test_mask_update_step_leaves_the_optimiser_state_untouched():
  params = {"w": jnp.array([[0.5, -0.1], [0.3, 0.0]]), "b": jnp.array([1.0, 2.0])}
  mask = {"w": jnp.array([[True, True], [True, False]]), "b": jnp.ones(2, bool)}
  tx = dst.rigl_optimizer(
    optax.adam(0.1), mask, end_step=100, drop_fraction=0.34, update_every=2, start_step=2
  )
  state = tx.init(params)
  g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, -1.0])}
  for _ in range(2):  # two ordinary steps build Adam's moments
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  before = state
  u, state = tx.update(g, state, params)  # t = 2: a mask update
  new_params = optax.apply_updates(params, u)
  grown = optim.get_mask(state)["w"] & ~optim.get_mask(before)["w"]
  assert int(grown.sum()) == 1 and bool(grown[1, 1])
  adam_before, adam_after = before.masked.inner_state[0], state.masked.inner_state[0]
  assert int(adam_after.count) == int(adam_before.count) == 2
  for name in ("mu", "nu"):
    expected = jax.tree.map(
      lambda x, r: jnp.where(r, 0.0, x),
      getattr(adam_before, name),
      {"w": grown, "b": jnp.zeros(2, bool)},
    )
    jax.tree.map(np.testing.assert_array_equal, getattr(adam_after, name), expected)
  np.testing.assert_array_equal(new_params["b"], params["b"])
  # skip_update=False applies the step: counters and moments advance.
  tx2 = dst.rigl_optimizer(
    optax.adam(0.1),
    mask,
    end_step=100,
    drop_fraction=0.34,
    update_every=2,
    start_step=2,
    skip_update=False,
  )
  s2 = tx2.init(params)
  for _ in range(3):
    _, s2 = tx2.update(g, s2, params)
  assert int(s2.masked.inner_state[0].count) == 3


@pytest.mark.parametrize(
  "build, match",
  [
    (
      lambda tx, m: dst.rigl_optimizer(tx, m, end_step=100, drop_fraction=-0.3),
      r"drop_fraction must be in \[0, 1\], got -0.3",
    ),
    (
      lambda tx, m: dst.rigl_optimizer(tx, m, end_step=100, alpha=1.5),
      r"alpha must be in \[0, 1\].*1.5",
    ),
    (
      lambda tx, m: dst.set_optimizer(tx, m, drop_fraction=2.0),
      r"drop_fraction must be in \[0, 1\].*2.0",
    ),
    (
      lambda tx, m: dst.rigl_optimizer(tx, m, end_step=0),
      r"end_step must be an integer >= 1, got 0",
    ),
    (
      lambda tx, m: dst.rigl_optimizer(tx, m, end_step=-5),
      r"end_step must be an integer >= 1, got -5",
    ),
    (
      lambda tx, m: dst.rigl_optimizer(tx, m, end_step=50, start_step=60),
      r"end_step must be after start_step \(60\)",
    ),
    (
      lambda tx, m: dst.gmp_optimizer(tx, m, final_sparsity=0.9, start_step=50, end_step=10),
      r"end_step must be after start_step \(50\)",
    ),
    (
      lambda tx, m: dst.gmp_optimizer(
        tx, m, final_sparsity=0.5, initial_sparsity=0.8, start_step=0, end_step=10
      ),
      r"initial_sparsity \(0.8\) must be <= final_sparsity",
    ),
    (
      lambda tx, m: dst.gmp_optimizer(tx, m, final_sparsity=1.2, start_step=0, end_step=10),
      r"final_sparsity must be in \[0, 1\)",
    ),
    (
      lambda tx, m: dst.granet_optimizer(
        tx, m, final_sparsity=0.9, start_step=0, end_step=10, regrow_end_step=20, alpha=-1
      ),
      r"alpha must be in \[0, 1\]",
    ),
    (
      lambda tx, m: dst.set_optimizer(tx, m, update_every=0),
      r"update_every must be an integer >= 1, got 0",
    ),
    (
      lambda tx, m: dst.set_optimizer(tx, m, start_step=-1),
      r"start_step must be an integer >= 0, got -1",
    ),
  ],
)
def test_out_of_range_arguments_are_refused_where_given(build, match):
  mask = {"w": jnp.ones((4, 4), bool)}
  with pytest.raises(ValueError, match=match):
    build(optax.sgd(0.1), mask)


# Issue #24: a DST step that compiles about as cheaply as the static one.


def test_same_shape_layers_update_together_as_each_alone():
  k = jax.random.split(jax.random.key(3), 6)
  params = {f"d{i}": {"kernel": jax.random.normal(k[i], (12, 8))} for i in range(3)}
  params["head"] = {"kernel": jax.random.normal(k[3], (8, 4))}
  grads = jax.tree.map(lambda p: jax.random.normal(k[4], p.shape), params)
  mask = masks.random_mask(k[5], params, 0.7)
  rule = dst.drop_and_grow_rule(0.3)
  got = jax.jit(rule)(mask, params, grads, k[0], 0)
  for name in params:
    expect, _ = dst.drop_and_grow(
      mask[name]["kernel"], params[name]["kernel"], jnp.abs(grads[name]["kernel"]), 0.3
    )
    np.testing.assert_array_equal(got[name]["kernel"], expect)


def test_rigl_step_does_not_grow_with_the_number_of_same_shape_layers():
  # Each selection is one loop, and same-shape layers share one vmapped
  # drop-and-grow: a layer adds to RigL's program beyond the static step's
  # only its share of the per-leaf bookkeeping (~20 lines), not two more
  # radix selections (~200 lines looped, thousands unrolled).
  def excess(depth):
    params = {f"d{i}": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)} for i in range(depth)}
    mask = masks.random_mask(jax.random.key(0), params, 0.8)

    def size(tx):
      def step(p, state, x):
        def loss(q):
          h = x
          for i in range(depth):
            h = jnp.tanh(h @ q[f"d{i}"]["kernel"] + q[f"d{i}"]["bias"])
          return jnp.sum(h**2)

        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

      lowered = jax.jit(step).lower(params, tx.init(params), jnp.ones((8, 16)))
      return len(lowered.as_text().splitlines())

    inner = optax.sgd(0.1, momentum=0.9)
    return size(dst.rigl_optimizer(inner, mask, end_step=1000, update_every=10)) - size(
      optim.sparse(inner, mask)
    )

  two, six = excess(2), excess(6)
  assert six - two <= 4 * 40, (two, six)


def test_drop_and_grow_layers_is_drop_and_grow_on_each_layer():
  rng = np.random.default_rng(5)
  shapes = [(3, 4), (2, 2, 3, 5), (6,), (3, 4)]
  layer_masks = [jnp.asarray(rng.random(s) < 0.5) for s in shapes]
  weights = [jnp.asarray(rng.integers(-3, 4, s), jnp.float32) for s in shapes]
  grow = [jnp.asarray(rng.integers(0, 3, s), jnp.float32) for s in shapes]
  new, grown = dst.drop_and_grow_layers(layer_masks, weights, grow, 0.5)
  for m, w, g, n, gr in zip(layer_masks, weights, grow, new, grown):
    want_new, want_grown = dst.drop_and_grow(m, w, g, 0.5)
    np.testing.assert_array_equal(n, want_new)
    np.testing.assert_array_equal(gr, want_grown)
