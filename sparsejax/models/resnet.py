"""Residual networks for CIFAR: ResNet-20/32/56 (He et al. 2016) and ResNet-18.

Conventions follow the OpenLTH / Synaptic-Flow reference code:

* 3x3 convs have no bias and padding 1 (as in PyTorch), each followed by
  BatchNorm (``momentum=0.9``, ``epsilon=1e-5``, i.e. PyTorch's 0.1 / 1e-5).
* Basic blocks are post-activation: ``act(bn(conv(act(bn(conv(x))))) + s(x))``.
  The shortcut ``s`` is the identity, or a 1x1 conv (no bias) + BatchNorm when
  the stride or channel count changes.
* The head is global average pooling and one ``Dense`` classifier.
* ``ResNet(ghost_skips=True)`` is the ghost-skip variant of ToST (SPEC §7,
  :mod:`sparsejax.tost`): every basic block gets two extra dense paths, 1x1
  conv + BatchNorm (``ghost_in``: block input -> pre-activation of the first
  conv, same stride; ``ghost_out``: first activation -> block output), scaled
  by the traced ``ghost_coef`` γ. Their modules are named ``ghost_*`` (never
  prunable, see :func:`sparsejax.masks.is_ghost`) and the other params keep
  the names of the plain model, so :func:`sparsejax.tost.export` (drop the
  ``ghost_*`` entries) gives the plain model's variables; at γ = 0 both give
  identical logits.
* Kernels (convs and classifier) use He normal, ``N(0, 2 / fan_in)`` -- the
  dense initialiser gain 2.0, see :func:`sparsejax.models.activations.he_normal`; biases are 0,
  BatchNorm scale 1 and bias 0.

Parameters are created in forward order, so the first kernel of
``variables['params']`` (in dict iteration order) is the stem conv and the last
one is the classifier.
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

ModuleDef = Any


class BasicBlock(nn.Module):
  """Post-activation basic residual block: two 3x3 convs and a shortcut.

  Maps ``[B, H, W, C_in]`` to ``[B, ceil(H / strides), ceil(W / strides),
  filters]``.

  Attributes:
    filters: number of output channels.
    conv: ``nn.Conv`` constructor (bias-free, with the kernel initialiser set).
    norm: ``nn.BatchNorm`` constructor (with the train/eval mode set).
    act: activation ``act(x, coef)``.
    strides: stride of the first 3x3 conv and of the projection shortcut.
    ghost: add ToST's two ghost paths (:func:`sparsejax.models.resnet.ghost_path`), scaled by
      ``ghost_coef``; default False.
    ghost_init: the constant of the ghost convs' kernels; default 1e-4.
    mid_filters: output channels of the first 3x3 conv; default ``None``:
      ``filters`` (a shrunk model, :mod:`sparsejax.shrink`, sets it).
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: activations.Activation
  strides: int = 1
  ghost: bool = False
  ghost_init: float = 1e-4
  mid_filters: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act_coef = scalars.read(self, scalars.ACT_COEF)
    ghost_coef = scalars.read(self, scalars.GHOST_COEF)
    residual = x
    y = self.conv(self.mid_filters or self.filters, (3, 3), self.strides, padding=1)(x)
    y = self.norm()(y)
    if self.ghost:
      y = y + ghost_path(self, "ghost_in", x, self.strides, ghost_coef)
    y = self.act(y, act_coef)
    first = y
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    y = self.norm()(y)
    if self.ghost:
      y = y + ghost_path(self, "ghost_out", first, 1, ghost_coef)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, padding=0, name="conv_proj")(
        residual
      )
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y, act_coef)


def ghost_path(
  block: nn.Module, name: str, x: jax.Array, strides: int, coef: jax.Array | None
) -> jax.Array:
  """``coef * norm(conv1x1(x))``: one ghost skip path of ToST inside ``block``.

  A dense 1x1 conv (``block.filters`` outputs, stride ``strides``, no bias,
  every kernel entry ``block.ghost_init``) and a BatchNorm, created in
  ``block``'s scope as ``<name>_conv`` and ``<name>_norm``. ``coef`` (γ) is
  ``None`` (the path at full strength, γ = 1) or a scalar, possibly traced.
  Maps ``[B, H, W, C]`` to ``[B, H / strides, W / strides, block.filters]``.
  """
  conv = block.conv(
    block.filters,
    (1, 1),
    strides,
    padding=0,
    kernel_init=nn.initializers.constant(block.ghost_init),
    name=f"{name}_conv",
  )
  y = block.norm(name=f"{name}_norm")(conv(x))
  return y if coef is None else jnp.asarray(coef, y.dtype) * y


