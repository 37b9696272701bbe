"""Injectable activations and the matching weight initialiser.

Every model in :mod:`sparsejax.models` takes an ``act`` field: a callable
``act(x, coef) -> y`` applied element-wise after each normalisation (or hidden
dense) layer. ``coef`` is the model's per-step scalar ``act_coef``
(:mod:`sparsejax.models.scalars`), ``None`` when it is not fed, or a scalar
(possibly traced) array, so an activation whose shape changes during training
-- e.g. the ghost soft neurons of ToST, ``(1 - beta) * relu(x) + beta *
swish(x)`` with ``beta`` annealed to 0 -- never triggers recompilation. An
activation that reads ``coef`` says so (a true ``reads_coef`` attribute, as
:func:`blend` sets): the model then declares ``act_coef`` in its
``scalar_names`` and accepts it::

  model = models.get("resnet20", num_classes=10, act=activations.blend())
  logits, _ = modeling.apply_model(model, variables, x, train=False,
                                   scalars={"act_coef": beta})  # traced beta

The weight initialiser of all models is He normal,
``N(0, HE_GAIN / fan_in)`` with ``HE_GAIN = 2.0`` (the "dense initialiser
gain"), the variance-preserving choice for ReLU networks.
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import norm as norm_lib

Array = jax.Array
Activation = Callable[[Array, Array | None], Array]
"""An activation ``act(x, coef) -> y``; ``coef`` is ``None`` or a scalar."""

HE_GAIN = 2.0
"""The variance gain of the models' dense initialiser, ``Var[w] = HE_GAIN / fan_in``."""


def he_normal(gain: float = HE_GAIN) -> nn.initializers.Initializer:
  """Returns the kernel initialiser ``N(0, gain / fan_in)`` (not truncated).

  For a conv kernel of shape ``[kh, kw, c_in / groups, c_out]`` the fan-in is
  ``kh * kw * c_in / groups``; for a dense kernel ``[d_in, d_out]`` it is
  ``d_in``.

  Args:
    gain: variance gain; the default 2.0 is He (Kaiming) normal.

  Returns:
    A Flax/JAX initialiser ``init(key, shape, dtype) -> Array``.
  """
  return nn.initializers.variance_scaling(gain, "fan_in", "normal")


def relu(x: Array, coef: Array | None = None) -> Array:
  """Rectified linear unit ``max(x, 0)``; ``coef`` is ignored."""
  del coef
  return jax.nn.relu(x)


def swish(x: Array, coef: Array | None = None) -> Array:
  """Swish / SiLU ``x * sigmoid(x)``; ``coef`` is ignored."""
  del coef
  return jax.nn.swish(x)


def blend(
  a: Callable[[Array], Array] = jax.nn.relu,
  b: Callable[[Array], Array] = jax.nn.swish,
) -> Activation:
  """Returns an activation that blends ``a`` into ``b`` by a coefficient.

  The returned ``act(x, coef)`` (``act.reads_coef`` is true) computes ``a(x)`` when ``coef`` is ``None`` and
  ``(1 - coef) * a(x) + coef * b(x)`` otherwise. ``coef`` may be a traced
  scalar, so annealing it inside a jit-compiled step never recompiles. With the
  defaults this is ToST's ghost soft neuron: ``coef = 1`` is pure Swish and
  ``coef = 0`` pure ReLU.

  Args:
    a: element-wise function ``a(x)`` used at ``coef = 0`` (default ReLU).
    b: element-wise function ``b(x)`` used at ``coef = 1`` (default Swish).

  Returns:
    An activation ``act(x, coef) -> Array`` with the shape and dtype of ``x``.
  """

  def act(x: Array, coef: Array | None = None) -> Array:
    if coef is None:
      return a(x)
    coef = jnp.asarray(coef, x.dtype)
    return (1 - coef) * a(x) + coef * b(x)

  act.reads_coef = True
  return act


class Conv(nn.Conv):
  """``nn.Conv`` as the CNNs of :mod:`sparsejax.models` use it (same fields,
  variables and values). A class of its own so that the models' convolutions
  can be told apart (:func:`sparsejax.modeling.apply_model` gives them
  XLA:CPU's fast path)."""


def conv_and_norm(train: bool, dtype, init_gain: float = HE_GAIN):
  """The ``(conv, norm)`` layer constructors shared by the CNNs.

  ``conv``: :class:`Conv` without bias, He-normal kernels of gain
  ``init_gain``.
  ``norm``: :class:`sparsejax.models.norm.BatchNorm` (``nn.BatchNorm``'s
  variables and formulas) with PyTorch's defaults
  (``momentum=0.9``, i.e. PyTorch's 0.1, ``epsilon=1e-5``), batch statistics
  when ``train``.
  """
  conv = functools.partial(Conv, use_bias=False, dtype=dtype, kernel_init=he_normal(init_gain))
  norm = functools.partial(
    norm_lib.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )
  return conv, norm
