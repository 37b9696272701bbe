"""Pruning-at-initialisation scores against hand-computed values (SPEC §2)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import _xla_cpu
from sparsejax import budgets
from sparsejax import diagnostics
from sparsejax import masks
from sparsejax import scores

# ----------------------------------------------------------------------------
# A two-layer linear model whose gradient and Hessian we write in numpy
# ----------------------------------------------------------------------------


def _linear_apply(p, x, train):
  del train
  return x @ p["w1"] @ p["w2"]


def _linear_problem(seed=0, batches=2, b=6):
  rng = np.random.default_rng(seed)
  params = {"w1": rng.normal(size=(3, 4)), "w2": rng.normal(size=(4, 3))}
  mask = {"w1": rng.random((3, 4)) > 0.3, "w2": rng.random((4, 3)) > 0.3}
  xs = rng.normal(size=(batches, b, 3))
  ys = rng.integers(0, 3, size=(batches, b))
  return params, mask, xs, ys


def _np_grad(w, x, y, temperature=1.0):
  """Analytic gradient of mean CE(x w1 w2 / T, y) w.r.t. (w1, w2)."""
  h = x @ w["w1"]
  z = h @ w["w2"] / temperature
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  dz = p / len(y) / temperature
  return {"w1": x.T @ (dz @ w["w2"].T), "w2": h.T @ dz}


def _np_sum_grad(w, xs, ys, temperature=1.0):
  gs = [_np_grad(w, x, y, temperature) for x, y in zip(xs, ys)]
  return {k: sum(g[k] for g in gs) for k in w}


def _to_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def test_snip_matches_analytic_gradient_times_weight():
  params, mask, xs, ys = _linear_problem()
  w = {k: params[k] * mask[k] for k in params}
  g = _np_sum_grad(w, xs, ys)
  expected = {k: np.abs(g[k] * w[k]) for k in w}
  got = scores.snip(
    _to_jax(params), _to_jax(mask), _linear_apply, (jnp.asarray(xs), jnp.asarray(ys))
  )
  for k in w:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(got["w1"])[~mask["w1"]] == 0)


def test_snip_sums_gradients_over_batches_before_multiplying():
  params, mask, xs, ys = _linear_problem(seed=1)
  # Batch 2: the same inputs with other labels, so the gradients partly cancel.
  xs[1] = xs[0]
  ys[1] = (ys[0] + 1) % 3
  p, m = _to_jax(params), _to_jax(mask)
  both = scores.snip(p, m, _linear_apply, [(xs[0], ys[0]), (xs[1], ys[1])])
  one = [scores.snip(p, m, _linear_apply, (xs[i], ys[i])) for i in range(2)]
  w = {k: params[k] * mask[k] for k in params}
  g = _np_sum_grad(w, xs, ys)
  for k in w:
    np.testing.assert_allclose(both[k], np.abs(g[k] * w[k]), rtol=1e-4, atol=1e-7)
    summed_abs = np.asarray(one[0][k] + one[1][k])
    assert np.all(np.asarray(both[k]) <= summed_abs + 1e-6)
    assert np.max(summed_abs - np.asarray(both[k])) > 1e-3  # cancellation seen


@pytest.mark.parametrize("nb", [1, 2])
def test_grasp_matches_finite_difference_hvp_of_analytic_gradient(nb):
  t = 200.0
  params, mask, xs, ys = _linear_problem(seed=2, batches=nb)
  w = {k: params[k] * mask[k] for k in params}
  g = _np_sum_grad(w, xs, ys, t)
  g = {k: g[k] * mask[k] for k in g}  # gradient of the sparse network
  eps = 1e-3
  plus = _np_sum_grad({k: w[k] + eps * g[k] for k in w}, xs, ys, t)
  minus = _np_sum_grad({k: w[k] - eps * g[k] for k in w}, xs, ys, t)
  hg = {k: (plus[k] - minus[k]) / (2 * eps) for k in w}
  paper_s = {k: -w[k] * hg[k] for k in w}  # S = -θ ⊙ Hg, remove the largest

  with jax.enable_x64(True):
    got = scores.grasp(
      _to_jax(params), _to_jax(mask), _linear_apply, (jnp.asarray(xs), jnp.asarray(ys))
    )
    for k in w:
      np.testing.assert_allclose(
        got[k], -paper_s[k], rtol=1e-6, atol=1e-9 * np.abs(paper_s[k]).max()
      )
    assert np.abs(paper_s["w1"]).max() > 0

    # From the dense mask, prune_at_init removes the largest S (keeps the
    # lowest 6 of the 24 weights).
    g = _np_sum_grad(params, xs, ys, t)
    plus = _np_sum_grad({k: params[k] + eps * g[k] for k in w}, xs, ys, t)
    minus = _np_sum_grad({k: params[k] - eps * g[k] for k in w}, xs, ys, t)
    s = np.concatenate(
      [np.ravel(-params[k] * (plus[k] - minus[k]) / (2 * eps)) for k in ("w1", "w2")]
    )
    keep_np = np.zeros(24, bool)
    keep_np[np.argsort(s)[:6]] = True
    mask_j = scores.prune_at_init(
      "grasp", _to_jax(params), sparsity=0.75, apply_fn=_linear_apply, batches=(xs, ys)
    )
    keep_j = np.concatenate([np.ravel(mask_j[k]) for k in ("w1", "w2")])
    np.testing.assert_array_equal(keep_j, keep_np)


@pytest.mark.skipif(
  _xla_cpu._disabled(os.environ), reason="the CPU rewrites are off in this process"
)
def test_grasp_traces_without_the_cpu_rewrites():
  # GraSP differentiates twice; sparsejax's CPU conv / batch-norm rewrites
  # (sparsejax._xla_cpu) would put their branches into the second-order trace.
  # One batch: over several, _conv_layout adds its own platform switch.
  from sparsejax import models  # pylint: disable=g-import-not-at-top

  model = models.get("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  y = jnp.arange(4) % 10
  variables = model.init(jax.random.key(0), x[:1])
  params, apply_fn = scores.linen_apply_fn(model, variables)
  mask = masks.ones_like(params)
  jaxpr = str(jax.make_jaxpr(lambda p: scores.grasp(p, mask, apply_fn, [(x, y)]))(params))
  assert "conv_general_dilated" in jaxpr
  assert jaxpr.count("platform_index") + jaxpr.count("cond[") == 0
  # The models' own gradient still carries them (the rewrites were not lost).
  loss = lambda p: jnp.sum(apply_fn(p, x, True))
  assert str(jax.make_jaxpr(jax.grad(loss))(params)).count("platform_index") > 0
  assert not _xla_cpu._plain()


# ----------------------------------------------------------------------------
# SynFlow
# ----------------------------------------------------------------------------


def _chain(widths, seed=0, low=0.5, high=1.5):
  rng = np.random.default_rng(seed)
  return {
    f"d{i}": jnp.asarray(rng.uniform(low, high, size=(a, b)), jnp.float32)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
  }


def _chain_apply(p, x, train):
  del train
  for i in range(len(p)):
    x = x @ p[f"d{i}"]
    if i < len(p) - 1:
      x = jax.nn.relu(x)
  return x


def test_synflow_conserves_flow_across_layers():
  params = _chain([5, 7, 3, 6, 4])
  s = scores.synflow_scores(params, masks.ones_like(params), _chain_apply, (5,))
  r = float(jnp.sum(_chain_apply(params, jnp.ones((1, 5)), False)))
  sums = [float(jnp.sum(s[f"d{i}"])) for i in range(4)]
  np.testing.assert_allclose(sums, [r] * 4, rtol=1e-5)


def test_synflow_100_rounds_trace_once_and_float64():
  params = _chain([6, 8, 8, 4])
  traces = []

  def apply(p, x, train):
    traces.append(1)
    return _chain_apply(p, x, train)

  mask = scores.synflow(params, masks.ones_like(params), apply, (6,), 0.9, 100)
  assert len(traces) == 1
  assert masks.summary(mask).kept == round(0.1 * (48 + 64 + 32))
  mask64 = scores.synflow(params, masks.ones_like(params), apply, (6,), 0.9, 100, dtype=jnp.float64)
  assert masks.summary(mask64).kept == masks.summary(mask).kept

  # A deep chain whose synaptic flow underflows float32 but not float64.
  deep = _chain([3] * 41, low=0.01, high=0.02)
  s32 = scores.synflow_scores(deep, masks.ones_like(deep), _chain_apply, (3,))
  s64 = scores.synflow_scores(deep, masks.ones_like(deep), _chain_apply, (3,), dtype=jnp.float64)
  assert s64["d0"].dtype == jnp.float64
  assert np.max(np.asarray(s32["d0"])) == 0.0
  assert np.min(np.asarray(s64["d0"])) > 0.0  # ~1e-54


def test_synflow_abs_the_batch_norm_statistics():
  class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(4, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(2, use_bias=False)(nn.relu(x))

  model = BNNet()
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables = {
    "params": variables["params"],
    "batch_stats": {"BatchNorm_0": {"mean": -3.0 * jnp.ones(4), "var": stats["var"]}},
  }
  params, apply_fn = scores.linen_apply_fn(model, variables)
  m = masks.ones_like(params)
  got = scores.synflow_scores(params, m, apply_fn, (3,))
  abs_state = jax.tree.map(jnp.abs, apply_fn.state)
  want = scores.synflow_scores(params, m, apply_fn.replace(state=abs_state), (3,))
  raw = scores.synflow_scores(
    params, m, lambda p, x, t: model.apply({"params": p, **apply_fn.state}, x), (3,)
  )
  for a, b, _c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(raw)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not np.allclose(got["Dense_0"]["kernel"], raw["Dense_0"]["kernel"])


class _SmallConv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    for c in (4, 8, 8):
      x = nn.relu(nn.Conv(c, (3, 3), use_bias=False)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_iterative_synflow_avoids_the_layer_collapse_of_magnitude():
  model = _SmallConv()
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  p = variables["params"]
  p = {**p, "Conv_1": {"kernel": p["Conv_1"]["kernel"] * 1e-3}}
  params, apply_fn = scores.linen_apply_fn(model, {"params": p})
  sparsity = 0.99  # keeps 11 of 1052 prunable weights
  with pytest.warns(RuntimeWarning, match="Conv_1/kernel"):
    mag = scores.prune_at_init("magnitude", params, sparsity=sparsity)
  syn = scores.prune_at_init(
    "synflow", params, sparsity=sparsity, apply_fn=apply_fn, input_shape=(8, 8, 3)
  )
  assert "Conv_1/kernel" in diagnostics.layer_collapse(mag)
  assert diagnostics.effective_sparsity(mag, apply_fn, (8, 8, 3)) == 1.0
  assert masks.summary(syn).kept == masks.summary(mag).kept == 11
  assert diagnostics.layer_collapse(syn) == []
  # Every weight SynFlow keeps lies on an input-to-output path.
  assert diagnostics.effective_sparsity(syn, apply_fn, (8, 8, 3)) == masks.summary(syn).sparsity


# ----------------------------------------------------------------------------
# Exact counts for every method and budget
# ----------------------------------------------------------------------------


def _mlp():
  ks = jax.random.split(jax.random.key(0), 3)
  return {
    "a": {"kernel": jax.random.normal(ks[0], (10, 13)), "bias": jnp.zeros(13)},
    "b": {"kernel": jax.random.normal(ks[1], (13, 7)), "bias": jnp.zeros(7)},
    "c": {"kernel": jax.random.normal(ks[2], (7, 3)), "bias": jnp.zeros(3)},
  }


def _mlp_apply(p, x, train):
  del train
  for k in ("a", "b"):
    x = jax.nn.relu(x @ p[k]["kernel"] + p[k]["bias"])
  return x @ p["c"]["kernel"] + p["c"]["bias"]


def _expected_kept(params, sparsity, budget):
  sizes = {p: int(np.prod(x.shape)) for p, x in masks.named_leaves(params) if x.ndim > 1}
  if budget == budgets.Global():
    return sum(sizes.values())
  layer_s = masks.layer_sparsities(params, sparsity, budget)
  return {p: masks.kept_count(n, layer_s[p]) for p, n in sizes.items()}


@pytest.mark.parametrize(
  "budget", [budgets.Global(), budgets.Uniform(), budgets.ERK()], ids=["global", "uniform", "erk"]
)
@pytest.mark.parametrize(
  "method", ["random", "magnitude", "snip", "grasp", "synflow", "iterative_snip"]
)
def test_exact_sparsity_for_every_method_and_budget(method, budget):
  params = _mlp()
  rng = np.random.default_rng(0)
  batch = (rng.normal(size=(12, 10)).astype(np.float32), np.arange(12) % 3)
  sparsity = 0.83
  mask = scores.prune_at_init(
    method,
    params,
    sparsity=sparsity,
    budget=budget,
    key=jax.random.key(1),
    apply_fn=_mlp_apply,
    batches=batch,
    input_shape=(10,),
    rounds=10 if method in ("synflow", "iterative_snip") else None,
  )
  masks.check_mask(mask, params)
  summary = masks.summary(mask)
  expected = _expected_kept(params, sparsity, budget)
  if budget == budgets.Global():
    assert summary.kept == round((1 - sparsity) * expected)
  else:
    assert {l.path: l.kept for l in summary.layers} == expected
  assert bool(jnp.all(mask["a"]["bias"]))


@pytest.mark.parametrize("method", ["iterative_snip", "iterative_grasp"])
def test_iterative_data_methods_compile_once_for_new_params(method):
  # The score function is a static argument of the compiled loop: a new one per
  # call (a fresh functools.partial) retraced and recompiled it for every call.
  events = []
  trace, compile_ = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
  )

  def listener(event, duration, **kwargs):
    del duration
    if event in (trace, compile_):
      events.append((event, kwargs.get("fun_name")))

  def apply(p, x, train):  # a new function: the first call cannot hit a cache
    return _mlp_apply(p, x, train)

  rng = np.random.default_rng(0)
  batch = (rng.normal(size=(12, 10)).astype(np.float32), np.arange(12) % 3)
  first = _mlp()
  second = jax.tree.map(lambda x: 2.0 * x + 1.0, first)  # new values, same shapes
  kept, loop_traces = [], []
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for params in (first, second):
      events.clear()
      mask = scores.prune_at_init(
        method, params, sparsity=0.8, apply_fn=apply, batches=batch, rounds=3
      )
      kept.append(masks.summary(mask).kept)
      loop_traces.append(events.count((trace, "_iterative")))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert loop_traces == [1, 0]
  assert events == []  # the second call traced and compiled nothing at all
  assert kept == [round(0.2 * (130 + 91 + 21))] * 2


def test_iterative_matches_one_shot_counts_with_overrides_and_rescoring():
  params = _mlp()
  budget = budgets.Global().with_overrides({"^c/": 0.0})
  mask = scores.iterative(scores.magnitude, params, masks.ones_like(params), 0.9, 7, budget=budget)
  one_shot = masks.topk_mask(scores.magnitude(params, masks.ones_like(params)), 0.9, budget=budget)
  assert masks.summary(mask).as_dict() == masks.summary(one_shot).as_dict()
  # Magnitude does not change with the mask, so iterating gives the same mask.
  for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(one_shot)):
    np.testing.assert_array_equal(a, b)
  assert bool(jnp.all(mask["c"]["kernel"]))


# ----------------------------------------------------------------------------
# The linen contract and errors
# ----------------------------------------------------------------------------


def test_linen_apply_fn_batch_norm_modes():
  class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(4)(x))
      return nn.Dense(2)(x)

  model = BNNet()
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  variables = {
    "params": variables["params"],
    "batch_stats": jax.tree.map(lambda s: s + 2.0, variables["batch_stats"]),
  }
  params, apply_fn = scores.linen_apply_fn(model, variables)
  x = jax.random.normal(jax.random.key(1), (5, 3))
  np.testing.assert_allclose(
    apply_fn(params, x, False), model.apply(variables, x, train=False), rtol=1e-6
  )
  np.testing.assert_allclose(
    apply_fn(params, x, True),
    model.apply(variables, x, train=True, mutable=["batch_stats"])[0],
    rtol=1e-6,
  )


def test_errors():
  params = _mlp()
  batch = (np.ones((3, 10), np.float32), np.arange(3))
  with pytest.raises(ValueError, match="batches"):
    scores.prune_at_init("snip", params, sparsity=0.9, apply_fn=_mlp_apply)
  with pytest.raises(ValueError, match="apply_fn"):
    scores.prune_at_init("grasp", params, sparsity=0.9, batches=batch)
  with pytest.raises(ValueError, match="key"):
    scores.prune_at_init("random", params, sparsity=0.9)
  with pytest.raises(ValueError, match="input_shape"):
    scores.prune_at_init("synflow", params, sparsity=0.9, apply_fn=_mlp_apply)
  with pytest.raises(ValueError, match="unknown method"):
    scores.prune_at_init("snap", params, sparsity=0.9)
  with pytest.raises(TypeError, match="temperature"):
    scores.prune_at_init(
      "snip", params, sparsity=0.9, apply_fn=_mlp_apply, batches=batch, temperature=2.0
    )
  with pytest.raises(ValueError, match="bn_mode"):
    scores.snip(params, masks.ones_like(params), _mlp_apply, batch, bn_mode="test")
  with pytest.raises(ValueError, match="sparsity"):
    scores.prune_at_init("magnitude", params, sparsity=1.0)
  with pytest.raises(ValueError, match="integer"):
    scores.snip(params, masks.ones_like(params), _mlp_apply, (batch[0], batch[0]))


def test_random_scores_are_the_random_method():
  params = _mlp()
  key = jax.random.key(4)
  s = scores.random_scores(key, params)
  assert jax.tree.structure(s) == jax.tree.structure(params)
  assert all(
    x.shape == p.shape and x.dtype == jnp.float32
    for x, p in zip(jax.tree.leaves(s), jax.tree.leaves(params))
  )
  mask = scores.prune_at_init("random", params, sparsity=0.7, key=key, budget=budgets.ERK())
  expected = masks.topk_mask(s, 0.7, budget=budgets.ERK())
  for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_iterative_erk_with_overrides_ends_at_the_one_shot_counts():
  params = _mlp()
  budget = budgets.ERK().with_overrides({"^a/": 0.5})
  mask = scores.iterative(scores.magnitude, params, masks.ones_like(params), 0.8, 4, budget=budget)
  one_shot = masks.topk_mask(scores.magnitude(params, masks.ones_like(params)), 0.8, budget=budget)
  for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(one_shot)):
    np.testing.assert_array_equal(a, b)
  assert int(mask["a"]["kernel"].sum()) == params["a"]["kernel"].size // 2
