"""Tests of the extension points of sparsejax.train.fit: the injected optimiser,
per-step scalars, the injected loss, hooks with their own (checkpointed) state,
steps.jsonl, and the truncation of the logs on resume. On digits (MLP, 44
steps of 32 per epoch), in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common
from experiments.configs import digits as digits_config
from sparsejax import checkpoints, data, hooks, losses, masks, models, optim, schedules, tost, train
from sparsejax import mesh as mesh_lib
from sparsejax.models import activations

SPE = 44  # steps per epoch: 1437 digits // 32
TIMING_KEYS = ("epoch_seconds", "steps_per_second")


def config(**overrides):
  cfg = dict(seed=0, num_epochs=3, batch_size=32, learning_rate=0.05,
             lr_schedule="cosine", momentum=0.9, weight_decay=5e-4,
             progress_bar=False, tensorboard=False, max_to_keep=5,
             log_every_steps=10)
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def ds():
  return data.load("digits")


def blend_mlp():
  """The MLP with ToST's ReLU/Swish blend: its output depends on act_coef."""
  return models.get("mlp", 10, act=activations.blend())


def magnitude_mask(params):
  return masks.topk_mask(jax.tree.map(jnp.abs, params), 0.9)


def without_timing(history):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def read_jsonl(path):
  return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def assert_trees_equal(a, b):
  assert checkpoints.tree_signature(a) == checkpoints.tree_signature(b)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class GradNormEvery(hooks.Hook):
  """Measures the global gradient norm every ``every`` steps (lax.cond)."""

  name = "grad_norm"

  def __init__(self, every: int):
    self.every = self.log_every_steps = every

  def init(self, state):
    del state
    return {"count": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.float32)}

  def after_step(self, hook_state, state, info):
    def measure(hs):
      norm = optax.tree.norm(info.grads)
      return {"count": hs["count"] + 1, "total": hs["total"] + norm}, norm

    hook_state, norm = jax.lax.cond(
        (info.step + 1) % self.every == 0, measure,
        lambda hs: (hs, jnp.zeros((), jnp.float32)), hook_state)
    return hook_state, state, {"grad_norm": norm,
                               "measurements": hook_state["count"]}

  def epoch_end(self, hook_state, state, epoch, ctx):
    assert ctx.steps_per_epoch == SPE and epoch * SPE == int(state.step)
    return hook_state, state, {"grad_norm_measurements": hook_state["count"]}


class PruneLayerAt(hooks.Hook):
  """At global step ``at`` prunes every weight of ``layer`` (inside the step)."""

  name = "prune_layer"

  def __init__(self, at: int, layer: str = "Dense_2/kernel"):
    self.at, self.layer = at, layer

  def after_step(self, hook_state, state, info):
    def prune(s):
      mask = masks.map_with_path(
          lambda p, m: jnp.zeros_like(m) if p == self.layer else m, s.mask)
      return s.replace(opt_state=optim.set_mask(s.opt_state, mask))

    state = jax.lax.cond(info.step == self.at, prune, lambda s: s, state)
    return hook_state, state, {}


# ----------------------------------------------------------------------------
# The optimiser
# ----------------------------------------------------------------------------


def test_create_train_state_wraps_the_mask_or_uses_a_masked_tx_as_is():
  model = models.get("mlp", 10, hidden=(16,))
  x = jnp.zeros((1, 8, 8, 1))
  tx = optax.sgd(0.1)
  dense = train.create_train_state(model, tx, x, jax.random.key(0))
  assert dense.tx is tx and dense.mask is None
  mask = magnitude_mask(dense.params)
  sparse = train.create_train_state(model, tx, x, jax.random.key(0), mask=mask)
  assert isinstance(sparse.opt_state, optim.MaskedState)
  assert sparse.tx is not tx  # optim.masked(tx, mask), built explicitly
  # A transformation that holds its own mask (e.g. a DST optimiser) is used
  # as is; its mask masks the fresh params.
  own = optim.masked(tx, mask)
  held = train.create_train_state(model, own, x, jax.random.key(0))
  assert held.tx is own
  assert_trees_equal(held.mask, mask)
  assert_trees_equal(held.params, sparse.params)
  assert_trees_equal(held.opt_state, sparse.opt_state)
  with pytest.raises(ValueError, match="already holds a mask"):
    train.create_train_state(model, own, x, jax.random.key(0), mask=mask)