class ResNet(nn.Module):
  """ResNet of basic blocks with a 3x3 stem and no max-pool (CIFAR variant).

  Stage ``i`` (0-based) has ``stage_sizes[i]`` basic blocks with
  ``num_filters * width * 2**i`` channels; every stage but the first halves the
  resolution in its first block. ``stage_sizes=(n, n, n), num_filters=16`` is
  the CIFAR ResNet-(6n+2) of He et al. (2016); ``stage_sizes=(2, 2, 2, 2),
  num_filters=64`` is the CIFAR ResNet-18.

  Variables are ``{'params', 'batch_stats'}``; pass ``mutable=['batch_stats']``
  to ``apply`` when ``train=True``.

  Attributes:
    num_classes: number of output logits.
    stage_sizes: number of basic blocks per stage; default ``(3, 3, 3)``
      (ResNet-20).
    num_filters: channels of the stem and the first stage, before ``width``;
      default 16.
    width: channel multiplier of every layer but the classifier; default 1.
    act: activation ``act(x, coef)``; default :func:`sparsejax.models.activations.relu`.
    init_gain: variance gain of the He-normal kernel initialiser
      ``N(0, init_gain / fan_in)``; default 2.0.
    dtype: computation dtype (parameters stay float32); default float32.
    ghost_skips: ToST's ghost-skip variant (see the module doc); default
      False.
    ghost_init: the constant of the ghost convs' kernels; default 1e-4.
    stage_channels: explicit channels of each stage's residual stream (the
      stem writes stage 0's), overriding ``num_filters * width * 2**i``;
      default ``None``. Set by :func:`sparsejax.shrink.shrink`.
    block_channels: explicit output channels of the first conv of every
      basic block, in order; default ``None`` (the stage's channels). Set by
      :func:`sparsejax.shrink.shrink`.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  num_filters: int = 16
  width: int = 1
  act: activations.Activation = activations.relu
  init_gain: float = activations.HE_GAIN
  dtype: Any = jnp.float32
  ghost_skips: bool = False
  ghost_init: float = 1e-4
  stage_channels: Sequence[int] | None = None
  block_channels: Sequence[int] | None = None

  @property
  def scalar_names(self) -> frozenset[str]:
    """The per-step scalars the model reads (:mod:`sparsejax.models.scalars`):
    ``act_coef`` when ``act`` reads its coefficient, ``ghost_coef`` with ``ghost_skips``."""
    return scalars.names(self.act, self.ghost_skips)

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
    stages = self.stage_channels or [
      self.num_filters * self.width * 2**i for i in range(len(self.stage_sizes))
    ]
    mids = list(self.block_channels or [None] * sum(self.stage_sizes))

    x = conv(stages[0], (3, 3), padding=1)(x)
    x = norm()(x)
    x = self.act(x, act_coef)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(
          stages[i],
          conv=conv,
          norm=norm,
          act=self.act,
          strides=strides,
          ghost=self.ghost_skips,
          ghost_init=self.ghost_init,
          mid_filters=mids.pop(0),
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
    )(x)
    return jnp.asarray(x, jnp.float32)


class Bottleneck(nn.Module):
  """Post-activation bottleneck block (1x1, 3x3, 1x1 convs, expansion 4).

  Maps ``[B, H, W, C_in]`` to ``[B, H / strides, W / strides, 4 * filters]``:
  ``act(bn(conv1x1(act(bn(conv3x3(act(bn(conv1x1(x))))))) + s(x))``, the
  stride on the 3x3 conv; ``s`` is the identity or a 1x1 conv + BatchNorm.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: activations.Activation
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act_coef = scalars.read(self, scalars.ACT_COEF)
    y = self.act(self.norm()(self.conv(self.filters, (1, 1), padding=0)(x)), act_coef)
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(y)
    y = self.act(self.norm()(y), act_coef)
    y = self.norm()(self.conv(4 * self.filters, (1, 1), padding=0)(y))
    if x.shape != y.shape:
      x = self.conv(4 * self.filters, (1, 1), self.strides, padding=0, name="conv_proj")(x)
      x = self.norm(name="norm_proj")(x)
    return self.act(x + y, act_coef)


class ResNet50(nn.Module):
  """CIFAR ResNet-50: a 3x3 stem (64 channels, no max-pool) and bottleneck
  stages of 3, 4, 6, 3 blocks with 64-512 (x4) channels; the model of GraNet
  and Sup-tickets on CIFAR. Fields as :class:`ResNet` (``width`` multiplies
  every channel count)."""

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 1
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
    """Float32 logits ``[B, num_classes]`` of NHWC images ``x``."""
    act_coef = scalars.read(self, scalars.ACT_COEF)
    conv, norm = activations.conv_and_norm(train, self.dtype, self.init_gain)
    x = self.act(norm()(conv(64 * self.width, (3, 3), padding=1)(x)), act_coef)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = Bottleneck(
          64 * self.width * 2**i,
          conv=conv,
          norm=norm,
          act=self.act,
          strides=2 if i > 0 and j == 0 else 1,
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
    )(x)
    return jnp.asarray(x, jnp.float32)


ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), num_filters=16)
ResNet32 = functools.partial(ResNet, stage_sizes=(5, 5, 5), num_filters=16)
ResNet56 = functools.partial(ResNet, stage_sizes=(9, 9, 9), num_filters=16)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), num_filters=64)
