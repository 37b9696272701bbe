"""Dynamic sparse training as optax transformations (SPEC §4).

SET, RigL, SRigL, gradual magnitude pruning (GMP) and GraNet change the mask during
training. Each is a wrapper around any optax optimiser, like
:func:`sparsejax.optim.sparse`: the mask lives in the optimiser state, the
mask update runs inside the jitted step under ``lax.cond`` every ``ΔT``
steps (never a recompilation, never a host round trip), and
``optax.apply_updates`` alone keeps every pruned entry exactly 0::

  mask = sj.masks.random_mask(key, params, 0.9, budget=sj.budgets.ERK())
  tx = sj.dst.rigl_optimizer(optax.sgd(0.1, momentum=0.9), mask, end_step=7500)
  params = sj.masks.apply(params, mask)
  opt_state = tx.init(params)
  ...                                   # the ordinary optax loop
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)

``grads`` are the dense gradients of the loss with respect to the masked
weights ``θ ⊙ m`` (what ``jax.grad`` returns for the masked params): RigL grows
where their magnitude is largest.

One mask update at step ``t`` (the optimiser's own step count, from 0), per
prunable layer with ``n`` active weights (SPEC §4):

1. **drop** the ``k = ⌊f(t) · n⌋`` active weights of smallest ``|θ|``
   (exact when ``f(t) · n`` is an integer, :func:`drop_count`);
2. **grow** ``k`` positions among those not kept after the drop (a weight
   just dropped may come back, and then keeps its value and moments):
   uniformly at random for SET (the PRNG key lives in the state), the largest
   ``|g|`` for RigL. Ties go to the lower flat index, so every layer keeps
   exactly ``n`` weights.
3. New connections are exactly 0 and their optimiser moments are reset to 0
   (:func:`sparsejax.optim.reset_moments`, generic over any optax state).
4. The whole optimiser update of that step is skipped (``skip_update=True``,
   the reference RigL code's and jaxpruner's choice): the weights and the
   optimiser state (moments, counters, schedules) stay as they were, apart
   from the mask and the reset moments of new connections.

N:M masks: :func:`set_optimizer` and :func:`rigl_optimizer` with
``nm=budgets.NM(2, 4)`` start from an N:M mask
(:func:`sparsejax.masks.random_mask` with that budget) and regrow, in each group of
M weights along the input dimension, as many weights as the drop removed from
it (:func:`drop_and_grow_nm`), so the mask stays exactly N:M. Without ``nm``
the regrowth only keeps per-layer counts and an N:M mask does not stay N:M.

Gradual magnitude pruning (Zhu & Gupta) instead removes weights globally by
magnitude along the cubic schedule
``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(t_1 − t_0))³``; GraNet adds a
RigL-style drop-and-regrow at constant density after each pruning step.

The state is :class:`DSTState`; it contains a
:class:`sparsejax.optim.MaskedState`, so :func:`sparsejax.optim.find_mask`,
``get_mask`` and ``reset_moments`` work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import math
from typing import Any
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import _checks
from sparsejax import _select
from sparsejax import budgets
from sparsejax import condensed
from sparsejax import hooks
from sparsejax import masks
from sparsejax import nm as nm_lib
from sparsejax import optim
from sparsejax._sort_keys import sortable_bits

PyTree = Any
ScalarOrSchedule = Union[float, optax.Schedule]  # noqa: UP007 (a runtime alias)


class DSTState(NamedTuple):
  """State of a dynamic-sparse-training optimiser.

  Attributes:
    masked: the :class:`sparsejax.optim.MaskedState` (mask and inner state).
    count: ``int32`` number of ``update`` calls so far (the step ``t``).
    key: PRNG key for random growth (SET), split at every mask update.
    mask_updates: ``int32`` number of mask updates done so far.
  """

  masked: optim.MaskedState
  count: jax.Array
  key: jax.Array
  mask_updates: jax.Array


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


def cosine_drop_fraction(alpha: float = 0.3, end_step: int = 1) -> optax.Schedule:
  """RigL's drop fraction ``f(t) = (α/2)(1 + cos(π t / T_end))``; 0 after ``T_end``.

  Args:
    alpha: initial fraction α (RigL: 0.3; GraNet's regrowth: 0.5).
    end_step: ``T_end``, the step where the fraction reaches 0.

  Returns:
    An optax schedule ``t -> f(t)``.

  Raises:
    ValueError: ``alpha`` outside [0, 1] or ``end_step < 1``.
  """
  _checks.fraction(alpha, "alpha")
  return optax.cosine_decay_schedule(float(alpha), _checks.step(end_step, "end_step", 1))


def cubic_sparsity(
  initial_sparsity: float, final_sparsity: float, start_step: int, end_step: int
) -> optax.Schedule:
  """Zhu & Gupta's ``s_t = s_f + (s_i − s_f)(1 − progress)³``.

  ``progress = (t − start_step) / (end_step − start_step)`` clipped to [0, 1],
  so ``s_t = s_i`` before ``start_step`` and ``s_f`` after ``end_step``.

  Raises:
    ValueError: a sparsity outside [0, 1), ``initial_sparsity >
      final_sparsity``, a negative ``start_step`` or ``end_step <=
      start_step``.
  """
  masks.check_sparsity(initial_sparsity, "initial_sparsity")
  masks.check_sparsity(final_sparsity, "final_sparsity")
  if float(initial_sparsity) > float(final_sparsity):
    raise ValueError(
      f"initial_sparsity ({initial_sparsity}) must be <= "
      f"final_sparsity ({final_sparsity}): pruning only removes "
      "weights"
    )
  start_step = _checks.step(start_step, "start_step")
  if _checks.step(end_step, "end_step") <= start_step:
    raise ValueError(
      f"end_step must be after start_step ({start_step}), got "
      f"end_step={end_step!r}: the pruning window would be empty"
    )
  span = int(end_step) - start_step

  def schedule(t):
    progress = jnp.clip((jnp.asarray(t, jnp.float32) - start_step) / span, 0.0, 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3

  return schedule


def is_update_step(t, *, update_every: int, start_step: int, end_step: int | None) -> jax.Array:
  """Whether step ``t`` updates the mask: ``t ∈ {start, start + ΔT, ...}``, ``t < end``."""
  t = jnp.asarray(t, jnp.int32)
  on = (t >= start_step) & ((t - start_step) % update_every == 0)
  if end_step is not None:
    on &= t < end_step
  return on


def _as_schedule(value: ScalarOrSchedule, name: str = "drop_fraction") -> optax.Schedule:
  if callable(value):
    return value
  return optax.constant_schedule(_checks.fraction(value, name))


#: Relative slack of :func:`drop_count`: a product ``f · n`` within this
#: fraction below an integer counts as that integer.
DROP_COUNT_SLACK = 2.0**-16


def drop_count(fraction, n_active) -> jax.Array:
  """``k = ⌊f · n⌋``, exact when ``f · n`` is an integer (SPEC §4).

  ``f`` comes from a float32 schedule and carries its rounding: RigL's
  ``f(T_end / 2)`` with α = 0.3 is 0.149999991 in float32, so a plain
  ``floor(f · n)`` drops 2 of ``n = 20`` weights instead of 3. A product
  within :data:`DROP_COUNT_SLACK` (2⁻¹⁶, relative, about 500 float32
  rounding errors) below an integer is taken as that integer; otherwise
  ``k`` is the plain floor. ``k`` is clipped to ``[0, n]``.

  >>> from sparsejax import dst
  >>> import jax.numpy as jnp
  >>> int(dst.drop_count(0.149999991, 20)), int(dst.drop_count(0.149, 20))
  (3, 2)

  Args:
    fraction: ``f`` (float, may be traced).
    n_active: ``n`` (int, may be traced).

  Returns:
    ``int32`` scalar ``k``.
  """
  n = jnp.asarray(n_active, jnp.int32)
  x = jnp.asarray(fraction, jnp.float32) * n.astype(jnp.float32)
  up = jnp.ceil(x)
  k = jnp.where(up - x <= DROP_COUNT_SLACK * jnp.maximum(up, 1.0), up, jnp.floor(x))
  return jnp.clip(k.astype(jnp.int32), 0, n)


# ----------------------------------------------------------------------------
# Drop and grow on one layer (flat vectors)
# ----------------------------------------------------------------------------


def drop_and_grow(
  mask: jax.Array, weights: jax.Array, growth_scores: jax.Array, fraction
) -> tuple[jax.Array, jax.Array]:
  """One layer's drop-and-grow; returns ``(new_mask, grown)``.

  Drops the ``k = ⌊fraction · n_active⌋`` (exact: :func:`drop_count`) active
  entries of smallest ``|weights|`` and grows the ``k`` highest
  ``growth_scores`` among the entries not kept after the drop (just-dropped
  ones included). ``grown`` marks entries active in ``new_mask`` but not in ``mask``. Ties go to the
  lower flat index; ``sum(new_mask) == sum(mask)`` exactly. NaN growth scores
  rank below every finite score of a candidate.

  >>> import jax.numpy as jnp
  >>> from sparsejax import dst
  >>> mask = jnp.array([True, True, True, False, False, False])
  >>> w = jnp.array([0.5, -0.1, 0.3, 0., 0., 0.])
  >>> g = jnp.array([0., 0., 0., 0.2, 0.9, 0.2])
  >>> new, grown = dst.drop_and_grow(mask, w, g, 0.34)  # k = 1
  >>> new.astype(int).tolist(), grown.astype(int).tolist()
  ([1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0])

  Args:
    mask: bool array, the layer's current mask.
    weights: the layer's weights (same shape).
    growth_scores: float array, higher grows first (same shape).
    fraction: drop fraction in [0, 1] (may be traced).
  """
  new, grown = drop_and_grow_layers([mask], [weights], [growth_scores], fraction)
  return new[0], grown[0]


def drop_and_grow_layers(
  layer_masks: Sequence[jax.Array],
  weights: Sequence[jax.Array],
  growth_scores: Sequence[jax.Array],
  fraction,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """:func:`drop_and_grow` on every layer at once; returns ``(new, grown)`` lists.

  Each layer gets exactly what :func:`drop_and_grow` gives it alone; the
  layers are flattened and laid end to end, so the drop and the growth are
  one :func:`sparsejax.masks.keep_top_in_segments` each, whatever the number
  of layers (a step compiles two selection loops, not two per layer).

  Args:
    layer_masks, weights, growth_scores: one array per layer (same shapes
      layer by layer).
    fraction: drop fraction in [0, 1] (may be traced).
  """
  shapes = [jnp.shape(m) for m in layer_masks]
  sizes = [math.prod(shape) for shape in shapes]
  flat = lambda xs: jnp.concatenate([jnp.ravel(x) for x in xs])
  m = flat(layer_masks)
  n_active = jnp.stack([jnp.sum(x, dtype=jnp.int32) for x in layer_masks])
  k = drop_count(fraction, n_active)
  magnitude = jnp.abs(flat([jnp.asarray(w, jnp.float32) for w in weights]))
  kept = masks.keep_top_in_segments(
    jnp.where(m, magnitude, -jnp.inf), n_active - k, sizes=tuple(sizes)
  )
  grow = flat([jnp.asarray(g, jnp.float32) for g in growth_scores])
  grow = jnp.where(jnp.isnan(grow), -jnp.finfo(jnp.float32).max, grow)
  new = kept | masks.keep_top_in_segments(jnp.where(kept, -jnp.inf, grow), k, sizes=tuple(sizes))
  offsets = np.cumsum([0] + sizes)
  split = lambda x: [
    x[a:b].reshape(shape) for a, b, shape in zip(offsets[:-1], offsets[1:], shapes)
  ]
  return split(new), split(new & ~m)


def drop_and_grow_nm(
  mask: jax.Array, weights: jax.Array, growth_scores: jax.Array, fraction, m: int
) -> tuple[jax.Array, jax.Array]:
  """:func:`drop_and_grow` that keeps the count of every N:M group.

  The drop is that of :func:`drop_and_grow` (the ``k = ⌊fraction · n_active⌋``
  active entries of smallest ``|weights|`` over the whole layer); each group
  of ``m`` consecutive entries along axis -2 (see
  ``sparsejax.nm.nm_groups``) then regrows as many entries as it lost,
  the highest ``growth_scores`` among its entries not kept after the drop
  (just-dropped ones included), ties to the lower flat index. So an N:M mask
  stays N:M and the layer keeps exactly its count.

  >>> import jax.numpy as jnp
  >>> from sparsejax import dst
  >>> mask = jnp.array([[True], [True], [False], [False]])  # one 2:4 group
  >>> w = jnp.array([[0.5], [-0.1], [0.], [0.]])
  >>> g = jnp.array([[0.], [0.], [0.3], [0.9]])
  >>> new, grown = dst.drop_and_grow_nm(mask, w, g, 0.5, 4)  # drops -0.1
  >>> new.ravel().astype(int).tolist(), grown.ravel().astype(int).tolist()
  ([1, 0, 0, 1], [0, 0, 0, 1])

  Args:
    mask: bool ``[..., c_in, c_out]``, ``c_in % m == 0``.
    weights: the layer's weights (same shape).
    growth_scores: float, higher grows first (same shape).
    fraction: drop fraction in [0, 1] (may be traced).
    m: group size M.
  """
  shape = mask.shape
  n_active = jnp.sum(mask, dtype=jnp.int32)
  k = drop_count(fraction, n_active)
  magnitude = jnp.abs(jnp.ravel(weights)).astype(jnp.float32)
  kept = masks.keep_top(jnp.where(jnp.ravel(mask), magnitude, -jnp.inf), n_active - k).reshape(
    shape
  )
  lost = nm_lib.group_counts(mask, m) - nm_lib.group_counts(kept, m)
  grow = growth_scores.astype(jnp.float32)
  grow = jnp.where(jnp.isnan(grow), -jnp.finfo(jnp.float32).max, grow)
  keys = sortable_bits(nm_lib.nm_groups(grow, m))
  free = ~nm_lib.nm_groups(kept, m)
  keys = jnp.where(free, keys, jnp.zeros((), keys.dtype))  # below every score
  grown_groups = nm_lib.keep_top_in_groups(keys, lost) & free
  new = kept | nm_lib.nm_ungroup(grown_groups, shape)
  return new, new & ~mask


# ----------------------------------------------------------------------------
# The transformation
# ----------------------------------------------------------------------------


class MaskStep(NamedTuple):
  """What a mask update returns when some kept weights must restart.

  Attributes:
    mask: the new mask.
    survivors: bool pytree, the entries whose weight and optimiser moments
      carry over; every other entry of ``mask`` is a new connection (exactly
      0, moments reset). A rule that returns a plain mask means
      ``survivors = old & new``. GraNet returns the mask after its magnitude
      pruning intersected with ``new``: a weight pruned and regrown in the
      same step restarts at 0 (SPEC §4).
  """

  mask: PyTree
  survivors: PyTree


MaskUpdate = Callable[..., PyTree | MaskStep]
"""``(mask, params, grads, key, t) -> new_mask`` (or a :class:`MaskStep`),
traced inside ``lax.cond``."""

StepPredicate = Callable[[jax.Array], jax.Array]
"""``t -> bool``: whether step ``t`` (an ``int32``, traced) does something."""

ExtraUpdates = Sequence[tuple[StepPredicate, MaskUpdate]]
"""``[(when, rule), ...]``: mask updates of their own schedule (see
:func:`dynamic_sparse`)."""


def dynamic_sparse(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  mask_update: MaskUpdate,
  *,
  update_every: int = 100,
  start_step: int | None = None,
  end_step: int | None = None,
  skip_update: bool = True,
  seed: int = 0,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """The generic DST wrapper: ``inner`` with a mask updated every ``ΔT`` steps.

  Every ``update(grads, state, params)`` call:

  1. at a mask-update step (:func:`is_update_step`, or a step where the
     ``when`` of one of ``extra_updates`` holds), computes
     ``new_mask = rule(mask, params, grads, key, t)`` under ``lax.cond`` with
     ``rule = mask_update`` on a periodic step, or the ``rule`` of the first
     extra update whose ``when(t)`` holds (it takes precedence); on other
     steps the mask is unchanged;
     A rule may return a :class:`MaskStep` to say which kept entries
     survive (the rest restart at 0);
  2. runs ``inner`` on the gradients masked by the *old* mask (``where``,
     so a NaN at a pruned position never reaches a kept weight); on a
     mask-update step with ``skip_update`` its new state is discarded: the
     optimiser state (momentum, Adam moments, step counters, schedules)
     stays exactly as it was (SPEC §4, as the RigL reference and jaxpruner);
  3. resets the moments of new connections to 0;
  4. returns updates that keep the surviving weights' inner updates (zero on
     mask-update steps when ``skip_update``) and set every entry outside
     ``new_mask``, and every new connection, to exactly 0 under
     ``optax.apply_updates``.

  So with ``skip_update`` a schedule inside ``inner`` (its learning rate)
  advances on weight-update steps only: after ``u`` mask updates it is at
  ``t − u``, where ``t`` is the step count of this wrapper (the one its own
  ``ΔT``, ``start_step`` and ``end_step`` count in).

  Args:
    inner: any optax transformation (extra args are forwarded).
    mask: the initial bool mask, parallel to the params, or a callable
      ``params -> mask`` called by ``init`` (as in :func:`sparsejax.optim.sparse`).
    mask_update: the rule, e.g. that of :func:`set_optimizer`,
      :func:`rigl_optimizer`, :func:`gmp_optimizer` or :func:`granet_optimizer`.
    update_every: ``ΔT`` in steps (default 100).
    start_step: first mask-update step (default ``update_every``).
    end_step: no mask update at or after this step (default: never stops).
    skip_update: on mask-update steps skip the weight update and leave the
      optimiser state untouched (default True, the reference); ``False``
      applies the inner update on those steps too.
    seed: seed of the PRNG key kept in the state.
    extra_updates: ``[(when, rule), ...]``, mask updates on a schedule of
      their own: ``when(t)`` (traced, ``t`` the step) says whether step ``t``
      runs ``rule`` (a :data:`MaskUpdate`) instead of the periodic update;
      e.g. the one large drop-and-regrow at the start of each Sup-tickets
      cycle (:meth:`sparsejax.suptickets.Plan.mask_updates`). They count as
      mask-update steps (``mask_updates``, ``skip_update``, moment reset).
      Default none.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`DSTState`.
  """
  update_every = _checks.step(update_every, "update_every", 1)
  start = update_every if start_step is None else _checks.step(start_step, "start_step")
  if end_step is not None and _checks.step(end_step, "end_step") <= start:
    raise ValueError(
      f"end_step must be after start_step ({start}): no mask "
      f"update would run; got end_step={end_step!r}"
    )
  masked = optim.sparse(inner, mask)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return DSTState(
      masked=masked.init(params),
      count=jnp.zeros((), jnp.int32),
      key=jax.random.key_data(jax.random.key(seed)),
      mask_updates=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("dynamic sparse training needs params: call tx.update(grads, state, params)")
    old = state.masked.mask
    t = state.count
    on = is_update_step(t, update_every=update_every, start_step=start, end_step=end_step)
    # Which rule: 0 the periodic one, i + 1 the first extra update that holds.
    which = jnp.zeros((), jnp.int32)
    for i in reversed(range(len(extra_updates))):
      due = jnp.asarray(extra_updates[i][0](t), bool)
      which = jnp.where(due, i + 1, which)
      on |= due
    rules = [mask_update, *(rule for _, rule in extra_updates)]
    key = jax.random.wrap_key_data(state.key)
    key, sub = jax.random.split(key)

    def branch(rule):
      def run():
        out = rule(old, params, updates, sub, t)
        if not isinstance(out, MaskStep):
          out = MaskStep(out, jax.tree.map(lambda n, o: n & o, out, old))
        return jax.tree.map(jnp.asarray, out)

      return run

    branches = [branch(rule) for rule in rules]
    changed = branches[0] if len(branches) == 1 else lambda: jax.lax.switch(which, branches)
    new, survivors = jax.lax.cond(on, changed, lambda: MaskStep(old, old))
    grads = masks.apply(updates, old)
    inner_updates, inner_state = inner.update(grads, state.masked.inner_state, params, **extra_args)
    skip = on if skip_update else jnp.zeros((), bool)
    # A skipped mask-update step leaves the inner state (moments, counters,
    # schedules) as it was; only new connections' moments are reset below.
    inner_state = jax.lax.cond(skip, lambda: state.masked.inner_state, lambda: inner_state)
    # Survivors: the inner update (0 on a skipped step); everything else,
    # dropped and new connections included, lands on exactly 0.
    out = jax.tree.map(
      lambda u, p, s: jnp.where(s, jnp.where(skip, 0, u), -p.astype(u.dtype)),
      inner_updates,
      params,
      survivors,
    )
    fresh = jax.tree.map(lambda n, s: n & ~s, new, survivors)
    masked_state = optim.reset_moments(optim.MaskedState(old, inner_state), fresh)._replace(
      mask=new
    )
    return out, DSTState(
      masked=masked_state,
      count=t + 1,
      key=jax.random.key_data(key),
      mask_updates=state.mask_updates + on.astype(jnp.int32),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _per_prunable_layer(fn, mask, params, *trees, prunable=None):
  """Applies ``fn(mask, param, *leaves)`` on prunable leaves; others keep their mask.

  Prunable leaves of the same shape and dtypes run as one ``jax.vmap`` of
  ``fn`` over their stack, so a ResNet's 22 layers compile as 9 programs,
  not 22; every layer's result is exactly the one ``fn`` gives it alone.
  """
  flags = jax.tree.leaves(masks.prunable_tree(params, prunable))
  out, treedef = jax.tree.flatten(mask)
  args = list(zip(out, jax.tree.leaves(params), *(jax.tree.leaves(t) for t in trees)))
  groups: dict[tuple, list[int]] = {}
  for i, (flag, leaves) in enumerate(zip(flags, args)):
    if flag:
      sig = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
      groups.setdefault(sig, []).append(i)
  for idx in groups.values():
    if len(idx) == 1:
      out[idx[0]] = fn(*args[idx[0]])
      continue
    stacked = jax.vmap(fn)(*(jnp.stack(xs) for xs in zip(*(args[i] for i in idx))))
    for j, i in enumerate(idx):
      out[i] = stacked[j]
  return jax.tree.unflatten(treedef, out)


def _nm_group_size(nm: budgets.NM | None) -> int | None:
  """``M`` of an :class:`~sparsejax.budgets.NM` budget (checked), ``None`` for ``None``."""
  if nm is None:
    return None
  budgets.check(nm, "nm")
  if not isinstance(nm, budgets.NM):
    raise ValueError(f"nm must be None or an NM(n, m) budget such as budgets.NM(2, 4), got {nm!r}")
  return nm.m


def _check_nm_start(mask: PyTree, nm: budgets.NM | None, prunable) -> None:
  """An N:M DST run must start from an N:M mask (checked when concrete).

  Layers whose input dimension is not divisible by M are not checked (they
  can only be in an N:M mask through ``NM(n, m).with_overrides``).
  """
  m = _nm_group_size(nm)
  if nm is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(mask)):
    return
  flags = masks.prunable_tree(mask, prunable)
  divisible = jax.tree.map(
    lambda f, x: bool(f) and x.ndim >= 2 and x.shape[-2] % m == 0, flags, mask
  )
  if not any(jax.tree.leaves(divisible)):
    raise ValueError(f"nm={nm!r}: no prunable layer has an input dimension divisible by {m}")
  nm_lib.check_nm(mask, nm, prunable=divisible)


def _nm_start(mask, nm: str | None, prunable):
  """``mask`` checked by :func:`_check_nm_start` (a mask function: its result,
  when ``init`` calls it)."""
  if not callable(mask):
    _check_nm_start(mask, nm, prunable)
    return mask

  def checked(params):
    out = mask(params)
    _check_nm_start(out, nm, prunable)
    return out

  return checked


def drop_and_grow_rule(
  fraction: ScalarOrSchedule, growth: str = "gradient", prunable=None, nm: budgets.NM | None = None
) -> MaskUpdate:
  """The :data:`MaskUpdate` of SET and RigL: :func:`drop_and_grow` per prunable layer.

  Every prunable layer drops ``⌊f(t) · n_active⌋`` active weights by
  magnitude and grows as many, by dense gradient magnitude
  (``growth="gradient"``, RigL) or uniformly at random (``"random"``, SET);
  other leaves keep their mask.

  Args:
    fraction: ``f(t)``, a float or an optax schedule of the step.
    growth: ``"gradient"`` (default) or ``"random"``.
    prunable: which leaves change (see :func:`sparsejax.masks.prunable_tree`).
    nm: ``None`` (default) or an :class:`~sparsejax.budgets.NM` budget: layers whose input
      dimension is divisible by M regrow within the groups the drop emptied
      (:func:`drop_and_grow_nm`), so an N:M mask stays N:M.
  """
  fraction = _as_schedule(fraction, "drop_fraction")
  if growth not in ("random", "gradient"):
    raise ValueError(f"growth must be 'random' or 'gradient', got {growth!r}")
  group = _nm_group_size(nm)

  def rule(mask, params, grads, key, t):
    f = fraction(t)
    flags = masks.prunable_tree(params, prunable)
    keys = iter(jax.random.split(key, max(len(jax.tree.leaves(params)), 1)))
    # The i-th prunable layer draws its random scores from the i-th key.
    scores = jax.tree.map(
      lambda flag, p, g: (
        (jax.random.uniform(next(keys), p.shape) if growth == "random" else jnp.abs(g))
        if flag
        else g
      ),
      flags,
      params,
      grads,
    )

    def nm_layer(m, p, s):
      return drop_and_grow_nm(m, p, s, f, group)[0]

    in_groups = jax.tree.map(
      lambda flag, p: bool(flag) and group is not None and p.ndim >= 2 and p.shape[-2] % group == 0,
      flags,
      params,
    )
    out = _per_prunable_layer(nm_layer, mask, params, scores, prunable=in_groups)
    # Every other prunable layer: one drop and one growth selection for all.
    rest = [
      i
      for i, (f_, g_) in enumerate(zip(jax.tree.leaves(flags), jax.tree.leaves(in_groups)))
      if f_ and not g_
    ]
    if rest:
      leaves, treedef = jax.tree.flatten(out)
      pick = lambda tree: [jax.tree.leaves(tree)[i] for i in rest]
      new, _ = drop_and_grow_layers(pick(mask), pick(params), pick(scores), f)
      for i, x in zip(rest, new):
        leaves[i] = x
      out = jax.tree.unflatten(treedef, leaves)
    return out

  return rule


def set_optimizer(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  *,
  drop_fraction: ScalarOrSchedule = 0.3,
  update_every: int = 100,
  start_step: int | None = None,
  end_step: int | None = None,
  skip_update: bool = True,
  prunable=None,
  seed: int = 0,
  nm: budgets.NM | None = None,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018): drop by magnitude, grow uniformly at random.

  Args:
    inner: the optimiser to wrap.
    mask: initial mask (e.g. :func:`sparsejax.masks.random_mask` with an
      ``ERK()`` budget), or a callable ``params -> mask`` called by ``init``.
    drop_fraction: ``f(t)``: a float or an optax schedule of the step, e.g.
      :func:`cosine_drop_fraction` (default constant 0.3).
    update_every, start_step, end_step, skip_update, seed, extra_updates:
      see :func:`dynamic_sparse`.
    prunable: which leaves change (see :func:`sparsejax.masks.prunable_tree`);
      the others keep their mask.
    nm: ``None`` (default; per-layer counts kept) or an
      :class:`~sparsejax.budgets.NM` budget such as ``NM(2, 4)``: ``mask``
      must be N:M (e.g. :func:`sparsejax.masks.random_mask` with
      ``budget=NM(2, 4)``) and every update regrows within the groups the drop
      emptied (:func:`drop_and_grow_nm`), so the mask stays N:M. Layers whose
      input dimension is not divisible by M keep per-layer counts.
  """
  mask = _nm_start(mask, nm, prunable)
  rule = drop_and_grow_rule(drop_fraction, "random", prunable, nm)
  return dynamic_sparse(
    inner,
    mask,
    rule,
    update_every=update_every,
    start_step=start_step,
    end_step=end_step,
    skip_update=skip_update,
    seed=seed,
    extra_updates=extra_updates,
  )


