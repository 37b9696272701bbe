"""Test aid, library only (no ``experiments``): small :func:`sparsejax.train.fit`
runs on the shipped digits dataset.

:func:`digits_fit` trains LeNet-300-100 (``mlp``) with the digits preset's
optimiser (SGD, momentum 0.9, lr 0.05 cosine, weight decay 5e-4, eval batch
512) and an optional magnitude-pruning mask at initialisation (global budget
over the kernels). Run as a module it trains into a workdir, for the SIGKILL
test::

  python -m tests.fitting WORKDIR NUM_EPOCHS
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from sparsejax import budgets
from sparsejax import data
from sparsejax import masks
from sparsejax import models
from sparsejax import schedules
from sparsejax import scores
from sparsejax import state
from sparsejax import train

DIGITS = dict(learning_rate=0.05, momentum=0.9, kind="cosine", weight_decay=5e-4)


def digits_optimizer(num_epochs: int, steps_per_epoch: int, **overrides):
  """The digits preset's optimiser (``overrides`` of :data:`DIGITS`)."""
  cfg = dict(DIGITS, **overrides)
  lr = schedules.lr_schedule(
    cfg["learning_rate"], num_epochs=num_epochs, steps_per_epoch=steps_per_epoch, kind=cfg["kind"]
  )
  return schedules.make_optimizer(lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def magnitude_mask_fn(model, sparsity: float):
  """``params -> mask``: magnitude pruning at initialisation, global budget
  over the kernels (as ``pruner="magnitude"`` of the experiments)."""

  def mask_fn(params):
    return scores.prune_at_init(
      "magnitude", params, sparsity=sparsity, budget=budgets.Global(), prunable=masks.KERNELS
    )

  return mask_fn


def digits_init(
  model,
  ds,
  *,
  num_epochs: int,
  batch_size: int,
  seed: int = 0,
  sparsity: float | None = 0.9,
  **optimizer,
):
  """The ``init`` of a digits run: magnitude mask at ``sparsity`` (``None``:
  dense)."""
  spe = schedules.steps_per_epoch(ds.num_train, batch_size)
  tx = digits_optimizer(num_epochs, spe, **optimizer)
  mask = None if sparsity is None else magnitude_mask_fn(model, sparsity)
  sample = jnp.zeros((1, *ds.image_shape), jnp.float32)
  return lambda: state.create_train_state(model, tx, sample, jax.random.key(seed), mask=mask)


def digits_fit(
  workdir,
  *,
  num_epochs: int = 3,
  batch_size: int = 32,
  seed: int = 0,
  sparsity: float | None = 0.9,
  optimizer=None,
  hooks=(),
  callbacks=(),
  stop_at_step=None,
  mesh=None,
  **options,
):
  """A digits run (``options``: :class:`sparsejax.train.FitOptions` fields;
  default no progress bar, non-finite check every 10 steps, eval batch 512)."""
  ds = data.load("digits")
  model = models.get("mlp", ds.num_classes)
  init = digits_init(
    model,
    ds,
    num_epochs=num_epochs,
    batch_size=batch_size,
    seed=seed,
    sparsity=sparsity,
    **(optimizer or {}),
  )
  options = dict(dict(progress_bar=False, log_every_steps=10, eval_batch_size=512), **options)
  return train.fit(
    model,
    ds,
    workdir,
    init=init,
    num_epochs=num_epochs,
    batch_size=batch_size,
    seed=seed,
    hooks=hooks,
    callbacks=callbacks,
    stop_at_step=stop_at_step,
    mesh=mesh,
    options=train.FitOptions(**options),
  )


if __name__ == "__main__":
  digits_fit(sys.argv[1], num_epochs=int(sys.argv[2]), max_to_keep=10)
