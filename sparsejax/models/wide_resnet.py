"""Wide residual networks for CIFAR (Zagoruyko & Komodakis 2016).

WRN-d-k: depth ``d = 6n + 4``, width multiplier ``k``. A 3x3 stem conv with
16 channels, three groups of ``n`` pre-activation basic blocks with
``16k, 32k, 64k`` channels (strides 1, 2, 2), a final BatchNorm and
activation, global average pooling and one ``Dense`` classifier. A block is
``conv(act(bn(conv(act(bn(x)))))) + s(x)``; when the shape changes the
shortcut ``s`` is a 1x1 conv (no bias) of the pre-activated input
``act(bn(x))``, as in the reference code. Convs have no bias; BatchNorm,
initialisers and the injectable activation follow :mod:`sparsejax.models`.

``ghost_skips=True`` is ToST's ghost-skip variant (:mod:`sparsejax.tost`):
every block gets the two ghost paths of
:func:`sparsejax.models.resnet.ghost_path`, ``ghost_in`` (block input -> the
first conv's output, before its BatchNorm and activation) and ``ghost_out``
(first activation -> block output), scaled by the traced ``ghost_coef``.

The DST papers' models: WRN-22-2 (RigL's CIFAR-10 model, 1.1 M parameters)
and WRN-28-10 (Sup-tickets, 36.5 M). Dropout between the convs is optional
(``dropout``; 0 by default, as in RigL) and uses the ``'dropout'`` rng.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import activations
from sparsejax.models import scalars
from sparsejax.models.resnet import ghost_path

ModuleDef = Any


class WideBasicBlock(nn.Module):
  """Pre-activation basic block: ``[B, H, W, C_in] -> [B, H/s, W/s, filters]``.

  Attributes:
    filters: output channels.
    conv: the conv layer constructor (see
      :func:`sparsejax.models.activations.conv_and_norm`).
    norm: the normalisation layer constructor (same).
    act: activation ``act(x, coef)``.
    strides: stride of the first conv and of the projection shortcut.
    dropout: dropout rate between the two convs.
    train: dropout active (batch statistics are set through ``norm``).
    ghost: add ToST's two ghost paths, scaled by ``ghost_coef``.
    ghost_init: the constant of the ghost convs' kernels; default 1e-4.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: activations.Activation
  strides: int = 1
  dropout: float = 0.0
  train: bool = False
  ghost: bool = False
  ghost_init: float = 1e-4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act_coef = scalars.read(self, scalars.ACT_COEF)
    ghost_coef = scalars.read(self, scalars.GHOST_COEF)
    pre = self.act(self.norm()(x), act_coef)
    y = self.conv(self.filters, (3, 3), self.strides, padding=1)(pre)
    if self.ghost:
      y = y + ghost_path(self, "ghost_in", x, self.strides, ghost_coef)
    y = self.act(self.norm()(y), act_coef)
    first = y
    if self.dropout:
      y = nn.Dropout(self.dropout, deterministic=not self.train)(y)
    y = self.conv(self.filters, (3, 3), padding=1)(y)
    if self.ghost:
      y = y + ghost_path(self, "ghost_out", first, 1, ghost_coef)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = self.conv(self.filters, (1, 1), self.strides, padding=0, name="conv_proj")(pre)
    return x + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen`` for 32x32 inputs.

  Attributes:
    num_classes: number of output logits.
    depth: ``6n + 4`` (22, 28, ...); default 22.
    widen: width multiplier ``k``; default 2.
    dropout: dropout rate inside the blocks; default 0.
    act: activation ``act(x, coef)``; default ReLU.
    init_gain: He-normal gain of the kernels; default 2.0.
    dtype: computation dtype; default float32.
    ghost_skips: ToST's ghost-skip variant (see the module doc); default
      False.
    ghost_init: the constant of the ghost convs' kernels; default 1e-4.
  """

  num_classes: int
  depth: int = 22
  widen: int = 2
  dropout: float = 0.0
  act: activations.Activation = activations.relu
  init_gain: float = activations.HE_GAIN
  dtype: Any = jnp.float32
  ghost_skips: bool = False
  ghost_init: float = 1e-4

  @property
  def scalar_names(self) -> frozenset[str]:
    """The per-step scalars the model reads (:mod:`sparsejax.models.scalars`):
    ``act_coef`` when ``act`` reads its coefficient, ``ghost_coef`` with ``ghost_skips``."""
    return scalars.names(self.act, self.ghost_skips)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits ``[B, num_classes]`` (float32) of NHWC images ``x``; the scalar
    ``act_coef`` goes to every activation, ``ghost_coef`` (γ; ``None``: 1)
    scales the ghost paths when ``ghost_skips``
    (:mod:`sparsejax.models.scalars`)."""
    act_coef = scalars.read(self, scalars.ACT_COEF)
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
    n = (self.depth - 4) // 6
    conv, norm = activations.conv_and_norm(train, self.dtype, self.init_gain)
    x = conv(16, (3, 3), padding=1)(x)
    for i, width in enumerate((16, 32, 64)):
      for j in range(n):
        x = WideBasicBlock(
          width * self.widen,
          conv=conv,
          norm=norm,
          act=self.act,
          strides=2 if i > 0 and j == 0 else 1,
          dropout=self.dropout,
          train=train,
          ghost=self.ghost_skips,
          ghost_init=self.ghost_init,
        )(x)
    x = self.act(norm()(x), act_coef)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=activations.he_normal(self.init_gain)
    )(x)
    return jnp.asarray(x, jnp.float32)


WRN22_2 = functools.partial(WideResNet, depth=22, widen=2)
WRN28_10 = functools.partial(WideResNet, depth=28, widen=10)
