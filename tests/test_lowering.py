"""Every program of sparsejax lowers for GPU and TPU, without its CPU tricks.

Lowering needs no accelerator: ``jax.jit(f).trace(*args).lower(
lowering_platforms=(p,))`` builds the StableHLO a ``p`` backend would
compile, on this CPU machine. Each program of :data:`PROGRAMS` is traced once
and lowered for ``cpu``, ``cuda`` and ``tpu``; the test asserts that

* it lowers (a ``lax.platform_dependent`` whose branches return different
  types fails here, as the bfloat16 batch norm of issue #24 did);
* the GPU and TPU texts hold no CPU-only custom call (LAPACK, DUCC, a
  ``cpu`` target) and no host callback;
* the CPU rewrites of :mod:`sparsejax._xla_cpu` and
  :mod:`sparsejax._conv_layout` are absent there. Every such rewrite runs
  under a ``jax.named_scope`` whose name starts with
  ``sparsejax._xla_cpu.CPU_SCOPE``, which the lowered text keeps in its
  locations. On CPU the names found must be exactly those the program
  declares, so the check cannot pass by a marker that never shows.

A new program is one more entry of :data:`PROGRAMS`; a new CPU trick, one
more named scope under ``CPU_SCOPE`` (and in :data:`MARKERS`). The models are
tiny (a one-block ResNet of 4 filters on 8x8 images, batch 4); only the
bfloat16 regression uses ResNet-20 at batch 8, where the issue found the bug.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import _conv_layout
from sparsejax import _xla_cpu
from sparsejax import dst
from sparsejax import gradient_flow
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import modeling
from sparsejax import models
from sparsejax import scores
from sparsejax import sparse_inference
from sparsejax import state as state_lib
from sparsejax import suptickets
from sparsejax import tost
from sparsejax import train

PLATFORMS = ("cpu", "cuda", "tpu")

MATERIALIZE = _xla_cpu.MATERIALIZE_SCOPE
BN_GEMV = _xla_cpu.BN_GEMV_SCOPE
CANONICAL = _conv_layout.SCOPE
MARKERS = frozenset({MATERIALIZE, BN_GEMV, CANONICAL})
"""The named scopes of sparsejax's CPU rewrites."""

# A CPU-only custom-call target or a host callback.
_CPU_ONLY = re.compile(r"cpu|lapack|ducc|callback|host", re.IGNORECASE)
_TARGETS = re.compile(r'custom_call\s*@"?([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')
_SCOPES = re.compile(re.escape(_xla_cpu.CPU_SCOPE) + r"\w*")

SHAPE = (8, 8, 3)
BATCH = 4


def _small_model(**kwargs):
  """A conv / batch-norm / residual net: ResNet, one block of 4 filters."""
  return models.get("resnet20", 10, stage_sizes=(1,), num_filters=4, **kwargs)


def _data(n=2 * BATCH, shape=SHAPE):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = (np.arange(n) % 10).astype(np.int32)
  return images, labels


def _variables(model, shape=SHAPE):
  return state_lib.init_variables(model, jnp.zeros((1, *shape)), jax.random.key(0))


def _train_step(
  model, tx=None, *, mask=None, batch_size=BATCH, shape=SHAPE, hooks=(), **step_kwargs
):
  """``(traced train step, None)`` of ``model`` with ``tx`` (default SGD)."""
  tx = optax.sgd(0.1, 0.9) if tx is None else tx
  state = state_lib.create_train_state(
    model, tx, jnp.zeros((1, *shape)), jax.random.key(0), mask=mask
  )
  step = train.make_train_step(
    model,
    mesh=mesh_lib.make_mesh(1),
    batch_size=batch_size,
    mean=np.zeros(3),
    std=np.ones(3),
    hooks=hooks,
    **step_kwargs,
  )
  images, labels = _data(2 * batch_size, shape)
  return step.trace(
    train.init_carry(state, hooks), images, labels, np.arange(len(labels), dtype=np.int32), 0
  )


def _random_mask(model, sparsity=0.8):
  return masks.random_mask(jax.random.key(1), _variables(model)["params"], sparsity)


def dense_step():
  return _train_step(_small_model())


def masked_step():
  model = _small_model()
  return _train_step(model, mask=_random_mask(model))


def rigl_step():
  model = _small_model()
  return _train_step(model, dst.rigl_optimizer(optax.sgd(0.1), _random_mask(model), end_step=1000))


def mask_update_step():
  """SET with ΔT = 1 from step 0: step 0 updates the mask."""
  model = _small_model()
  return _train_step(
    model,
    dst.set_optimizer(
      optax.sgd(0.1), _random_mask(model), end_step=10, update_every=1, start_step=0
    ),
  )


