"""Batch normalisation for the sparsejax models.

:class:`BatchNorm` is a drop-in for ``flax.linen.BatchNorm`` as the models use
it (normalise over all axes but the last, learned ``scale`` and ``bias``,
running ``mean`` and ``var`` in the ``batch_stats`` collection, same names and
defaults, hence the same checkpoints). Its training-mode computation is the
method :meth:`BatchNorm.normalize_batch`, which
:func:`sparsejax.modeling.apply_model` replaces on CPU by matrix-vector
products (a third of a ResNet-20 step was XLA:CPU's lowering of those
reductions; see ``sparsejax/_xla_cpu.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """Batch norm over all axes but the last (features), like ``nn.BatchNorm``.

  ``y = (x - mean) * scale / sqrt(var + epsilon) + bias`` with the batch
  statistics in training mode (biased variance ``E[x^2] - E[x]^2``, float32)
  and the running averages otherwise. In training mode (and not while
  initialising) the running averages become
  ``momentum * running + (1 - momentum) * batch``.

  Attributes:
    use_running_average: normalise with the running statistics (evaluation)
      instead of the batch's (training); default ``False``.
    momentum: decay of the running averages; default 0.9 (PyTorch's 0.1).
    epsilon: added to the variance; default 1e-5.
    dtype: output dtype; default ``None``: that of ``x`` promoted with the
      float32 parameters.

  Variables: ``params``: ``scale`` (ones) and ``bias`` (zeros), ``[C]``
  float32; ``batch_stats``: ``mean`` (zeros) and ``var`` (ones), ``[C]``.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    if self.use_running_average:
      mul = scale * lax.rsqrt(running_var.value + self.epsilon)
      y = (x - running_mean.value) * mul + bias
      return y.astype(dtype)
    y, mean, var = self.normalize_batch(x, scale, bias)
    if not self.is_initializing():
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * mean
      running_var.value = m * running_var.value + (1 - m) * var
    return y.astype(dtype)

  def normalize_batch(
    self, x: jax.Array, scale: jax.Array, bias: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm of ``x`` over all axes but the last.

    Args:
      x: ``[..., C]`` activations (any float dtype; statistics in float32).
      scale, bias: ``[C]`` float32 affine parameters.

    Returns:
      ``(y, mean, var)``: ``y = (x - mean) * scale / sqrt(var + epsilon) +
      bias`` (float32, shape of ``x``) and the batch statistics ``[C]``
      (biased variance ``E[x^2] - E[x]^2``, as ``flax.linen.BatchNorm``
      computes it).
    """
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axes)
    var = jnp.maximum(jnp.mean(x32 * x32, axes) - mean * mean, 0.0)
    y = (x32 - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
    return y, mean, var
