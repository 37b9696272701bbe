"""ToST: a training recipe that makes any sparse mask train better (SPEC §7).

Jaiswal et al. (2022), "Training Your Sparse Neural Network Better with Any
Mask". Four techniques, each switchable, each with a schedule of the global
step; "ghost" means present early in training and gone by the end, so that the
final network is the plain sparse network of the original architecture:

* **Ghost soft neurons** (``ToST.soft_neurons``): the models' activation
  becomes :func:`sparsejax.models.activations.blend`, ``(1 - β) ReLU + β
  Swish``, with β(t) the per-step scalar ``act_coef``.
* **Ghost skip connections** (``ToST.ghost_skips``): the model variant
  ``ghost_skips=True`` of the CIFAR ResNets, ResNet-18 and the Wide ResNets
  (:func:`ghost_model`): every basic block gets two dense 1x1 conv +
  BatchNorm paths (block input -> pre-activation of the first conv, same
  stride; first activation -> block output), kernels initialised to the
  constant 1e-4, scaled by γ(t), the per-step scalar ``ghost_coef``. The
  ghost parameters are named ``ghost_*``, so they are never prunable and
  not counted in budgets (:func:`sparsejax.masks.is_ghost`); :func:`export`
  drops them and returns the variables of the plain registry model, which at
  γ = 0 gives identical logits. VGG, MobileNetV2, ResNet-50 (bottlenecks) and
  the MNIST models have no basic blocks: :func:`ghost_model` refuses them
  with a ``ValueError`` (the other three techniques work on any model).
* **Label smoothing** (``ToST.label_smoothing``): α(t), the per-step
  scalar ``tost_label_smoothing`` (:data:`LABEL_SMOOTHING`; read only by
  :func:`label_smoothing_loss`, so :func:`sparsejax.train.fit` refuses it
  without that loss), with the reference target ``1 - α`` on the
  true class and ``α / (C - 1)`` on every other class
  (:func:`smoothed_targets`; not optax's ``(1 - α) y + α / C``).
* **Layer-wise rescaled initialisation, LRsI** (``ToST.lrsi``): GradInit
  (Zhu et al. 2021) on the masked network, :func:`lrsi`: one positive scale
  per parameter tensor, learned by Adam so that the loss after one
  normalised SGD step is minimal subject to a gradient-norm bound; then
  folded into the weights (pruned entries stay exactly 0). :class:`LRsICallback`
  runs it inside :func:`sparsejax.train.fit` on a fresh start.

Every schedule is a :class:`Ramp` (hold a value for a fraction of training,
then linear to another), evaluated inside the jitted steps from the step
counter: changing β, γ or α never recompiles. Presets (:func:`preset`):

* ``"ghost"``: sparsejax's documented default, since the paper's switch-off
  epochs are not public: β and γ are 1 for the first 10% of training, then
  linear to 0 at 50%; α is 0.1, then linear to 0 on the same points; LRsI.
* ``"always_on"``: the released reference code: Swish (β = 1), the ghost
  skips (γ = 1) and label smoothing α = 0.1 for the whole run; LRsI. The
  trained network then keeps its extra paths and soft activations (exporting
  it to the plain model changes its function).
* ``"soft_neurons"``, ``"ghost_skips"``, ``"label_smoothing"``, ``"lrsi"``:
  one technique of ``"ghost"`` alone; ``"none"``: the baseline.

Example::

  from sparsejax import state, tost, train

  recipe = tost.preset("ghost")
  model = recipe.model("resnet20", num_classes=10)   # ghost skips, blend act
  total = num_epochs * steps_per_epoch
  init = lambda: state.create_train_state(model, tx, sample, key, mask=mask_fn)
  result = train.fit(model, ds, workdir, init=init, num_epochs=num_epochs,
                     batch_size=batch_size, scalars=recipe.scalars(total),
                     loss_fn=recipe.loss_fn(), callbacks=recipe.callbacks())
  plain = tost.export(result.state.variables)  # params of resnet20 itself
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import _checks
from sparsejax import data as data_lib
from sparsejax import hooks as hooks_lib
from sparsejax import losses
from sparsejax import masks
from sparsejax import mesh as mesh_lib
from sparsejax import modeling
from sparsejax import models
from sparsejax import schedules
from sparsejax.models import activations
from sparsejax.models import scalars as scalars_lib

PyTree = Any

#: The per-step scalar names of β (activation blend), γ (ghost skips) and α (smoothing).
ACT_COEF = scalars_lib.ACT_COEF
GHOST_COEF = scalars_lib.GHOST_COEF
#: ToST's smoothing has a key of its own, which is not the ``"label_smoothing"``
#: scalar of :func:`sparsejax.losses.smoothed_cross_entropy` (optax's α / C),
#: so passing α(t) without ToST's loss is an error, never the other formula.
LABEL_SMOOTHING = "tost_label_smoothing"


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ramp:
  """A schedule in fractions of training: ``start``, held, then linear to ``end``.

  Step ``t`` of ``T`` gets ``start`` while ``t <= round(hold * T)``, then
  the value moves linearly to ``end``, reached at ``round(stop * T)`` and
  kept after (:func:`sparsejax.schedules.hold_then_ramp`).

  Attributes:
    start: the value at the start of training; default 1.0.
    end: the value at and after ``stop``; default 0.0.
    hold: fraction of training held at ``start``; default 0.1.
    stop: fraction of training at which ``end`` is reached (``>= hold``);
      default 0.5.
  """

  start: float = 1.0
  end: float = 0.0
  hold: float = 0.1
  stop: float = 0.5

  def __post_init__(self):
    _checks.number(self.start, "Ramp.start")
    _checks.number(self.end, "Ramp.end")
    _checks.number(self.hold, "Ramp.hold", 0.0, 1.0, why="a fraction of training")
    _checks.number(
      self.stop, "Ramp.stop", self.hold, 1.0, why="a fraction of training, at or after hold"
    )

  @classmethod
  def constant(cls, value: float) -> Ramp:
    """``value`` for the whole run."""
    return cls(value, value, 1.0, 1.0)

  def schedule(self, total_steps: int) -> optax.Schedule:
    """The ``optax.Schedule`` of the global step for a run of ``total_steps``."""
    hold = round(self.hold * int(total_steps))
    stop = round(self.stop * int(total_steps))
    return schedules.hold_then_ramp(self.start, self.end, hold, stop - hold)


#: The ghost schedule of β and γ, 1 for the first 10% of training and 0 at 50%.
GHOST_RAMP = Ramp(1.0, 0.0, 0.1, 0.5)
#: The ghost schedule of α, 0.1 for the first 10% of training and 0 at 50%.
GHOST_SMOOTHING = Ramp(0.1, 0.0, 0.1, 0.5)


# ----------------------------------------------------------------------------
# Label smoothing with the reference target
# ----------------------------------------------------------------------------


def smoothed_targets(labels: jax.Array, num_classes: int, alpha: float | jax.Array) -> jax.Array:
  """ToST's smoothed targets: ``1 - α`` on the true class, ``α / (C - 1)`` elsewhere.

  Args:
    labels: integer class indices ``[...]``.
    num_classes: ``C >= 2``.
    alpha: the smoothing factor α (a float or a traced scalar).

  Returns:
    ``float32 [..., C]``; every row sums to 1.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import tost
    >>> tost.smoothed_targets(jnp.array([1]), 4, 0.3)
    Array([[0.1, 0.7, 0.1, 0.1]], dtype=float32)
  """
  if num_classes < 2:
    raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  return one_hot * (1 - alpha) + (1 - one_hot) * (alpha / (num_classes - 1))


def off_target_smoothed_cross_entropy(
  logits: jax.Array, labels: jax.Array, alpha: float | jax.Array
) -> jax.Array:
  """Per-example cross-entropy against :func:`smoothed_targets` (float32).

  Args:
    logits: ``[..., C]``; labels: ``[...]``; alpha: α.

  Returns:
    ``[...]``.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy(logits, smoothed_targets(labels, logits.shape[-1], alpha))


