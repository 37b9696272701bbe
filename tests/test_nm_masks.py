"""N:M budgets: exact counts per group, ties, errors, pruning methods, DST."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import dst
from sparsejax import masks
from sparsejax import nm
from sparsejax import optim
from sparsejax import scores

TWO_FOUR = budgets.NM(2, 4)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _normal(seed, shape):
  # numpy, not jax.random: no compilation for test data.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _params():
  return {
    "conv": {"kernel": _normal(1, (3, 3, 8, 12))},
    "dense": {"kernel": _normal(2, (24, 10)), "bias": _normal(3, (10,))},
  }


def _reference_nm(scores_leaf, n, m):
  """N:M by hand: in each group along axis -2, sort by (-score, position)."""
  s = np.asarray(scores_leaf)
  out = np.zeros(s.shape, bool)
  cin = s.shape[-2]
  for idx in np.ndindex(*s.shape[:-2], s.shape[-1]):
    lead, cout = idx[:-1], idx[-1]
    for g in range(cin // m):
      rows = list(range(g * m, (g + 1) * m))
      vals = [s[(*lead, r, cout)] for r in rows]
      order = sorted(range(m), key=lambda j: (-vals[j], j))
      for j in order[:n]:
        out[(*lead, rows[j], cout)] = True
  return out


@pytest.mark.parametrize("budget", [budgets.NM(2, 4), budgets.NM(3, 8)])
def test_exact_count_in_every_group_and_matches_reference(budget):
  n, m = budget.n, budget.m
  params = _params()
  # Coarse scores: many ties inside groups.
  sc = jax.tree.map(lambda p: jnp.round(p * 2) / 2, params)
  mask = masks.topk_mask(sc, budget=budget)
  assert_trees_equal(mask, masks.topk_mask(sc, budget.sparsity, budget=budget))
  nm.check_nm(mask, budget)
  for path in ("conv", "dense"):
    counts = nm.group_counts(mask[path]["kernel"], m)
    assert counts.shape == (
      *mask[path]["kernel"].shape[:-2],
      mask[path]["kernel"].shape[-1],
      mask[path]["kernel"].shape[-2] // m,
    )
    assert np.all(np.asarray(counts) == n)
    np.testing.assert_array_equal(mask[path]["kernel"], _reference_nm(sc[path]["kernel"], n, m))
  assert bool(mask["dense"]["bias"].all())  # not prunable
  s = masks.summary(mask)
  assert s.sparsity == pytest.approx(1 - n / m)


def test_groups_run_along_the_input_dimension_and_ties_go_to_lower_index():
  mask = masks.topk_mask({"w": jnp.ones((8, 3))}, budget=TWO_FOUR)["w"]
  expected = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)[:, None].repeat(3, 1)
  np.testing.assert_array_equal(mask, expected)
  # NaN ranks lowest; -0.0 ties with 0.0.
  w = jnp.array([[jnp.nan], [0.0], [-0.0], [-1.0]])
  np.testing.assert_array_equal(nm.nm_keep(w, 2, 4).ravel(), [False, True, True, False])


def test_traced_n_and_within_under_jit():
  s = _normal(4, (3, 3, 8, 4))
  for n in (1, 2, 3):
    got = jax.jit(lambda x, k: nm.nm_keep(x, k, 4))(s, n)
    np.testing.assert_array_equal(got, _reference_nm(s, n, 4))
  within = nm.nm_keep(s, 1, 4)  # one available per group
  got = nm.nm_keep(s, 2, 4, within)  # keeps min(2, 1)
  np.testing.assert_array_equal(got, within)
  mask = masks.topk_mask({"w": s}, budget=TWO_FOUR, within={"w": nm.nm_keep(-s, 3, 4)})
  assert not bool(jnp.any(mask["w"] & ~nm.nm_keep(-s, 3, 4)))
  assert np.all(np.asarray(nm.group_counts(mask["w"], 4)) == 2)


def test_errors_are_clear():
  params = _params()
  with pytest.raises(ValueError, match="divisible by M=16.*'conv/kernel'"):
    masks.topk_mask(params, budget=budgets.NM(8, 16))
  with pytest.raises(ValueError, match="sparsity 0.5; got sparsity=0.9"):
    masks.topk_mask(params, 0.9, budget=TWO_FOUR)
  with pytest.raises(ValueError, match="1 <= N <= M"):
    budgets.NM(5, 4)
  with pytest.raises(ValueError, match="1 <= N <= M"):
    budgets.parse("5:4")
  with pytest.raises(ValueError, match="budget must be one of"):
    budgets.parse("2/4")
  with pytest.raises(ValueError, match="budget must be one of"):
    masks.topk_mask(params, 0.5, budget="2/4")
  with pytest.raises(ValueError, match=r"budgets.parse\('2:4'\) is NM\(n=2, m=4\)"):
    masks.topk_mask(params, 0.5, budget="2:4")  # a string is refused
  with pytest.raises(ValueError, match="axis -2"):
    masks.topk_mask(params, budget=TWO_FOUR, prunable=lambda p, x: True)
  with pytest.raises(ValueError, match="not 2:4"):
    nm.check_nm(masks.ones_like(params), TWO_FOUR)
  with pytest.raises(ValueError, match="budgets.parse"):
    nm.check_nm(masks.ones_like(params), "2:4")
  with pytest.raises(ValueError, match="traced sparsity"):
    jax.jit(lambda s: masks.topk_mask(params, s, budget=TWO_FOUR))(0.5)
  assert budgets.parse("2:4") == TWO_FOUR and budgets.NM(1, 4).sparsity == 0.75


def test_overrides_prune_a_layer_on_its_own_and_lift_the_divisibility_need():
  params = {
    "stem": {"kernel": jnp.arange(3 * 3 * 3 * 8.0).reshape(3, 3, 3, 8)},
    "body": {"kernel": jnp.arange(3 * 3 * 8 * 8.0).reshape(3, 3, 8, 8)},
  }
  mask = masks.topk_mask(params, budget=TWO_FOUR.with_overrides({"stem": 0.0}))
  assert bool(mask["stem"]["kernel"].all())
  nm.check_nm({"body": mask["body"]}, TWO_FOUR)
  mask = masks.topk_mask(params, budget=TWO_FOUR.with_overrides({"stem": 0.9}))
  assert int(mask["stem"]["kernel"].sum()) == masks.kept_count(216, 0.9)


def test_nnx_state():
  model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  mask = masks.topk_mask(jax.tree.map(jnp.abs, state), budget=TWO_FOUR)
  assert np.all(np.asarray(nm.group_counts(mask["kernel"][...], 4)) == 2)


def _mlp():
  def apply_fn(p, x, train=False):
    del train
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["l1"]["kernel"])
    return h @ p["l2"]["kernel"]

  params = {"l1": {"kernel": _normal(5, (16, 8))}, "l2": {"kernel": _normal(6, (8, 4))}}
  return params, apply_fn


@pytest.mark.parametrize(
  "method,kw",
  [
    ("random", {"key": jax.random.key(0)}),
    ("magnitude", {}),
    ("iterative_magnitude", {"rounds": 6}),
    ("snip", {"batches": (jnp.ones((4, 16)), jnp.array([0, 1, 2, 3]))}),
    ("synflow", {"input_shape": (16,), "rounds": 6}),
  ],
)
def test_every_pruning_method_targets_nm(method, kw):
  params, apply_fn = _mlp()
  one_four = budgets.NM(1, 4)
  mask = scores.prune_at_init(method, params, budget=one_four, apply_fn=apply_fn, **kw)
  nm.check_nm(mask, one_four)
  # A sparsity that agrees with the budget's is the same mask.
  assert_trees_equal(
    mask,
    scores.prune_at_init(method, params, sparsity=0.75, budget=one_four, apply_fn=apply_fn, **kw),
  )


def test_rigl_keeps_nm_through_updates():
  # (SET shares the rule; its random growth is one more growth score, covered
  # by test_drop_and_grow_nm_keeps_every_group_count_for_any_mask.)
  params = {
    "conv": {"kernel": _normal(7, (1, 2, 8, 4))},
    "dense": {"kernel": _normal(8, (8, 3)), "bias": jnp.zeros(3)},
  }
  mask = masks.topk_mask(jax.tree.map(jnp.abs, params), budget=TWO_FOUR)
  tx = dst.rigl_optimizer(
    optax.sgd(0.1), mask, drop_fraction=0.5, update_every=1, start_step=0, nm=TWO_FOUR, end_step=100
  )
  state = tx.init(masks.apply(params, mask))
  p = masks.apply(params, mask)
  update = jax.jit(tx.update)
  for step in range(2):
    grads = jax.tree.map(lambda x: _normal(10 + step, x.shape), p)  # noqa: B023
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
    new = optim.get_mask(state)
    nm.check_nm(new, TWO_FOUR)
  assert float(dst.mask_churn(mask, new)) > 0
  for make in (dst.rigl_optimizer, dst.set_optimizer):
    with pytest.raises(ValueError, match="not 2:4"):
      make(optax.sgd(0.1), masks.ones_like(params), end_step=10, nm=TWO_FOUR)
    with pytest.raises(ValueError, match="budgets.parse"):
      make(optax.sgd(0.1), mask, end_step=10, nm="2:4")
    with pytest.raises(ValueError, match="nm must be None or an NM"):
      make(optax.sgd(0.1), mask, end_step=10, nm=budgets.ERK())


def test_drop_and_grow_nm_keeps_every_group_count_for_any_mask():
  mask = _normal(5, (16, 6)) > 0.3
  w = _normal(6, (16, 6)) * mask
  g = _normal(7, (16, 6))
  new, grown = jax.jit(dst.drop_and_grow_nm, static_argnums=4)(mask, w, g, 0.5, 8)
  np.testing.assert_array_equal(nm.group_counts(new, 8), nm.group_counts(mask, 8))
  assert not bool(jnp.any(grown & mask))


def test_masks_and_nm_import_no_circle_and_masks_reexports_no_nm_name():
  import sparsejax

  for name in [
    "nm",
    "parse_nm",
    "nm_sparsity",
    "check_nm",
    "nm_groups",
    "nm_ungroup",
    "group_counts",
    "keep_top_in_groups",
    "nm_keep",
    "_check_nm_sparsity",
    "_nm_topk_mask",
    "check_budget",
    "BUDGETS",
  ]:
    assert not hasattr(masks, name), name
  for name in ["nm", "parse_nm", "nm_sparsity", "_nm_topk_mask", "_check_nm_sparsity"]:
    assert not hasattr(nm, name), name
  assert sparsejax.nm is nm and "nm" in sparsejax.__all__
  assert sparsejax.budgets is budgets and "budgets" in sparsejax.__all__
