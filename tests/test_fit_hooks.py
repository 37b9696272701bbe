"""Tests of the extension points of sparsejax.train.fit: the initial state and
its optimiser, per-step scalars, the injected loss, step hooks with their own
(checkpointed) state (at the step level, a three-step loop over
make_train_step, and in fit), steps.jsonl, the truncation of the logs on
resume, and one fit-level test per callback. On digits (MLP, 44 steps of 32
per epoch), in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import checkpoints
from sparsejax import data
from sparsejax import hooks
from sparsejax import losses
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import models
from sparsejax import optim
from sparsejax import schedules
from sparsejax import state
from sparsejax import tost
from sparsejax import train
from sparsejax.models import activations

SPE = 44  # steps per epoch: 1437 digits // 32
TIMING_KEYS = ("epoch_seconds", "steps_per_second")
SAMPLE = jnp.zeros((1, 8, 8, 1))


def digits_tx(num_epochs=3, weight_decay=5e-4):
  """The digits preset's optimiser: lr 0.05 cosine, momentum 0.9."""
  return schedules.make_optimizer(
    schedules.lr_schedule(0.05, num_epochs=num_epochs, steps_per_epoch=SPE, kind="cosine"),
    momentum=0.9,
    weight_decay=weight_decay,
  )


def options(**overrides):
  return train.FitOptions(
    **dict(
      dict(progress_bar=False, tensorboard=False, max_to_keep=5, log_every_steps=10), **overrides
    )
  )


def run(ds, workdir, model, *, tx=None, mask=None, num_epochs=3, init=None, opts=None, **kwargs):
  """A digits fit of ``model`` (batch 32, seed 0) from ``create_train_state(
  model, tx, SAMPLE, key(0), mask)``."""
  tx = digits_tx(num_epochs) if tx is None else tx
  if init is None:
    init = lambda: state.create_train_state(model, tx, SAMPLE, jax.random.key(0), mask=mask)
  return train.fit(
    model,
    ds,
    workdir,
    init=init,
    num_epochs=num_epochs,
    batch_size=32,
    options=opts or options(),
    **kwargs,
  )


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


def grad_norm_every(every: int, name: str = "grad_norm") -> hooks.StepHook:
  """Measures the global gradient norm every ``every`` steps (lax.cond)."""

  def init(state):
    del state
    return {"count": jnp.zeros((), jnp.int32), "total": jnp.zeros((), jnp.float32)}

  def update(hook_state, state, info):
    def measure(hs):
      norm = optax.tree.norm(info.grads)
      return {"count": hs["count"] + 1, "total": hs["total"] + norm}, norm

    hook_state, norm = jax.lax.cond(
      (info.step + 1) % every == 0, measure, lambda hs: (hs, jnp.zeros((), jnp.float32)), hook_state
    )
    return hook_state, state, {"grad_norm": norm, "measurements": hook_state["count"]}

  return hooks.StepHook(init, update, name=name, logs_at=hooks.every(every))


def grad_norm_measurements(step, carry, ctx):
  """Epoch-end callback: the grad-norm hook's count joins the record."""
  assert ctx.steps_per_epoch == SPE and ctx.epoch * SPE == int(carry.state.step) == step
  ctx.record["grad_norm_measurements"] = carry.hook_states["grad_norm"]["count"]


def prune_layer_at(at: int, layer: str = "Dense_2/kernel") -> hooks.StepHook:
  """At global step ``at`` prunes every weight of ``layer`` (inside the step)."""

  def update(hook_state, state, info):
    def prune(s):
      mask = masks.map_with_path(lambda p, m: jnp.zeros_like(m) if p == layer else m, s.mask)
      return s.replace(opt_state=optim.set_mask(s.opt_state, mask))

    state = jax.lax.cond(info.step == at, prune, lambda s: s, state)
    return hook_state, state, {}

  return hooks.StepHook(update=update, name="prune_layer")


# ----------------------------------------------------------------------------
# The initial state and its optimiser
# ----------------------------------------------------------------------------