def gmp_step():
  model = _small_model()
  ones = masks.ones_like(_variables(model)["params"])
  return _train_step(
    model,
    dst.gmp_optimizer(
      optax.sgd(0.1), ones, final_sparsity=0.8, start_step=0, end_step=4, update_every=1
    ),
  )


def granet_step():
  model = _small_model()
  ones = masks.ones_like(_variables(model)["params"])
  return _train_step(
    model,
    dst.granet_optimizer(
      optax.sgd(0.1),
      ones,
      final_sparsity=0.8,
      start_step=0,
      end_step=4,
      regrow_end_step=8,
      update_every=1,
    ),
  )


def bf16_resnet20_step():
  """Issue #24: ResNet-20 in bfloat16, batch 8, CIFAR-sized input."""
  return _train_step(
    models.get("resnet20", 10, dtype=jnp.bfloat16), batch_size=8, shape=(32, 32, 3)
  )


def tost_ghost_step():
  recipe = tost.preset("ghost", lrsi=None)
  model = recipe.model("resnet20", 10, stage_sizes=(1,), num_filters=4)
  return _train_step(model, scalars=recipe.scalars(10), loss_fn=recipe.loss_fn())


def gradient_flow_step():
  model = _small_model()
  images, labels = _data(BATCH)
  hook = gradient_flow.GradientFlow(model, (images / 255.0, labels), every=1)
  return _train_step(model, mask=_random_mask(model), hooks=(hook.hook(),))


def eval_step():
  model = _small_model()
  state = state_lib.create_train_state(
    model, optax.sgd(0.1), jnp.zeros((1, *SHAPE)), jax.random.key(0)
  )
  step = train.make_eval_step(model, mesh=mesh_lib.make_mesh(1), mean=np.zeros(3), std=np.ones(3))
  images, labels = _data(BATCH)
  sums = {
    "loss_sum": jnp.zeros(()),
    "correct": jnp.zeros((), jnp.int32),
    "count": jnp.zeros((), jnp.int32),
  }
  return step.trace(state, sums, images, labels, np.ones(BATCH, bool))


def _scoring():
  """``(params, ones mask, ApplyFn, two stacked float batches)``."""
  model = _small_model()
  params, apply_fn = scores.linen_apply_fn(model, _variables(model))
  images, labels = _data(2 * BATCH)
  xs = jnp.asarray(images, jnp.float32).reshape(2, BATCH, *SHAPE) / 255.0
  return params, masks.ones_like(params), apply_fn, (xs, labels.reshape(2, BATCH))


def snip():
  params, mask, apply_fn, batches = _scoring()
  return jax.jit(scores.snip).trace(params, mask, apply_fn, batches)


def grasp():
  params, mask, apply_fn, batches = _scoring()
  return jax.jit(scores.grasp).trace(params, mask, apply_fn, batches)


def fused_synflow():
  params, mask, apply_fn, _ = _scoring()
  fn = lambda p, m, f: scores.synflow(p, m, f, SHAPE, 0.8, rounds=3)
  return jax.jit(fn).trace(params, mask, apply_fn)


def iterative_snip():
  params, mask, apply_fn, batches = _scoring()
  fn = lambda p, m, f, b: scores.iterative(scores.snip, p, m, 0.8, 3, f, b)
  return jax.jit(fn).trace(params, mask, apply_fn, batches)


def lrsi():
  """The compiled loop of :func:`sparsejax.tost.lrsi`, traced as it does."""
  model = _small_model()
  variables = _variables(model)
  params, mask = variables["params"], _random_mask(model)

  def loss(p, batch):
    x, y = batch
    logits, _ = modeling.apply_model(
      model, {**variables, "params": p}, x.astype(jnp.float32) / 255.0, train=True
    )
    return jnp.mean(tost.off_target_smoothed_cross_entropy(logits, y, 0.0))

  settings = tost.LRsI(steps=2, batch_size=BATCH)
  with modeling.second_order():
    return tost._lrsi_scan.trace(  # pylint: disable=protected-access
      loss, settings, None, masks.apply(params, mask), mask, _data(), jax.random.key(2)
    )


def sparse_apply():
  model = models.get("mlp", 10, hidden=(16,))
  variables = _variables(model)
  mask = masks.random_mask(jax.random.key(1), variables["params"], 0.97)
  sparse = sparse_inference.sparsify(
    model, variables, jnp.zeros((1, *SHAPE)), mask, min_sparsity=0.0
  )
  fn = lambda v, x: sparse_inference.apply(model, v, x)
  return jax.jit(fn).trace(sparse, jnp.zeros((BATCH, *SHAPE)))