def label_smoothing_loss() -> losses.LossFn:
  """The training loss ``loss_fn(logits, labels, scalars)`` of ToST's smoothing.

  :func:`off_target_smoothed_cross_entropy` with α =
  ``scalars["tost_label_smoothing"]`` (:data:`LABEL_SMOOTHING`)
  (plain cross-entropy when that scalar is absent).
  """

  def loss_fn(logits, labels, scalars):
    return off_target_smoothed_cross_entropy(logits, labels, scalars.get(LABEL_SMOOTHING, 0.0))

  return loss_fn


# ----------------------------------------------------------------------------
# Ghost skips: models, export, masks
# ----------------------------------------------------------------------------


def supports_ghost_skips(name: str) -> bool:
  """Whether the registered model ``name`` has a ghost-skip variant."""
  model = models.get(name, 2)
  return "ghost_skips" in {f.name for f in dataclasses.fields(model)}


def ghost_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The ghost-skip variant of the registered model ``name``.

  ``models.get(name, num_classes, ghost_skips=True, **kwargs)``; it reads
  the scalar ``ghost_coef`` (γ, traced; in its ``scalar_names``). Exists for ``resnet20``,
  ``resnet32``, ``resnet56``, ``resnet18``, ``wrn22_2`` and ``wrn28_10``
  (any depth and width of those families).

  Raises:
    ValueError: a model without basic residual blocks (VGG, MobileNetV2,
      ResNet-50, LeNet-5, MLP): ToST's ghost skips are defined per basic
      block and VGG's plain conv stack has none. Train such a model with the
      other techniques, e.g. ``preset("ghost", ghost_skips=None)``.
  """
  if not supports_ghost_skips(name):
    supported = [n for n in models.names() if supports_ghost_skips(n)]
    raise ValueError(
      f"ghost skip connections are defined for the basic blocks of residual "
      f"networks ({', '.join(supported)}); {name!r} has none. Use ToST "
      "without them, e.g. tost.preset('ghost', ghost_skips=None)"
    )
  return models.get(name, num_classes, ghost_skips=True, **kwargs)


def _drop_ghosts(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {
      k: _drop_ghosts(v) for k, v in tree.items() if not str(k).startswith(masks.GHOST_PREFIX)
    }
  return tree


def export(tree: PyTree) -> PyTree:
  """``tree`` without its ghost entries: the variables of the plain model.

  Drops every dict entry whose key starts with ``ghost_`` at any depth, so it
  works on variables (``{'params', 'batch_stats'}``), params, masks and
  batch statistics of a :func:`ghost_model`; the result has exactly the
  structure of the plain registry model's. At γ = 0 the plain model with the
  exported variables computes the ghost model's logits exactly.

  Example:

    >>> from sparsejax import tost
    >>> tost.export({"Conv_0": {"kernel": 1}, "ghost_in_conv": {"kernel": 2}})
    {'Conv_0': {'kernel': 1}}
  """
  return _drop_ghosts(tree)


def lift_mask(mask: PyTree, params: PyTree) -> PyTree:
  """A mask of the plain model extended to the ghost model's ``params``.

  The entries of ``mask`` are kept; every ghost leaf of ``params`` gets an
  all-``True`` mask (ghost parameters are never pruned). ``params`` may be
  abstract (``jax.ShapeDtypeStruct``).

  Raises:
    ValueError: ``mask`` does not fit the plain part of ``params``.
  """
  flat = dict(masks.named_leaves(mask))
  masks.check_mask(mask, export(params))
  return masks.map_with_path(
    lambda p, x: jnp.ones(jnp.shape(x), jnp.bool_) if masks.is_ghost(p) else flat[p], params
  )


# ----------------------------------------------------------------------------
# LRsI: GradInit on the masked network
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LRsI:
  """Settings of :func:`lrsi` (defaults: ToST's released recipe, SPEC §7).

  Attributes:
    steps: Adam iterations on the scales; default 180.
    learning_rate: Adam's learning rate on the scales; default 1e-2.
    eta: size of the inner SGD step η; default 0.1.
    grad_norm_bound: the constraint ``‖g‖₂ <= bound`` on the network's
      gradient; while violated the objective is ``‖g‖₂`` itself; default 1.0.
    normalize_step: the inner step is ``η g / ‖g‖₂`` (True, default) or
      ``η g``.
    grad_clip: global-norm clip of the scales' gradient before Adam
      (``None``: none); default 1.0.
    weight_floor: lower bound of the scales of weights (every tensor whose
      name is not ``bias``); default 0.01.
    bias_floor: lower bound of the scales of biases; default 0.0.
    batch_size: examples per iteration, split in halves (gradient, loss
      after the step); default 128.
  """

  steps: int = 180
  learning_rate: float = 1e-2
  eta: float = 0.1
  grad_norm_bound: float = 1.0
  normalize_step: bool = True
  grad_clip: float | None = 1.0
  weight_floor: float = 0.01
  bias_floor: float = 0.0
  batch_size: int = 128

  def __post_init__(self):
    _checks.step(self.steps, "LRsI.steps", 1)
    _checks.step(self.batch_size, "LRsI.batch_size", 2)
    _checks.number(self.learning_rate, "LRsI.learning_rate", 0.0, lo_open=True)
    _checks.number(self.eta, "LRsI.eta", 0.0, lo_open=True)
    _checks.number(self.grad_norm_bound, "LRsI.grad_norm_bound", 0.0, lo_open=True)
    if self.grad_clip is not None:
      _checks.number(self.grad_clip, "LRsI.grad_clip", 0.0, lo_open=True)
    _checks.number(self.weight_floor, "LRsI.weight_floor", 0.0)
    _checks.number(self.bias_floor, "LRsI.bias_floor", 0.0)


def is_bias(path: str) -> bool:
  """Whether LRsI treats the leaf at ``path`` as a bias (floor ``bias_floor``):
  its name is ``bias`` (dense/conv biases, BatchNorm offsets)."""
  return path.rsplit("/", 1)[-1] == "bias"


def scale_floors(params: PyTree, settings: LRsI = LRsI()) -> PyTree:
  """One float32 floor per tensor: ``bias_floor`` for biases, else ``weight_floor``."""
  return masks.map_with_path(
    lambda p, _: jnp.float32(settings.bias_floor if is_bias(p) else settings.weight_floor), params
  )


def fold(params: PyTree, scales: PyTree, mask: PyTree | None = None) -> PyTree:
  """``params * scales`` leaf by leaf, then masked: pruned entries exactly 0."""
  scaled = jax.tree.map(lambda p, s: p * s.astype(p.dtype), params, scales)
  return scaled if mask is None else masks.apply(scaled, mask)


def lrsi_objective(
  loss: Callable[[PyTree, Any], jax.Array],
  params: PyTree,
  mask: PyTree,
  scales: PyTree,
  batch: Any,
  settings: LRsI = LRsI(),
) -> tuple[jax.Array, dict]:
  """GradInit's objective of ``scales`` on one batch, differentiable in ``scales``.

  With ``θ = fold(params, scales, mask)``, ``g = mask ⊙ ∇L(θ; B₁)`` (the
  masked network's gradient on the first half of ``batch``) and the step
  ``s = η g / ‖g‖₂`` (or ``η g``), the objective is ``L(θ - s; B₂)`` (the
  loss after the step on the second half) when ``‖g‖₂ <= grad_norm_bound``,
  else ``‖g‖₂``.

  Args:
    loss: ``loss(params, batch) -> scalar``.
    params: the initial params ``[...]``; mask: their bool mask.
    scales: one float32 scalar per tensor of ``params``.
    batch: a pytree of arrays with a leading batch axis of even size.
    settings: :class:`LRsI`.

  Returns:
    ``(objective, {"grad_norm", "loss_after_step"})``.
  """
  half = jax.tree.leaves(batch)[0].shape[0] // 2
  first = jax.tree.map(lambda a: a[:half], batch)
  second = jax.tree.map(lambda a: a[half : 2 * half], batch)
  theta = fold(params, scales, mask)
  grads = masks.apply(jax.grad(loss)(theta, first), mask)
  norm = optax.tree.norm(grads)
  step = (
    jax.tree.map(lambda g: g / jnp.maximum(norm, 1e-12), grads)
    if settings.normalize_step
    else grads
  )
  after = loss(jax.tree.map(lambda t, s: t - settings.eta * s, theta, step), second)
  objective = jnp.where(norm > settings.grad_norm_bound, norm, after)
  return objective, {"grad_norm": norm, "loss_after_step": after}


def lrsi(
  loss: Callable[[PyTree, Any], jax.Array],
  params: PyTree,
  mask: PyTree | None,
  data: Any,
  key: jax.Array,
  settings: LRsI = LRsI(),
  preprocess: Callable[[jax.Array, Any], Any] | None = None,
) -> tuple[PyTree, dict]:
  """LRsI: learns one scale per tensor with GradInit, folds it into ``params``.

  Starting from scales 1, each of ``settings.steps`` iterations draws
  ``batch_size`` examples of ``data`` (uniformly, with replacement, from
  ``fold_in(key, i)``), applies ``preprocess(key, batch)`` (e.g. augment and
  normalise), and takes one Adam step (after the global-norm clip
  ``grad_clip``) on :func:`lrsi_objective`; then every scale is floored
  (``weight_floor`` for weights, ``bias_floor`` for biases). The whole loop is
  one compiled ``lax.scan``. Scales are learned on the masked network and
  folded into the masked params, so pruned entries stay exactly 0.

  Args:
    loss: ``loss(params, batch) -> scalar`` (static; e.g. the model's
      training loss in training mode).
    params: the initial params (``[...]`` leaves).
    mask: their bool mask, or ``None`` (dense).
    data: a pytree of arrays with a common leading axis ``N`` (e.g.
      ``(uint8 images [N, H, W, C], int labels [N])``), passed to the
      compiled loop as arguments (not baked in as constants).
    key: PRNG key of the batches.
    settings: :class:`LRsI`.
    preprocess: ``preprocess(key, batch) -> batch`` (static); default none.

  Returns:
    ``(params, info)``: the rescaled params and, as host values,
    ``scales`` (``{path: float}``), ``objective``, ``grad_norm`` and
    ``loss_after_step`` (one per iteration, ``[steps]`` numpy arrays), and
    ``objective_before`` / ``objective_after``: the objective of scales 1
    and of the final scales on one fixed batch (``fold_in(key, steps)``).
  """
  mask = masks.ones_like(params) if mask is None else mask
  params = masks.apply(params, mask)
  # Second order: traced without the CPU fast path, whose branches autodiff
  # would multiply (modeling.second_order); _lrsi_scan retraces per call (new
  # closures).
  with modeling.second_order():
    scales, info = _lrsi_scan(loss, settings, preprocess, params, mask, data, key)
  info = jax.device_get(info)
  out = {k: np.asarray(v) for k, v in info.items()}
  out["objective_before"] = float(out["objective_before"])
  out["objective_after"] = float(out["objective_after"])
  out["scales"] = {p: float(s) for p, s in masks.named_leaves(jax.device_get(scales))}
  return fold(params, scales, mask), out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _lrsi_scan(loss, settings, preprocess, params, mask, data, key):
  n = jax.tree.leaves(data)[0].shape[0]

  def draw(k):
    idx = jax.random.randint(k, (settings.batch_size,), 0, n)
    batch = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)
    return batch if preprocess is None else preprocess(jax.random.fold_in(k, 1), batch)

  objective = functools.partial(lrsi_objective, loss, params, mask, settings=settings)
  parts = [optax.adam(settings.learning_rate)]
  if settings.grad_clip is not None:
    parts.insert(0, optax.clip_by_global_norm(settings.grad_clip))
  tx = optax.chain(*parts)
  floors = scale_floors(params, settings)
  ones = jax.tree.map(lambda _: jnp.ones((), jnp.float32), params)

  def body(carry, i):
    scales, opt_state = carry
    batch = draw(jax.random.fold_in(key, i))
    (value, aux), grads = jax.value_and_grad(lambda s: objective(s, batch), has_aux=True)(scales)
    updates, opt_state = tx.update(grads, opt_state, scales)
    scales = jax.tree.map(jnp.maximum, optax.apply_updates(scales, updates), floors)
    return (scales, opt_state), (value, aux["grad_norm"], aux["loss_after_step"])

  (scales, _), (values, norms, after) = jax.lax.scan(
    body, (ones, tx.init(ones)), jnp.arange(settings.steps)
  )
  fixed = draw(jax.random.fold_in(key, settings.steps))
  info = {
    "objective": values,
    "grad_norm": norms,
    "loss_after_step": after,
    "objective_before": objective(ones, fixed)[0],
    "objective_after": objective(scales, fixed)[0],
  }
  return scales, info


class LRsICallback(hooks_lib.Callback):
  """Runs :func:`lrsi` on the initial train state of a fresh :func:`sparsejax.train.fit` run
  (a :class:`sparsejax.hooks.Callback` ``at_fresh_start``).

  The loss is ``fit``'s training loss of the model in training mode (batch
  statistics of the batch, running averages left as they are) with the
  per-step scalars of step 0 (e.g. β(0), γ(0), α(0)); the data are the
  training images, augmented like training (when fit augments) and
  normalised; the key is ``fold_in(key(seed), 3)``. After the
  run, ``info`` holds :func:`lrsi`'s info and ``seconds``, its wall time
  with compilation (on a resumed run, where the
  checkpoint already holds the rescaled weights, it stays ``None``).

  Args:
    settings: :class:`LRsI`.
  """

  at_fresh_start = True

  def __init__(self, settings: LRsI = LRsI()):
    self.settings = settings
    self.info: dict | None = None

  def __call__(self, step, carry, ctx: hooks_lib.FitContext):
    del step
    state, model, ds = carry.state, ctx.model, ctx.dataset
    loss_fn = ctx.loss_fn or losses.smoothed_cross_entropy()
    values = schedules.scalar_values(ctx.scalars, jnp.zeros((), jnp.int32))
    augment = ctx.augment
    mean = jnp.asarray(ds.mean, jnp.float32)
    std = jnp.asarray(ds.std, jnp.float32)
    batch_stats = state.batch_stats

    def preprocess(key, batch):
      x, y = batch
      if augment:
        x = data_lib.augment(key, x)
      return data_lib.normalize(x, mean, std), y

    def loss(params, batch):
      x, y = batch
      return modeling.loss_and_logits(
        model,
        params,
        {"batch_stats": batch_stats} if batch_stats else {},
        x,
        y,
        loss_fn,
        scalars=values,
        rngs={"dropout": jax.random.key(0)},
      )[0]

    seed = ctx.seed
    data = mesh_lib.put_replicated(
      (np.asarray(ds.train_images), np.asarray(ds.train_labels, np.int32)), ctx.mesh
    )
    start = time.perf_counter()
    params, info = lrsi(
      loss,
      state.params,
      state.mask,
      data,
      jax.random.fold_in(jax.random.key(seed), 3),
      self.settings,
      preprocess,
    )
    self.info = dict(info, seconds=time.perf_counter() - start)
    return carry.replace(state=state.replace(params=params))


# ----------------------------------------------------------------------------
# The recipe and its presets
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToST:
  """Which ToST techniques a run uses, with their schedules.

  Attributes:
    soft_neurons: β(t) of the activation blend, or ``None`` (plain ReLU).
    ghost_skips: γ(t) of the ghost skip paths, or ``None`` (plain model).
    label_smoothing: α(t), or ``None`` (no smoothing).
    lrsi: :class:`LRsI` settings, or ``None`` (the plain initialisation).
  """

  soft_neurons: Ramp | None = None
  ghost_skips: Ramp | None = None
  label_smoothing: Ramp | None = None
  lrsi: LRsI | None = None

  def __post_init__(self):
    # β and γ blend two paths (0 and 1 are the ends); α is a probability
    # mass moved off the true class (below 1, or the target vanishes).
    for name, hi, hi_open in (
      ("soft_neurons", 1.0, False),
      ("ghost_skips", 1.0, False),
      ("label_smoothing", 1.0, True),
    ):
      ramp = getattr(self, name)
      if ramp is not None:
        for end in ("start", "end"):
          _checks.number(getattr(ramp, end), f"ToST.{name}.{end}", 0.0, hi, hi_open=hi_open)

  @property
  def techniques(self) -> tuple[str, ...]:
    """Names of the techniques switched on."""
    return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

  def scalars(self, total_steps: int) -> dict[str, optax.Schedule]:
    """The per-step scalars for ``fit(scalars=...)`` of a run of ``total_steps``:
    ``act_coef`` (β), ``ghost_coef`` (γ), ``tost_label_smoothing`` (α), those
    on."""
    out = {}
    for name, ramp in (
      (ACT_COEF, self.soft_neurons),
      (GHOST_COEF, self.ghost_skips),
      (LABEL_SMOOTHING, self.label_smoothing),
    ):
      if ramp is not None:
        out[name] = ramp.schedule(total_steps)
    return out

  def model(self, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The registered model ``name`` for this recipe: the ghost-skip variant
    (:func:`ghost_model`) with ``ghost_skips``, the blend activation with
    ``soft_neurons`` (unless ``act`` is given)."""
    if self.soft_neurons is not None:
      kwargs.setdefault("act", activations.blend())
    if self.ghost_skips is not None:
      return ghost_model(name, num_classes, **kwargs)
    return models.get(name, num_classes, **kwargs)

  def loss_fn(self) -> losses.LossFn | None:
    """:func:`label_smoothing_loss` with ``label_smoothing``, else ``None``
    (``fit``'s default loss)."""
    return label_smoothing_loss() if self.label_smoothing is not None else None

  def callbacks(self) -> tuple[hooks_lib.Callback, ...]:
    """``(LRsICallback(lrsi),)`` with ``lrsi``, else ``()``."""
    return (LRsICallback(self.lrsi),) if self.lrsi is not None else ()


PRESETS: dict[str, ToST] = {
  "none": ToST(),
  "ghost": ToST(GHOST_RAMP, GHOST_RAMP, GHOST_SMOOTHING, LRsI()),
  "always_on": ToST(Ramp.constant(1.0), Ramp.constant(1.0), Ramp.constant(0.1), LRsI()),
  "soft_neurons": ToST(soft_neurons=GHOST_RAMP),
  "ghost_skips": ToST(ghost_skips=GHOST_RAMP),
  "label_smoothing": ToST(label_smoothing=GHOST_SMOOTHING),
  "lrsi": ToST(lrsi=LRsI()),
}
"""The presets of :func:`preset` (see the module doc)."""


def preset(name: str, **overrides: Any) -> ToST:
  """The preset ``name`` of :data:`PRESETS`, with fields replaced by ``overrides``.

  Example: ``preset("ghost", ghost_skips=None)`` (e.g. for VGG),
  ``preset("ghost", lrsi=LRsI(steps=50))``.

  Raises:
    ValueError: an unknown preset.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown ToST preset {name!r}; valid: {', '.join(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


__all__ = [
  "ACT_COEF",
  "GHOST_COEF",
  "GHOST_RAMP",
  "GHOST_SMOOTHING",
  "LABEL_SMOOTHING",
  "LRsI",
  "LRsICallback",
  "PRESETS",
  "Ramp",
  "ToST",
  "export",
  "fold",
  "ghost_model",
  "is_bias",
  "label_smoothing_loss",
  "lift_mask",
  "lrsi",
  "lrsi_objective",
  "off_target_smoothed_cross_entropy",
  "preset",
  "scale_floors",
  "smoothed_targets",
  "supports_ghost_skips",
]
