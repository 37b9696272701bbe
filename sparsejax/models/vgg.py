"""VGG-11/16/19 with batch norm, CIFAR variant (OpenLTH / Synaptic-Flow).

Each integer in the configuration is a 3x3 conv (no bias, padding 1) +
BatchNorm (``momentum=0.9``, ``epsilon=1e-5``) + activation with that many
channels; ``'M'`` is a 2x2 max-pool with stride 2. As in the OpenLTH reference
code the configurations omit the fifth max-pool of the ImageNet VGG: a 32x32
input reaches the head as a 2x2 map, which is global-average pooled and fed to a
single ``Dense`` classifier (no hidden fully-connected layers).

Kernels use He normal, ``N(0, 2 / fan_in)`` -- the dense initialiser gain 2.0,
see :func:`sparsejax.models.activations.he_normal`; biases are 0, BatchNorm scale 1 and bias 0.
The stem conv is the first kernel and the classifier the last kernel of
``variables['params']`` in dict iteration order.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import activations
from sparsejax.models import scalars

CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512,
    ),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}  # fmt: skip
"""The layer plans, conv channel counts and ``'M'`` for a 2x2 max-pool."""


class VGG(nn.Module):
  """VGG with batch norm, global average pooling and one linear classifier.

  Variables are ``{'params', 'batch_stats'}``; pass ``mutable=['batch_stats']``
  to ``apply`` when ``train=True``.

  Attributes:
    num_classes: number of output logits.
    config: layer plan, see :data:`sparsejax.models.vgg.CONFIGS`; default VGG-16.
    act: activation ``act(x, coef)``; default :func:`sparsejax.models.activations.relu`.
    init_gain: variance gain of the He-normal kernel initialiser
      ``N(0, init_gain / fan_in)``; default 2.0.
    dtype: computation dtype (parameters stay float32); default float32.
  """

  num_classes: int
  config: Sequence[int | str] = CONFIGS["vgg16"]
  act: activations.Activation = activations.relu
  init_gain: float = activations.HE_GAIN
  dtype: Any = jnp.float32

  @property
  def scalar_names(self) -> frozenset[str]:
    """The per-step scalars the model reads (:mod:`sparsejax.models.scalars`):
    ``act_coef`` when ``act`` reads its coefficient."""
    return scalars.names(self.act)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Computes logits.

    Args:
      x: images ``[B, H, W, C]`` (NHWC); H and W divisible by 16 when the plan
        has four max-pools, e.g. ``[B, 32, 32, 3]`` for CIFAR.
      train: use batch statistics in BatchNorm and update ``batch_stats``
        (otherwise use the running averages).

    Returns:
      Float32 logits ``[B, num_classes]``.
    """
    act_coef = scalars.read(self, scalars.ACT_COEF)
    conv, norm = activations.conv_and_norm(train, self.dtype, self.init_gain)
    for layer in self.config:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = norm()(conv(layer, (3, 3), padding=1)(x))
        x = self.act(x, act_coef)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
    )(x)
    return jnp.asarray(x, jnp.float32)


VGG11 = functools.partial(VGG, config=CONFIGS["vgg11"])
VGG16 = functools.partial(VGG, config=CONFIGS["vgg16"])
VGG19 = functools.partial(VGG, config=CONFIGS["vgg19"])