def test_create_train_state_wraps_the_mask_or_uses_a_masked_tx_as_is():
  model = models.get("mlp", 10, hidden=(16,))
  x = jnp.zeros((1, 8, 8, 1))
  tx = optax.sgd(0.1)
  dense = state.create_train_state(model, tx, x, jax.random.key(0))
  assert dense.tx is tx and dense.mask is None
  mask = magnitude_mask(dense.params)
  sparse = state.create_train_state(model, tx, x, jax.random.key(0), mask=mask)
  assert isinstance(sparse.opt_state, optim.MaskedState)
  assert sparse.tx is not tx  # optim.sparse(tx, mask), built explicitly
  # A transformation that holds its own mask (e.g. a DST optimiser) is used
  # as is; its mask masks the fresh params.
  own = optim.sparse(tx, mask)
  held = state.create_train_state(model, own, x, jax.random.key(0))
  assert held.tx is own
  assert_trees_equal(held.mask, mask)
  assert_trees_equal(held.params, sparse.params)
  assert_trees_equal(held.opt_state, sparse.opt_state)
  with pytest.raises(ValueError, match="already holds a mask"):
    state.create_train_state(model, own, x, jax.random.key(0), mask=mask)


def test_init_is_what_trains(ds, tmp_path):
  # Zero learning rate: nothing moves, bitwise; no "lr" field (plain sgd's
  # state carries no learning rate).
  model = models.get("mlp", 10)
  still = run(ds, tmp_path / "zero", model, tx=optax.sgd(0.0), mask=magnitude_mask, num_epochs=1)
  init = state.create_train_state(
    model, optax.sgd(0.0), SAMPLE, jax.random.key(0), mask=magnitude_mask
  )
  assert_trees_equal(still.state.params, init.params)
  assert "lr" not in still.history[0] and int(still.state.step) == SPE
  # A state or a function making it: the same run bitwise.
  tx = digits_tx(num_epochs=1)
  made = run(ds, tmp_path / "made", model, tx=tx, num_epochs=1)
  given = run(
    ds,
    tmp_path / "given",
    model,
    num_epochs=1,
    init=state.create_train_state(model, tx, SAMPLE, jax.random.key(0)),
  )
  assert_trees_equal(given.state.params, made.state.params)
  assert without_timing(given.history) == without_timing(made.history)
  # Cosine over 44 steps, logged from the optimiser state at the epoch's
  # last step (t = 43).
  assert made.history[0]["lr"] == pytest.approx(
    0.05 * 0.5 * (1 + np.cos(np.pi * 43 / 44)), rel=1e-5
  )


def test_init_function_is_called_only_on_a_fresh_start(ds, tmp_path):
  model = models.get("mlp", 10, hidden=(16,))
  tx = digits_tx(num_epochs=2)
  calls = []

  def init():
    made = state.create_train_state(model, tx, SAMPLE, jax.random.key(0), mask=magnitude_mask)
    calls.append("traced" if isinstance(made.step, jax.core.Tracer) else "run")
    return made

  run(ds, tmp_path, model, init=init, num_epochs=2, stop_at_step=50)
  assert calls == ["traced", "run"]  # jax.eval_shape for the layout, then once
  calls.clear()
  resumed = run(ds, tmp_path, model, init=init, num_epochs=2)
  assert resumed.resumed_from == 50 and "run" not in calls  # at most traced
  # An init of another model is refused before anything runs.
  other = models.get("mlp", 10, hidden=(8,))
  with pytest.raises(ValueError, match="params and batch statistics of this model"):
    run(ds, tmp_path / "other", other, init=init, num_epochs=2)


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
  result = run(
    ds,
    tmp_path,
    model,
    loss_fn=loss_fn,
    scalars={"act_coef": act_coef, "label_smoothing": optax.linear_schedule(0.0, 0.3, 3 * SPE)},
  )
  # One trace of the train step (the loss) and one of the eval step, for
  # every value of the scalars.
  assert traced == {"act_coef": 2, "loss": 1}
  # Logged: the value at each epoch's last step t = 43, 87, 131.
  hist = result.history
  assert [r["act_coef"] for r in hist] == pytest.approx([1.0, 1 - 43 / 88, 1 - 87 / 88])
  assert [r["label_smoothing"] for r in hist] == pytest.approx(
    [0.3 * t / 132 for t in (43, 87, 131)]
  )
  # Evaluation passes the coefficient at state.step to the model: the metrics
  # of that blend, not of pure ReLU (act_coef=None).
  ev = train.evaluate(
    model,
    result.state,
    ds.test_images,
    ds.test_labels,
    mean=ds.mean,
    std=ds.std,
    scalars={"act_coef": optax.constant_schedule(ramp(132))},
  )
  assert float(ramp(132)) == 0.0  # the end of the ramp: pure ReLU
  assert hist[-1]["test_loss"] == pytest.approx(ev["loss"], rel=1e-6)
  mid = run(
    ds, tmp_path / "mid", model, num_epochs=1, scalars={"act_coef": optax.constant_schedule(0.5)}
  )
  half = train.evaluate(
    model,
    mid.state,
    ds.test_images,
    ds.test_labels,
    mean=ds.mean,
    std=ds.std,
    scalars={"act_coef": optax.constant_schedule(0.5)},
  )
  relu = train.evaluate(model, mid.state, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std)
  assert mid.history[0]["test_loss"] == pytest.approx(half["loss"], rel=1e-6)
  assert mid.history[0]["test_accuracy"] == half["accuracy"]
  assert abs(half["loss"] - relu["loss"]) > 1e-3


