"""Applying a model: the one closure of training, evaluation and scoring.

Every part of the library that runs a model (the train and eval steps, ToST's
LRsI, gradient flow, batch-statistics recomputation, the scores' linen
models) calls :func:`apply_model` or :func:`loss_and_logits`; nothing else
calls ``model.apply`` with per-step scalars. Three things happen here, once:

* **Model state.** Every collection of the variables but ``'params'`` (and
  ``'scalars'``) is model state, e.g. ``'batch_stats'``: mutable and returned
  updated in training mode, read only in eval mode.
* **Scalars.** Per-step scalars (ToST's ``act_coef`` β and ``ghost_coef`` γ)
  reach the model explicitly, in the ``'scalars'`` collection
  (:mod:`sparsejax.models.scalars`). A model declares the names it reads in
  its ``scalar_names`` property; a scalar it does not declare is a
  ``ValueError`` naming those it does.
* **The CPU fast path.** The model is traced inside
  ``sparsejax._xla_cpu.fast_path()``: on CPU the models' convolutions get a
  materialised input and their training-mode batch norm GEMV statistics
  (XLA's defaults are several times slower there); GPU and TPU lower the
  plain program. It is on by default, without any flag; a program that
  differentiates twice is traced inside :func:`second_order`, a loop body
  with convolutions is wrapped by :func:`loop_body`.

Example (shapes only, by ``jax.eval_shape``)::

  >>> import jax, jax.numpy as jnp
  >>> from sparsejax import modeling, models
  >>> from sparsejax.models import activations
  >>> model = models.get("mlp", 10, hidden=(8,), act=activations.blend())
  >>> sorted(model.scalar_names)
  ['act_coef']
  >>> x = jnp.zeros((2, 4, 4, 1))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> logits, state = jax.eval_shape(
  ...     lambda v: modeling.apply_model(model, v, x, train=True,
  ...                                    scalars={"act_coef": 0.5}), variables)
  >>> logits.shape, state
  ((2, 10), {})
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax import _xla_cpu
from sparsejax.models import scalars as scalars_lib

PyTree = Any

#: ``loss_fn(logits, labels, scalars) -> per-example loss`` (as :data:`sparsejax.losses.LossFn`).
LossFn = Callable[[jax.Array, jax.Array, Mapping[str, Any]], jax.Array]

#: The collections of a model's variables that are not model state.
_NOT_STATE = ("params", scalars_lib.COLLECTION)


def scalar_names(model: nn.Module) -> frozenset[str]:
  """The per-step scalars ``model`` reads: its ``scalar_names`` property, or
  none for a model without one.

  Example:

    >>> from sparsejax import modeling, models, tost
    >>> sorted(modeling.scalar_names(tost.ghost_model("resnet20", 10)))
    ['ghost_coef']
  """
  return frozenset(getattr(model, "scalar_names", ()))


def model_scalars(model: nn.Module, scalars: Mapping[str, Any] | None) -> dict[str, Any]:
  """The entries of ``scalars`` that ``model`` reads (:func:`scalar_names`);
  the others (e.g. a loss's) are left out, not refused."""
  names = scalar_names(model)
  return {k: v for k, v in dict(scalars or {}).items() if k in names}


def check_scalars(model: nn.Module, names) -> None:
  """Raises ``ValueError`` unless ``model`` reads every scalar in ``names``.

  Example:

    >>> from sparsejax import modeling, models
    >>> modeling.check_scalars(models.get("mlp", 10), ["act_coef"])
    Traceback (most recent call last):
    ...
    ValueError: the model MLP reads no scalar 'act_coef'; it reads: none ...
  """
  known = scalar_names(model)
  unknown = sorted(set(names) - known)
  if unknown:
    reads = ", ".join(sorted(known)) or "none"
    raise ValueError(
      f"the model {type(model).__name__} reads no scalar "
      f"{', '.join(map(repr, unknown))}; it reads: {reads} (its scalar_names; "
      "act_coef needs an activation that reads its coefficient, e.g. "
      "activations.blend(); ghost_coef needs ghost_skips=True)"
    )


def apply_model(
  model: nn.Module,
  variables: Mapping[str, PyTree],
  x: jax.Array,
  *,
  train: bool,
  scalars: Mapping[str, Any] | None = None,
  rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict]:
  """``model.apply`` with the model state, the scalars and the CPU fast path.

  Every collection of ``variables`` but ``'params'`` (e.g. ``'batch_stats'``)
  is model state. In training mode it is mutable and the updated state is
  returned (batch norm normalises with the batch's statistics and updates its
  running averages); in eval mode it is read only and returned unchanged.
  Models without state are called without ``mutable``.

  Args:
    model: a linen module whose ``__call__`` takes ``(x, train=...)``.
    variables: ``{'params': ..., 'batch_stats'?: ...}``.
    x: the input batch, e.g. ``[B, H, W, C]``.
    train: training mode.
    scalars: per-step scalars ``{name: value}`` (floats or traced scalars),
      each one the model reads (``model.scalar_names``), e.g.
      ``{"act_coef": beta}``; fed in the ``'scalars'`` collection.
    rngs: PRNG keys by name, e.g. ``{"dropout": key}``.

  Returns:
    ``(logits, state)``: the model's output and the (updated) model state,
    ``{}`` for a model without state.

  Raises:
    ValueError: a scalar the model does not read.
  """
  scalars = dict(scalars or {})
  check_scalars(model, scalars)
  state = {k: v for k, v in variables.items() if k not in _NOT_STATE}
  feed = {k: v for k, v in variables.items() if k != scalars_lib.COLLECTION}
  if scalars:
    feed[scalars_lib.COLLECTION] = scalars
  with _xla_cpu.fast_path():
    if train and state:
      logits, updates = model.apply(feed, x, train=True, mutable=list(state), rngs=rngs)
      return logits, dict(updates)
    return model.apply(feed, x, train=train, rngs=rngs), state


def loss_and_logits(
  model: nn.Module,
  params: PyTree,
  model_state: Mapping[str, PyTree] | None,
  x: jax.Array,
  y: jax.Array,
  loss_fn: LossFn,
  *,
  scalars: Mapping[str, Any] | None = None,
  loss_scalars: Mapping[str, Any] | None = None,
  rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, dict]]:
  """The mean training loss of ``model`` on ``(x, y)``, differentiable in ``params``.

  The model runs in training mode (:func:`apply_model`) with the entries of
  ``scalars`` it reads (:func:`model_scalars`); the loss is
  ``mean(loss_fn(logits, y, loss_scalars))``. Use as
  ``jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)``.

  Args:
    model: the linen module.
    params: its params.
    model_state: the other collections, e.g. ``{'batch_stats': ...}`` (``{}``
      or ``None`` without).
    x, y: the inputs and the labels.
    loss_fn: ``loss_fn(logits, labels, scalars) -> per-example loss``.
    scalars: per-step scalars ``{name: value}``; the model gets those it
      reads, the loss all of them.
    loss_scalars: what the loss gets instead of ``scalars`` (e.g. a view that
      records the names the loss reads); default ``scalars``.
    rngs: PRNG keys by name, e.g. ``{"dropout": key}``.

  Returns:
    ``(loss, (logits, new_model_state))``.
  """
  scalars = dict(scalars or {})
  variables = {"params": params, **(model_state or {})}
  logits, new_state = apply_model(
    model, variables, x, train=True, scalars=model_scalars(model, scalars), rngs=rngs
  )
  loss = jnp.mean(loss_fn(logits, y, scalars if loss_scalars is None else loss_scalars))
  return loss, (logits, new_state)


