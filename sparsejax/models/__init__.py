"""Flax linen models for sparse training, and a registry by name.

All models share the call signature ``model.apply(variables, x, train=False)``
with NHWC float inputs ``x`` and return float32 logits ``[B, num_classes]``.
Models with BatchNorm have variables ``{'params', 'batch_stats'}`` (apply with
``mutable=['batch_stats']`` when ``train=True``, or use
:func:`sparsejax.modeling.apply_model`, which does it for any model); LeNet-5
and the MLP have ``{'params'}`` only. Every model has an injectable
activation ``act(x, coef)`` (see :mod:`sparsejax.models.activations`), a
``dtype`` for the computation and He-normal kernels (dense initialiser gain
2.0). Per-step scalars (``act_coef``, ``ghost_coef``) are read from the
``'scalars'`` collection and declared in ``model.scalar_names``
(:mod:`sparsejax.models.scalars`). Parameters are created in forward order: the first kernel of
``variables['params']`` in dict iteration order is the first layer and the last
one is the classifier.

Example (shapes only, by ``jax.eval_shape``: no FLOPs, no memory)::

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from sparsejax import models
  >>> model = models.get("resnet20", num_classes=10)
  >>> x = jnp.zeros((1, 32, 32, 3))
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> variables["params"]["Conv_0"]["kernel"].shape  # the stem conv
  (3, 3, 3, 16)
  >>> jax.eval_shape(model.apply, variables, x).shape  # logits
  (1, 10)

A training step updates the batch-norm statistics::

  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  logits, state = modeling.apply_model(model, variables, x, train=True)  # the same
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from sparsejax.models import activations
from sparsejax.models import scalars
from sparsejax.models.mobilenet import InvertedResidual
from sparsejax.models.mobilenet import MobileNetV2
from sparsejax.models.resnet import BasicBlock
from sparsejax.models.resnet import Bottleneck
from sparsejax.models.resnet import ResNet
from sparsejax.models.resnet import ResNet18
from sparsejax.models.resnet import ResNet20
from sparsejax.models.resnet import ResNet32
from sparsejax.models.resnet import ResNet50
from sparsejax.models.resnet import ResNet56
from sparsejax.models.small import MLP
from sparsejax.models.small import LeNet5
from sparsejax.models.vgg import VGG
from sparsejax.models.vgg import VGG11
from sparsejax.models.vgg import VGG16
from sparsejax.models.vgg import VGG19
from sparsejax.models.wide_resnet import WRN22_2
from sparsejax.models.wide_resnet import WRN28_10
from sparsejax.models.wide_resnet import WideBasicBlock
from sparsejax.models.wide_resnet import WideResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
  "resnet20": ResNet20,
  "resnet32": ResNet32,
  "resnet56": ResNet56,
  "resnet18": ResNet18,
  "resnet50": ResNet50,
  "wrn22_2": WRN22_2,
  "wrn28_10": WRN28_10,
  "vgg11": VGG11,
  "vgg16": VGG16,
  "vgg19": VGG19,
  "mobilenetv2": MobileNetV2,
  "lenet5": LeNet5,
  "mlp": MLP,
}


def names() -> list[str]:
  """Returns the registered model names, in registration order."""
  return list(_REGISTRY)


def get(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of :func:`names`: ``resnet20``, ``resnet32``, ``resnet56``,
      ``resnet18``, ``resnet50`` (CIFAR, bottlenecks), ``wrn22_2``,
      ``wrn28_10`` (Wide ResNets, any ``depth``/``widen``), ``vgg11``,
      ``vgg16``, ``vgg19``, ``mobilenetv2``, ``lenet5``, ``mlp``.
    num_classes: number of output logits.
    **kwargs: further fields of the model class, e.g. ``width=2`` (ResNets),
      ``hidden=(300, 100)`` (MLP), ``act=activations.blend()``,
      ``dtype=jnp.bfloat16``, ``init_gain=2.0``.

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: if ``name`` is not registered.
  """
  try:
    constructor = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown model {name!r}; valid names are: {', '.join(_REGISTRY)}.") from None
  return constructor(num_classes=num_classes, **kwargs)


def params_in_creation_order(
  model: nn.Module, *args: Any, **kwargs: Any
) -> list[tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
  """Lists the ``'params'`` leaves of ``model`` in the order they are created.

  Flax creates parameters in forward order, and an eager ``model.init`` returns
  nested dicts in that insertion order. Any JAX transformation of the params
  (``jax.jit(model.init)``, ``jax.eval_shape``, ``jax.tree.map``, optimiser
  updates, checkpoint restores) rebuilds the dicts with *sorted* keys instead,
  where e.g. ``'BasicBlock_0'`` precedes the stem ``'Conv_0'``. This function
  recovers the creation order abstractly (no FLOPs, no memory for the params),
  e.g. to find the first layer and the classifier.

  Args:
    model: an unbound Flax module.
    *args: example inputs of ``model.init`` after the rng, e.g. a batch ``x``
      of shape ``[B, H, W, C]`` (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: keyword arguments of ``model.init``.

  Returns:
    ``(path, shape_dtype)`` for every leaf of ``variables['params']``, where
    ``path`` is the tuple of nested dict keys, in creation order.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import models
    >>> model = models.get("resnet20", num_classes=10)
    >>> leaves = models.params_in_creation_order(model, jnp.zeros((1, 32, 32, 3)))
    >>> kernels = [path for path, s in leaves if s.ndim > 1]
    >>> kernels[0], kernels[-1]  # the first layer and the classifier
    (('Conv_0', 'kernel'), ('Dense_0', 'kernel'))
  """
  order = []

  def walk(tree: Any, path: tuple[str, ...]) -> None:
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, path + (key,))
      else:
        order.append((path + (key,), jax.ShapeDtypeStruct(value.shape, value.dtype)))

  def init(rng: jax.Array, *args: Any) -> None:
    walk(model.init(rng, *args, **kwargs)["params"], ())

  jax.eval_shape(init, jax.random.key(0), *args)
  return order


def layer_order(model: nn.Module, *args: Any, **kwargs: Any) -> tuple[str, ...]:
  """Paths (``"a/b/kernel"``) of the ``'params'`` leaves in creation order.

  The ``order`` argument of :class:`sparsejax.masks.Prunable`, which decides
  the "first layer" and the "classifier" of the keep-dense presets.

  Arguments as for :func:`params_in_creation_order`.

  Example:

    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> from sparsejax import masks, models
    >>> model = models.get("resnet20", num_classes=10)
    >>> order = models.layer_order(model, jnp.zeros((1, 32, 32, 3)))
    >>> order[0], order[-2]
    ('Conv_0/kernel', 'Dense_0/kernel')
    >>> prunable = dataclasses.replace(masks.KEEP_FIRST_AND_CLASSIFIER_DENSE,
    ...                                order=order)
  """
  return tuple("/".join(path) for path, _ in params_in_creation_order(model, *args, **kwargs))


__all__ = [
  "layer_order",
  "BasicBlock",
  "Bottleneck",
  "InvertedResidual",
  "LeNet5",
  "MLP",
  "MobileNetV2",
  "ResNet",
  "ResNet18",
  "ResNet20",
  "ResNet32",
  "ResNet50",
  "ResNet56",
  "VGG",
  "VGG11",
  "VGG16",
  "VGG19",
  "WRN22_2",
  "WRN28_10",
  "WideBasicBlock",
  "WideResNet",
  "activations",
  "get",
  "names",
  "params_in_creation_order",
  "scalars",
]