def test_default_loss_smoothing_from_scalar_or_argument():
  logits = jnp.array([[0.0, np.log(3.0)]])  # softmax (0.25, 0.75)
  labels = jnp.array([1])
  # targets (α/2, 1 - α/2): α = 0.2 gives -(0.1 ln 0.25 + 0.9 ln 0.75).
  want = -(0.1 * np.log(0.25) + 0.9 * np.log(0.75))
  assert float(losses.smoothed_cross_entropy(0.2)(logits, labels, {})[0]) == pytest.approx(
    want, rel=1e-6
  )
  from_scalar = losses.smoothed_cross_entropy(0.0)(
    logits, labels, {"label_smoothing": jnp.float32(0.2)}
  )
  assert float(from_scalar[0]) == pytest.approx(want, rel=1e-6)
  assert float(losses.cross_entropy(logits, labels)[0]) == pytest.approx(-np.log(0.75), rel=1e-6)


def test_injected_loss_is_what_trains(ds, tmp_path):
  # A constant loss: train_loss exactly 3.0, zero gradients, so without
  # weight decay plain SGD leaves the params exactly as initialised.
  def constant(logits, labels, scalars):
    del labels, scalars
    return jnp.full(logits.shape[:1], 3.0) + 0.0 * logits.sum(-1)

  model = models.get("mlp", 10)
  result = run(
    ds, tmp_path, model, tx=digits_tx(1, weight_decay=0.0), num_epochs=1, loss_fn=constant
  )
  assert result.history[0]["train_loss"] == 3.0
  init = state.create_train_state(model, optax.sgd(0.1), SAMPLE, jax.random.key(0))
  assert_trees_equal(result.state.params, init.params)


# ----------------------------------------------------------------------------
# The extension points at the step level: a three-step loop over
# make_train_step
# ----------------------------------------------------------------------------


def three_steps(ds, model, *, hooks_=(), scalars=None, loss_fn=None, tx=None, mask=magnitude_mask):
  mesh = mesh_lib.make_mesh(1)
  step = train.make_train_step(
    model,
    mesh=mesh,
    batch_size=32,
    mean=ds.mean,
    std=ds.std,
    scalars=scalars,
    loss_fn=loss_fn,
    hooks=hooks_,
  )
  start = state.create_train_state(
    model, tx or optax.sgd(0.1), SAMPLE, jax.random.key(0), mask=mask
  )
  host = jax.device_get(start)
  # Replicated on the mesh, as the step returns it: one compilation.
  carry = mesh_lib.put_replicated(train.init_carry(start, hooks_), mesh)
  images = mesh_lib.put_replicated(ds.train_images, mesh)
  labels = mesh_lib.put_replicated(np.asarray(ds.train_labels, np.int32), mesh)
  perm = mesh_lib.put_replicated(np.asarray(data_perm(ds)), mesh)
  logs = []
  for k in range(3):
    carry, out = step(carry, images, labels, perm, k)
    logs.append(jax.device_get(out))
  return host, carry, logs


def data_perm(ds):
  return data.epoch_permutation(0, 0, ds.num_train)


