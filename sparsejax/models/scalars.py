"""Per-step scalars of the models: the ``"scalars"`` collection.

A model that reads a per-step scalar (ToST's activation blend β, its
ghost-skip scale γ) reads it from the variable collection ``"scalars"``
(:data:`COLLECTION`) with :func:`read`, never from a keyword argument of its
``__call__``, and declares the names it reads in its ``scalar_names``
property. The scalars are fed by :func:`sparsejax.modeling.apply_model`, which
refuses a scalar the model does not declare::

  logits, _ = modeling.apply_model(model, variables, x, train=False,
                                   scalars={"act_coef": beta})
  # the same, by hand:
  logits = model.apply({**variables, "scalars": {"act_coef": beta}}, x)

A scalar that is not fed reads as ``None`` (the models' default: plain ReLU,
ghost paths at full strength). Values may be traced: changing them never
recompiles.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

COLLECTION = "scalars"
"""The variable collection holding the per-step scalars."""

ACT_COEF = "act_coef"
"""The scalar β, the coefficient passed to every activation ``act(x, coef)``; read by a
model whose activation reads it (:func:`reads_coef`, e.g.
:func:`sparsejax.models.activations.blend`)."""

GHOST_COEF = "ghost_coef"
"""The scalar γ, the scale of ToST's ghost skip paths; read by a ``ghost_skips=True`` model."""


def read(module: nn.Module, name: str) -> jax.Array | None:
  """The scalar ``name`` fed to the model ``module`` belongs to, or ``None``.

  Reads the root scope's :data:`COLLECTION`, so a block deep in a model sees
  the scalars the whole model was applied with.
  """
  root = module.scope.root
  if root.has_variable(COLLECTION, name):
    return root.get_variable(COLLECTION, name)
  return None


def reads_coef(act: Any) -> bool:
  """Whether the activation ``act(x, coef)`` reads ``coef``: it says so with a
  true ``reads_coef`` attribute (:func:`sparsejax.models.activations.blend`
  does; ``relu`` and ``swish`` ignore ``coef``)."""
  return bool(getattr(act, "reads_coef", False))


def names(act: Any, ghost_skips: bool = False) -> frozenset[str]:
  """The ``scalar_names`` of a model with activation ``act``:
  :data:`ACT_COEF` when ``act`` reads its coefficient, :data:`GHOST_COEF` with
  ghost skips."""
  out = set()
  if reads_coef(act):
    out.add(ACT_COEF)
  if ghost_skips:
    out.add(GHOST_COEF)
  return frozenset(out)