def superpose_reprune():
  params = _variables(_small_model())["params"]
  ticket = jax.tree.map(lambda p: p + 1.0, params)

  def fn(average, ticket, count, num_kept):
    average = suptickets.superpose(average, ticket, count)
    return suptickets.reprune(average, num_kept)

  return jax.jit(fn).trace(params, ticket, jnp.int32(1), jnp.int32(50))


# name -> (builder of the traced program, the CPU markers it lowers on CPU).
PROGRAMS = {
  "dense_step": (dense_step, {MATERIALIZE, BN_GEMV}),
  "masked_step": (masked_step, {MATERIALIZE, BN_GEMV}),
  "rigl_step": (rigl_step, {MATERIALIZE, BN_GEMV}),
  "mask_update_step": (mask_update_step, {MATERIALIZE, BN_GEMV}),
  "gmp_step": (gmp_step, {MATERIALIZE, BN_GEMV}),
  "granet_step": (granet_step, {MATERIALIZE, BN_GEMV}),
  "bf16_resnet20_step": (bf16_resnet20_step, {MATERIALIZE, BN_GEMV}),
  "tost_ghost_step": (tost_ghost_step, {MATERIALIZE, BN_GEMV}),
  "gradient_flow_step": (gradient_flow_step, {MATERIALIZE, BN_GEMV}),
  "eval_step": (eval_step, {MATERIALIZE}),
  # Batch norm in eval mode while scoring (the default); two batches: the
  # scan's body has canonical convolutions.
  "snip": (snip, {MATERIALIZE, CANONICAL}),
  # Second order, traced inside plain_ops: no conv or batch-norm rewrite on
  # CPU either; the scan over the batches has canonical convolutions.
  "grasp": (grasp, {CANONICAL}),
  "fused_synflow": (fused_synflow, {MATERIALIZE, CANONICAL}),
  "iterative_snip": (iterative_snip, {MATERIALIZE, CANONICAL}),
  "lrsi": (lrsi, set()),
  "sparse_inference_apply": (sparse_apply, set()),
  "superpose_reprune": (superpose_reprune, set()),
}


@functools.cache
def _traced(name: str):
  return PROGRAMS[name][0]()


@functools.cache
def _lowered(name: str, platform: str) -> jax.stages.Lowered:
  return _traced(name).lower(lowering_platforms=(platform,))


def custom_call_targets(text: str) -> set[str]:
  """The ``stablehlo.custom_call`` targets named in a lowered module's text."""
  return {a or b for a, b in _TARGETS.findall(text)}


def cpu_markers(text: str) -> set[str]:
  """The names under ``_xla_cpu.CPU_SCOPE`` in a lowered module's text."""
  return set(_SCOPES.findall(text))


def test_every_cpu_rewrite_has_a_marker_that_some_program_shows():
  assert all(m.startswith(_xla_cpu.CPU_SCOPE + "_") for m in MARKERS)
  assert set().union(*(expected for _, expected in PROGRAMS.values())) == MARKERS


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_lowers_without_cpu_tricks(name, platform):
  lowered = _lowered(name, platform)
  found = cpu_markers(lowered.as_text(debug_info=True))
  if platform == "cpu":
    # The markers are there (so their absence below means something), and
    # only the program's own: a new CPU trick must be declared.
    assert found == PROGRAMS[name][1]
    return
  assert not found, f"CPU rewrites lowered for {platform}: {sorted(found)}"
  text = lowered.as_text()  # without locations: only the program's own names
  bad = {t for t in custom_call_targets(text) if _CPU_ONLY.search(t)}
  assert not bad, f"CPU-only custom calls or host callbacks for {platform}: {bad}"
  assert "callback" not in text.lower()


def test_bf16_batch_norm_gradients_keep_the_input_dtype():
  """Both branches of batch norm's platform_dependent: dx in x's dtype."""
  x = jnp.linspace(-1.0, 1.0, 2 * 3 * 4).reshape(2, 3, 4).astype(jnp.bfloat16)
  scale, bias = jnp.ones(4), jnp.zeros(4)

  def grads(fn):
    loss = lambda *a: jnp.sum(fn(*a, 1e-5)[0] ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

  for fn in (_xla_cpu._bn_gemv, _xla_cpu._bn_plain):  # pylint: disable=protected-access
    dx, dscale, dbias = grads(fn)
    assert (dx.dtype, dscale.dtype, dbias.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  dx, _, _ = grads(_xla_cpu.batch_norm_train)
  assert dx.dtype == jnp.bfloat16