def test_injected_tx_is_what_trains(ds, tmp_path):
  # Zero learning rate: nothing moves, bitwise; no "lr" field (fit did not
  # build the optimiser, so it does not know its schedule).
  model = models.get("mlp", 10)
  still = train.fit(config(num_epochs=1), tmp_path / "zero", model=model,
                    dataset=ds, tx=optax.sgd(0.0), mask=magnitude_mask)
  init = train.create_train_state(model, optax.sgd(0.0), jnp.zeros((1, 8, 8, 1)),
                                  jax.random.key(0), mask=magnitude_mask)
  assert_trees_equal(still.state.params, init.params)
  assert "lr" not in still.history[0] and int(still.state.step) == SPE
  # The optimiser of the config, passed explicitly: the same run bitwise.
  cfg = config(num_epochs=1)
  default = train.fit(cfg, tmp_path / "default", model=model, dataset=ds)
  given = train.fit(cfg, tmp_path / "given", model=model, dataset=ds,
                    tx=schedules.make_optimizer(cfg, SPE))
  assert_trees_equal(given.state.params, default.state.params)
  # Cosine over 44 steps, logged at the epoch's last step (t = 43).
  assert default.history[0]["lr"] == pytest.approx(
      0.05 * 0.5 * (1 + np.cos(np.pi * 43 / 44)), rel=1e-5)


# ----------------------------------------------------------------------------
# Per-step scalars and the loss
# ----------------------------------------------------------------------------


def test_scalars_reach_model_and_loss_are_logged_and_never_recompile(ds, tmp_path):
  traced = {"act_coef": 0, "loss": 0}
  ramp = schedules.hold_then_ramp(1.0, 0.0, SPE, 2 * SPE)

  def act_coef(t):
    if isinstance(t, jax.core.Tracer):
      traced["act_coef"] += 1
    return ramp(t)

  def loss_fn(logits, labels, scalars):
    traced["loss"] += 1
    assert set(scalars) == {"act_coef", "label_smoothing"}
    return losses.cross_entropy(logits, labels, scalars["label_smoothing"])

  model = blend_mlp()
  result = train.fit(
      config(), tmp_path, model=model, dataset=ds, loss_fn=loss_fn,
      scalars={"act_coef": act_coef,
               "label_smoothing": optax.linear_schedule(0.0, 0.3, 3 * SPE)})
  # One trace of the train step (the loss) and one of the eval step, for
  # every value of the scalars.
  assert traced == {"act_coef": 2, "loss": 1}
  # Logged: the value at each epoch's last step t = 43, 87, 131.
  hist = result.history
  assert [r["act_coef"] for r in hist] == pytest.approx(
      [1.0, 1 - 43 / 88, 1 - 87 / 88])
  assert [r["label_smoothing"] for r in hist] == pytest.approx(
      [0.3 * t / 132 for t in (43, 87, 131)])
  # Evaluation passes the coefficient at state.step to the model: the metrics
  # of that blend, not of pure ReLU (act_coef=None).
  ev = train.evaluate(model, result.state, ds.test_images, ds.test_labels,
                      mean=ds.mean, std=ds.std,
                      scalars={"act_coef": optax.constant_schedule(ramp(132))})
  assert float(ramp(132)) == 0.0  # the end of the ramp: pure ReLU
  assert hist[-1]["test_loss"] == pytest.approx(ev["loss"], rel=1e-6)
  mid = train.fit(config(num_epochs=1), tmp_path / "mid", model=model,
                  dataset=ds, scalars={"act_coef": optax.constant_schedule(0.5)})
  half = train.evaluate(model, mid.state, ds.test_images, ds.test_labels,
                        mean=ds.mean, std=ds.std,
                        scalars={"act_coef": optax.constant_schedule(0.5)})
  relu = train.evaluate(model, mid.state, ds.test_images, ds.test_labels,
                        mean=ds.mean, std=ds.std)
  assert mid.history[0]["test_loss"] == pytest.approx(half["loss"], rel=1e-6)
  assert mid.history[0]["test_accuracy"] == half["accuracy"]
  assert abs(half["loss"] - relu["loss"]) > 1e-3