def second_order() -> contextlib.AbstractContextManager:
  """A context for tracing a program that differentiates twice (GraSP, LRsI).

  Inside it (in this thread), :func:`apply_model` traces the plain model,
  without the CPU rewrites, whose branches autodiff would multiply (LRsI's
  objective on a ghost ResNet-20 traced in 36 s instead of 121 s). Call the
  jitted function inside it so that its trace happens there; a function
  already traced outside at the same shapes keeps that trace (JAX's jit cache
  does not know about the context). Values are the same up to float rounding.
  """
  return _xla_cpu.plain_ops()


def loop_body(fn: Callable) -> Callable:
  """``fn`` for the body of a ``lax`` loop (``scan``, ``fori_loop``).

  On CPU every convolution ``fn`` traces (those of its gradients included)
  gets XLA:CPU's canonical layout, which XLA only gives to convolutions
  outside loops (``sparsejax/_conv_layout.py``; 3-5x on SynFlow's rounds).
  Meant for functions that are already differentiated (a score): their
  ``custom_vjp`` rules are not kept. Other platforms run ``fn`` as it is.
  """
  return _xla_cpu.canonical_convs(fn)


__all__ = [
  "LossFn",
  "apply_model",
  "check_scalars",
  "loop_body",
  "loss_and_logits",
  "model_scalars",
  "scalar_names",
  "second_order",
]
