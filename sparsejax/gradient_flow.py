r"""Sparse-aware initialisation and gradient-flow measurement (SPEC §5).

Evci et al. (2022), "Gradient flow in sparse neural networks and how lottery
tickets win": a sparse network initialised with the *dense* initialiser has
units whose incoming variance is too small (most of their inputs are pruned),
hence poor gradient flow; scaling every unit by its *active* fan-in fixes
that. This module has

* :func:`sparse_init`: re-initialise the active weights of a masked network
  with ``σ_o² = scale / max(1, fan_in(o))``, ``fan_in(o)`` counted over the
  active incoming weights of unit ``o`` (receptive field included);
* :func:`active_fans`: those per-weight active fan-ins / fan-outs;
* :func:`masked_grad_norms`: the global and per-layer L2 norm of the masked
  gradient of the plain cross-entropy on a fixed batch;
* :class:`GradientFlow`: a :class:`sparsejax.hooks.StepHook` that measures it
  inside the jitted train step every ``K`` steps and on every step of a
  dynamic-sparse-training mask update, just before and just after it, and
  logs it to ``steps.jsonl`` without a host sync per step::

    flow = gradient_flow.GradientFlow(model, held_out, every=100,
                                      update_steps=gradient_flow.UpdateSteps(100))
    train.fit(model, ds, workdir, init=init, num_epochs=E, batch_size=B,
              hooks=[flow.hook()], callbacks=[flow.callback()])

Shapes follow Flax: a dense kernel is ``[d_in, d_out]``, a conv kernel
``[kh, kw, c_in / groups, c_out]``; the output unit is the last axis, the
input unit the one before it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _checks
from sparsejax import data
from sparsejax import dst
from sparsejax import hooks
from sparsejax import losses
from sparsejax import masks
from sparsejax import modeling
from sparsejax.models import activations

PyTree = Any

#: ``mode`` values of :func:`sparse_init` (as ``variance_scaling``'s).
MODES = ("fan_in", "fan_out", "fan_avg")
#: ``distribution`` values of :func:`sparse_init`.
DISTRIBUTIONS = ("normal", "truncated_normal", "uniform")
# std of the standard normal truncated to [-2, 2] (flax/jax variance_scaling).
_TRUNCATED_STD = 0.87962566103423978


# ----------------------------------------------------------------------------
# Sparse-aware initialisation
# ----------------------------------------------------------------------------


def active_fans(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Active fan-in and fan-out of every entry of one kernel's mask.

  >>> import jax.numpy as jnp
  >>> from sparsejax import gradient_flow
  >>> m = jnp.array([[True, False, False], [True, True, False]])  # [in=2, out=3]
  >>> fi, fo = gradient_flow.active_fans(m)
  >>> fi.tolist(), fo.tolist()
  ([[2, 1, 0]], [[1], [2]])

  Args:
    mask: bool ``[..., in, out]`` (``ndim >= 2``); leading axes are the
      receptive field.

  Returns:
    ``(fan_in, fan_out)``, int32, broadcastable to ``mask.shape``:
    ``fan_in[..., o]`` the active weights into output unit ``o`` (summed over
    the receptive field and the inputs; shape ``[1, ..., 1, out]``),
    ``fan_out[..., i, :]`` those out of input unit ``i`` (summed over the
    receptive field and the outputs; shape ``[1, ..., in, 1]``).
  """
  m = jnp.asarray(mask, jnp.int32)
  if m.ndim < 2:
    raise ValueError(f"a kernel mask has ndim >= 2, got shape {m.shape}")
  fan_in = jnp.sum(m, axis=tuple(range(m.ndim - 1)), keepdims=True)
  fan_out = jnp.sum(m, axis=tuple(a for a in range(m.ndim) if a != m.ndim - 2), keepdims=True)
  return fan_in, fan_out


