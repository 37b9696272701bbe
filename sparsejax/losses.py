"""Losses: the one softmax cross-entropy used by training, evaluation and scoring.

A training loss of :func:`sparsejax.train.fit` has the signature
``loss_fn(logits, labels, scalars) -> per-example loss``: ``logits``
``[B, C]``, integer ``labels`` ``[B]``, ``scalars`` the dict of per-step scalar
values (traced ``float32``, see ``fit(scalars=...)``); the train step takes
the mean. :func:`smoothed_cross_entropy` is the default one.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

#: ``loss_fn(logits [B, C], labels [B], scalars) -> per-example loss [B]``.
LossFn = Callable[[jax.Array, jax.Array, Mapping[str, jax.Array]], jax.Array]


def cross_entropy(
  logits: jax.Array, labels: jax.Array, label_smoothing: float | jax.Array = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing.

  Computed in (at least) ``float32``: ``optax.softmax_cross_entropy`` against
  ``one_hot(labels)`` smoothed with ``optax.smooth_labels`` (skipped when
  ``label_smoothing`` is the Python number 0).

  Args:
    logits: ``[..., C]``.
    labels: integer class indices ``[...]``.
    label_smoothing: the smoothing factor α (a float or a traced scalar):
      targets ``(1 - α) one_hot + α / C``. Default 0.

  Returns:
    The loss of each example, ``[...]``.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
    one_hot = optax.smooth_labels(one_hot, label_smoothing)
  return optax.softmax_cross_entropy(logits, one_hot)


def smoothed_cross_entropy(label_smoothing: float = 0.0) -> LossFn:
  """The default training loss of :func:`sparsejax.train.fit`.

  ``loss_fn(logits, labels, scalars)`` is :func:`cross_entropy` with the
  smoothing factor ``scalars["label_smoothing"]`` when that per-step scalar is
  given (a schedule α(t)), else the constant ``label_smoothing``.
  """
  label_smoothing = float(label_smoothing)

  def loss_fn(logits, labels, scalars):
    return cross_entropy(logits, labels, scalars.get("label_smoothing", label_smoothing))

  return loss_fn
