"""Constant fan-in budgets and SRigL (issue #27; SPEC §1 "constant fan-in", §4 "SRigL")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import condensed
from sparsejax import dst
from sparsejax import masks
from sparsejax import optim
from sparsejax import scores
from tests import test_lowering as lowering


def ints(x):
  return np.asarray(x).astype(int).tolist()


# ----------------------------------------------------------------------------
# budgets.ConstantFanIn
# ----------------------------------------------------------------------------


def test_parse_names_and_refusals():
  assert (
    budgets.parse("cfi") == budgets.ConstantFanIn(budgets.Uniform()) == (budgets.ConstantFanIn())
  )
  assert budgets.parse("cfi-erk") == budgets.ConstantFanIn(budgets.ERK())
  for bad in (budgets.Global(), budgets.NM(2, 4), budgets.ConstantFanIn()):
    with pytest.raises(ValueError, match="per-layer allocation"):
      budgets.ConstantFanIn(bad)
  with pytest.raises(ValueError, match="ndim >= 2"):
    masks.topk_mask(
      {"b": jnp.ones(4)}, 0.5, budget=budgets.ConstantFanIn(), prunable=lambda p, x: True
    )


def test_dense_kernel_exact_k_per_unit_ties_by_flat_index():
  # [d_in=4, d_out=3]; s = 0.5: k = round(0.5 * 4) = 2 per unit.
  s = jnp.array([[3.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 5.0, 1.0], [0.0, 4.0, 1.0]])
  m = masks.topk_mask({"w": s}, 0.5, budget=budgets.ConstantFanIn())["w"]
  # Unit 0: 3 and 2; unit 1: 5 and 4; unit 2: all tied, rows 0 and 1.
  assert ints(m) == [[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]]
  # s = 0.9: k = max(1, round(0.4)) = 1.
  m = masks.topk_mask({"w": s}, 0.9, budget=budgets.ConstantFanIn())["w"]
  assert ints(m) == [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_conv_kernel_fan_in_is_the_receptive_field():
  # [kh=1, kw=2, c_in=2, c_out=2]: fan-in 4; s = 0.75 -> k = 1 per channel.
  s = jnp.array([[[[1.0, 7.0], [2.0, 7.0]], [[9.0, 0.0], [2.0, 7.0]]]])
  m = masks.topk_mask({"k": s}, 0.75, budget=budgets.ConstantFanIn())["k"]
  # Channel 0: 9 at (0, 1, 0, 0); channel 1: the tied 7s, the first one.
  want = np.zeros((1, 2, 2, 2), int)
  want[0, 1, 0, 0] = 1
  want[0, 0, 0, 1] = 1
  assert ints(m) == want.tolist()
  assert condensed.check_constant_fan_in({"k": m}) == {"k": 1}


def test_erk_base_k_from_each_layer_sparsity_and_traced_uniform():
  params = {
    "a": jnp.zeros((30, 8)),
    "b": jnp.zeros((3, 3, 8, 16)),
    "c": jnp.zeros((16, 4)),
    "bias": jnp.zeros(4),
  }
  sc = jax.tree.map(lambda x: jax.random.uniform(jax.random.key(0), x.shape), params)
  budget = budgets.ConstantFanIn(budgets.ERK())
  mask = masks.topk_mask(sc, 0.8, budget=budget)
  layer_s = masks.layer_sparsities(params, 0.8, budgets.ERK())
  assert budget.layer_sparsities({p: params[p].shape for p in "abc"}, 0.8) == layer_s
  got = condensed.check_constant_fan_in(mask, allow_ablated=False)
  fan_in = {"a": 30, "b": 72, "c": 16}
  assert got == {p: masks.kept_count(fan_in[p], layer_s[p]) for p in fan_in}
  assert bool(mask["bias"].all())
  # A Uniform base takes a traced sparsity (the same counts).
  traced = jax.jit(lambda s: masks.topk_mask(sc, s, budget=budgets.ConstantFanIn()))
  eager = masks.topk_mask(sc, 0.8, budget=budgets.ConstantFanIn())
  assert all(
    bool((a == b).all()) for a, b in zip(jax.tree.leaves(traced(0.8)), jax.tree.leaves(eager))
  )


def test_overrides_inside_and_outside_constant_fan_in():
  sc = {
    "a": jax.random.uniform(jax.random.key(0), (10, 4)),
    "b": jax.random.uniform(jax.random.key(1), (10, 4)),
  }
  inside = budgets.ConstantFanIn(budgets.Uniform().with_overrides({"^b": 0.5}))
  m = masks.topk_mask(sc, 0.8, budget=inside)
  assert condensed.check_constant_fan_in(m, allow_ablated=False) == {"a": 2, "b": 5}
  outside = budgets.ConstantFanIn().with_overrides({"^b": 0.5})
  m = masks.topk_mask(sc, 0.8, budget=outside)
  assert condensed.fan_in_counts(m["a"]).tolist() == [2] * 4
  assert int(m["b"].sum()) == 20  # a plain per-layer top-k of the 40


def test_within_keeps_min_k_available_per_unit():
  s = jnp.arange(12.0).reshape(4, 3)
  within = jnp.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]], bool)
  m = masks.topk_mask({"w": s}, 0.5, budget=budgets.ConstantFanIn(), within={"w": within})["w"]
  # k = 2; unit 1 has 2 available, unit 2 only 1.
  assert ints(m) == [[0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]]


def test_every_pruning_at_init_method_and_random_mask():
  params = {
    "a": jax.random.normal(jax.random.key(0), (20, 6)),
    "b": jax.random.normal(jax.random.key(1), (6, 3)),
  }
  budget = budgets.ConstantFanIn(budgets.ERK())
  want = {
    p: masks.kept_count(params[p].shape[0], s)
    for p, s in masks.layer_sparsities(params, 0.7, budgets.ERK()).items()
  }
  for mask in (
    scores.prune_at_init("magnitude", params, sparsity=0.7, budget=budget),
    scores.prune_at_init("random", params, sparsity=0.7, budget=budget, key=jax.random.key(2)),
    scores.prune_at_init("iterative_magnitude", params, sparsity=0.7, budget=budget, rounds=3),
    masks.random_mask(jax.random.key(3), params, 0.7, budget=budget),
  ):
    assert condensed.check_constant_fan_in(mask, allow_ablated=False) == want
  # Magnitude under constant fan-in: the top |θ| of each column.
  mask = scores.prune_at_init("magnitude", params, sparsity=0.7, budget=budget)
  assert bool((mask["a"] == condensed.constant_fan_in_mask(jnp.abs(params["a"]), want["a"])).all())


# ----------------------------------------------------------------------------
# SRigL
# ----------------------------------------------------------------------------


def _one_update(mask, w, g, **kwargs):
  params = {"w": jnp.asarray(w)}
  tx = dst.srigl_optimizer(
    optax.sgd(0.1, momentum=0.9),
    {"w": jnp.asarray(mask, bool)},
    end_step=100,
    update_every=1,
    start_step=0,
    **kwargs,
  )
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
  return optax.apply_updates(params, updates)["w"], state


def test_hand_computed_update_per_unit_drop_and_grow_counts():
  # [d_in=4, d_out=2], k = 2. f = 0.5 of n = 4: RigL's layer-wise drop keeps
  # the 2 largest |θ| (both of unit 1), so unit 0 drops 2 and unit 1 none.
  mask = [[1, 0], [1, 0], [0, 1], [0, 1]]
  w = [[0.01, 0.0], [0.02, 0.0], [0.0, 0.9], [0.0, 0.8]]
  # Unit 0 regrows 2 of its 4 entries: 0.5 tied on rows 1-3 -> rows 1 and 2.
  g = [[0.1, 9.0], [0.5, 9.0], [0.5, 9.0], [0.5, 9.0]]
  new_w, state = _one_update(mask, w, g, drop_fraction=0.5, ablation_threshold=0.0)
  new = optim.get_mask(state)["w"]
  assert ints(new) == [[0, 0], [1, 0], [1, 1], [0, 1]]
  # Row 1 was dropped and regrown: it keeps its value; row 2 is new at 0;
  # row 0 is gone; unit 1 is untouched (skipped update: no SGD step).
  np.testing.assert_array_equal(
    new_w, np.float32([[0.0, 0.0], [0.02, 0.0], [0.0, 0.9], [0.0, 0.8]])
  )
  assert int(state.dst.mask_updates) == 1


def test_srigl_layer_matches_the_optimizer_and_docstring_case():
  mask = jnp.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool)
  w = jnp.array([[0.9, 0.1], [0.05, 0.0], [0.0, 0.8], [0.0, 0.0]])
  g = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.3, 0.0], [0.2, 0.7]])
  direct = dst.srigl_layer(mask, w, g, 0.5, 4, ablation_threshold=0.0)
  _, state = _one_update(mask, w, g, drop_fraction=0.5, ablation_threshold=0.0)
  assert ints(direct) == ints(optim.get_mask(state)["w"]) == [[1, 0], [0, 0], [1, 1], [0, 1]]


def _ablation_case():
  # [d_in=4, d_out=3], k = 2, B = 6; f = 0.5: d = 3, n_keep = 3.
  mask = [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
  w = [[0.9, 0.7, 0.02], [0.8, 0.01, 0.03], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
  g = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.8, 0.0], [0.9, 0.0, 0.0]]
  return mask, w, g


def test_ablation_of_a_unit_without_salient_weights_and_redistribution():
  # Salient: the 3 largest |θ| (0.9, 0.8 of unit 0; 0.7 of unit 1) and the 3
  # largest |g| (1.0, 0.9 of unit 0; 0.8 of unit 1): counts 4, 2, 0. γ_sal =
  # 0.5: threshold max(1, ⌊0.5 · 2⌋) = 1, so unit 2 is ablated and the 2 live
  # units share B = 6: k' = 3. Unit 0 regrows row 2 (|g| 1.0); unit 1 keeps
  # 0.7 and regrows row 2 (0.8) and, of the tied 0s, row 1 (its dropped 0.01).
  mask, w, g = _ablation_case()
  new_w, state = _one_update(mask, w, g, drop_fraction=0.5, ablation_threshold=0.5)
  new = optim.get_mask(state)["w"]
  assert ints(new) == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]
  assert condensed.check_constant_fan_in({"w": new}) == {"w": 3}
  assert dst.ablated_units({"w": new}) == (1, 3)
  assert dst.ablated_fraction({"w": new}) == pytest.approx(1 / 3)
  np.testing.assert_array_equal(
    new_w, np.float32([[0.9, 0.7, 0.0], [0.8, 0.01, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  )
  assert int(state.budget["w"]) == 6
  # The default threshold (0.3): max(1, ⌊0.6⌋) = 1, the same ablation.
  _, state = _one_update(mask, w, g, drop_fraction=0.5)
  assert ints(optim.get_mask(state)["w"]) == ints(new)
  # A layer that may not ablate (e.g. the classifier) keeps all units at k.
  _, state = _one_update(
    mask, w, g, drop_fraction=0.5, ablation_threshold=0.5, ablatable=lambda path, leaf: False
  )
  kept = optim.get_mask(state)["w"]
  assert condensed.check_constant_fan_in({"w": kept}, allow_ablated=False) == {"w": 2}


def test_ablation_never_leaves_more_than_fan_in_per_unit():
  # 2 units of fan-in 4, B = 6 (k = 3): one unit alone could hold only 4, so
  # the second unit stays however unsalient (the reference's guard).
  mask = jnp.array([[1, 1], [1, 1], [1, 1], [0, 0]], bool)
  w = jnp.array([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.0, 0.0]])
  g = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
  new = dst.srigl_layer(mask, w, g, 0.5, 6, ablation_threshold=1.0)
  assert condensed.check_constant_fan_in({"w": new}, allow_ablated=False) == {"w": 3}


def test_arguments_are_checked():
  mask = {"w": jnp.ones((4, 2), bool)}
  with pytest.raises(ValueError, match="ablation_threshold must be in"):
    dst.srigl_optimizer(optax.sgd(0.1), mask, end_step=10, ablation_threshold=1.5)
  with pytest.raises(ValueError, match="constant fan-in starting mask"):
    dst.srigl_optimizer(optax.sgd(0.1), {"w": jnp.array([[1, 1], [0, 1]], bool)}, end_step=10)
  with pytest.raises(ValueError, match="alpha"):
    dst.srigl_optimizer(optax.sgd(0.1), mask, end_step=10, alpha=2.0)


def _mlp_loss(params, x, y):
  h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  h = jax.nn.relu(h @ params["l2"]["kernel"] + params["l2"]["bias"])
  logits = h @ params["l3"]["kernel"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_constant_fan_in_after_every_update_of_a_tiny_mlp():
  k = jax.random.split(jax.random.key(0), 6)
  params = {
    "l1": {"kernel": jax.random.normal(k[0], (16, 12)) * 0.3, "bias": jnp.zeros(12)},
    "l2": {"kernel": jax.random.normal(k[1], (12, 12)) * 0.3, "bias": jnp.zeros(12)},
    "l3": {"kernel": jax.random.normal(k[2], (12, 3)) * 0.3},
  }
  mask = masks.random_mask(k[3], params, 0.75, budget=budgets.ConstantFanIn(budgets.ERK()))
  start = condensed.check_constant_fan_in(mask, allow_ablated=False)
  tx = dst.srigl_optimizer(
    optax.sgd(0.1, momentum=0.9),
    mask,
    end_step=40,
    alpha=0.5,
    update_every=2,
    start_step=0,
    ablation_threshold=0.5,
    ablatable=lambda path, leaf: not path.startswith("l3"),
  )
  params = masks.apply(params, mask)
  state = tx.init(params)
  x = jax.random.normal(k[4], (32, 16))
  y = jax.random.randint(k[5], (32,), 0, 3)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  budget = jax.device_get(state.budget)
  ablated = []
  for _ in range(20):
    params, state = step(params, state)
    mask = jax.device_get(optim.get_mask(state))
    fan = condensed.check_constant_fan_in(mask)
    ablated.append(dst.ablated_units(mask)[0])
    for path, k_now in fan.items():
      layer = path.split("/")[0]
      counts = condensed.fan_in_counts(mask[layer]["kernel"])
      live = int((counts > 0).sum())
      fan_in = mask[layer]["kernel"].shape[0]
      assert k_now == min(int(budget[layer]["kernel"]) // live, fan_in)
    assert fan["l3/kernel"] == start["l3/kernel"]  # never ablated
    for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
      assert not np.asarray(leaf)[~np.asarray(m)].any()  # pruned entries are 0
  assert int(state.dst.mask_updates) == 10
  assert max(ablated) > 0  # ablation ran (and may revive units later)
  assert np.isfinite(float(_mlp_loss(params, x, y)))


def test_optimizer_state_untouched_on_mask_update_steps():
  mask, w, g = _ablation_case()
  params = {"w": jnp.asarray(w)}
  tx = dst.srigl_optimizer(
    optax.sgd(0.1, momentum=0.9),
    {"w": jnp.asarray(mask, bool)},
    end_step=100,
    update_every=2,
    start_step=1,
    drop_fraction=0.5,
    ablation_threshold=0.5,
  )
  state = tx.init(params)
  # Step 0: an ordinary step builds momentum.
  updates, state = tx.update({"w": jnp.asarray(g) + 1.0}, state, params)
  params = optax.apply_updates(params, updates)
  before = state
  # Step 1: a mask update: no weight moves, the inner state stays, apart from
  # the reset moments of new connections.
  updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
  new = optim.get_mask(state)["w"]
  old = optim.get_mask(before)["w"]
  survivors = np.asarray(new & old)
  assert not np.asarray(updates["w"])[survivors].any()
  trace_before = np.asarray(before.dst.masked.inner_state[0].trace["w"])
  trace_after = np.asarray(state.dst.masked.inner_state[0].trace["w"])
  assert (trace_after[survivors] == trace_before[survivors]).all()
  assert not trace_after[np.asarray(new & ~old)].any()
  assert int(state.dst.count) == 2 and int(state.dst.mask_updates) == 1


def test_lowering_for_cuda_and_tpu_has_no_cpu_rewrite():
  model = lowering._small_model()  # pylint: disable=protected-access
  params = lowering._variables(model)["params"]  # pylint: disable=protected-access
  mask = masks.random_mask(
    jax.random.key(1), params, 0.8, budget=budgets.ConstantFanIn(budgets.ERK())
  )
  tx = dst.srigl_optimizer(optax.sgd(0.1), mask, end_step=1000, update_every=1, start_step=0)
  traced = lowering._train_step(model, tx)  # pylint: disable=protected-access
  for platform in ("cuda", "tpu"):
    lowered = traced.lower(lowering_platforms=(platform,))
    assert not lowering.cpu_markers(lowered.as_text(debug_info=True)), platform
    text = lowered.as_text()
    bad = {t for t in lowering.custom_call_targets(text) if lowering._CPU_ONLY.search(t)}  # pylint: disable=protected-access
    assert not bad, (platform, bad)
    assert "callback" not in text.lower()
