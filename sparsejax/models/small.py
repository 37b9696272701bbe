"""Small models for MNIST-scale studies: LeNet-5 and a multi-layer perceptron.

Both use biases and no normalisation, so their variables are ``{'params'}``
only. Kernels of all layers use He normal, ``N(0, 2 / fan_in)`` -- the dense
initialiser gain 2.0, see :func:`sparsejax.models.activations.he_normal`; biases are 0. The first
layer is the first kernel and the classifier the last kernel of
``variables['params']`` in dict iteration order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import activations
from sparsejax.models import scalars


class LeNet5(nn.Module):
  """LeNet-5: two 5x5 conv + max-pool stages and three dense layers.

  Layers: conv 6 -> pool -> conv 16 -> pool -> dense 120 -> dense 84 -> dense
  ``num_classes``, with the activation after every layer but the last. Convs use
  ``'SAME'`` padding and pools are 2x2 with stride 2, so any input of at least
  4x4 works; the first dense layer has ``16 * ceil(H / 4) * ceil(W / 4)``
  inputs (784 for 28x28 MNIST, 1024 for 32x32 CIFAR).

  Attributes:
    num_classes: number of output logits.
    act: activation ``act(x, coef)``; default :func:`sparsejax.models.activations.relu`.
    init_gain: variance gain of the He-normal kernel initialiser
      ``N(0, init_gain / fan_in)``; default 2.0.
    dtype: computation dtype (parameters stay float32); default float32.
    width: multiplier of the widths of every layer but the classifier
      (``max(1, round(width * n))`` for ``n`` in 6, 16, 120, 84); may be
      fractional, e.g. for a small dense network with as many weights as a
      sparse LeNet-5; default 1.
  """

  num_classes: int
  act: activations.Activation = activations.relu
  init_gain: float = activations.HE_GAIN
  dtype: Any = jnp.float32
  width: float = 1.0

  @property
  def scalar_names(self) -> frozenset[str]:
    """The per-step scalars the model reads (:mod:`sparsejax.models.scalars`):
    ``act_coef`` when ``act`` reads its coefficient."""
    return scalars.names(self.act)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: images ``[B, H, W, C]`` (NHWC), e.g. ``[B, 28, 28, 1]``.
      train: unused (no dropout or normalisation); kept for a uniform API.

    Returns:
      Float32 logits ``[B, num_classes]``.
    """
    act_coef = scalars.read(self, scalars.ACT_COEF)
    del train
    kernel_init = activations.he_normal(self.init_gain)
    scaled = lambda n: max(1, round(self.width * n))
    for features in map(scaled, (6, 16)):
      x = nn.Conv(features, (5, 5), padding="SAME", dtype=self.dtype, kernel_init=kernel_init)(x)
      x = self.act(x, act_coef)
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    for features in map(scaled, (120, 84)):
      x = nn.Dense(features, dtype=self.dtype, kernel_init=kernel_init)(x)
      x = self.act(x, act_coef)
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init)(x)
    return jnp.asarray(x, jnp.float32)


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs (LeNet-300-100 by default).

  Attributes:
    num_classes: number of output logits.
    hidden: widths of the hidden dense layers; default ``(300, 100)``.
    act: activation ``act(x, coef)`` after every hidden layer; default
      :func:`sparsejax.models.activations.relu`.
    init_gain: variance gain of the He-normal kernel initialiser
      ``N(0, init_gain / fan_in)``; default 2.0 (used by ``initializer="he"``).
    dtype: computation dtype (parameters stay float32); default float32.
    residual: every hidden layer whose input and output widths agree adds its
      input, ``x + act(Dense(x))`` (a residual MLP); default False.
    initializer: ``"he"`` (default: He-normal kernels with ``init_gain``, zero
      biases) or ``"pytorch"`` (``torch.nn.Linear``'s default: kernel and
      bias uniform in ``±1 / sqrt(fan_in)``, i.e. variance gain 1/3).
  """

  num_classes: int
  hidden: Sequence[int] = (300, 100)
  act: activations.Activation = activations.relu
  init_gain: float = activations.HE_GAIN
  dtype: Any = jnp.float32
  residual: bool = False
  initializer: str = "he"

  @property
  def scalar_names(self) -> frozenset[str]:
    """The per-step scalars the model reads (:mod:`sparsejax.models.scalars`):
    ``act_coef`` when ``act`` reads its coefficient."""
    return scalars.names(self.act)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: inputs ``[B, ...]``, flattened to ``[B, D]`` (e.g. ``[B, 28, 28, 1]``
        gives D = 784).
      train: unused (no dropout or normalisation); kept for a uniform API.

    Returns:
      Float32 logits ``[B, num_classes]``.

    Raises:
      ValueError: ``initializer`` is neither ``"he"`` nor ``"pytorch"``.
    """
    act_coef = scalars.read(self, scalars.ACT_COEF)
    del train
    if self.initializer not in MLP_INITS:
      raise ValueError(f"MLP.initializer must be one of {MLP_INITS}, got {self.initializer!r}")
    x = x.reshape((x.shape[0], -1))

    def dense(features, h):
      if self.initializer == "he":
        layer = nn.Dense(
          features, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
        )
      else:
        bound = 1.0 / max(1, h.shape[-1]) ** 0.5
        layer = nn.Dense(
          features,
          dtype=self.dtype,
          kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
          bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound
          ),
        )
      return layer(h)

    for features in self.hidden:
      h = self.act(dense(features, x), act_coef)
      x = x + h if self.residual and x.shape[-1] == features else h
    x = dense(self.num_classes, x)
    return jnp.asarray(x, jnp.float32)


#: ``MLP.initializer`` values.
MLP_INITS = ("he", "pytorch")