def test_step_hooks_compose_in_order_carry_their_state_and_log(ds):
  seen = []

  def count_init(s):
    return {"steps": jnp.zeros((), jnp.int32), "mask_kept": jnp.zeros((), jnp.int32)}

  def count_update(hs, s, info):
    # After prune_layer_at(1): the second hook sees the first one's state.
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(s.mask))
    seen.append(info)
    return (
      {"steps": hs["steps"] + 1, "mask_kept": kept},
      s,
      {"step": info.step, "before": info.state_before.step, "loss": info.loss, "kept": kept},
    )

  counter = hooks.StepHook(count_init, count_update, name="counter")
  model = models.get("mlp", 10)
  start, carry, logs = three_steps(ds, model, hooks_=(prune_layer_at(1), counter))
  assert set(carry.hook_states) == {"counter"}  # the stateless hook has none
  assert int(carry.hook_states["counter"]["steps"]) == 3
  assert int(carry.state.step) == 3
  assert [int(l["counter"]["step"]) for l in logs] == [0, 1, 2]
  assert [int(l["counter"]["before"]) for l in logs] == [0, 1, 2]
  assert logs[0]["prune_layer"] == {}
  kept0 = sum(int(np.sum(m)) for m in jax.tree.leaves(start.mask))
  dense_2 = int(np.sum(np.asarray(start.mask["Dense_2"]["kernel"])))
  assert [int(l["counter"]["kept"]) for l in logs] == [kept0, kept0 - dense_2, kept0 - dense_2]
  assert int(carry.hook_states["counter"]["mask_kept"]) == kept0 - dense_2
  assert all(np.isfinite(l["counter"]["loss"]) for l in logs)
  assert len(seen) == 1  # traced once for three steps
  # The metrics of the carry: three steps of 32.
  assert int(carry.metrics["steps"]) == 3 and int(carry.metrics["count"]) == 96


def test_step_scalars_and_loss_at_the_state_step(ds):
  values = []

  def loss_fn(logits, labels, scalars):
    jax.debug.callback(lambda v: values.append(float(v)), scalars["ramp"])
    return losses.cross_entropy(logits, labels)

  _, carry, _ = three_steps(
    ds,
    models.get("mlp", 10),
    loss_fn=loss_fn,
    scalars={"ramp": optax.linear_schedule(0.0, 1.0, 10)},
  )
  jax.effects_barrier()
  assert values == pytest.approx([0.0, 0.1, 0.2])
  # The same three steps with the default loss: another (plain CE) run.
  _, plain, _ = three_steps(ds, models.get("mlp", 10))
  assert float(carry.metrics["loss_sum"]) == pytest.approx(
    float(plain.metrics["loss_sum"]), rel=1e-6
  )


