"""The train state: what changes during training, and the optimiser that changes it.

* :class:`TrainState`: params, batch statistics, optimiser state (holding the
  mask for sparse training, :func:`sparsejax.optim.sparse`), step, rng and, as
  a static field, the optimiser transformation; a pytree.
* :func:`init_variables`: ``model.init`` in inference mode, jitted per model.
* :func:`create_train_state`: initialises a model, builds the (sparse)
  optimiser and its state and masks the fresh params.

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from sparsejax import models, state
  >>> model = models.get("mlp", 10, hidden=(8,))
  >>> s = state.create_train_state(model, optax.sgd(0.1), jnp.zeros((1, 4, 4, 1)),
  ...                              jax.random.key(0))
  >>> int(s.step), s.mask is None
  (0, True)
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparsejax import masks as masks_lib
from sparsejax import optim

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and the optimiser that changes it.

  A pytree: the arrays are its leaves; the optimiser transformation ``tx`` is
  a static field (part of the tree structure, not saved in checkpoints). The
  steps call ``state.tx.update``, so what :func:`create_train_state` built (an
  inner optimiser wrapped with :func:`sparsejax.optim.sparse` for sparse
  training, or a transformation that holds its own mask) is exactly what
  trains. ``state.tx`` is compared by identity: each transformation object
  compiles its own step (the persistent compilation cache shares identical
  programs across them).

  Attributes:
    step: ``int32`` scalar, the number of optimiser steps taken.
    params: model parameters (pruned entries exactly 0).
    batch_stats: batch-norm running statistics; ``{}`` for models without.
    opt_state: optimiser state; for sparse training it contains a
      :class:`sparsejax.optim.MaskedState` holding the mask.
    rng: ``uint32`` raw key data (``jax.random.key_data``) of the training key;
      constant during training. The augmentation key of step ``t`` is
      ``fold_in(key, t)``.
    tx: the full optimiser transformation (static).
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def key(self) -> jax.Array:
    """The training key as a typed PRNG key."""
    return jax.random.wrap_key_data(self.rng)

  @property
  def mask(self) -> PyTree | None:
    """The mask held in the optimiser state, or ``None`` for dense training."""
    return optim.find_mask(self.opt_state)

  @property
  def variables(self) -> dict:
    """``{'params', 'batch_stats'}`` ready for ``model.apply``."""
    return variables_of(self.params, self.batch_stats)

  @property
  def learning_rate(self) -> jax.Array | None:
    """The learning rate of the optimiser's last update (read from an
    ``optax.inject_hyperparams`` state, e.g. of
    :func:`sparsejax.schedules.make_optimizer`), or ``None`` when the state
    carries none."""
    return optim.find_hyperparam(self.opt_state, "learning_rate")


def variables_of(params: PyTree, batch_stats: PyTree) -> dict:
  """``{'params': params, 'batch_stats': batch_stats}``, without empty statistics."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


@functools.partial(jax.jit, static_argnums=(0,))
def init_variables(model: nn.Module, sample_input: jax.Array, key: jax.Array) -> dict:
  """``model.init`` in inference mode; returns ``{'params', 'batch_stats'?}``.

  Jitted with the model static: one compilation per model and input shape,
  shared by every caller (train-state creation, scoring, re-initialisation).
  """
  variables = model.init(key, sample_input, train=False)
  return (
    flax.core.unfreeze(variables)
    if isinstance(variables, flax.core.FrozenDict)
    else dict(variables)
  )


@functools.partial(jax.jit, static_argnums=(0,))
def _init_sparse(tx, params, mask):
  """``(params, opt_state)`` of ``optim.sparse(tx, mask)``.

  Jitted with the inner ``tx`` static and the mask traced: one compilation per
  optimiser for every mask. Params are masked with the mask in the state.
  """
  opt_state = optim.sparse(tx, mask).init(params)
  return masks_lib.apply(params, optim.get_mask(opt_state)), opt_state


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  sample_input: jax.Array,
  rng: jax.Array,
  mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> TrainState:
  """Initialises the model and the optimiser; step 0.

  ``rng`` is split into the init key and the training key; the same ``rng``
  always gives the same state. The function also works under
  ``jax.eval_shape`` (e.g. :func:`sparsejax.train.fit` traces it for the
  layout of its checkpoints).

  The state's transformation is ``sparsejax.optim.sparse(tx, mask)`` when a
  ``mask`` is given, else ``tx`` itself. A ``tx`` whose state already holds a
  mask (one that contains a :class:`sparsejax.optim.MaskedState`, e.g.
  ``optim.sparse(inner, mask_fn)`` or a dynamic-sparse-training optimiser)
  is used as is, with ``mask=None``. In both sparse cases the fresh params
  are masked with the mask of the state.

  Args:
    model: a Flax linen module (e.g. from :func:`sparsejax.models.get`).
    tx: the optimiser (e.g. :func:`sparsejax.schedules.make_optimizer`).
    sample_input: an input batch of the right shape, e.g. ``zeros((1, H, W, C))``.
    rng: a PRNG key (typed or raw ``uint32`` key data).
    mask: ``None`` (dense, or ``tx`` holds its own mask); a bool mask pytree
      parallel to the params; or a callable ``params -> mask`` applied to the
      fresh params (e.g. magnitude pruning at initialisation; called outside
      ``jit``).

  Returns:
    A :class:`TrainState` on the default device.

  Raises:
    ValueError: a mask that does not fit the params, or a mask for a ``tx``
      that already holds one.
  """
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
  init_key, train_key = jax.random.split(rng)
  variables = init_variables(model, sample_input, init_key)
  params = variables["params"]
  if callable(mask):
    mask = mask(params)
  if mask is not None:
    masks_lib.check_mask(mask, params)
    if optim.find_mask(jax.eval_shape(tx.init, params)) is not None:
      raise ValueError(
        "tx already holds a mask in its state (it contains an optim.MaskedState); pass mask=None"
      )
    params, opt_state = _init_sparse(tx, params, mask)
    tx = optim.sparse(tx, mask)
  else:
    opt_state = tx.init(params)
    held = optim.find_mask(opt_state)
    if held is not None:
      params = masks_lib.apply(params, held)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=opt_state,
    rng=jax.random.key_data(train_key),
    tx=tx,
  )