def test_default_loss_smoothing_from_scalar_or_config():
  logits = jnp.array([[0.0, np.log(3.0)]])  # softmax (0.25, 0.75)
  labels = jnp.array([1])
  # targets (α/2, 1 - α/2): α = 0.2 gives -(0.1 ln 0.25 + 0.9 ln 0.75).
  want = -(0.1 * np.log(0.25) + 0.9 * np.log(0.75))
  assert float(losses.smoothed_cross_entropy(0.2)(logits, labels, {})[0]) == \
      pytest.approx(want, rel=1e-6)
  from_scalar = losses.smoothed_cross_entropy(0.0)(
      logits, labels, {"label_smoothing": jnp.float32(0.2)})
  assert float(from_scalar[0]) == pytest.approx(want, rel=1e-6)
  assert float(losses.cross_entropy(logits, labels)[0]) == pytest.approx(
      -np.log(0.75), rel=1e-6)


def test_injected_loss_is_what_trains(ds, tmp_path):
  # A constant loss: train_loss exactly 3.0, zero gradients, so without
  # weight decay plain SGD leaves the params exactly as initialised.
  def constant(logits, labels, scalars):
    del labels, scalars
    return jnp.full(logits.shape[:1], 3.0) + 0.0 * logits.sum(-1)

  model = models.get("mlp", 10)
  result = train.fit(config(num_epochs=1, weight_decay=0.0), tmp_path,
                     model=model, dataset=ds, loss_fn=constant)
  assert result.history[0]["train_loss"] == 3.0
  init = train.create_train_state(model, optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)),
                                  jax.random.key(0))
  assert_trees_equal(result.state.params, init.params)


# ----------------------------------------------------------------------------
# Hooks, steps.jsonl and resume
# ----------------------------------------------------------------------------


def hooked_fit(ds, workdir, hooks=None, **kwargs):
  hooks = (GradNormEvery(10), PruneLayerAt(60)) if hooks is None else hooks
  return train.fit(config(), workdir, model=blend_mlp(), dataset=ds,
                   mask=magnitude_mask, hooks=hooks,
                   scalars={"act_coef": schedules.hold_then_ramp(1.0, 0.0, 30, 60)},
                   **kwargs)


@pytest.fixture(scope="module")
def reference(ds, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("hooked")
  return workdir, hooked_fit(ds, workdir)


def test_hook_state_logs_and_mask_changes(reference):
  workdir, result = reference
  # 132 steps, a measurement every 10: steps 10, 20, ..., 130.
  hs = result.hook_states["grad_norm"]
  assert int(hs["count"]) == 13
  assert [r["grad_norm_measurements"] for r in result.history] == [4, 8, 13]
  steps = read_jsonl(workdir / "steps.jsonl")
  assert [r["step"] for r in steps] == list(range(10, 131, 10))
  assert [r["measurements"] for r in steps] == list(range(1, 14))
  assert all(r["grad_norm"] > 0 for r in steps)
  assert sum(r["grad_norm"] for r in steps) == pytest.approx(float(hs["total"]),
                                                             rel=1e-5)
  assert "prune_layer" not in result.hook_states  # stateless
  # The mask changed inside the jitted step at step 60 (epoch 2); each
  # record's sparsity is that of the state at its epoch end.
  before = masks.summary(magnitude_mask(train.create_train_state(
      blend_mlp(), optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)),
      jax.random.key(0)).params))
  after = masks.summary(result.state.mask)
  dense_2 = {l.path: l for l in before.layers}["Dense_2/kernel"]
  assert after.kept == before.kept - dense_2.kept
  assert [r["sparsity"] for r in result.history] == [
      before.sparsity, after.sparsity, after.sparsity]
  assert np.all(np.asarray(result.state.params["Dense_2"]["kernel"]) == 0.0)


