"""ToST (sparsejax.tost, SPEC §7): schedules, ghost skips, label smoothing, LRsI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import data
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import modeling
from sparsejax import models
from sparsejax import schedules
from sparsejax import state as state_lib
from sparsejax import tost
from sparsejax import train
from sparsejax.models import activations

X16 = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def test_ghost_schedules_at_chosen_steps():
  # T = 1000 steps: hold to step 100, linear to 0 at step 500.
  scalars = tost.preset("ghost").scalars(1000)
  assert set(scalars) == {"act_coef", "ghost_coef", "tost_label_smoothing"}
  at = lambda name, t: float(scalars[name](t))
  for name in ("act_coef", "ghost_coef"):
    assert [at(name, t) for t in (0, 100, 300, 400, 500, 999)] == pytest.approx(
      [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]
    )
  assert [at("tost_label_smoothing", t) for t in (0, 100, 300, 500, 800)] == pytest.approx(
    [0.1, 0.1, 0.05, 0.0, 0.0]
  )
  # always_on: constant for the whole run
  on = tost.preset("always_on").scalars(1000)
  assert [float(on["act_coef"](t)) for t in (0, 500, 999)] == [1.0, 1.0, 1.0]
  assert float(on["tost_label_smoothing"](999)) == pytest.approx(0.1)
  # a schedule is a config value; a Ramp refuses hold > stop
  ramp = tost.Ramp(0.8, 0.2, hold=0.2, stop=0.6).schedule(100)
  assert [float(ramp(t)) for t in (20, 40, 60)] == pytest.approx([0.8, 0.5, 0.2])
  with pytest.raises(ValueError, match="at or after hold"):
    tost.Ramp(hold=0.6, stop=0.5)


def test_presets_and_single_techniques():
  assert tost.preset("none").techniques == ()
  assert tost.preset("ghost").techniques == (
    "soft_neurons",
    "ghost_skips",
    "label_smoothing",
    "lrsi",
  )
  for name in ("soft_neurons", "ghost_skips", "label_smoothing", "lrsi"):
    assert tost.preset(name).techniques == (name,)
  assert tost.preset("ghost").lrsi == tost.LRsI(steps=180, learning_rate=1e-2)
  assert tost.preset("ghost", ghost_skips=None).techniques == (
    "soft_neurons",
    "label_smoothing",
    "lrsi",
  )
  with pytest.raises(ValueError, match="unknown ToST preset"):
    tost.preset("bogus")


# ----------------------------------------------------------------------------
# Label smoothing
# ----------------------------------------------------------------------------


def test_label_smoothing_targets_by_hand_for_ten_classes():
  targets = np.asarray(tost.smoothed_targets(jnp.array([3, 0]), 10, 0.1))
  expected = np.full((2, 10), 0.1 / 9, np.float32)
  expected[0, 3] = expected[1, 0] = 0.9
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  # not optax's (1 - a) y + a / C, which puts 0.91 on the true class
  assert targets[0, 3] != pytest.approx(0.91)
  # the loss: -(0.9 log p_y + sum_other (0.1/9) log p_j), uniform logits: log 10
  logits = jnp.zeros((1, 10))
  loss = tost.off_target_smoothed_cross_entropy(logits, jnp.array([3]), 0.1)
  assert float(loss[0]) == pytest.approx(np.log(10.0), rel=1e-6)
  logits = jnp.arange(10.0)[None]
  logp = np.asarray(jax.nn.log_softmax(logits))[0]
  by_hand = -(0.9 * logp[3] + (0.1 / 9) * (logp.sum() - logp[3]))
  loss_fn = tost.label_smoothing_loss()
  got = loss_fn(logits, jnp.array([3]), {"tost_label_smoothing": jnp.float32(0.1)})
  assert float(got[0]) == pytest.approx(by_hand, rel=1e-6)


# ----------------------------------------------------------------------------
# Ghost skips
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "wrn22_2"])
def test_ghost_model_at_gamma_zero_equals_the_exported_plain_model(name):
  plain = models.get(name, 10)
  ghost = tost.ghost_model(name, 10)
  vg = ghost.init(jax.random.key(0), X16)
  exported = tost.export(vg)
  # the plain model's exact structure, and the same initial values
  vp = plain.init(jax.random.key(0), X16)
  assert jax.tree.structure(exported) == jax.tree.structure(vp)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(vp)):
    np.testing.assert_array_equal(a, b)
  # perturb the shared params so that the check is not about the init only
  exported = jax.tree.map(lambda p: p * 1.1 + 0.01, exported)
  vg = jax.tree.map(lambda p: p * 1.1 + 0.01, vg)
  for is_train in (False, True):
    lp, _ = modeling.apply_model(plain, exported, X16, train=is_train)
    lg, _ = modeling.apply_model(
      ghost, vg, X16, train=is_train, scalars={"ghost_coef": jnp.float32(0)}
    )
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(lg))
    l1, _ = modeling.apply_model(
      ghost, vg, X16, train=is_train, scalars={"ghost_coef": jnp.float32(1)}
    )
    assert float(jnp.abs(l1 - lp).max()) > 1e-3  # the paths do act when on
  # two ghost paths (1x1 conv + BN) per block, kernels the constant 1e-4
  ghost_paths = [p for p in masks.paths(vg["params"]) if masks.is_ghost(p)]
  blocks = {p.split("/")[0] for p in ghost_paths}
  assert len(ghost_paths) == len(blocks) * 2 * 3  # kernel, BN scale, BN bias
  kernel = vg["params"]["BasicBlock_3" if name == "resnet20" else "WideBasicBlock_3"][
    "ghost_in_conv"
  ]["kernel"]
  np.testing.assert_allclose(kernel, 1e-4 * 1.1 + 0.01)


def test_ghost_model_refuses_models_without_basic_blocks():
  with pytest.raises(ValueError, match="'vgg16' has none"):
    tost.ghost_model("vgg16", 10)
  with pytest.raises(ValueError, match="ghost_skips=None"):
    tost.preset("ghost").model("mobilenetv2", 10)
  assert tost.preset("ghost", ghost_skips=None).model("vgg11", 10).act is not (activations.relu)
  assert tost.supports_ghost_skips("resnet18")


def test_ghost_params_are_untouched_by_masks_and_budgets():
  ghost = tost.ghost_model("resnet20", 10)
  params = ghost.init(jax.random.key(0), X16)["params"]
  plain = tost.export(params)
  ghost_leaves = [p for p in masks.paths(params) if masks.is_ghost(p)]
  assert ghost_leaves
  # prunability: never, whatever the preset or predicate
  for prunable in (None, masks.Prunable(predicate=lambda p, x: True), lambda p, x: True):
    flags = dict(masks.named_leaves(masks.prunable_tree(params, prunable)))
    assert not any(flags[p] for p in ghost_leaves)
  # budgets: the same per-layer sparsities and counts as on the plain model
  for budget in (budgets.Global(), budgets.ERK(), budgets.Uniform()):
    scores_ = jax.tree.map(lambda p: jnp.abs(p), params)
    mask = masks.topk_mask(scores_, 0.9, budget=budget)
    for p in ghost_leaves:
      assert bool(dict(masks.named_leaves(mask))[p].all())
    summary = masks.summary(mask)
    plain_summary = masks.summary(masks.topk_mask(tost.export(scores_), 0.9, budget=budget))
    assert summary.as_dict() == plain_summary.as_dict()
    assert not any(masks.is_ghost(p) for p in summary.as_dict()["layers"])
  # random masks and the ghost model's pruning at initialisation
  mask = masks.random_mask(jax.random.key(2), params, 0.95, budget=budgets.ERK())
  assert all(bool(dict(masks.named_leaves(mask))[p].all()) for p in ghost_leaves)
  # a plain model's mask lifts to the ghost model: ghost leaves all True
  plain_mask = masks.random_mask(jax.random.key(2), plain, 0.95)
  lifted = tost.lift_mask(plain_mask, params)
  masks.check_mask(lifted, params)
  assert masks.summary(lifted).as_dict() == masks.summary(plain_mask).as_dict()
  for a, b in zip(jax.tree.leaves(tost.export(lifted)), jax.tree.leaves(plain_mask)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# No recompilation when beta, gamma, alpha change
# ----------------------------------------------------------------------------


def _tiny_dataset(n=16, shape=(8, 8, 3)):
  rng = np.random.default_rng(0)
  images = lambda k: rng.integers(0, 256, (k, *shape), dtype=np.uint8)
  labels = lambda k: (np.arange(k) % 10).astype(np.int32)
  return data.Dataset(
    "tiny",
    10,
    images(n),
    labels(n),
    images(8),
    labels(8),
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    augment=False,
  )


def test_changing_beta_gamma_alpha_never_recompiles():
  recipe = tost.preset("ghost", lrsi=None)
  model = recipe.model("resnet20", 10, num_filters=4, stage_sizes=(1, 1, 1))
  ds = _tiny_dataset()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  traces = {"model": 0, "loss": 0}
  base_loss = recipe.loss_fn()

  def loss_fn(logits, labels, scalars):
    traces["loss"] += 1
    return base_loss(logits, labels, scalars)

  class Counting(type(model)):
    def __call__(self, x, train=False):
      traces["model"] += 1
      return super().__call__(x, train)

  model = Counting(
    **{
      f: getattr(model, f)
      for f in ("num_classes", "stage_sizes", "num_filters", "act", "ghost_skips")
    }
  )
  scalars = recipe.scalars(10)  # beta, gamma, alpha all move over 10 steps
  tx = optax.sgd(0.01)
  state = state_lib.create_train_state(model, tx, jnp.zeros((1, 8, 8, 3)), jax.random.key(0))
  step = train.make_train_step(
    model, mesh=mesh, batch_size=4, mean=ds.mean, std=ds.std, loss_fn=loss_fn, scalars=scalars
  )
  carry, images, labels, perm = mesh_lib.put_replicated(
    (train.init_carry(state), ds.train_images, ds.train_labels, np.arange(16)), mesh
  )
  traces.update(model=0, loss=0)  # create_train_state traced the model once
  seen = []
  for k in range(8):
    seen.append([float(scalars[n](carry.state.step)) for n in sorted(scalars)])
    carry, _ = step(carry, images, labels, perm, k % 4)
  assert len({tuple(v) for v in seen}) == 5  # the values did change
  assert traces == {"model": 1, "loss": 1}  # traced once, never again


# ----------------------------------------------------------------------------
# LRsI
# ----------------------------------------------------------------------------


def _small_problem(sparsity=0.8):
  model = models.get("mlp", 10, hidden=(32,))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
  y = (np.arange(64) % 10).astype(np.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  mask = masks.random_mask(jax.random.key(1), params, sparsity, budget=budgets.Uniform())

  def loss(p, batch):
    xb, yb = batch
    return jnp.mean(tost.off_target_smoothed_cross_entropy(model.apply({"params": p}, xb), yb, 0.0))

  return loss, masks.apply(params, mask), mask, (x, y)


def test_lrsi_keeps_pruned_entries_zero_and_lowers_its_objective():
  loss, params, mask, data_ = _small_problem()
  settings = tost.LRsI(steps=60, batch_size=32)
  new, info = tost.lrsi(loss, params, mask, data_, jax.random.key(3), settings)
  for p, m in zip(jax.tree.leaves(new), jax.tree.leaves(mask)):
    assert (np.asarray(p)[~np.asarray(m)] == 0).all()
    assert np.count_nonzero(np.asarray(p)) == np.count_nonzero(np.asarray(m)) or (
      p.ndim == 1
    )  # biases start at 0
  assert info["objective"].shape == (60,)
  assert info["objective_after"] < info["objective_before"]
  # one scale per tensor, folded in: new = scale * old; floors respected
  for path, old in masks.named_leaves(params):
    s = info["scales"][path]
    assert s >= (0.0 if path.endswith("bias") else 0.01)
    np.testing.assert_allclose(dict(masks.named_leaves(new))[path], s * old, rtol=1e-6)
  assert any(abs(s - 1) > 1e-3 for s in info["scales"].values())


def test_lrsi_objective_is_the_grad_norm_while_the_bound_is_violated():
  loss, params, mask, (x, y) = _small_problem()
  ones = jax.tree.map(lambda _: jnp.float32(1), params)
  batch = (x[:32], y[:32])
  grads = masks.apply(jax.grad(loss)(params, (x[:16], y[:16])), mask)
  norm = float(optax.tree.norm(grads))
  loose, aux = tost.lrsi_objective(loss, params, mask, ones, batch, tost.LRsI(grad_norm_bound=1e9))
  step = jax.tree.map(lambda g: 0.1 * g / norm, grads)
  after = loss(jax.tree.map(jnp.subtract, params, step), (x[16:32], y[16:32]))
  assert float(loose) == pytest.approx(float(after), rel=1e-5)
  assert float(aux["grad_norm"]) == pytest.approx(norm, rel=1e-5)
  tight, _ = tost.lrsi_objective(
    loss, params, mask, ones, batch, tost.LRsI(grad_norm_bound=norm / 2)
  )
  assert float(tight) == pytest.approx(norm, rel=1e-5)


def _fit(model, ds, workdir, *, num_epochs, learning_rate, mask=None, **kwargs):
  """fit with batch 8, SGD (momentum 0.9) at a constant ``learning_rate``."""
  tx = schedules.make_optimizer(learning_rate)
  init = lambda: state_lib.create_train_state(
    model, tx, jnp.zeros((1, 8, 8, 3)), jax.random.key(0), mask=mask
  )
  return train.fit(
    model,
    ds,
    workdir,
    init=init,
    num_epochs=num_epochs,
    batch_size=8,
    options=train.FitOptions(progress_bar=False, tensorboard=False, async_checkpointing=False),
    **kwargs,
  )


def test_lrsi_callback_rescales_the_initial_state_of_fit(tmp_path):
  ds = _tiny_dataset(n=32)
  model = models.get("mlp", 10, hidden=(16,))
  sample = jnp.zeros((1, 8, 8, 3))
  params = state_lib.init_variables(model, sample, jax.random.key(0))["params"]
  mask = masks.random_mask(jax.random.key(1), params, 0.9)
  hook = tost.LRsICallback(tost.LRsI(steps=5, batch_size=8))
  result = _fit(model, ds, tmp_path, num_epochs=1, learning_rate=0.0, mask=mask, callbacks=[hook])
  assert hook.info is not None and len(hook.info["scales"]) == 4
  # lr 0: the trained params are the rescaled initial ones, zeros kept
  start = state_lib.create_train_state(
    model, optax.sgd(0.0), sample, jax.random.key(0), mask=mask
  ).params
  for path, p in masks.named_leaves(result.state.params):
    np.testing.assert_allclose(
      p, hook.info["scales"][path] * np.asarray(dict(masks.named_leaves(start))[path]), rtol=1e-6
    )
  # a rerun resumes from the checkpoint: no second LRsI
  again = tost.LRsICallback(tost.LRsI(steps=5, batch_size=8))
  _fit(model, ds, tmp_path, num_epochs=1, learning_rate=0.0, mask=mask, callbacks=[again])
  assert again.info is None


def test_recipe_scalars_reach_model_and_loss_in_fit(tmp_path):
  ds = _tiny_dataset(n=32)
  recipe = tost.preset("ghost", lrsi=None)
  model = recipe.model("resnet20", 10, num_filters=4, stage_sizes=(1, 1, 1))
  result = _fit(
    model,
    ds,
    tmp_path,
    num_epochs=2,
    learning_rate=0.05,
    scalars=recipe.scalars(10),
    loss_fn=recipe.loss_fn(),
  )
  # the epoch records hold beta, gamma, alpha at each epoch's last step
  last = result.history[-1]
  assert last["act_coef"] == 0.0 and last["ghost_coef"] == 0.0
  assert last["tost_label_smoothing"] == 0.0
  first = result.history[0]
  assert first["act_coef"] == pytest.approx(0.5) and first["tost_label_smoothing"] == (
    pytest.approx(0.05)
  )
  # at gamma = 0 the exported plain model evaluates to the same accuracy
  plain = models.get("resnet20", 10, num_filters=4, stage_sizes=(1, 1, 1), act=activations.blend())
  state = result.state
  exported = state.replace(
    params=tost.export(state.params), batch_stats=tost.export(state.batch_stats)
  )
  kw = dict(mean=ds.mean, std=ds.std, batch_size=8)
  a = train.evaluate(plain, exported, ds.test_images, ds.test_labels, **kw)
  b = train.evaluate(model, state, ds.test_images, ds.test_labels, **kw, scalars=recipe.scalars(10))
  assert a["accuracy"] == b["accuracy"]
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: tost.Ramp(1.0, 0.0, 0.6, 0.5), r"Ramp.stop must be in \[0.6, 1\], got 0.5"),
    (lambda: tost.Ramp(1.0, 0.0, -0.1, 0.5), r"Ramp.hold must be in \[0, 1\], got -0.1"),
    (
      lambda: tost.ToST(soft_neurons=tost.Ramp(1.5, 0.0)),
      r"ToST.soft_neurons.start must be in \[0, 1\], got 1.5",
    ),
    (
      lambda: tost.ToST(label_smoothing=tost.Ramp(1.0, 0.0)),
      r"ToST.label_smoothing.start must be in \[0, 1\), got 1.0",
    ),
    (
      lambda: tost.ToST(ghost_skips=tost.Ramp(0.5, -0.2)),
      r"ToST.ghost_skips.end must be in \[0, 1\], got -0.2",
    ),
    (lambda: tost.LRsI(eta=0.0), r"LRsI.eta must be in \(0, inf\), got 0.0"),
    (lambda: tost.LRsI(weight_floor=-1.0), r"LRsI.weight_floor must be in \[0, inf\)"),
    (lambda: tost.LRsI(steps=0), r"LRsI.steps must be an integer >= 1, got 0"),
  ],
)
def test_tost_arguments_are_checked_where_given(build, match):
  with pytest.raises(ValueError, match=match):
    build()
