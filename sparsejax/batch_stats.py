"""Exact batch-norm statistics of a dataset: :func:`sparsejax.batch_stats.recompute_batch_stats`.

Sup-tickets (SPEC §6) recomputes the batch-norm running statistics of every
superposed model over the training data; any model whose weights were changed
outside training (averaged, re-pruned, rescaled) needs the same. Also
available as ``sparsejax.train.recompute_batch_stats``.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import data as data_lib
from sparsejax import mesh as mesh_lib
from sparsejax import modeling

PyTree = Any


#: ``variance`` modes of :func:`recompute_batch_stats`.
BN_VARIANCE_MODES = ("pooled", "average")


@functools.partial(jax.jit, static_argnums=(0,))
def _stats_update(model, params, stats, images, mean, std, key, scalars):
  """The ``batch_stats`` a training-mode forward pass writes, from ``stats``."""
  x = data_lib.normalize(images, mean, std)
  _, new = modeling.apply_model(
    model,
    {"params": params, "batch_stats": stats},
    x,
    train=True,
    scalars=scalars,
    rngs={"dropout": key},
  )
  return new["batch_stats"]


@functools.partial(jax.jit, static_argnums=(0,))
def _accumulate_stats(model, params, sums, rate, images, mean, std, key, scalars):
  """Adds ``n ×`` the batch's statistics (and squared means) to ``sums``."""
  zeros = jax.tree.map(jnp.zeros_like, rate)
  scaled = _stats_update(model, params, zeros, images, mean, std, key, scalars)
  # r <- m r + (1 - m) s from r = 0 gives (1 - m) s: divide by the rate 1 - m.
  batch = jax.tree.map(lambda a, r: jnp.where(r > 0, a / jnp.where(r > 0, r, 1), 0), scaled, rate)
  n = jnp.asarray(images.shape[0], jnp.float32)
  return {
    "stats": jax.tree.map(lambda t, b: t + n * b, sums["stats"], batch),
    "squares": jax.tree.map(lambda t, b: t + n * b * b, sums["squares"], batch),
    "count": sums["count"] + n,
  }