def rigl_optimizer(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  *,
  end_step: int,
  alpha: float = 0.3,
  drop_fraction: ScalarOrSchedule | None = None,
  update_every: int = 100,
  start_step: int | None = None,
  skip_update: bool = True,
  prunable=None,
  seed: int = 0,
  nm: budgets.NM | None = None,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """RigL (Evci et al. 2020): drop by magnitude, grow by dense gradient magnitude.

  Defaults are SPEC §4's: ``ΔT = 100``, ``f(t) = (α/2)(1 + cos(π t / T_end))``
  with ``α = 0.3``; ``T_end = end_step`` (RigL: 75% of training), after which
  the mask is fixed.

  One update step by hand (``ΔT = 1`` from step 0): the weakest weight
  drops, the largest gradient outside the mask grows at exactly 0, and the
  survivors' update is skipped on this mask-update step:

  >>> import jax.numpy as jnp, optax
  >>> from sparsejax import dst, optim
  >>> params = {"w": jnp.array([[0.5, -0.1], [0., 0.]])}
  >>> mask = {"w": jnp.array([[True, True], [False, False]])}
  >>> grads = {"w": jnp.array([[1., 0.], [0.9, 0.2]])}
  >>> tx = dst.rigl_optimizer(optax.sgd(0.1), mask, end_step=100,
  ...                         drop_fraction=0.5, update_every=1, start_step=0)
  >>> updates, state = tx.update(grads, tx.init(params), params)
  >>> optim.get_mask(state)["w"].astype(int).tolist()
  [[1, 0], [1, 0]]
  >>> optax.apply_updates(params, updates)["w"].tolist()
  [[0.5, 0.0], [0.0, 0.0]]

  Args:
    inner: the optimiser to wrap.
    mask: initial mask (e.g. :func:`sparsejax.masks.random_mask` with an
      ``ERK()`` budget), or a callable ``params -> mask`` called by ``init``.
    end_step: ``T_end``.
    alpha: initial drop fraction of the cosine schedule.
    drop_fraction: overrides the cosine schedule (float or optax schedule).
    update_every, start_step, skip_update, seed, extra_updates: see
      :func:`dynamic_sparse`.
    prunable: which leaves change; the others keep their mask.
    nm: ``None`` or an :class:`~sparsejax.budgets.NM` budget kept through
      every update; see :func:`set_optimizer`.
  """
  mask = _nm_start(mask, nm, prunable)
  _checks.fraction(alpha, "alpha")
  end_step = _checks.step(end_step, "end_step", 1)
  fraction = (
    cosine_drop_fraction(alpha, end_step)
    if drop_fraction is None
    else _as_schedule(drop_fraction, "drop_fraction")
  )
  rule = drop_and_grow_rule(fraction, "gradient", prunable, nm)
  return dynamic_sparse(
    inner,
    mask,
    rule,
    update_every=update_every,
    start_step=start_step,
    end_step=end_step,
    skip_update=skip_update,
    seed=seed,
    extra_updates=extra_updates,
  )


# ----------------------------------------------------------------------------
# SRigL: constant fan-in RigL with neuron ablation
# ----------------------------------------------------------------------------

#: SRigL's default salience threshold γ_sal (Lasby et al. 2024; the released
#: code's ``min_salient_weights_per_neuron: 0.3``).
SRIGL_ABLATION_THRESHOLD = 0.3


class SRigLState(NamedTuple):
  """State of :func:`srigl_optimizer`.

  Attributes:
    dst: the :class:`DSTState` (mask, inner state, step, key, mask updates).
    budget: ``int32`` scalar per params leaf: the active weights ``B_l`` of
      each prunable layer's starting mask (0 for other leaves), the count
      the layer's units share after any ablation.
  """

  dst: DSTState
  budget: PyTree


def _units(x: jax.Array) -> jax.Array:
  """``[..., U]`` → ``[U, F]`` (unit ``o``'s fan-in in increasing flat index)."""
  return _select.units_by_fan_in(x)


def srigl_layer(
  mask: jax.Array,
  weights: jax.Array,
  grads: jax.Array,
  fraction,
  budget,
  *,
  ablation_threshold: float = SRIGL_ABLATION_THRESHOLD,
  ablate=True,
) -> jax.Array:
  """One layer's SRigL update (constant fan-in drop, ablation, per-unit growth).

  Pure and ``jit``-/``vmap``-compatible; see :func:`srigl_optimizer` for the
  equations. ``mask``, ``weights``, ``grads``: ``[..., U]`` (``U`` output
  units, fan-in ``F`` = the product of the other axes); ``budget``: ``B``,
  the layer's active weights before any ablation; ``ablate``: whether units
  of this layer may be ablated (a bool, may be traced). Returns the new mask:
  every active unit keeps exactly ``k' = min(F, ⌊B / U_active⌋)`` inputs,
  every ablated unit none.

  >>> import jax.numpy as jnp
  >>> from sparsejax import dst
  >>> mask = jnp.array([[1, 1], [1, 0], [0, 1], [0, 0]], bool)   # k = 2
  >>> w = jnp.array([[0.9, 0.1], [0.05, 0.], [0., 0.8], [0., 0.]])
  >>> g = jnp.array([[0., 0.], [0., 0.], [0.3, 0.], [0.2, 0.7]])
  >>> dst.srigl_layer(mask, w, g, 0.5, 4, ablation_threshold=0.0).astype(int).tolist()
  [[1, 0], [0, 0], [1, 1], [0, 1]]
  """
  shape = jnp.shape(mask)
  n_units = shape[-1]
  fan_in = math.prod(shape[:-1])
  m = jnp.asarray(mask, bool)
  budget = jnp.asarray(budget, jnp.int32)
  magnitude = jnp.abs(jnp.asarray(weights, jnp.float32))
  grow = jnp.abs(jnp.asarray(grads, jnp.float32))
  grow = jnp.where(jnp.isnan(grow), -jnp.finfo(jnp.float32).max, grow)
  n_active = jnp.sum(m, dtype=jnp.int32)
  n_drop = drop_count(fraction, n_active)
  n_keep = n_active - n_drop
  flat_m = jnp.ravel(m)
  if ablation_threshold > 0:
    # Salient: kept by RigL's layer-wise drop or among its n_drop largest |g|.
    salient = (
      masks.keep_top(jnp.where(flat_m, jnp.ravel(magnitude), -jnp.inf), n_keep) & flat_m
    ) | masks.keep_top(jnp.ravel(grow), n_drop)
    counts = jnp.sum(_units(salient.reshape(shape)), axis=1, dtype=jnp.int32)
    k0 = budget // n_units
    threshold = jnp.maximum(
      1, jnp.floor(jnp.float32(ablation_threshold) * k0.astype(jnp.float32)).astype(jnp.int32)
    )
    # Never so many that the budget would need more than F inputs per unit:
    # the (B // F + 1)-th most salient unit always stays.
    min_units = budget // fan_in
    ranked = -jnp.sort(-counts)
    floor_count = ranked[jnp.clip(min_units, 0, n_units - 1)]
    threshold = jnp.where(min_units < n_units, jnp.minimum(threshold, floor_count), 0)
    ablated = (counts < threshold) & jnp.asarray(ablate, bool)
  else:
    ablated = jnp.zeros((n_units,), bool)
  n_live = jnp.maximum(n_units - jnp.sum(ablated, dtype=jnp.int32), 1)
  k_new = jnp.minimum(budget // n_live, fan_in)
  live = jnp.broadcast_to(~ablated, shape)
  # Drop: RigL's layer-wise top n_keep of |θ| over the active weights of live
  # units, then at most k' per unit (its largest |θ|).
  candidates = m & live
  n_keep = jnp.minimum(n_keep, jnp.sum(candidates, dtype=jnp.int32))
  kept = (
    masks.keep_top(
      jnp.where(jnp.ravel(candidates), jnp.ravel(magnitude), -jnp.inf), n_keep
    ).reshape(shape)
    & candidates
  )
  kept = condensed.constant_fan_in_mask(magnitude, k_new, within=kept)
  # Grow: every live unit regrows k' - kept_o inputs, largest |g| first.
  regrow = jnp.where(ablated, 0, k_new - jnp.sum(_units(kept), axis=1, dtype=jnp.int32))
  grown = condensed.constant_fan_in_mask(grow, regrow, within=~kept)
  return kept | grown


def srigl_rule(
  fraction: ScalarOrSchedule,
  budget: PyTree,
  *,
  ablation_threshold: float = SRIGL_ABLATION_THRESHOLD,
  prunable=None,
  ablatable=None,
) -> MaskUpdate:
  """The :data:`MaskUpdate` of SRigL: :func:`srigl_layer` per prunable layer.

  ``budget`` is the :attr:`SRigLState.budget` pytree; ``ablatable`` says
  which prunable layers may ablate units (see :func:`srigl_optimizer`).
  Prunable layers of one shape run as one ``vmap``.
  """
  fraction = _as_schedule(fraction, "drop_fraction")

  def rule(mask, params, grads, key, t):
    del key
    f = fraction(t)
    flags = masks.prunable_tree(params, prunable)
    may = masks.prunable_tree(params, ablatable)
    may = jax.tree.map(lambda a, b: jnp.asarray(bool(a) and bool(b)), flags, may)

    def layer(m, p, g, b, a):
      return srigl_layer(m, p, g, f, b, ablation_threshold=ablation_threshold, ablate=a)

    return _per_prunable_layer(layer, mask, params, grads, budget, may, prunable=prunable)

  return rule


def srigl_optimizer(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  *,
  end_step: int,
  alpha: float = 0.3,
  drop_fraction: ScalarOrSchedule | None = None,
  update_every: int = 100,
  start_step: int | None = None,
  ablation_threshold: float = SRIGL_ABLATION_THRESHOLD,
  ablatable=None,
  skip_update: bool = True,
  prunable=None,
  seed: int = 0,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """SRigL (Lasby et al., ICLR 2024): RigL under constant fan-in, with neuron ablation.

  Every output unit ``o`` of a prunable layer (a column of a dense kernel, an
  output channel of a conv kernel over ``kh · kw · c_in``; ``U`` units of
  fan-in ``F``) keeps the same number ``k`` of active inputs, so the layer
  can run condensed (:mod:`sparsejax.condensed`). Start from a constant
  fan-in mask, e.g. :func:`sparsejax.masks.random_mask` with
  ``budget=budgets.ConstantFanIn(budgets.ERK())``; its active count ``B_l``
  per layer is the layer's budget for the whole run
  (:attr:`SRigLState.budget`). At a mask-update step ``t`` (RigL's schedule,
  ``f(t) = (α/2)(1 + cos(π t / T_end))``), per layer with ``n`` active
  weights, ``θ`` its weights and ``g`` the dense gradient:

  1. **salience** (RigL's layer-wise criteria): with ``d = ⌊f(t) · n⌋``
     (:func:`drop_count`), the salient weights are the ``n − d`` active
     weights of largest ``|θ|`` and the ``d`` entries of largest ``|g|``
     (any entry of the layer); ``c_o`` = the salient weights of unit ``o``;
  2. **ablation**: unit ``o`` is ablated when ``c_o < γ``, ``γ = max(1,
     ⌊γ_sal · k_0⌋)``, ``k_0 = ⌊B / U⌋`` the constant fan-in before ablation
     and ``γ_sal`` = ``ablation_threshold`` (paper default 0.3); ``γ`` is
     lowered to the ``(⌊B / F⌋ + 1)``-th largest ``c_o`` when needed, so
     enough units stay to hold ``B`` at ``≤ F`` inputs each. An ablated unit
     loses all its inputs; the ablation is decided afresh at every update (a
     unit whose gradients become salient again comes back, at 0);
  3. **redistribution**: every live unit gets ``k' = ⌊B / U_live⌋`` inputs
     (the ablated units' share spread over the others);
  4. **drop**: RigL's drop, the ``n − d`` active weights of largest ``|θ|``
     in the live units (layer-wise), then at most ``k'`` per unit (its
     largest ``|θ|``);
  5. **grow**: every live unit regrows ``k' − kept_o`` inputs, the largest
     ``|g|`` among its entries not kept (a just-dropped weight may come back
     and keeps its value), ties to the lower flat index.

  So after every update each live unit has exactly ``k'`` inputs and each
  ablated unit none (:func:`sparsejax.condensed.check_constant_fan_in`).
  New connections start at 0 with reset moments, and the optimiser state is
  untouched on a mask-update step (``skip_update``), as for every DST method
  (:func:`dynamic_sparse`). :func:`ablated_fraction` of the mask gives the
  fraction of ablated units (:class:`AblatedUnits` logs it).

  From the paper and its released code (``calgaryml/condensed-sparsity``,
  ``RigLConstFanScheduler``): the salience rule, γ_sal = 0.3 measured
  against the sparse constant fan-in ``k_0``
  (``use_sparse_const_fan_in_for_ablation``), the guard on the number of
  live units, ``k' = ⌊B / U_live⌋`` and the per-unit regrowth. One
  difference: where the layer-wise drop leaves a unit more than ``k'``
  weights, the reference keeps an arbitrary ``k'`` of them; here its
  ``k'`` largest ``|θ|``. The reference never ablates the classifier: pass
  ``ablatable=dataclasses.replace(masks.KEEP_CLASSIFIER_DENSE,
  order=models.layer_order(model, x))``.

  Args:
    inner: the optimiser to wrap.
    mask: the starting constant fan-in mask, or a callable ``params -> mask``
      called by ``init``.
    end_step: ``T_end`` (RigL: 75% of training).
    alpha: initial drop fraction α of the cosine schedule (default 0.3).
    drop_fraction: overrides the cosine schedule (float or optax schedule).
    update_every: ``ΔT`` (default 100).
    start_step, skip_update, seed, extra_updates: see :func:`dynamic_sparse`.
    ablation_threshold: ``γ_sal`` in [0, 1] (default 0.3, the paper's); 0
      turns ablation off (constant fan-in RigL).
    ablatable: which prunable layers may ablate units, as ``prunable`` (see
      :func:`sparsejax.masks.prunable_tree`); default every prunable layer.
    prunable: which leaves change (kernels of ``ndim >= 2``); the others keep
      their mask.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SRigLState`.

  Example:

    >>> import jax, jax.numpy as jnp, optax
    >>> from sparsejax import budgets, condensed, dst, masks
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> mask = masks.random_mask(jax.random.key(1), params, 0.5,
    ...                          budget=budgets.ConstantFanIn())
    >>> tx = dst.srigl_optimizer(optax.sgd(0.1), mask, end_step=10,
    ...                          update_every=1, start_step=0)
    >>> grads = {"w": jax.random.normal(jax.random.key(2), (8, 4))}
    >>> _, state = tx.update(grads, tx.init(masks.apply(params, mask)), params)
    >>> condensed.check_constant_fan_in(state.dst.masked.mask)
    {'w': 4}
  """
  _checks.fraction(alpha, "alpha")
  end_step = _checks.step(end_step, "end_step", 1)
  gamma = _checks.number(
    ablation_threshold,
    "ablation_threshold",
    0.0,
    1.0,
    why="γ_sal, a fraction of each unit's constant fan-in",
  )
  fraction = (
    cosine_drop_fraction(alpha, end_step)
    if drop_fraction is None
    else _as_schedule(drop_fraction, "drop_fraction")
  )
  mask = _cfi_start(mask, prunable)
  options = dict(
    update_every=update_every,
    start_step=start_step,
    end_step=end_step,
    skip_update=skip_update,
    seed=seed,
    extra_updates=extra_updates,
  )
  # Checks the schedule once, here.
  dynamic_sparse(inner, mask, lambda m, *_: m, **options)

  def transformation(budget):
    rule = srigl_rule(
      fraction, budget, ablation_threshold=gamma, prunable=prunable, ablatable=ablatable
    )
    return dynamic_sparse(inner, mask, rule, **options)

  def init_fn(params):
    state = transformation(None).init(params)
    flags = masks.prunable_tree(params, prunable)
    budget = jax.tree.map(
      lambda f, m: jnp.sum(m, dtype=jnp.int32) if f else jnp.zeros((), jnp.int32),
      flags,
      state.masked.mask,
    )
    return SRigLState(state, budget)

  def update_fn(updates, state, params=None, **extra_args):
    out, dst_state = transformation(state.budget).update(updates, state.dst, params, **extra_args)
    return out, SRigLState(dst_state, state.budget)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cfi_start(mask, prunable):
  """``mask`` checked constant fan-in (no ablated unit) when concrete."""

  def check(m):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(m)):
      return m
    try:
      condensed.check_constant_fan_in(m, prunable, allow_ablated=False)
    except ValueError as e:
      raise ValueError(
        f"srigl_optimizer needs a constant fan-in starting mask, e.g. "
        f"masks.random_mask(key, params, s, budget=budgets.ConstantFanIn("
        f"budgets.ERK())): {e}"
      ) from None
    return m

  if not callable(mask):
    return check(mask)
  return lambda params: check(mask(params))


def ablated_units(mask: PyTree, prunable=None) -> tuple[int, int]:
  """``(ablated, total)`` output units of the prunable kernels of ``mask``.

  A unit is ablated when it has no active input (fan-in 0).

  >>> import jax.numpy as jnp
  >>> from sparsejax import dst
  >>> dst.ablated_units({"w": jnp.array([[1, 0, 0], [1, 0, 1]], bool)})
  (1, 3)
  """
  flags = jax.tree.leaves(masks.prunable_tree(mask, prunable))
  ablated = total = 0
  for f, m in zip(flags, jax.tree.leaves(mask)):
    if f and jnp.ndim(m) >= 2:
      counts = condensed.fan_in_counts(m)
      ablated += int((counts == 0).sum())
      total += int(counts.size)
  return ablated, total


def ablated_fraction(mask: PyTree, prunable=None) -> float:
  """The fraction of output units of the prunable kernels with no active input."""
  ablated, total = ablated_units(mask, prunable)
  return ablated / total if total else 0.0


class AblatedUnits:
  """An epoch-end callback of :func:`sparsejax.train.fit` adding
  ``ablated_units`` (the :func:`ablated_fraction` of the mask) to every epoch
  record, e.g. for SRigL.

  Example::

    train.fit(..., callbacks=[dst.AblatedUnits(prunable).callback()])
  """

  def __init__(self, prunable=None):
    self.prunable = prunable

  def epoch_end(self, step, carry, ctx):
    del step
    ctx.record["ablated_units"] = ablated_fraction(jax.device_get(carry.state.mask), self.prunable)
    return None

  def callback(self) -> hooks.Callback:
    """The epoch-end :class:`sparsejax.hooks.Callback`."""
    return hooks.callback(self.epoch_end, at_epoch_end=True)


def _magnitude_prune(sparsity: optax.Schedule, prunable):
  def rule(mask, params, grads, key, t):
    del grads, key
    magnitude = jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)
    return masks.topk_mask(
      magnitude, sparsity(t), budget=budgets.Global(), prunable=prunable, within=mask
    )

  return rule


def gmp_optimizer(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  *,
  final_sparsity: float,
  start_step: int,
  end_step: int,
  initial_sparsity: float = 0.0,
  update_every: int = 100,
  regrow_fraction: ScalarOrSchedule | None = None,
  regrow_end_step: int | None = None,
  skip_update: bool = True,
  prunable=None,
  seed: int = 0,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu & Gupta 2017), optionally with regrowth.

  At every update step ``t`` in ``[start_step, end_step]`` (every
  ``update_every`` steps, ``end_step`` included) the mask becomes the global
  top-``|θ|`` of the currently active weights at sparsity
  :func:`cubic_sparsity` ``(t)`` (exact count over all prunable entries).
  With ``regrow_fraction``, each update step (until ``regrow_end_step``) then
  drops that fraction of every layer's active weights by magnitude and
  regrows as many by gradient magnitude (GraNet); the density is unchanged
  by regrowth. The weights removed by the step's magnitude pruning are zero,
  with reset moments, before its regrowth (the GraNet reference): one pruned
  and regrown in the same step starts at exactly 0 like every new
  connection.

  GMP and GraNet cannot target an N:M budget: their pruning is a global
  ranking whose sparsity follows a schedule, not N of every M. For N:M
  sparse training use :func:`set_optimizer` or :func:`rigl_optimizer` with
  ``nm=``, or prune at initialisation with ``budget=NM(n, m)``.

  Args:
    inner: the optimiser to wrap.
    mask: starting mask (all True for a dense start, or ERK at
      ``initial_sparsity``).
    final_sparsity: ``s_f``.
    start_step, end_step: ``t_0`` and ``t_1`` of the cubic schedule.
    initial_sparsity: ``s_i`` (default 0: dense start).
    update_every: ``ΔT``.
    regrow_fraction: ``None`` (plain GMP) or the regrowth drop fraction
      (float or schedule; GraNet: :func:`cosine_drop_fraction` ``(0.5, ...)``).
    regrow_end_step: no updates at or after this step (default
      ``end_step + 1``: pruning only).
    skip_update, seed, extra_updates: see :func:`dynamic_sparse`.
    prunable: which leaves are pruned; the others keep their mask.
  """
  sparsity = cubic_sparsity(initial_sparsity, final_sparsity, start_step, end_step)
  prune = _magnitude_prune(sparsity, prunable)
  last = (
    int(end_step) + 1
    if regrow_end_step is None
    else _checks.step(regrow_end_step, "regrow_end_step", 1)
  )
  if regrow_fraction is None:
    rule = prune
  else:
    regrow = drop_and_grow_rule(regrow_fraction, "gradient", prunable)

    def rule(mask, params, grads, key, t):
      pruned = jax.lax.cond(t <= end_step, lambda: prune(mask, params, grads, key, t), lambda: mask)
      # Pruned weights are 0, with reset moments, before regrowth sees them:
      # one pruned and regrown in this step restarts at 0 (SPEC §4).
      new = regrow(pruned, masks.apply(params, pruned), grads, key, t)
      return MaskStep(new, jax.tree.map(lambda n, p: n & p, new, pruned))

  return dynamic_sparse(
    inner,
    mask,
    rule,
    update_every=update_every,
    start_step=start_step,
    end_step=last,
    skip_update=skip_update,
    seed=seed,
    extra_updates=extra_updates,
  )


def granet_optimizer(
  inner: optax.GradientTransformation,
  mask: optim.MaskOrFn,
  *,
  final_sparsity: float,
  start_step: int,
  end_step: int,
  regrow_end_step: int,
  initial_sparsity: float = 0.0,
  alpha: float = 0.5,
  update_every: int = 1000,
  skip_update: bool = True,
  prunable=None,
  seed: int = 0,
  extra_updates: ExtraUpdates = (),
) -> optax.GradientTransformationExtraArgs:
  """GraNet (Liu et al. 2021): gradual magnitude pruning plus gradient regrowth.

  SPEC §4's CIFAR reference: ERK start at ``initial_sparsity = 0.5`` (or
  dense), pruning every 1000 iterations from epoch 0 to epoch 80 of 160
  (``start_step``, ``end_step``), regrowth fraction 0.5 decayed by cosine to 0
  at ``regrow_end_step``, gradient growth, per-layer counts kept during
  regrowth. See :func:`gmp_optimizer` for the arguments.
  """
  return gmp_optimizer(
    inner,
    mask,
    final_sparsity=final_sparsity,
    start_step=start_step,
    end_step=end_step,
    initial_sparsity=initial_sparsity,
    update_every=update_every,
    regrow_fraction=cosine_drop_fraction(alpha, regrow_end_step),
    regrow_end_step=regrow_end_step,
    skip_update=skip_update,
    prunable=prunable,
    seed=seed,
    extra_updates=extra_updates,
  )


def mask_churn(old: PyTree, new: PyTree) -> jax.Array:
  """Fraction of mask entries that differ between ``old`` and ``new`` (float32)."""
  changed = sum(
    jnp.sum(a != b, dtype=jnp.int32) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))
  )
  total = sum(math.prod(jnp.shape(a)) for a in jax.tree.leaves(old))
  return jnp.asarray(changed, jnp.float32) / max(total, 1)


class MaskChurn:
  """How much the mask moves: a step hook and an epoch-end callback of
  :func:`sparsejax.train.fit`.

  :meth:`callback` adds ``mask_churn`` to every epoch record: the fraction of
  all mask entries (non-prunable ones included) that differ from the mask at
  the previous epoch end (at the start of training for the first epoch).
  With ``log_every_steps=K`` :meth:`hook` also logs ``mask_churn`` every
  ``K`` steps to ``steps.jsonl`` (the change since the previous log),
  computed inside the jitted step. The reference masks are the hook's state,
  so a resumed run continues the same series.

  Example::

    churn = dst.MaskChurn(log_every_steps=100)
    train.fit(..., hooks=[churn.hook()], callbacks=[churn.callback()])

  Args:
    log_every_steps: per-step logging period, or ``None`` (epochs only).
    name: the hook's name (default ``"dst"``).
  """

  def __init__(self, log_every_steps: int | None = None, name: str = "dst"):
    self.log_every_steps = log_every_steps
    self.name = name

  def init(self, state):
    mask = state.mask
    if mask is None:
      raise ValueError(
        "MaskChurn needs a sparse train state (an optimiser state that holds a mask)"
      )
    return {"epoch": mask, "step": mask}

  def update(self, hook_state, state, info):
    if self.log_every_steps is None:
      return hook_state, state, {}
    mask = state.mask
    due = (info.step + 1) % self.log_every_steps == 0
    churn = jax.lax.cond(
      due, lambda: mask_churn(hook_state["step"], mask), lambda: jnp.zeros((), jnp.float32)
    )
    ref = jax.tree.map(lambda a, b: jnp.where(due, b, a), hook_state["step"], mask)
    return dict(hook_state, step=ref), state, {"mask_churn": churn}

  def hook(self) -> hooks.StepHook:
    """The :class:`sparsejax.hooks.StepHook` (state: the reference masks)."""
    return hooks.StepHook(
      self.init, self.update, name=self.name, logs_at=hooks.every(self.log_every_steps)
    )

  def epoch_end(self, step, carry, ctx):
    del step
    hook_state, mask = carry.hook_states[self.name], carry.state.mask
    ctx.record["mask_churn"] = float(mask_churn(hook_state["epoch"], mask))
    return carry.replace(
      hook_states=dict(carry.hook_states, **{self.name: dict(hook_state, epoch=mask)})
    )

  def callback(self) -> hooks.Callback:
    """The epoch-end :class:`sparsejax.hooks.Callback` (``mask_churn`` field)."""
    return hooks.callback(self.epoch_end, at_epoch_end=True)