def _check_choice(value: str, valid: tuple[str, ...], name: str) -> None:
  if value not in valid:
    raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def sparse_kernel_init(
  key: chex.PRNGKey,
  mask: jax.Array,
  *,
  scale: float = activations.HE_GAIN,
  mode: str = "fan_in",
  distribution: str = "normal",
  dtype=jnp.float32,
) -> jax.Array:
  """One kernel drawn with the sparse-aware variance; inactive entries 0.

  Entry ``w[..., i, o]`` has variance ``scale / max(1, n)`` with ``n`` the
  active fan-in of ``o`` (``mode="fan_in"``), the active fan-out of ``i``
  (``"fan_out"``) or their mean (``"fan_avg"``), see :func:`active_fans`.
  With an all-True mask this is ``jax.nn.initializers.variance_scaling(scale,
  mode, distribution)``'s distribution. See :func:`sparse_init`.

  Args:
    key: PRNG key.
    mask: bool ``[..., in, out]``.
    scale: variance gain (default 2.0, He).
    mode: ``"fan_in"`` (default), ``"fan_out"`` or ``"fan_avg"``.
    distribution: ``"normal"`` (default), ``"truncated_normal"`` (to ±2 std,
      rescaled to the variance) or ``"uniform"``.
    dtype: dtype of the result.

  Returns:
    ``dtype`` array of ``mask.shape``.
  """
  _check_choice(mode, MODES, "mode")
  _check_choice(distribution, DISTRIBUTIONS, "distribution")
  _checks.number(scale, "scale", 0.0, lo_open=True, why="a variance gain")
  fan_in, fan_out = active_fans(mask)
  fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
  variance = scale / jnp.maximum(jnp.asarray(fan, jnp.float32), 1.0)
  shape = jnp.shape(mask)
  if distribution == "normal":
    draw = jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(variance)
  elif distribution == "truncated_normal":
    draw = (
      jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
      * jnp.sqrt(variance)
      / _TRUNCATED_STD
    )
  else:
    draw = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * jnp.sqrt(3.0 * variance)
  return jnp.where(mask, draw, 0.0).astype(dtype)


def sparse_init(
  key: chex.PRNGKey,
  params: PyTree,
  mask: PyTree,
  *,
  scale: float | None = None,
  mode: str = "fan_in",
  distribution: str = "normal",
  kernels=None,
) -> PyTree:
  """Re-initialises the kernels of a masked network, variance by active fan-in.

  SPEC §5: every active weight into unit ``o`` is drawn from
  ``N(0, σ_o²)``, ``σ_o² = scale / max(1, fan_in(o))``, ``fan_in(o)`` the
  number of *active* incoming weights of ``o`` summed over the receptive
  field (:func:`sparse_kernel_init`). Units with no active input get zeros,
  and every inactive entry is exactly 0. Only the kernels are redrawn;
  biases and normalisation parameters keep their values. With an all-True
  mask the distribution is the dense ``variance_scaling(scale, mode,
  distribution)`` initialiser, the models' own (He normal, ``scale = 2``)
  with the defaults. Vectorised per layer (no loop over units) and
  jit-compatible (``mode``, ``distribution`` and ``kernels`` static).

  >>> import jax, jax.numpy as jnp
  >>> from sparsejax import gradient_flow
  >>> params = {"w": jnp.ones((3, 2)), "b": jnp.full((2,), 0.5)}
  >>> mask = {"w": jnp.array([[True, False], [True, False], [False, False]]),
  ...         "b": jnp.array([True, True])}
  >>> new = gradient_flow.sparse_init(jax.random.key(0), params, mask)
  >>> (new["w"][:, 1] == 0).all().item(), new["b"].tolist()  # no input: zeros
  (True, [0.5, 0.5])

  Args:
    key: PRNG key; split over the kernels in flattening order.
    params: the params pytree.
    mask: bool mask parallel to ``params``.
    scale: variance gain; default the models' dense initialiser gain,
      :data:`sparsejax.models.activations.HE_GAIN` (2.0); pass
      ``model.init_gain`` for a model built with another one.
    mode: ``"fan_in"`` (default, the paper's), ``"fan_out"`` (active
      outgoing weights of the input unit) or ``"fan_avg"`` (their mean).
    distribution: ``"normal"`` (default), ``"truncated_normal"`` or
      ``"uniform"`` (same variance).
    kernels: which leaves are redrawn: ``None`` (every leaf with
      ``ndim > 1``, :data:`sparsejax.masks.KERNELS`), a
      :class:`sparsejax.masks.Prunable`, a predicate ``(path, leaf) -> bool``
      or a pytree of bools.

  Returns:
    The params with their kernels redrawn (same structure, shapes, dtypes).
  """
  masks.check_mask(mask, params)
  _check_choice(mode, MODES, "mode")
  _check_choice(distribution, DISTRIBUTIONS, "distribution")
  scale = activations.HE_GAIN if scale is None else float(scale)
  flags = masks.prunable_tree(params, kernels)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [
    sparse_kernel_init(k, m, scale=scale, mode=mode, distribution=distribution, dtype=p.dtype)
    if f
    else p
    for k, p, m, f in zip(keys, leaves, jax.tree.leaves(mask), jax.tree.leaves(flags))
  ]
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Gradient flow
# ----------------------------------------------------------------------------