def test_step_uses_the_state_optimiser_and_keeps_pruned_weights_zero(ds):
  start, carry, _ = three_steps(ds, models.get("mlp", 10), tx=schedules.make_optimizer(0.05))
  assert int(carry.state.step) == 3
  for p, m in zip(jax.tree.leaves(carry.state.params), jax.tree.leaves(start.mask)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
  assert float(carry.state.learning_rate) == pytest.approx(0.05)
  # Zero learning rate: nothing moves.
  still_start, still, _ = three_steps(ds, models.get("mlp", 10), tx=optax.sgd(0.0))
  assert_trees_equal(still.state.params, still_start.params)


# ----------------------------------------------------------------------------
# Hooks, steps.jsonl and resume
# ----------------------------------------------------------------------------


def hooked_fit(ds, workdir, hooks_=None, callbacks=None, **kwargs):
  hooks_ = (grad_norm_every(10), prune_layer_at(60)) if hooks_ is None else hooks_
  if callbacks is None:
    callbacks = [hooks.callback(grad_norm_measurements, at_epoch_end=True)]
  return run(
    ds,
    workdir,
    blend_mlp(),
    mask=magnitude_mask,
    hooks=hooks_,
    callbacks=callbacks,
    scalars={"act_coef": schedules.hold_then_ramp(1.0, 0.0, 30, 60)},
    **kwargs,
  )


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
  assert sum(r["grad_norm"] for r in steps) == pytest.approx(float(hs["total"]), rel=1e-5)
  assert "prune_layer" not in result.hook_states  # stateless
  # The mask changed inside the jitted step at step 60 (epoch 2); each
  # record's sparsity is that of the state at its epoch end.
  before = masks.summary(
    magnitude_mask(
      state.create_train_state(blend_mlp(), optax.sgd(0.1), SAMPLE, jax.random.key(0)).params
    )
  )
  after = masks.summary(result.state.mask)
  dense_2 = {l.path: l for l in before.layers}["Dense_2/kernel"]
  assert after.kept == before.kept - dense_2.kept
  assert [r["sparsity"] for r in result.history] == [
    before.sparsity,
    after.sparsity,
    after.sparsity,
  ]
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
  assert without_timing(read_jsonl(tmp_path / "metrics.jsonl")) == without_timing(
    read_jsonl(ref_dir / "metrics.jsonl")
  )
  assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
  assert read_jsonl(tmp_path / "steps.jsonl") == read_jsonl(ref_dir / "steps.jsonl")


def test_hook_state_is_part_of_the_run_signature(ds, reference, tmp_path):
  ref_dir, _ = reference
  before = sorted(p.name for p in (ref_dir / "checkpoints").iterdir())
  with pytest.raises(checkpoints.CheckpointMismatchError, match="state_signature"):
    hooked_fit(ds, ref_dir, hooks_=(prune_layer_at(60),), callbacks=())  # no grad-norm state
  assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == before


def test_hooks_must_be_hooks_with_unique_names(ds, tmp_path):
  with pytest.raises(ValueError, match="unique"):
    hooked_fit(ds, tmp_path, hooks_=(grad_norm_every(5), grad_norm_every(10)))
  with pytest.raises(TypeError, match="Hook"):
    hooked_fit(ds, tmp_path, hooks_=(lambda s: s,))
  with pytest.raises(TypeError, match="Callback"):
    hooked_fit(ds, tmp_path, callbacks=(lambda step, carry, ctx: None,))
  with pytest.raises(ValueError, match="never run"):
    hooks.callback(lambda step, carry, ctx: None)
  with pytest.raises(ValueError, match="taken by the epoch record"):
    run(ds, tmp_path, blend_mlp(), scalars={"lr": optax.constant_schedule(0.1)})
  with pytest.raises(ValueError, match="FitOptions.log_every_steps"):
    train.FitOptions(log_every_steps=0)


# ----------------------------------------------------------------------------
# One fit-level test per callback: the user's (every_steps, at_epoch_end,
# at_fresh_start, check) and fit's own (evaluation, epoch record, metrics log,
# checkpoint; preemption and the non-finite check: tests/test_train.py)
# ----------------------------------------------------------------------------


class Recorder(hooks.Callback):
  """Records when it runs; at the end of epoch 2 it doubles the params of
  the carry (a changed carry replaces fit's)."""

  every_steps = 20
  at_epoch_end = True
  at_fresh_start = True

  def __init__(self):
    self.calls, self.checked = [], 0

  def check(self, ctx):
    self.checked += 1
    assert ctx.num_epochs == 3 and ctx.batch_size == 32 and ctx.steps_per_epoch == SPE

  def __call__(self, step, carry, ctx):
    self.calls.append((step, ctx.epoch_end))
    if ctx.epoch_end:
      ctx.record["recorded_step"] = step
    if ctx.epoch_end and ctx.epoch == 2:
      return carry.replace(
        state=carry.state.replace(params=jax.tree.map(lambda p: 2 * p, carry.state.params))
      )
    return None


def test_user_callback_runs_when_due_and_may_change_the_carry(ds, tmp_path):
  model = models.get("mlp", 10)
  rec = Recorder()
  result = run(ds, tmp_path, model, mask=magnitude_mask, callbacks=[rec], stop_at_step=100)
  assert rec.checked == 1
  # Fresh start (step 0, before any step), every 20 steps, each epoch end.
  assert rec.calls == [
    (0, False),
    (20, False),
    (40, False),
    (44, True),
    (60, False),
    (80, False),
    (88, True),
    (100, False),
  ]
  assert [r["recorded_step"] for r in result.history] == [44, 88]
  # Resumed: no fresh-start call; check() again; the doubled params of
  # epoch 2 were checkpointed and trained on.
  rec2 = Recorder()
  rest = run(ds, tmp_path, model, mask=magnitude_mask, callbacks=[rec2])
  assert rest.resumed_from == 100 and rec2.checked == 1
  assert rec2.calls == [(120, False), (132, True)]
  plain = run(ds, tmp_path / "plain", model, mask=magnitude_mask)
  assert without_timing(plain.history)[:1] == [
    {k: v for k, v in r.items() if k != "recorded_step"} for r in without_timing(rest.history)[:1]
  ]
  assert plain.history[-1]["train_loss"] != rest.history[-1]["train_loss"]
  # A changed structure is refused.
  bad = hooks.callback(
    lambda step, carry, ctx: carry.replace(metrics={"loss_sum": carry.metrics["loss_sum"]}),
    at_epoch_end=True,
  )
  with pytest.raises(ValueError, match="changed the structure"):
    run(ds, tmp_path / "bad", model, callbacks=[bad], num_epochs=1)


def test_evaluation_callback_every_n_epochs_and_at_the_end(ds, tmp_path):
  result = run(ds, tmp_path, models.get("mlp", 10), num_epochs=3, opts=options(eval_every_epochs=2))
  assert ["test_accuracy" in r for r in result.history] == [False, True, True]
  final = train.evaluate(
    models.get("mlp", 10), result.state, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std
  )
  assert result.history[-1]["test_accuracy"] == pytest.approx(final["accuracy"])


def test_epoch_record_callback_fields_and_their_order(ds, tmp_path):
  def extra(step, carry, ctx):
    ctx.record["extra"] = jnp.float32(0.5)  # device scalars become JSON numbers

  result = run(
    ds,
    tmp_path,
    blend_mlp(),
    num_epochs=1,
    scalars={"act_coef": optax.constant_schedule(1.0)},
    callbacks=[hooks.callback(extra, at_epoch_end=True)],
  )
  (record,) = result.history
  assert list(record) == [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "sparsity",
    "epoch_seconds",
    "steps_per_second",
    "act_coef",
    "extra",
  ]
  assert record["extra"] == 0.5 and record["epoch"] == 1 and record["step"] == SPE
  assert record["sparsity"] == 0.0 and record["steps_per_second"] > 0


def test_metrics_log_callback_writes_jsonl_and_tensorboard(ds, tmp_path):
  result = run(
    ds, tmp_path / "tb", models.get("mlp", 10), num_epochs=1, opts=options(tensorboard=True)
  )
  assert without_timing(read_jsonl(tmp_path / "tb" / "metrics.jsonl")) == without_timing(
    result.history
  )
  assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
  run(ds, tmp_path / "no_tb", models.get("mlp", 10), num_epochs=1)
  assert not (tmp_path / "no_tb" / "tb").exists()


def test_checkpoint_callback_every_n_epochs_last_and_stop(ds, tmp_path):
  model = models.get("mlp", 10, hidden=(16,))
  run(ds, tmp_path, model, num_epochs=3, stop_at_step=100, opts=options(checkpoint_every_epochs=2))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [88, 100]  # epoch 2, and the stop
  run(ds, tmp_path, model, num_epochs=3, opts=options(checkpoint_every_epochs=2))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [88, 100, 132]  # and the last epoch


def test_progress_bar_callback_on_a_terminal(ds, tmp_path, monkeypatch, capsys):
  import sys  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
  run(
    ds, tmp_path, models.get("mlp", 10, hidden=(8,)), num_epochs=1, opts=options(progress_bar=True)
  )
  err = capsys.readouterr().err
  assert "/44" in err


def test_a_scalar_that_nothing_reads_is_an_error_naming_those_read(tmp_path):
  # A typo (act_coeff) would otherwise be dropped silently; so would ToST's
  # alpha without ToST's loss (the default loss reads "label_smoothing").
  model = models.get("mlp", 10, hidden=(8,))
  start = state.create_train_state(model, optax.sgd(0.1), SAMPLE, jax.random.key(0))
  images = jnp.zeros((8, 8, 8, 1), jnp.uint8)
  labels = jnp.zeros(8, jnp.int32)
  for scalars, unused in (
    ({"act_coeff": optax.constant_schedule(0.5)}, "act_coeff"),
    ({tost.LABEL_SMOOTHING: optax.constant_schedule(0.1)}, "tost_label_smoothing"),
  ):
    step = train.make_train_step(
      model,
      mesh=mesh_lib.make_mesh(1),
      batch_size=4,
      mean=(0.0,),
      std=(1.0,),
      augment=False,
      scalars=scalars,
    )
    with pytest.raises(
      ValueError,
      match=rf"scalars \['{unused}'\] are read by "
      r"neither the model, the loss nor a hook.*loss \['label_smoothing'\]",
    ):
      step(train.init_carry(start), images, labels, jnp.arange(8), 0)
  # Read by the loss: accepted.
  step = train.make_train_step(
    model,
    mesh=mesh_lib.make_mesh(1),
    batch_size=4,
    mean=(0.0,),
    std=(1.0,),
    augment=False,
    loss_fn=tost.label_smoothing_loss(),
    scalars={tost.LABEL_SMOOTHING: optax.constant_schedule(0.1)},
  )
  step(train.init_carry(start), images, labels, jnp.arange(8), 0)
