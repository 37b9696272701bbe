"""The sparse optimiser: sparse training in an ordinary optax loop (SPEC §1, §4).

``sparse(inner, mask)`` wraps any optax transformation. The mask lives in the
optimiser state, so one line turns a dense loop into a sparse one::

  opt = sj.optim.sparse(optax.sgd(0.1, momentum=0.9), mask)
  params = sj.masks.apply(params, mask)
  opt_state = opt.init(params)
  ...
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)   # pruned entries stay exactly 0

Dynamic sparse training replaces the mask inside the jitted step with
:func:`set_mask` (same shapes and dtype, so nothing recompiles) and clears the
optimiser moments of regrown connections with :func:`reset_moments`, which is
generic over any optax state: it maps over the param-shaped subtrees of the
state instead of matching known state classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import optax

from sparsejax import masks

PyTree = Any
#: A mask, or a function ``params -> mask`` (called by ``init``).
MaskOrFn = Union[PyTree, Callable[[PyTree], PyTree]]  # noqa: UP007 (a runtime alias)


class MaskedState(NamedTuple):
  """State of :func:`sparse`.

  Attributes:
    mask: bool pytree parallel to the params; ``True`` keeps an entry.
    inner_state: state of the wrapped transformation.
  """

  mask: PyTree
  inner_state: optax.OptState


def sparse(
  inner: optax.GradientTransformation, mask: MaskOrFn
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that pruned entries get no gradient and stay exactly 0.

  ``update(grads, state, params, **extra_args)``:

  1. zeroes the gradients of pruned entries, so ``inner`` (and its moments)
     never sees them;
  2. runs ``inner`` (any optax transformation: sgd, momentum, nesterov, adam,
     adamw, ``optax.chain``, ``optax.add_decayed_weights``,
     ``optax.inject_hyperparams``...; extra args are forwarded);
  3. sets the update of every pruned entry to ``-params`` so that
     ``optax.apply_updates(params, updates)`` makes it exactly ``0.0``, also
     right after the mask changed. Without ``params`` the pruned updates are
     ``0`` and the params must already be masked.

  Unlike ``optax.masked``, which chooses *which leaves* a transformation
  applies to, the mask here is elementwise and lives in the state. Like
  ``optax.masked``, ``mask`` may be a function of the params, called in
  ``init`` (e.g. a pruning-at-initialisation score of the fresh params).

  Args:
    inner: the optimiser to wrap.
    mask: bool pytree with the structure and shapes of the params, or a
      callable ``params -> mask`` called by ``init``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`MaskedState`.

  Example:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from sparsejax import optim
    >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> mask = {"w": jnp.array([True, False, True])}
    >>> opt = optim.sparse(optax.sgd(0.1), mask)
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.array([1.0, 1.0, 1.0])}
    >>> updates, state = opt.update(grads, state, params)
    >>> optax.apply_updates(params, updates)  # the pruned entry becomes exactly 0
    {'w': Array([0.9, 0. , 2.9], dtype=float32)}
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    mask_ = mask(params) if callable(mask) else mask
    masks.check_mask(mask_, params)
    return MaskedState(mask=jax.tree.map(jnp.asarray, mask_), inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    mask_ = state.mask
    grads = masks.apply(updates, mask_)
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    if params is None:
      updates = masks.apply(updates, mask_)
    else:
      updates = jax.tree.map(
        lambda u, p, m: jnp.where(m, u, -p.astype(u.dtype)), updates, params, mask_
      )
    return updates, MaskedState(mask_, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_masked_state(x) -> bool:
  return isinstance(x, MaskedState)


def _masked_states(opt_state) -> list[MaskedState]:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(x)]


def find_mask(opt_state) -> PyTree | None:
  """The mask of the (outermost) :class:`MaskedState`, or ``None`` if dense.

  Example:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from sparsejax import optim
    >>> params = {"w": jnp.ones(2)}
    >>> print(optim.find_mask(optax.sgd(0.1).init(params)))
    None
    >>> state = optim.sparse(optax.sgd(0.1), {"w": jnp.array([True, False])}).init(params)
    >>> optim.find_mask(state)
    {'w': Array([ True, False], dtype=bool)}
  """
  found = _masked_states(opt_state)
  return found[0].mask if found else None


def get_mask(opt_state) -> PyTree:
  """The mask held by the (outermost) :class:`MaskedState` in ``opt_state``.

  Raises:
    ValueError: the state holds no mask (use :func:`find_mask` to get ``None``).
  """
  mask = find_mask(opt_state)
  if mask is None:
    raise ValueError(
      "the optimiser state holds no mask: build the optimiser with "
      "sparsejax.optim.sparse(inner, mask)"
    )
  return mask


def set_mask(opt_state, mask: PyTree):
  """Returns ``opt_state`` with its mask replaced by ``mask``.

  ``mask`` must have the old mask's structure, shapes and ``bool`` dtype, so a
  jitted step that calls this (e.g. under ``lax.cond``) never recompiles. The
  params are not touched: the next ``update`` zeroes the newly pruned entries,
  or call :func:`sparsejax.masks.apply` yourself.
  """
  masks.check_mask(mask, get_mask(opt_state))
  return jax.tree.map(
    lambda s: s._replace(mask=mask) if _is_masked_state(s) else s,
    opt_state,
    is_leaf=_is_masked_state,
  )


def _map_param_shaped(fn, tree, like: PyTree):
  """Applies ``fn`` to every subtree of ``tree`` shaped exactly like ``like``."""
  treedef = jax.tree.structure(like)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(like)]

  def param_shaped(x) -> bool:
    if jax.tree.structure(x) != treedef:
      return False
    return [jnp.shape(y) for y in jax.tree.leaves(x)] == shapes

  return jax.tree.map(lambda x: fn(x) if param_shaped(x) else x, tree, is_leaf=param_shaped)


def reset_moments(opt_state, positions: PyTree):
  """Zeroes the optimiser moments at ``positions`` (e.g. regrown connections).

  Every param-shaped subtree of the wrapped optimiser's state (momentum
  ``trace``, Adam ``mu`` and ``nu``, ...) is set to 0 where ``positions`` is
  ``True``. Counters, hyperparameters and the mask itself are untouched. Works
  for any optax state without knowing its classes.

  Args:
    opt_state: a state containing a :class:`MaskedState`.
    positions: bool pytree parallel to the params.

  Returns:
    ``opt_state`` with those moments zeroed.

  Example:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from sparsejax import optim
    >>> params = {"w": jnp.zeros(3)}
    >>> opt = optim.sparse(optax.sgd(1.0, momentum=0.9), {"w": jnp.ones(3, bool)})
    >>> _, state = opt.update({"w": jnp.array([1.0, 2.0, 3.0])}, opt.init(params),
    ...                       params)
    >>> state = optim.reset_moments(state, {"w": jnp.array([False, True, False])})
    >>> state.inner_state[0].trace  # the momentum of the middle entry is cleared
    {'w': Array([1., 0., 3.], dtype=float32)}
  """

  def reset(masked_state):
    if not _is_masked_state(masked_state):
      return masked_state
    masks.check_mask(positions, masked_state.mask)
    inner = _map_param_shaped(
      lambda sub: jax.tree.map(
        lambda x, r: jnp.where(r, jnp.zeros((), x.dtype), x), sub, positions
      ),
      masked_state.inner_state,
      positions,
    )
    return masked_state._replace(inner_state=inner)

  return jax.tree.map(reset, opt_state, is_leaf=_is_masked_state)


_HYPERPARAMS_STATES = tuple(
  {
    optax.InjectHyperparamsState,
    getattr(optax, "InjectStatefulHyperparamsState", optax.InjectHyperparamsState),
  }
)


def _is_hyperparams_state(x) -> bool:
  return isinstance(x, _HYPERPARAMS_STATES)


def find_hyperparam(opt_state, name: str) -> jax.Array | None:
  """The hyperparameter ``name`` of the (outermost) ``optax.inject_hyperparams``
  state in ``opt_state`` that holds it, or ``None``.

  ``inject_hyperparams`` stores the values its last ``update`` used, e.g. the
  learning rate of the step just taken (of step 0 right after ``init``).

  Example:

    >>> import jax.numpy as jnp
    >>> import optax
    >>> from sparsejax import optim
    >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    >>> float(optim.find_hyperparam(tx.init({"w": jnp.ones(2)}), "learning_rate"))
    0.5
  """
  for x in jax.tree.leaves(opt_state, is_leaf=_is_hyperparams_state):
    if _is_hyperparams_state(x) and name in x.hyperparams:
      return x.hyperparams[name]
  return None
