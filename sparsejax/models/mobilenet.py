"""MobileNetV2 (Sandler et al. 2018), CIFAR variant of kuangliu/pytorch-cifar.

Differences from the ImageNet network, all as in the common CIFAR port:

* the stem is a 3x3 conv with 32 channels and stride 1, and the second group of
  the inverted-residual table has stride 1 instead of 2, so a 32x32 input
  reaches the head at 4x4;
* every block has its 1x1 expansion conv (also when the expansion is 1);
* a stride-1 block whose channel count changes adds a 1x1 conv + BatchNorm
  projection shortcut (stride-2 blocks have no shortcut);
* the head is a 1x1 conv to 1280 channels + BatchNorm + activation, global
  average pooling and one ``Dense`` classifier.

Convs have no bias and are followed by BatchNorm (``momentum=0.9``,
``epsilon=1e-5``); the activation defaults to ReLU (the CIFAR port's choice)
and is not applied after the projection of a block (linear bottleneck).
Kernels use He normal, ``N(0, 2 / fan_in)`` -- the dense initialiser gain 2.0,
see :func:`sparsejax.models.activations.he_normal` (a depthwise 3x3 kernel has fan-in 9);
biases are 0, BatchNorm scale 1 and bias 0. The stem conv is the first kernel
and the classifier the last kernel of ``variables['params']`` in dict iteration
order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import activations
from sparsejax.models import scalars

ModuleDef = Any

CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
  (1, 16, 1, 1),
  (6, 24, 2, 1),  # Stride 2 in the ImageNet network.
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)
"""The inverted-residual table, rows (expansion t, channels c, blocks n, first stride s)."""


class InvertedResidual(nn.Module):
  """Inverted residual block: 1x1 expand, 3x3 depthwise, linear 1x1 project.

  Maps ``[B, H, W, C_in]`` to ``[B, ceil(H / strides), ceil(W / strides),
  filters]`` through ``expansion * C_in`` hidden channels.

  Attributes:
    filters: number of output channels.
    expansion: hidden-channel multiplier ``t``.
    conv: ``nn.Conv`` constructor (bias-free, with the kernel initialiser set).
    norm: ``nn.BatchNorm`` constructor (with the train/eval mode set).
    act: activation ``act(x, coef)``.
    strides: stride of the depthwise conv; a residual connection is added only
      when it is 1.
  """

  filters: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef
  act: activations.Activation
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act_coef = scalars.read(self, scalars.ACT_COEF)
    hidden = self.expansion * x.shape[-1]
    y = self.conv(hidden, (1, 1), padding=0)(x)
    y = self.norm()(y)
    y = self.act(y, act_coef)
    y = self.conv(hidden, (3, 3), self.strides, padding=1, feature_group_count=hidden)(y)
    y = self.norm()(y)
    y = self.act(y, act_coef)
    y = self.conv(self.filters, (1, 1), padding=0)(y)
    y = self.norm()(y)
    if self.strides != 1:
      return y
    residual = x
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), padding=0, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return y + residual


class MobileNetV2(nn.Module):
  """MobileNetV2 for small (e.g. 32x32) images.

  Variables are ``{'params', 'batch_stats'}``; pass ``mutable=['batch_stats']``
  to ``apply`` when ``train=True``.

  Attributes:
    num_classes: number of output logits.
    config: inverted-residual table, see :data:`sparsejax.models.mobilenet.CIFAR_CONFIG`.
    stem_filters: channels of the 3x3 stem conv; default 32.
    stem_strides: stride of the stem conv; default 1 (2 in the ImageNet net).
    head_filters: channels of the final 1x1 conv; default 1280.
    act: activation ``act(x, coef)``; default :func:`sparsejax.models.activations.relu`.
    init_gain: variance gain of the He-normal kernel initialiser
      ``N(0, init_gain / fan_in)``; default 2.0.
    dtype: computation dtype (parameters stay float32); default float32.
  """

  num_classes: int
  config: Sequence[tuple[int, int, int, int]] = CIFAR_CONFIG
  stem_filters: int = 32
  stem_strides: int = 1
  head_filters: int = 1280
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
      x: images ``[B, H, W, C]`` (NHWC), e.g. ``[B, 32, 32, 3]`` for CIFAR.
      train: use batch statistics in BatchNorm and update ``batch_stats``
        (otherwise use the running averages).

    Returns:
      Float32 logits ``[B, num_classes]``.
    """
    act_coef = scalars.read(self, scalars.ACT_COEF)
    conv, norm = activations.conv_and_norm(train, self.dtype, self.init_gain)

    x = conv(self.stem_filters, (3, 3), self.stem_strides, padding=1)(x)
    x = norm()(x)
    x = self.act(x, act_coef)
    for expansion, filters, num_blocks, first_strides in self.config:
      for j in range(num_blocks):
        x = InvertedResidual(
          filters,
          expansion,
          conv=conv,
          norm=norm,
          act=self.act,
          strides=first_strides if j == 0 else 1,
        )(x)
    x = conv(self.head_filters, (1, 1), padding=0)(x)
    x = norm()(x)
    x = self.act(x, act_coef)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
    )(x)
    return jnp.asarray(x, jnp.float32)
