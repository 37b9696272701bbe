"""Budgets as objects: parse, the objects, overrides, strings refused (SPEC §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import dst
from sparsejax import lottery
from sparsejax import masks
from sparsejax import scores


def _params():
  rng = np.random.default_rng(0)
  return {
    "stem": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
    "body": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 8, 8)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32), "bias": jnp.zeros(10)},
  }


def _shapes(params):
  return {p: x.shape for p, x in masks.named_leaves(params) if x.ndim > 1}


def _kept(mask):
  return {p: int(m.sum()) for p, m in masks.named_leaves(mask)}


@pytest.mark.parametrize(
  "text, budget",
  [
    ("global", budgets.Global()),
    ("uniform", budgets.Uniform()),
    ("erk", budgets.ERK()),
    ("er", budgets.ER()),
    ("2:4", budgets.NM(2, 4)),
    (" 1:8 ", budgets.NM(1, 8)),
    ("4:4", budgets.NM(4, 4)),
  ],
)
def test_parse_gives_the_objects(text, budget):
  parsed = budgets.parse(text)
  assert parsed == budget and type(parsed) is type(budget)
  assert budgets.parse(parsed) is parsed  # an object passes through


@pytest.mark.parametrize(
  "text, match",
  [
    ("layerwise", "budget must be one of"),
    ("ERK", "budget must be one of"),
    ("2/4", "budget must be one of"),
    ("", "budget must be one of"),
    ("0:4", r"1 <= N <= M, got 0:4"),
    ("5:4", r"1 <= N <= M, got 5:4"),
    (0.5, "must be a string"),
    (None, "must be a string"),
  ],
)
def test_parse_errors(text, match):
  with pytest.raises(ValueError, match=match):
    budgets.parse(text)


def test_objects_are_frozen_hashable_and_distinct():
  assert budgets.ERK() != budgets.ER() and budgets.ERK(0.5) == budgets.ERK(power=0.5)
  assert (
    len(
      {
        budgets.Global(),
        budgets.Global(),
        budgets.Uniform(),
        budgets.ERK(),
        budgets.ER(),
        budgets.NM(2, 4),
        budgets.NM(2, 4),
      }
    )
    == 5
  )
  with pytest.raises(AttributeError):
    budgets.NM(2, 4).n = 3
  assert budgets.NM(2, 4).sparsity == 0.5 and budgets.NM(3, 8).sparsity == 0.625
  assert str(budgets.NM(2, 4)) == "2:4"
  hash(budgets.ERK().with_overrides({"head": 0.0}))  # a static jit argument
  with pytest.raises(ValueError, match=r"power must be in \[0, 1\], got 1.5"):
    budgets.ERK(power=1.5)
  with pytest.raises(ValueError, match="NM n must be an integer"):
    budgets.NM(2.5, 4)
  with pytest.raises(ValueError, match="1 <= N <= M"):
    budgets.NM(0, 4)


def test_erk_power_zero_is_uniform_and_er_differs_on_convs():
  params = _params()
  shapes = _shapes(params)
  assert budgets.ERK(power=0.0).layer_sparsities(shapes, 0.8) == pytest.approx(
    budgets.Uniform().layer_sparsities(shapes, 0.8)
  )
  erk = budgets.ERK().layer_sparsities(shapes, 0.8)
  er = budgets.ER().layer_sparsities(shapes, 0.8)
  assert erk["stem/kernel"] != pytest.approx(er["stem/kernel"])
  sc = jax.tree.map(jnp.abs, params)
  for budget in (budgets.ERK(), budgets.ER(), budgets.ERK(0.3)):
    kept = _kept(masks.topk_mask(sc, 0.8, budget=budget))
    sp = masks.layer_sparsities(params, 0.8, budget)
    for p, s in sp.items():
      assert kept[p] == masks.kept_count(int(np.prod(shapes[p])), s), (budget, p)


def test_nm_implies_its_sparsity_and_refuses_another():
  sc = jax.tree.map(jnp.abs, _params())
  nm = budgets.NM(2, 4)
  implied = masks.topk_mask(sc, budget=nm)
  same = masks.topk_mask(sc, 0.5, budget=nm)
  for a, b in zip(jax.tree.leaves(implied), jax.tree.leaves(same)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(
    ValueError,
    match=r"NM\(n=2, m=4\) keeps 2 of every 4.*sparsity "
    r"0.5; got sparsity=0.75: leave the sparsity out",
  ):
    masks.topk_mask(sc, 0.75, budget=nm)
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    masks.topk_mask(sc, 1.0, budget=nm)
  with pytest.raises(ValueError, match="no per-layer allocation"):
    masks.layer_sparsities(sc, 0.5, nm)


@pytest.mark.parametrize("budget", [budgets.Global(), budgets.Uniform(), budgets.ERK()])
def test_a_sparsity_is_required_except_for_nm(budget):
  with pytest.raises(ValueError, match="needs a sparsity in"):
    masks.topk_mask(jax.tree.map(jnp.abs, _params()), budget=budget)


def test_overrides_fix_layers_and_spread_the_rest():
  params = _params()
  sc = jax.tree.map(jnp.abs, params)
  shapes = _shapes(params)
  n = {p: int(np.prod(s)) for p, s in shapes.items()}
  ov = budgets.Global().with_overrides({"^head": 0.0, "stem": 0.5})
  assert ov == budgets.Overrides(budgets.Global(), {"^head": 0.0, "stem": 0.5})
  assert ov.as_dict() == {"^head": 0.0, "stem": 0.5}
  kept = _kept(masks.topk_mask(sc, 0.9, budget=ov))
  assert kept["head/kernel"] == 80 and kept["stem/kernel"] == n["stem/kernel"] // 2
  assert kept["body/kernel"] == masks.kept_count(n["body/kernel"], 0.9)
  # Uniform and ERK allocate over the layers that are not overridden.
  ov_erk = budgets.ERK().with_overrides({"^head": 0.0})
  sp = ov_erk.layer_sparsities(shapes, 0.9)
  rest = {p: s for p, s in shapes.items() if p != "head/kernel"}
  assert sp == {**budgets.ERK().layer_sparsities(rest, 0.9), "head/kernel": 0.0}
  # Overriding twice merges; a pattern matching nothing, a bad sparsity and
  # two patterns disagreeing on a path are errors.
  twice = ov_erk.with_overrides({"stem": 0.5})
  assert twice == budgets.Overrides(budgets.ERK(), {"^head": 0.0, "stem": 0.5})
  with pytest.raises(ValueError, match="'classifier' matches no prunable path"):
    masks.topk_mask(sc, 0.9, budget=budgets.Uniform().with_overrides({"classifier": 0.0}))
  with pytest.raises(ValueError, match=r"override 'head' must be in \[0, 1\)"):
    budgets.Global().with_overrides({"head": 1.0})
  with pytest.raises(ValueError, match="several overrides"):
    masks.topk_mask(sc, 0.9, budget=budgets.Global().with_overrides({"head": 0.0, "kernel": 0.5}))
  with pytest.raises(ValueError, match="needs a Python float sparsity"):
    jax.jit(lambda s: masks.topk_mask(sc, s, budget=ov))(0.9)
  with pytest.raises(ValueError, match="base=.*budgets.parse"):
    budgets.Overrides("erk", {"head": 0.0})


def test_pools_protocol():
  shapes = _shapes(_params())
  (pool,) = budgets.Global().pools(shapes, 0.9)
  assert pool.joint and pool.paths == frozenset(shapes) and pool.sparsity == 0.9
  (pool,) = budgets.Uniform().pools(shapes, 0.9)
  assert not pool.joint and pool.group is None
  (pool,) = budgets.NM(2, 4).pools(shapes, None)
  assert pool.group == (2, 4) and pool.sparsity == 0.5
  pools = budgets.NM(2, 4).with_overrides({"stem": 0.0}).pools(shapes, None)
  assert {(p.paths, p.group) for p in pools} == {
    (frozenset({"body/kernel", "head/kernel"}), (2, 4)),
    (frozenset({"stem/kernel"}), None),
  }
  erk = budgets.ERK().pools(shapes, 0.9)
  assert frozenset().union(*(p.paths for p in erk)) == frozenset(shapes)
  assert budgets.Global().pools({}, 0.9) == ()


def test_library_functions_refuse_strings_naming_parse():
  params = _params()
  sc = jax.tree.map(jnp.abs, params)
  key = jax.random.key(0)
  calls = [
    lambda: masks.topk_mask(sc, 0.5, budget="erk"),
    lambda: masks.layer_sparsities(params, 0.5, "uniform"),
    lambda: masks.random_mask(key, params, 0.5, budget="erk"),
    lambda: scores.prune_at_init("magnitude", params, sparsity=0.5, budget="global"),
    lambda: scores.iterative(
      scores.magnitude, params, masks.ones_like(params), 0.5, 2, budget="uniform"
    ),
    lambda: lottery.prune_level(params, masks.ones_like(params), 1, budget="global"),
    lambda: dst.rigl_optimizer(optax.sgd(0.1), masks.ones_like(params), end_step=10, nm="2:4"),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=r"is a string.*sparsejax\.budgets\.parse"):
      call()


def test_random_mask_exact_counts_under_each_budget():
  params = _params()
  key = jax.random.key(3)
  shapes = _shapes(params)
  for budget in (budgets.Uniform(), budgets.ERK()):
    kept = _kept(masks.random_mask(key, params, 0.7, budget=budget))
    for p, s in budget.layer_sparsities(shapes, 0.7).items():
      assert kept[p] == masks.kept_count(int(np.prod(shapes[p])), s)
  mask = masks.random_mask(key, params, budget=budgets.NM(1, 4))
  assert masks.summary(mask).sparsity == 0.75
  assert bool(mask["head"]["bias"].all())