def recompute_batch_stats(
  model: nn.Module,
  variables: Mapping[str, PyTree],
  images: np.ndarray,
  *,
  mean,
  std,
  batch_size: int = 128,
  mesh: jax.sharding.Mesh | None = None,
  variance: str = "pooled",
  key: jax.Array | None = None,
  scalars: Mapping[str, Any] | None = None,
) -> PyTree:
  """Exact batch-norm statistics of ``variables["params"]`` over a dataset.

  What ``torch.optim.swa_utils.update_bn`` does for averaged weights: the
  running statistics become the cumulative average over all the batches of a
  pass over ``images`` of the statistics that training mode computes, instead
  of an exponential moving average dominated by the last batches. Every
  example counts once, in order, without augmentation (the last, shorter
  batch is weighted by its size); each batch-norm layer sees the inputs of a
  training-mode forward pass (earlier layers normalised with their batch's
  statistics, as in ``update_bn``).

  * ``variance="pooled"`` (default): ``mean`` is the mean over all examples
    and ``var`` the variance over all examples of each layer's inputs,
    ``E_b[var_b + mean_b²] − (E_b[mean_b])²`` with ``E_b`` the size-weighted
    average over batches ``b`` (exact, whatever the batch size). Every other
    statistic is the size-weighted average over batches.
  * ``variance="average"``: ``var`` is the size-weighted average of the
    batches' (biased) variances, like ``update_bn``'s average of batch
    variances; equal to the pooled variance for a single batch.

  Works for any linen model whose ``__call__`` takes ``(x, train=...)`` and
  whose batch-norm layers keep running statistics ``r ← m·r + (1 − m)·s``
  (``flax.linen.BatchNorm``, :class:`sparsejax.models.norm.BatchNorm`, any
  momentum): each layer's ``1 − m`` is measured once by running the first
  batch from all-zero and all-one statistics, so a layer's momentum need not
  be known; statistics that a training pass does not update keep their
  values. Statistics are paired as ``mean``/``var`` by their names in
  ``batch_stats``. One jitted program per batch shape, the sums stay on
  device.

  Args:
    model: the linen module.
    variables: ``{"params": ..., "batch_stats": ...}`` (e.g.
      :attr:`sparsejax.state.TrainState.variables`, or superposed params with the train
      state's statistics as the template).
    images: ``uint8 [N, H, W, C]`` host array (e.g. ``dataset.train_images``).
    mean, std: per-channel normalisation constants (``Dataset.mean``/``std``).
    batch_size: examples per forward pass (default 128; a multiple of the
      mesh size, except for the last batch, which runs replicated).
    mesh: default :func:`sparsejax.mesh.make_mesh` over all devices.
    variance: ``"pooled"`` or ``"average"`` (above).
    key: PRNG key for dropout in training mode (default ``key(0)``; batch
      ``b`` uses ``fold_in(key, b)``).
    scalars: per-step scalars the model reads (``model.scalar_names``),
      e.g. ``{"act_coef": beta}`` (:func:`sparsejax.modeling.apply_model`).

  Returns:
    The new ``batch_stats`` (same structure, replicated on ``mesh``);
    ``{}`` for a model without them.

  Raises:
    ValueError: an unknown ``variance``, an empty ``images`` or a batch size
      below 1.
  """
  if variance not in BN_VARIANCE_MODES:
    raise ValueError(f"variance must be one of {BN_VARIANCE_MODES}, got {variance!r}")
  stats = variables.get("batch_stats") or {}
  if not stats:
    return {}
  images = np.asarray(images)
  n_total, batch_size = images.shape[0], int(batch_size)
  if n_total == 0 or batch_size < 1:
    raise ValueError(
      f"need images and batch_size >= 1, got {n_total} images and batch_size={batch_size}"
    )
  mesh = mesh_lib.make_mesh() if mesh is None else mesh
  key = jax.random.key(0) if key is None else key
  scalars = dict(scalars or {})
  modeling.check_scalars(model, scalars)
  params = mesh_lib.put_replicated(variables["params"], mesh)
  norm = (jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))

  def put(x):
    return (
      mesh_lib.put_batch(x, mesh)
      if x.shape[0] % mesh.size == 0
      else mesh_lib.put_replicated(x, mesh)
    )

  first = put(images[:batch_size])
  zeros = jax.tree.map(jnp.zeros_like, stats)
  ones = jax.tree.map(jnp.ones_like, stats)
  a = _stats_update(model, params, zeros, first, *norm, key, scalars)
  c = _stats_update(model, params, ones, first, *norm, key, scalars)
  # c - a = m (the momentum); layers that do not update give a = 0, c = 1.
  rate = jax.tree.map(lambda a, c: 1.0 - (c - a), a, c)
  sums = {"stats": zeros, "squares": zeros, "count": jnp.zeros((), jnp.float32)}
  for b, start in enumerate(range(0, n_total, batch_size)):
    x = first if b == 0 else put(images[start : start + batch_size])
    sums = _accumulate_stats(
      model, params, sums, rate, x, *norm, jax.random.fold_in(key, b), scalars
    )
  flat = flax.traverse_util.flatten_dict(stats)
  avg = flax.traverse_util.flatten_dict(jax.tree.map(lambda t: t / sums["count"], sums["stats"]))
  sq = flax.traverse_util.flatten_dict(jax.tree.map(lambda t: t / sums["count"], sums["squares"]))
  updated = flax.traverse_util.flatten_dict(jax.tree.map(lambda r: r > 0, rate))
  out = {}
  for path, old in flat.items():
    value = avg[path]
    mean_path = path[:-1] + ("mean",)
    if variance == "pooled" and path[-1] == "var" and mean_path in flat:
      # E[x²] − E[x]² from each batch's var_b + mean_b².
      value = jnp.maximum(value + sq[mean_path] - avg[mean_path] ** 2, 0.0)
    out[path] = jnp.where(updated[path], value, old).astype(old.dtype)
  return mesh_lib.put_replicated(jax.device_get(flax.traverse_util.unflatten_dict(out)), mesh)