def test_stop_and_resume_with_stateful_hook_is_bitwise(ds, reference, tmp_path):
  ref_dir, ref = reference
  part = hooked_fit(ds, tmp_path, stop_at_step=50)  # mid epoch 2
  assert int(part.state.step) == 50 and len(part.history) == 1
  assert int(part.hook_states["grad_norm"]["count"]) == 5
  # Records written after the checkpoint (a crash before it committed) are
  # dropped on resume: each step and each epoch once.
  with open(tmp_path / "steps.jsonl", "a") as f:
    f.write(json.dumps({"step": 60, "grad_norm": -1.0, "measurements": 99}) + "\n")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write(json.dumps(dict(part.history[0], epoch=2, step=88)) + "\n")
  rest = hooked_fit(ds, tmp_path)
  assert rest.resumed_from == 50
  assert_trees_equal(rest.state, ref.state)
  assert_trees_equal(rest.hook_states, ref.hook_states)
  assert without_timing(rest.history) == without_timing(ref.history)
  assert without_timing(read_jsonl(tmp_path / "metrics.jsonl")) == \
      without_timing(read_jsonl(ref_dir / "metrics.jsonl"))
  assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  assert read_jsonl(tmp_path / "steps.jsonl") == read_jsonl(ref_dir / "steps.jsonl")


def test_hook_state_is_part_of_the_run_signature(ds, reference, tmp_path):
  ref_dir, _ = reference
  before = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
  with pytest.raises(checkpoints.CheckpointMismatchError, match="state_signature"):
    hooked_fit(ds, ref_dir, hooks=(PruneLayerAt(60),))  # no grad-norm state
  assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == before


def test_hooks_must_be_hooks_with_unique_names(ds, tmp_path):
  with pytest.raises(ValueError, match="unique"):
    hooked_fit(ds, tmp_path, hooks=(GradNormEvery(5), GradNormEvery(10)))
  with pytest.raises(TypeError, match="Hook"):
    hooked_fit(ds, tmp_path, hooks=(lambda s: s,))
  with pytest.raises(ValueError, match="taken by the epoch record"):
    train.fit(config(), tmp_path, model=blend_mlp(), dataset=ds,
              scalars={"lr": optax.constant_schedule(0.1)})


# ----------------------------------------------------------------------------
# A runner that uses the scalars: the activation blend of experiments.common
# ----------------------------------------------------------------------------


def test_runner_anneals_the_activation_blend(tmp_path):
  cfg = digits_config.get_config()
  cfg.update(dict(num_epochs=2, batch_size=32, progress_bar=False,
                  tensorboard=False, act_coef_schedule=(1.0, 0.0, 1, 1)))
  result = common.run(cfg, str(tmp_path))
  # Swish for epoch 1 (44 steps), then linear to ReLU over epoch 2.
  assert [r["act_coef"] for r in result.history] == pytest.approx(
      [1.0, 1 - 43 / 44])
  with pytest.raises(ValueError, match="act_coef_schedule"):
    common.resolve_config(dict_config(cfg, act_coef_schedule=(1.0, 0.0)))


def dict_config(cfg, **overrides):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(overrides)
  return cfg


def test_a_scalar_that_nothing_reads_is_an_error_naming_those_read(tmp_path):
  # A typo (act_coeff) would otherwise be dropped silently; so would ToST's
  # alpha without ToST's loss (the default loss reads "label_smoothing").
  model = models.get("mlp", 10, hidden=(8,))
  for scalars, unused in (({"act_coeff": optax.constant_schedule(0.5)}, "act_coeff"),
                          ({tost.LABEL_SMOOTHING: optax.constant_schedule(0.1)},
                           "tost_label_smoothing")):
    step = train.make_train_step(model, mesh=mesh_lib.make_mesh(1), batch_size=4,
                                 mean=(0.,), std=(1.,), augment=False,
                                 scalars=scalars)
    state = train.create_train_state(model, optax.sgd(0.1), jnp.zeros((1, 8, 8, 1)),
                                     jax.random.key(0))
    images = jnp.zeros((8, 8, 8, 1), jnp.uint8)
    labels = jnp.zeros(8, jnp.int32)
    with pytest.raises(ValueError, match=rf"scalars \['{unused}'\] are read by "
                       r"neither the model, the loss nor a hook.*loss \['label_smoothing'\]"):
      step(state, train.init_train_metrics(), images, labels, jnp.arange(8), 0)
  # Read by the loss: accepted.
  step = train.make_train_step(
      model, mesh=mesh_lib.make_mesh(1), batch_size=4, mean=(0.,), std=(1.,),
      augment=False, loss_fn=tost.label_smoothing_loss(),
      scalars={tost.LABEL_SMOOTHING: optax.constant_schedule(0.1)})
  step(state, train.init_train_metrics(), images, labels, jnp.arange(8), 0)
