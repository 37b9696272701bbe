"""Masks and budgets: exact counts, ERK by hand, presets, errors (SPEC §1)."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import budgets
from sparsejax import masks


def _params():
  # Insertion order stem -> block -> head differs from sorted order on purpose.
  return {
    "stem": {"kernel": jnp.ones((3, 3, 3, 8)), "bias": jnp.zeros(8)},
    "block": {"kernel": jnp.ones((3, 3, 8, 8)), "scale": jnp.ones(8)},
    "a_head": {"kernel": jnp.ones((8, 10)), "bias": jnp.zeros(10)},
  }


def _kept(mask):
  return {p: int(np.sum(m)) for p, m in masks.named_leaves(mask)}


def test_global_exact_count_under_total_ties_keeps_lowest_flat_indices():
  params = _params()
  scores = jax.tree.map(jnp.ones_like, params)  # every score tied
  mask = masks.topk_mask(scores, 0.9)
  n = 216 + 576 + 80
  kept = _kept(mask)
  assert kept["a_head/kernel"] + kept["block/kernel"] + kept["stem/kernel"] == round(0.1 * n)
  # Ties go to the lower index of the concatenation in flattening order
  # (a_head, block, stem): all 80 head entries, then the first 7 of block.
  assert kept["a_head/kernel"] == 80 and kept["block/kernel"] == 7
  assert kept["stem/kernel"] == 0
  np.testing.assert_array_equal(np.ravel(mask["block"]["kernel"]), np.arange(576) < 7)
  # Non-prunable leaves are all True.
  assert kept["stem/bias"] == 8 and kept["block/scale"] == 8


def test_uniform_ties_exact_per_layer_counts_and_partial_ties():
  params = _params()
  # Heavy ties: only 3 distinct values per layer.
  scores = jax.tree.map(
    lambda p: jnp.asarray(np.arange(p.size).reshape(p.shape) % 3, jnp.float32), params
  )
  mask = masks.topk_mask(scores, 0.7, budget=budgets.Uniform())
  kept = _kept(mask)
  assert kept["stem/kernel"] == round(0.3 * 216) == 65
  assert kept["block/kernel"] == round(0.3 * 576) == 173
  assert kept["a_head/kernel"] == round(0.3 * 80) == 24
  # Everything kept scores 2 (the top value), lowest flat indices first.
  flat = np.ravel(mask["block"]["kernel"])
  assert np.all(np.arange(576)[flat] % 3 == 2)
  assert np.flatnonzero(flat)[-1] == 3 * 172 + 2


def test_at_least_one_entry_per_pool_and_rounding():
  scores = {"w": jnp.arange(100.0).reshape(10, 10)}
  assert _kept(masks.topk_mask(scores, 0.999))["w"] == 1
  assert masks.kept_count(100, 0.999) == 1
  assert masks.kept_count(10, 0.25) == 8  # round(7.5) -> 8 (half to even)
  assert masks.kept_count(10, 0.75) == 2  # round(2.5) -> 2 (half to even)
  top = masks.topk_mask(scores, 0.95)["w"]
  np.testing.assert_array_equal(np.flatnonzero(np.ravel(top)), np.arange(95, 100))


def test_traced_sparsity_under_jit_matches_python():
  params = _params()
  scores = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
  for budget in (budgets.Global(), budgets.Uniform()):
    ref = masks.topk_mask(scores, 0.83, budget=budget)
    got = jax.jit(lambda s, sp: masks.topk_mask(s, sp, budget=budget))(  # noqa: B023
      scores, jnp.float32(0.83)
    )
    assert _kept(got) == _kept(ref)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_array_equal(a, b)


def test_within_restricts_to_existing_mask_for_iterative_pruning():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(20, 10)), jnp.float32)
  scores = {"w": jnp.abs(w)}
  m1 = masks.topk_mask(scores, 0.5)
  # Re-score with inverted magnitudes: without `within` it would pick pruned
  # entries; with it, only survivors of m1 can be kept.
  inverted = {"w": -jnp.abs(w)}
  m2 = masks.topk_mask(inverted, 0.8, within=m1)
  assert _kept(m2)["w"] == 40
  assert not np.any(np.asarray(m2["w"]) & ~np.asarray(m1["w"]))
  # Asking for more than `within` keeps caps at what it keeps.
  assert _kept(masks.topk_mask(inverted, 0.2, within=m1))["w"] == 100


def test_erk_densities_hand_computed_with_dense_layer_fix():
  # small: raw (2+2)/4 = 1.0; big: raw 200/10000 = 0.02; density 0.5.
  # First pass: eps = 0.5*10004 / (1.0*4 + 0.02*10000) = 24.52 -> small > 1,
  # made dense. Second pass: rhs = 0.5*10000 - 0.5*4 = 4998, divisor = 200,
  # eps = 24.99 -> big density 0.4998. Total kept 4 + 4998 = 0.5 * 10004.
  shapes = {"small": (2, 2), "big": (100, 100)}
  d = budgets.ERK().densities(shapes, 0.5)
  assert d["small"] == 1.0
  assert d["big"] == pytest.approx(0.4998, abs=1e-12)
  params = {"small": jnp.zeros((2, 2)), "big": jnp.zeros((100, 100))}
  mask = masks.topk_mask(jax.tree.map(jnp.ones_like, params), 0.5, budget=budgets.ERK())
  assert _kept(mask) == {"big": 4998, "small": 4}


def test_erk_vs_er_on_conv_kernel_and_power_scale():
  shapes = {"conv": (3, 3, 4, 8), "fc": (8, 10)}
  n = {"conv": 288, "fc": 80}
  # ERK raw: conv 18/288 = 0.0625, fc 18/80 = 0.225.
  eps = 0.2 * 368 / (0.0625 * 288 + 0.225 * 80)
  d = budgets.ERK().densities(shapes, 0.2)
  assert d["conv"] == pytest.approx(eps * 0.0625)
  assert d["fc"] == pytest.approx(eps * 0.225)
  # ER raw: conv (4+8)/32 = 0.375, fc 0.225.
  eps_er = 0.2 * 368 / (0.375 * 288 + 0.225 * 80)
  d_er = budgets.ER().densities(shapes, 0.2)
  assert d_er["conv"] == pytest.approx(eps_er * 0.375)
  # Total budget preserved in both; power 0 is uniform.
  for dens in (d, d_er):
    assert sum(dens[k] * n[k] for k in n) == pytest.approx(0.2 * 368)
  d0 = budgets.ERK(power=0.0).densities(shapes, 0.2)
  assert d0["conv"] == pytest.approx(0.2) and d0["fc"] == pytest.approx(0.2)


def test_overrides_and_layer_sparsities():
  params = _params()
  sp = masks.layer_sparsities(params, 0.9, budgets.Uniform().with_overrides({"a_head": 0.0}))
  assert sp == {"a_head/kernel": 0.0, "block/kernel": 0.9, "stem/kernel": 0.9}
  scores = jax.tree.map(jnp.ones_like, params)
  mask = masks.topk_mask(scores, 0.9, budget=budgets.Global().with_overrides({"a_head": 0.0}))
  kept = _kept(mask)
  assert kept["a_head/kernel"] == 80
  assert kept["block/kernel"] + kept["stem/kernel"] == round(0.1 * (216 + 576))
  with pytest.raises(ValueError, match="'classifier' matches no prunable path"):
    masks.topk_mask(scores, 0.9, budget=budgets.Global().with_overrides({"classifier": 0.0}))


def test_prunable_presets_follow_the_given_order():
  params = _params()  # keys sort as a_head, block, stem; forward is stem, block, a_head
  order = (
    "stem/kernel",
    "stem/bias",
    "block/kernel",
    "block/scale",
    "a_head/kernel",
    "a_head/bias",
  )
  ordered = lambda preset: dataclasses.replace(preset, order=order)
  default = masks.prunable_tree(params)
  assert default["stem"]["kernel"] and default["a_head"]["kernel"]
  assert not default["stem"]["bias"] and not default["block"]["scale"]
  first = masks.prunable_tree(params, ordered(masks.KEEP_FIRST_DENSE))
  assert not first["stem"]["kernel"] and first["a_head"]["kernel"]
  last = masks.prunable_tree(params, ordered(masks.KEEP_CLASSIFIER_DENSE))
  assert last["stem"]["kernel"] and not last["a_head"]["kernel"]
  both = ordered(masks.KEEP_FIRST_AND_CLASSIFIER_DENSE)
  assert [p for p, f in masks.named_leaves(masks.prunable_tree(params, both)) if f] == [
    "block/kernel"
  ]
  # A mask built with the preset keeps the excluded layers dense.
  mask = masks.topk_mask(jax.tree.map(jnp.ones_like, params), 0.9, prunable=both)
  assert _kept(mask)["stem/kernel"] == 216 and _kept(mask)["block/kernel"] == 58
  with pytest.raises(ValueError, match="exclude pattern 'nope'"):
    masks.Prunable(exclude=("nope",))(params)


@pytest.mark.parametrize(
  "preset",
  [masks.KEEP_FIRST_DENSE, masks.KEEP_CLASSIFIER_DENSE, masks.KEEP_FIRST_AND_CLASSIFIER_DENSE],
)
def test_first_and_last_presets_refuse_to_guess_the_order(preset):
  # Without an order the key order would decide: 'a_head' sorts first.
  params = _params()
  with pytest.raises(ValueError, match=r"need order=.*models\.layer_order\(model, x\)"):
    masks.prunable_tree(params, preset)
  with pytest.raises(ValueError, match="need order="):
    masks.topk_mask(jax.tree.map(jnp.ones_like, params), 0.5, prunable=preset)
  # The presets that do not name a layer need no order.
  assert sum(jax.tree.leaves(masks.prunable_tree(params, masks.KERNELS))) == 3


def test_apply_summary_and_collapse():
  params = {
    "a": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3)},
    "b": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  }
  mask = {
    "a": {"kernel": jnp.array([[True, False, True], [False, False, True]])},
    "b": {"kernel": jnp.zeros((3, 2), bool), "bias": jnp.ones(2, bool)},
  }
  out = masks.apply(params, mask)
  np.testing.assert_array_equal(out["a"]["kernel"], [[1, 0, 3], [0, 0, 6]])
  np.testing.assert_array_equal(out["b"]["bias"], [1, 1])
  s = masks.summary(mask)
  assert (s.kept, s.total) == (3, 12)
  assert s.sparsity == pytest.approx(0.75)
  assert s.collapsed == ("b/kernel",)
  assert "COLLAPSED" in str(s) and s.as_dict()["layers"]["a/kernel"]["kept"] == 3
  np.testing.assert_array_equal(masks.from_params(out)["a"]["kernel"], mask["a"]["kernel"])


def test_works_on_nnx_state():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 5, rngs=rngs)
      self.fc2 = nnx.Linear(5, 3, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  scores = jax.tree.map(jnp.abs, state)
  mask = masks.topk_mask(scores, 0.5, budget=budgets.Uniform())
  assert type(mask) is type(state)
  assert _kept(mask) == {
    "fc1/bias": 5,
    "fc1/kernel": 15,
    "fc2/bias": 3,
    "fc2/kernel": round(0.5 * 15),
  }
  masks.check_mask(mask, state)
  zeroed = masks.apply(state, mask)
  assert int(jnp.sum(zeroed["fc1"]["kernel"][...] != 0)) == 15


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_sparsity_out_of_range_errors(bad):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    masks.topk_mask({"w": jnp.ones((4, 4))}, bad)
  with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
    masks.layer_sparsities({"w": jnp.ones((4, 4))}, bad, budgets.ERK())


def test_mask_mismatch_errors_name_the_path():
  params = _params()
  mask = masks.ones_like(params)
  masks.check_mask(mask, params)
  missing = {k: v for k, v in mask.items() if k != "block"}
  with pytest.raises(ValueError, match=r"paths only in params: \['block/kernel'"):
    masks.check_mask(missing, params)
  wrong_shape = dict(mask, stem={"kernel": jnp.ones((3, 3, 3, 4), bool), "bias": jnp.ones(8, bool)})
  with pytest.raises(ValueError, match=r"'stem/kernel' has shape \(3, 3, 3, 4\)"):
    masks.check_mask(wrong_shape, params)
  wrong_dtype = jax.tree.map(lambda m: m.astype(jnp.float32), mask)
  with pytest.raises(ValueError, match="'a_head/bias' has dtype float32"):
    masks.check_mask(wrong_dtype, params)
  with pytest.raises(ValueError, match="mask does not match"):
    masks.topk_mask(jax.tree.map(jnp.ones_like, params), 0.5, within=missing)


def test_nan_scores_error_names_the_path():
  scores = {"ok": jnp.ones((3, 3)), "bad": jnp.ones((3, 3)).at[1, 1].set(jnp.nan)}
  with pytest.raises(ValueError, match="scores for 'bad' contain 1 NaN"):
    masks.topk_mask(scores, 0.5)
  # NaN in a non-prunable leaf is ignored.
  masks.topk_mask({"w": jnp.ones((3, 3)), "b": jnp.full(3, jnp.nan)}, 0.5)


def test_unknown_budget_and_traced_erk_errors():
  with pytest.raises(ValueError, match="budget must be one of"):
    masks.topk_mask({"w": jnp.ones((4, 4))}, 0.5, budget="layerwise")
  with pytest.raises(ValueError, match="budget must be one of"):
    budgets.parse("layerwise")
  with pytest.raises(ValueError, match="budget must be a sparsejax.budgets.Budget"):
    masks.topk_mask({"w": jnp.ones((4, 4))}, 0.5, budget=0.5)
  with pytest.raises(ValueError, match="needs a Python float sparsity"):
    jax.jit(lambda s: masks.topk_mask({"w": jnp.ones((4, 4))}, s, budget=budgets.ERK()))(0.5)


def test_prunable_order_survives_sorted_params():
  from sparsejax import models

  model = models.get("resnet20", 10)
  x = jnp.ones((1, 32, 32, 3))
  # A jitted init sorts the dict keys: 'BasicBlock_0' comes before the stem.
  params = jax.jit(lambda k: model.init(k, x))(jax.random.key(0))["params"]
  order = models.layer_order(model, x)
  flags = masks.prunable_tree(
    params, masks.Prunable(keep_first_dense=True, keep_last_dense=True, order=order)
  )
  off = [p for p, f in masks.named_leaves(flags) if not f and p.endswith("kernel")]
  assert sorted(off) == ["Conv_0/kernel", "Dense_0/kernel"]
  with pytest.raises(ValueError, match="order names paths that are not in"):
    masks.prunable_tree(params, masks.Prunable(order=("nope/kernel",)))


def test_radix_select_matches_stable_argsort_on_tie_heavy_scores():
  rng = np.random.default_rng(0)
  for trial in range(60):
    n = int(rng.integers(1, 400))
    x = rng.integers(-3, 4, n).astype(np.float32) * rng.choice([1.0, 1e-30, 1e30])
    x[rng.integers(0, n)] = [-0.0, -np.inf, np.inf][trial % 3]
    k = int(rng.integers(0, n + 1))
    got = np.asarray(masks.keep_top(jnp.asarray(x), k))
    expect = np.zeros(n, bool)
    expect[np.argsort(-(x + 0.0), kind="stable")[:k]] = True  # -0.0 == 0.0
    np.testing.assert_array_equal(got, expect)


# Issue #23: one rounding rule, jit with constant scores, apply's structure check.


def test_a_python_and_a_traced_sparsity_keep_the_same_count():
  # (1 - 0.73125) * 240 is exactly 64.5; float64 arithmetic says 64.50000000000001.
  assert masks.kept_count(240, 0.73125) == 64
  assert int(jax.jit(lambda s: masks.kept_count(240, s))(0.73125)) == 64
  scores = {"w": jnp.arange(240.0).reshape(12, 20)}
  eager = masks.topk_mask(scores, 0.73125)
  traced = jax.jit(lambda s: masks.topk_mask(scores, s))(0.73125)
  assert int(eager["w"].sum()) == int(traced["w"].sum()) == 64
  rng = np.random.default_rng(0)
  traced_count = jax.jit(jax.vmap(masks.kept_count, (None, 0)), static_argnums=0)
  sparsities = rng.uniform(0, 0.999, 200).astype(np.float32)
  for n in (7, 240, 1001):
    assert [masks.kept_count(n, float(s)) for s in sparsities] == (
      traced_count(n, sparsities).tolist()
    )


def test_topk_mask_under_jit_with_constant_scores_and_a_traced_sparsity():
  scores = {"a": jnp.array([[3.0, 1.0], [4.0, 2.0]])}
  mask = jax.jit(lambda s: masks.topk_mask(scores, s))(0.5)
  np.testing.assert_array_equal(mask["a"], [[True, False], [True, False]])


def test_apply_with_a_mask_of_another_structure_is_one_clear_error():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  with pytest.raises(
    ValueError,
    match=r"mask does not match the structure of "
    r"params; paths only in params: \['dense/bias'\]",
  ):
    masks.apply(params, {"dense": {"kernel": jnp.ones((3, 2), bool)}})
  with pytest.raises(ValueError, match=r"mask leaf 'dense/kernel' has shape \(2, 3\)"):
    masks.apply(params, {"dense": {"kernel": jnp.ones((2, 3), bool), "bias": jnp.ones(2, bool)}})


# Issue #24: the radix select is a loop, exact in every float dtype.


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_keep_top_is_exact_in_every_float_dtype(dtype):
  rng = np.random.default_rng(1)
  with jax.enable_x64(dtype == "float64"):
    for trial in range(12):
      n = int(rng.integers(1, 300))
      x = rng.integers(-3, 4, n).astype(np.float64) * rng.choice([1.0, 0.5, 1e-3])
      x[rng.integers(0, n)] = [-0.0, np.nan, -np.inf, np.inf][trial % 4]
      x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
      k = int(rng.integers(0, n + 1))
      got = np.asarray(masks.keep_top(jnp.asarray(x, dtype), k))
      ranked = np.where(np.isnan(x), -np.inf, x) + 0.0  # NaN lowest, -0.0 == 0.0
      expect = np.zeros(n, bool)
      expect[np.argsort(-ranked, kind="stable")[:k]] = True
      np.testing.assert_array_equal(got, expect)
      assert got.sum() == k


def test_keep_top_lowers_to_one_radix_pass_whatever_the_bit_width():
  # 32 or 64 unrolled passes made a DST step (two selections per layer)
  # compile several times slower than the static step; the loop holds one.
  def size(dtype):
    with jax.enable_x64(True):
      lowered = jax.jit(masks.keep_top).lower(jnp.zeros(1000, dtype), 10)
    return len(lowered.as_text().splitlines())

  assert size(jnp.float64) <= size(jnp.float32) + 5
  assert size(jnp.float32) < 200


def test_keep_top_in_segments_is_keep_top_on_each_segment():
  rng = np.random.default_rng(3)
  sizes = (7, 1, 30, 12, 30)
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    # Few distinct values: many ties, which must go to the lower index.
    scores = jnp.asarray(rng.integers(0, 4, sum(sizes)), dtype)
    scores = scores.at[5].set(jnp.nan).at[40].set(-0.0)
    k = np.array([rng.integers(0, n + 1) for n in sizes], np.int32)
    got = jax.jit(masks.keep_top_in_segments, static_argnums=2)(scores, k, sizes)
    start = 0
    for n, kj in zip(sizes, k):
      np.testing.assert_array_equal(
        got[start : start + n], masks.keep_top(scores[start : start + n], kj)
      )
      assert int(got[start : start + n].sum()) == kj
      start += n