def grad_norms(
  grads: PyTree, mask: PyTree | None = None, prunable=None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Global and per-layer L2 norms of the gradient masked by ``mask``.

  Args:
    grads: a gradient pytree (dense: pruned entries included).
    mask: bool mask parallel to it (entries outside it do not count);
      ``None``: dense.
    prunable: which leaves get a per-layer norm (default every kernel,
      :data:`sparsejax.masks.KERNELS`; SPEC's "layer").

  Returns:
    ``(global_norm, {path: layer_norm})``, float32 scalars; the global norm
    is over every leaf (biases and normalisation parameters included).
  """
  if mask is not None:
    grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, mask)
  sq = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), grads)
  flags = masks.prunable_tree(grads, prunable)
  layers = {
    p: jnp.sqrt(s) for (p, s), f in zip(masks.named_leaves(sq), jax.tree.leaves(flags)) if f
  }
  total = jnp.sqrt(sum(jax.tree.leaves(sq), jnp.zeros((), jnp.float32)))
  return total, layers


def masked_grad_norms(
  model,
  params: PyTree,
  batch: tuple[jax.Array, jax.Array],
  mask: PyTree | None = None,
  *,
  batch_stats: PyTree = None,
  prunable=None,
  scalars: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The gradient flow of ``params`` on ``batch`` (SPEC §5).

  The L2 norm of ``m ⊙ ∇θ L(θ ⊙ m)`` where ``L`` is the mean plain softmax
  cross-entropy of ``batch`` (no weight decay, no label smoothing), the model
  in training mode (batch norm with the batch's statistics; the running
  averages are not changed), globally and per layer (:func:`grad_norms`).
  Traceable: call it inside ``jit``.

  Args:
    model: the linen module.
    params: its params (masked or not: they are masked here).
    batch: ``(x, y)``: normalised inputs ``float32 [B, H, W, C]`` and labels
      ``int32 [B]``.
    mask: bool mask parallel to ``params``; ``None``: dense.
    batch_stats: the model's batch statistics (``{}``/``None`` without).
    prunable: leaves with a per-layer norm (see :func:`grad_norms`).
    scalars: per-step scalars the model reads (``model.scalar_names``),
      e.g. ``{"act_coef": beta}`` (:func:`sparsejax.modeling.apply_model`).

  Returns:
    ``(global_norm, {path: layer_norm})``.
  """
  x, y = batch
  if mask is not None:
    params = masks.apply(params, mask)
  state = {"batch_stats": batch_stats} if batch_stats else {}

  modeling.check_scalars(model, scalars or {})

  def loss(p):
    return modeling.loss_and_logits(
      model,
      p,
      state,
      x,
      y,
      lambda logits, labels, _: losses.cross_entropy(logits, labels),
      scalars=scalars,
      rngs={"dropout": jax.random.key(0)},
    )[0]

  return grad_norms(jax.grad(loss)(params), mask, prunable)


@dataclasses.dataclass(frozen=True)
class UpdateSteps:
  """The mask-update steps of :func:`sparsejax.dst.dynamic_sparse`, as a predicate.

  ``UpdateSteps(every, start, end)(t)`` is whether step ``t`` (0-based, the
  optimiser's count) updates the mask: ``t >= start``, ``(t - start) %
  every == 0`` and ``t < end``. It works on Python ints (on the host) and on
  traced ``int32`` arrays alike (the same ``&`` expression), so a hook and
  its host-side log filter agree exactly.

  >>> from sparsejax import gradient_flow
  >>> steps = gradient_flow.UpdateSteps(100, end_step=300)
  >>> [t for t in range(400) if steps(t)]
  [100, 200]

  Attributes:
    update_every: ``ΔT``.
    start_step: first update step (default ``update_every``, as
      :func:`sparsejax.dst.dynamic_sparse`).
    end_step: no update at or after it (default: never stops).
  """

  update_every: int
  start_step: int | None = None
  end_step: int | None = None

  def __post_init__(self):
    _checks.step(self.update_every, "UpdateSteps.update_every", 1)
    start = (
      self.update_every
      if self.start_step is None
      else _checks.step(self.start_step, "UpdateSteps.start_step")
    )
    if self.end_step is not None and _checks.step(self.end_step, "UpdateSteps.end_step") <= start:
      raise ValueError(
        f"UpdateSteps.end_step must be after start_step ({start}), "
        f"got {self.end_step!r}: no step would update the mask"
      )

  def __call__(self, t):
    start = self.update_every if self.start_step is None else self.start_step
    on = (t >= start) & ((t - start) % self.update_every == 0)
    if self.end_step is not None:
      on = on & (t < self.end_step)
    return on


class GradientFlow:
  """The gradient flow (SPEC §5): a step hook and an epoch-end callback of
  :func:`sparsejax.train.fit` (``hooks=[flow.hook()],
  callbacks=[flow.callback()]``).

  On the steps it logs it computes, inside the jitted train step (under
  ``lax.cond``, nothing on the other steps), the gradient flow
  (:func:`masked_grad_norms`) of a fixed held-out batch twice: at the state
  the step started from and at the state it returns. The record of step
  count ``s`` in ``steps.jsonl`` (the logs stay on device until the epoch's
  flush) holds

  * ``grad_norm`` and ``grad_norm/<layer>``: at ``θ_s`` with its mask;
  * ``grad_norm_before`` and ``grad_norm_before/<layer>``: at ``θ_{s−1}``
    with its mask, before the optimiser update of the step; at ``s = 1``
    this is the gradient flow at initialisation, and on a mask-update step
    the pair is the flow just before and just after the update (with
    ``skip_update``, the only change is the mask's);
  * ``mask_change``: the fraction of mask entries the step changed.

  It logs at ``s = 1``, every ``every`` steps and, with ``update_steps``,
  at ``s = t + 1`` for every mask-update step ``t`` (the optimiser's step
  count equals the train state's when training starts at step 0). Its state
  keeps the latest ``grad_norm``, which every epoch record of
  ``metrics.jsonl`` (and TensorBoard) also gets (:meth:`callback`).

  Args:
    model: the linen module being trained.
    batch: ``(x, y)``, normalised inputs and labels, e.g. from
      :func:`held_out_split`; stays on device.
    every: measurement period ``K`` in steps (default 100).
    update_steps: ``t -> bool`` predicate of the mask-update steps, working
      on ints and traced arrays (:class:`UpdateSteps`); ``None``: no DST.
    prunable: leaves with a per-layer norm (default every kernel).
    name: the hook's name (default ``"gradient_flow"``).
  """

  def __init__(
    self,
    model,
    batch: tuple[Any, Any],
    *,
    every: int = 100,
    update_steps: Callable[[Any], Any] | None = None,
    prunable=None,
    name: str = "gradient_flow",
  ):
    every = _checks.step(every, "every", 1)
    self.model = model
    self.batch = (jnp.asarray(batch[0], jnp.float32), jnp.asarray(batch[1], jnp.int32))
    self.every = int(every)
    self.update_steps = update_steps
    self.prunable = prunable
    self.name = name

  def _due(self, s):
    due = (s == 1) | (s % self.every == 0)
    if self.update_steps is not None:
      due = due | self.update_steps(s - 1)
    return due

  def logs_at(self, step: int) -> bool:
    return bool(self._due(int(step)))

  def measure(self, state, scalars=None) -> tuple[jax.Array, dict]:
    """``masked_grad_norms`` of a train state on the hook's batch (traceable)."""
    return masked_grad_norms(
      self.model,
      state.params,
      self.batch,
      state.mask,
      batch_stats=state.batch_stats,
      prunable=self.prunable,
      scalars=modeling.model_scalars(self.model, scalars),
    )

  def init(self, state):
    del state
    return {"grad_norm": jnp.zeros((), jnp.float32)}

  def epoch_end(self, step, carry, ctx):
    del step
    ctx.record["grad_norm"] = carry.hook_states[self.name]["grad_norm"]

  def hook(self) -> hooks.StepHook:
    """The :class:`sparsejax.hooks.StepHook` that measures in the step."""
    return hooks.StepHook(self.init, self.update, name=self.name, logs_at=self.logs_at)

  def callback(self) -> hooks.Callback:
    """The epoch-end :class:`sparsejax.hooks.Callback` (``grad_norm`` field)."""
    return hooks.callback(self.epoch_end, at_epoch_end=True)

  def update(self, hook_state, state, info):
    if info.state_before is None:
      raise ValueError("GradientFlow needs StepInfo.state_before")
    before = info.state_before

    def measure():
      g0, layers0 = self.measure(before, info.scalars)
      g1, layers1 = self.measure(state, info.scalars)
      old, new = before.mask, state.mask
      change = jnp.zeros((), jnp.float32) if old is None else dst.mask_churn(old, new)
      logs = {"grad_norm": g1, "grad_norm_before": g0, "mask_change": change}
      logs.update({f"grad_norm/{p}": v for p, v in layers1.items()})
      logs.update({f"grad_norm_before/{p}": v for p, v in layers0.items()})
      return logs

    shapes = jax.eval_shape(measure)
    due = self._due(info.step + 1)
    logs = jax.lax.cond(
      due, measure, lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    )
    latest = jnp.where(due, logs["grad_norm"], hook_state["grad_norm"])
    return {"grad_norm": latest}, state, logs


def held_out_split(dataset, per_class: int, seed: int = 0):
  """Removes a class-balanced held-out batch from a dataset's training split.

  Args:
    dataset: a :class:`sparsejax.data.Dataset`.
    per_class: held-out examples per class.
    seed: selection seed (:func:`sparsejax.data.class_balanced_indices`).

  Returns:
    ``(train_dataset, (x, y))``: the dataset without those examples (test
    split, mean and std unchanged) and the held-out batch, ``x`` normalised
    ``float32 [num_classes * per_class, H, W, C]``, ``y`` ``int32``.
  """
  _checks.step(per_class, "per_class", 1)
  idx = data.class_balanced_indices(
    dataset.train_labels, per_class, seed, num_classes=dataset.num_classes
  )
  keep = np.ones(dataset.num_train, bool)
  keep[idx] = False
  rest = dataclasses.replace(
    dataset, train_images=dataset.train_images[keep], train_labels=dataset.train_labels[keep]
  )
  x = data.normalize(dataset.train_images[idx], dataset.mean, dataset.std)
  return rest, (x, jnp.asarray(dataset.train_labels[idx], jnp.int32))
