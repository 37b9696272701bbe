"""Pruning at initialisation: saliency scores and masks (SPEC §2).

Every score is a pure, ``jit``-compiled function of ``(params, mask, ...)`` that
returns a pytree of float scores parallel to ``params``, computed on the masked
parameters ``θ ⊙ m``. **Higher is kept**: :func:`sparsejax.masks.topk_mask`
turns scores into an exact-count mask under a budget. One place per method:

==============  ======================  ======================================
method          function                score (higher kept)
==============  ======================  ======================================
Random          :func:`random_scores`   ``N(0, 1)``
Magnitude       :func:`magnitude`       ``|θ|``
SNIP            :func:`snip`            ``|g ⊙ θ|``
GraSP           :func:`grasp`           ``θ ⊙ (H g)`` (= −S of the paper)
SynFlow         :func:`synflow_scores`  ``|∂R/∂θ ⊙ θ|`` on the abs'd network
                :func:`synflow`         100 fused rounds → mask
Iterative       :func:`iterative`       any score, n rounds to ``d^(k/n)``
==============  ======================  ======================================

:func:`prune_at_init` is the entry point that returns a mask for a method name.

The model contract
------------------
A model is a function ``apply_fn(params, x, train) -> logits`` (``train`` a
Python bool selecting the batch-norm mode; the caller closes over everything
else). Models with non-trainable state (batch-norm statistics) are better given
as an :class:`ApplyFn`, which carries the state *explicitly*::

  params, apply_fn = linen_apply_fn(model, variables)   # Flax linen
  logits = apply_fn(params, x, train=False)             # BN eval: stored stats

An :class:`ApplyFn` is a pytree (its ``state`` is traced, its function static)
and is called like a plain function, but SynFlow can replace the state by its
absolute value (``|mean|``, ``|var|``, as the reference implementation does
with the whole ``state_dict``) and :mod:`sparsejax.diagnostics` can replace it
by neutral statistics. A plain function's closed-over state is used as is.
With ``train=True`` a linen model normalises with the batch statistics and the
updated running averages are discarded.

Scoring data
------------
``batches`` for SNIP and GraSP is one batch ``(x, y)`` with integer labels
``y: [B]``, a stack ``(xs, ys)`` with ``xs: [nb, B, ...]`` and ``ys: [nb, B]``,
or a sequence of equally shaped ``(x, y)`` pairs. The batches are scanned
(``lax.scan``) inside one compiled program. The loss of each batch is the mean
cross-entropy over its examples; losses (and gradients) are summed over batches.
The reference scoring sample is class balanced, 10 examples per class
(:func:`sparsejax.data.class_balanced_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
import contextlib
import dataclasses
import functools
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import budgets
from sparsejax import losses
from sparsejax import masks
from sparsejax import modeling

PyTree = Any
METHODS = ("random", "magnitude", "snip", "grasp", "synflow")
BN_MODES = ("train", "eval")

# ----------------------------------------------------------------------------
# The model contract
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ApplyFn:
  """A model function with explicit non-trainable state.

  Calling it as ``apply_fn(params, x, train)`` computes
  ``fn(params, state, x, train)``. It is a pytree whose only children are the
  leaves of ``state``, so it can be passed to ``jit``-compiled functions as an
  ordinary argument; ``fn`` is static (part of the compilation cache key: a
  plain function compares by identity, a linen module by its fields).

  Attributes:
    fn: ``(params, state, x, train: bool) -> logits [B, num_classes]``.
    state: pytree of non-trainable arrays (e.g. ``{'batch_stats': ...}``), or
      ``None``.
  """

  fn: Callable[..., jax.Array]
  state: PyTree = None

  def __call__(self, params: PyTree, x: jax.Array, train: bool = False):
    return self.fn(params, self.state, x, train)

  def replace(self, **changes) -> ApplyFn:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(ApplyFn, data_fields=["state"], meta_fields=["fn"])


@dataclasses.dataclass(frozen=True)
class _Stateless:
  """Adapts a plain ``f(params, x, train)`` to ``fn(params, state, x, train)``."""

  f: Callable[..., jax.Array]

  def __call__(self, params, state, x, train):
    del state
    return self.f(params, x, train)


@dataclasses.dataclass(frozen=True)
class _LinenFn:
  """``fn(params, state, x, train)`` of a Flax linen module."""

  module: Any
  scalars: tuple[tuple[str, Any], ...] = ()

  def __call__(self, params, state, x, train):
    variables = {"params": params, **(state or {})}
    logits, _ = modeling.apply_model(
      self.module, variables, x, train=train, scalars=dict(self.scalars)
    )
    return logits


def as_apply_fn(apply_fn) -> ApplyFn:
  """Returns ``apply_fn`` as an :class:`ApplyFn` (a plain function gets no state).

  Raises:
    ValueError: if ``apply_fn`` is ``None`` or not callable.
  """
  if isinstance(apply_fn, ApplyFn):
    return apply_fn
  if apply_fn is None or not callable(apply_fn):
    raise ValueError(
      "apply_fn must be a function apply_fn(params, x, train) -> logits or an "
      f"ApplyFn (see sparsejax.scores.linen_apply_fn), got {apply_fn!r}"
    )
  return ApplyFn(_Stateless(apply_fn), None)


def linen_apply_fn(
  model, variables: Mapping[str, PyTree], scalars: Mapping[str, float] | None = None
) -> tuple[PyTree, ApplyFn]:
  """Splits Flax linen ``variables`` into ``(params, apply_fn)``.

  Every collection but ``'params'`` (e.g. ``'batch_stats'``) becomes the
  :class:`ApplyFn` state. ``apply_fn(params, x, train)`` calls
  :func:`sparsejax.modeling.apply_model` ``(model, variables, x,
  train=train, scalars=scalars)``; with
  ``train=True`` and state it passes ``mutable=[<state collections>]`` and
  discards the updated statistics, so batch norm normalises with the statistics
  of ``x``. With ``train=False`` batch norm uses the stored running averages.

  Args:
    model: a linen module whose ``__call__`` takes ``(x, train=...)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` from ``model.init``.
    scalars: per-step scalars the model reads (``model.scalar_names``), as
      static Python numbers (hashable), e.g. ``{"act_coef": 1.0}``.

  Returns:
    ``(variables['params'], apply_fn)``.
  """
  if "params" not in variables:
    raise ValueError(f"variables have no 'params' collection: {list(variables)}")
  state = {k: v for k, v in variables.items() if k != "params"}
  scalars = dict(scalars or {})
  modeling.check_scalars(model, scalars)
  fn = _LinenFn(model, tuple(sorted(scalars.items())))
  return variables["params"], ApplyFn(fn, state or None)


def _bn_train(bn_mode: str) -> bool:
  if bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
  return bn_mode == "train"


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def stack_batches(batches) -> tuple[jax.Array, jax.Array]:
  """Normalises scoring data to a stack ``(xs [nb, B, ...], ys [nb, B])``.

  Accepts one batch ``(x, y)`` with ``y: [B]``, a stack ``(xs, ys)`` with
  ``ys: [nb, B]``, or a sequence of equally shaped ``(x, y)`` pairs. Labels are
  integer class indices.
  """
  if batches is None:
    raise ValueError(
      "this score needs scoring data: pass batches=(x, y) (e.g. "
      "sparsejax.data.class_balanced_batch(ds, 10))"
    )
  if not isinstance(batches, Sequence) or len(batches) == 0:
    raise ValueError(
      f"batches must be (x, y) or a sequence of (x, y) pairs, got {type(batches).__name__}"
    )
  if len(batches) == 2 and not isinstance(batches[0], (tuple, list)):
    x, y = jnp.asarray(batches[0]), jnp.asarray(batches[1])
    if y.ndim == 1:
      x, y = x[None], y[None]
    elif y.ndim != 2:
      raise ValueError(
        f"labels must be integer class indices of shape [B] or [nb, B], got shape {y.shape}"
      )
  else:
    if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
      raise ValueError("batches must be (x, y) or a sequence of (x, y) pairs")
    x = jnp.stack([jnp.asarray(b[0]) for b in batches])
    y = jnp.stack([jnp.asarray(b[1]) for b in batches])
    if y.ndim != 2:
      raise ValueError(
        f"labels must be integer class indices of shape [B], got shape {y.shape[1:]}"
      )
  if x.shape[:2] != y.shape:
    raise ValueError(
      f"inputs {x.shape} and labels {y.shape} disagree on the leading (batch) dimensions"
    )
  if not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
  return x, y


def _summed_over_batches(fn, like: PyTree, xs, ys) -> PyTree:
  """``Σ_b fn(xs[b], ys[b])`` as one ``lax.scan``; ``fn`` returns a ``like`` tree.

  A single batch is computed without a loop. On CPU the loop body's
  convolutions are put in XLA:CPU's fast layout, which XLA does not do inside
  loops (:func:`sparsejax.modeling.loop_body`).
  """
  if xs.shape[0] == 1:
    return fn(xs[0], ys[0])
  fn = modeling.loop_body(fn)

  def body(acc, xy):
    return jax.tree.map(jnp.add, acc, fn(*xy)), None

  zeros = jax.tree.map(jnp.zeros_like, like)
  total, _ = jax.lax.scan(body, zeros, (xs, ys))
  return total


def _flags_static(params: PyTree, prunable) -> tuple[bool, ...]:
  """The prunable flags as a hashable tuple (a static ``jit`` argument)."""
  return tuple(jax.tree.leaves(masks.prunable_tree(params, prunable)))


def _flags_tree(params: PyTree, flags: tuple[bool, ...]) -> PyTree:
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def _cast_floats(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def precision_scope(dtype) -> contextlib.AbstractContextManager:
  """The scope in which to compute in ``dtype``: ``jax.enable_x64`` for float64.

  SynFlow and :func:`sparsejax.diagnostics.effective_mask` can compute in
  float64 without the process-wide ``jax_enable_x64`` flag.

  Args:
    dtype: ``float64`` (a ``jax.enable_x64(True)`` scope), or ``float32``,
      ``float16`` or ``bfloat16`` (a scope that does nothing).

  Returns:
    A context manager.

  Raises:
    ValueError: ``dtype`` is not a float type.

  Example::

    >>> import jax.numpy as jnp
    >>> from sparsejax import scores
    >>> with scores.precision_scope(jnp.float64):
    ...   print(jnp.ones(2, jnp.float64).dtype)
    float64
  """
  if np.dtype(dtype) == np.float64:
    return jax.enable_x64(True)
  if np.dtype(dtype) not in (np.float32, np.float16) and np.dtype(dtype).name != "bfloat16":
    raise ValueError(f"dtype must be a float type, got {dtype!r}")
  return contextlib.nullcontext()


# ----------------------------------------------------------------------------
# Scores (higher is kept)
# ----------------------------------------------------------------------------


@jax.jit
def random_scores(key: jax.Array, params: PyTree) -> PyTree:
  """Random scores: iid ``N(0, 1)`` per entry (SPEC §2 "Random").

  With a global budget this gives approximately uniform per-layer density.

  Args:
    key: a PRNG key.
    params: params pytree (only shapes are read).

  Returns:
    float32 scores parallel to ``params``.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(1, len(leaves)))
  return jax.tree.unflatten(
    treedef, [jax.random.normal(k, jnp.shape(p), jnp.float32) for k, p in zip(keys, leaves)]
  )


@jax.jit
def magnitude(params: PyTree, mask: PyTree) -> PyTree:
  """Magnitude scores ``S = |θ ⊙ m|`` (SPEC §2 "Magnitude")."""
  return jax.tree.map(jnp.abs, masks.apply(params, mask))


@functools.partial(jax.jit, static_argnames=("train",))
def _snip(params, mask, apply_fn: ApplyFn, xs, ys, train: bool):
  w = masks.apply(params, mask)
  grad = jax.grad(lambda w_, x, y: jnp.mean(losses.cross_entropy(apply_fn(w_, x, train), y)))
  g = _summed_over_batches(lambda x, y: grad(w, x, y), w, xs, ys)
  return jax.tree.map(lambda g_, w_: jnp.abs(g_ * w_), g, w)


def snip(params: PyTree, mask: PyTree, apply_fn, batches, bn_mode: str = "eval") -> PyTree:
  """SNIP connection sensitivity (Lee et al. 2019), SPEC §2 "SNIP".

  ``S = |g ⊙ θ|`` with ``g = Σ_b ∇_θ L_b(θ ⊙ m)``: the cross-entropy gradient is
  summed over all scoring batches *before* the product with θ (partly
  cancelling batch gradients lower the score). Normalising by ``Σ S`` as the
  paper does would not change the ranking and is omitted.

  Args:
    params: params pytree θ.
    mask: bool mask pytree m; scores are computed at ``θ ⊙ m``.
    apply_fn: ``apply_fn(params, x, train) -> logits`` or :class:`ApplyFn`.
    batches: scoring data, see :func:`stack_batches`.
    bn_mode: batch-norm mode while scoring, ``'eval'`` (default, the
      Synaptic-Flow reference) or ``'train'``.

  Returns:
    Non-negative scores parallel to ``params``; pruned entries score 0.
  """
  xs, ys = stack_batches(batches)
  return _snip(params, mask, as_apply_fn(apply_fn), xs, ys, _bn_train(bn_mode))


@functools.partial(jax.jit, static_argnames=("flags", "temperature", "train"))
def _grasp(params, mask, apply_fn: ApplyFn, xs, ys, flags, temperature: float, train: bool):
  w = masks.apply(params, mask)
  grad = jax.grad(
    lambda w_, x, y: jnp.mean(losses.cross_entropy(apply_fn(w_, x, train) / temperature, y))
  )
  g = _summed_over_batches(lambda x, y: grad(w, x, y), w, xs, ys)
  # The direction g is the gradient of the sparse network: it spans the kept
  # entries of the prunable tensors (the reference takes g over the conv/linear
  # weights, through the mask).
  g = jax.tree.map(
    lambda g_, m, f: jnp.where(m, g_, 0) if f else jnp.zeros_like(g_),
    g,
    mask,
    _flags_tree(w, flags),
  )
  g = jax.lax.stop_gradient(g)
  hvp = lambda x, y: jax.jvp(lambda w_: grad(w_, x, y), (w,), (g,))[1]
  hg = _summed_over_batches(hvp, w, xs, ys)
  return jax.tree.map(jnp.multiply, w, hg)


def grasp(
  params: PyTree,
  mask: PyTree,
  apply_fn,
  batches,
  temperature: float = 200.0,
  bn_mode: str = "train",
  prunable=None,
) -> PyTree:
  """GraSP, gradient signal preservation (Wang et al. 2020), SPEC §2 "GraSP".

  The paper scores ``S = −θ ⊙ (H g)`` and **removes the largest S** (the
  weights whose removal least reduces the gradient norm ``gᵀg``). Here, so that
  every score in sparsejax means "higher is kept", the function returns

      ``−S = θ ⊙ (H g)``,

  and :func:`sparsejax.masks.topk_mask` keeps the highest ``−S`` — the same
  weights as the reference (``keep = S <= threshold``). Scores can be negative.

  * ``g = stop_gradient(m ⊙ Σ_b ∇_θ L_b)`` where ``L_b`` is the mean
    cross-entropy of ``logits / temperature`` on batch ``b``; ``g`` is also
    zero outside the prunable tensors, as the reference takes g over the
    conv/linear weights (through the mask).
  * ``H g = Σ_b ∂/∂ε ∇_θ L_b(θ + ε g)``, a forward-over-reverse
    Hessian-vector product (``jax.jvp`` of ``jax.grad``); H is never formed.

  Args:
    params: params pytree θ.
    mask: bool mask pytree m; everything is evaluated at ``θ ⊙ m``.
    apply_fn: ``apply_fn(params, x, train) -> logits`` or :class:`ApplyFn`.
    batches: scoring data, see :func:`stack_batches`.
    temperature: T dividing the logits; default 200 (the reference).
    bn_mode: ``'train'`` (default, the reference) or ``'eval'``.
    prunable: which tensors span ``g``; see :func:`sparsejax.masks.prunable_tree`.

  Returns:
    Scores ``θ ⊙ (H g)`` parallel to ``params``; higher is kept.
  """
  xs, ys = stack_batches(batches)
  # Second order (jvp of grad): the whole program is traced without the
  # models' CPU fast path, whose branches autodiff would multiply
  # (modeling.second_order). On a ResNet-20 (100 images, 2-core AMD
  # EPYC Zen 4) the first call took 5.0 s instead of 10.8 s, later calls
  # 1.05 s instead of 0.99 s (one run). _grasp is only traced here.
  with modeling.second_order():
    return _grasp(
      params,
      mask,
      as_apply_fn(apply_fn),
      xs,
      ys,
      _flags_static(params, prunable),
      float(temperature),
      _bn_train(bn_mode),
    )


def _synflow_linearise(params, apply_fn: ApplyFn, dtype):
  """SynFlow's network: ``|θ|`` and ``|state|`` in ``dtype``."""
  abs_cast = lambda t: _cast_floats(jax.tree.map(jnp.abs, t), dtype)
  return abs_cast(params), apply_fn.replace(state=abs_cast(apply_fn.state))


def _synflow_round(abs_params, mask, abs_apply_fn: ApplyFn, x, train: bool):
  """``|∂R/∂w ⊙ w|`` at ``w = |θ| ⊙ m``, ``R = Σ logits(x)``."""
  w = masks.apply(abs_params, mask)
  g = jax.grad(lambda w_: jnp.sum(abs_apply_fn(w_, x, train)))(w)
  return jax.tree.map(lambda g_, w_: jnp.abs(g_ * w_), g, w)


@functools.partial(jax.jit, static_argnames=("input_shape", "train", "dtype"))
def _synflow_scores(params, mask, apply_fn: ApplyFn, input_shape, train, dtype):
  abs_params, abs_fn = _synflow_linearise(params, apply_fn, dtype)
  x = jnp.ones((1, *input_shape), dtype)
  return _synflow_round(abs_params, mask, abs_fn, x, train)


def synflow_scores(
  params: PyTree,
  mask: PyTree,
  apply_fn,
  input_shape: Sequence[int],
  *,
  bn_mode: str = "eval",
  dtype=jnp.float32,
) -> PyTree:
  """One round of SynFlow scores (Tanaka et al. 2020), SPEC §2 "SynFlow".

  Data-free: every parameter and every :class:`ApplyFn` state leaf (batch-norm
  statistics) is replaced by its absolute value, the input is a single all-ones
  example ``x = 1 [1, *input_shape]``, ``R = Σ logits(x)`` and

      ``S = |∂R/∂θ ⊙ θ|``   at ``θ ← |θ| ⊙ m``.

  For a chain of linear layers with non-negative weights and no biases the sum
  of the scores of every layer equals R (conservation of synaptic flow).

  Args:
    params: params pytree θ.
    mask: bool mask pytree m.
    apply_fn: ``apply_fn(params, x, train) -> logits`` or :class:`ApplyFn`
      (only an ``ApplyFn``'s state can be abs'd; a plain function's closed-over
      statistics are used as they are).
    input_shape: shape of one example, e.g. ``(32, 32, 3)``.
    bn_mode: ``'eval'`` (default, the reference) or ``'train'``.
    dtype: ``jnp.float32`` (default) or ``jnp.float64``; float64 runs in a
      ``jax.enable_x64`` scope for deep nets whose R under/overflows in float32.
      The model must compute in the dtype of its params and input (linen models
      with an explicit ``dtype=jnp.float32`` attribute stay in float32).

  Returns:
    Non-negative scores of ``dtype`` parallel to ``params``; pruned entries 0.
  """
  with precision_scope(dtype):
    return _synflow_scores(
      params, mask, as_apply_fn(apply_fn), tuple(input_shape), _bn_train(bn_mode), np.dtype(dtype)
    )


# ----------------------------------------------------------------------------
# Iterative pruning: n rounds to d^(k/n), one compiled program
# ----------------------------------------------------------------------------


def _iterate(
  score_fn, params, mask, sparsity: float, rounds: int, budget: budgets.Budget, flags: PyTree
):
  """``rounds`` rounds of score-then-prune inside one ``lax.fori_loop``.

  Round ``k`` prunes each pool of the budget (:meth:`budgets.Budget.pools`)
  to density ``d ** (k / n)`` among the entries kept so far
  (:meth:`budgets.Pool.scheduled`); the last round calls ``topk_mask`` with
  the Python ``sparsity`` (under ``lax.cond``), so the final counts are
  exactly those of a one-shot mask. ``score_fn(params, mask)`` is traced
  once; on CPU its convolutions are put in the layout of XLA:CPU's fast
  kernel, which XLA does not do inside a loop (see
  :func:`sparsejax.modeling.loop_body`).
  """
  score_fn = modeling.loop_body(score_fn)
  shapes = {
    p: tuple(jnp.shape(x))
    for (p, x), f in zip(masks.named_leaves(params), jax.tree.leaves(flags))
    if f
  }
  pools = budget.pools(shapes, sparsity)

  def final(scores, within):
    return masks.topk_mask(scores, sparsity, budget=budget, prunable=flags, within=within)

  def scheduled(scores, within, exponent):
    return masks.select_pools(scores, [p.scheduled(exponent) for p in pools], within=within)

  def body(i, m):
    scores = score_fn(params, m)
    k = i + 1
    exponent = k.astype(jnp.float32) / rounds
    return jax.lax.cond(k == rounds, final, lambda s, w: scheduled(s, w, exponent), scores, m)

  return jax.lax.fori_loop(0, rounds, body, mask)


@functools.partial(jax.jit, static_argnames=("score_fn", "sparsity", "rounds", "budget", "flags"))
def _iterative(score_fn, params, mask, args, sparsity, rounds, budget, flags):
  return _iterate(
    lambda p, m: score_fn(p, m, *args),
    params,
    mask,
    sparsity,
    rounds,
    budget,
    _flags_tree(params, flags),
  )


def _check_prune_args(params, mask, sparsity, rounds, budget) -> float:
  """Checks the arguments; returns the sparsity the budget prunes to."""
  budgets.check(budget)
  sparsity = budget.resolve_sparsity(sparsity)
  masks.check_mask(mask, params)
  if int(rounds) != rounds or rounds < 1:
    raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
  return float(sparsity)


def iterative(
  score_fn: Callable[..., PyTree],
  params: PyTree,
  mask: PyTree,
  sparsity: float | None,
  rounds: int,
  *args,
  budget: budgets.Budget = budgets.Global(),
  prunable=None,
) -> PyTree:
  """Iterative pruning with any score (SPEC §2 "Iterative variants").

  Round ``k = 1..n`` rescores with the current mask,
  ``S_k = score_fn(params, m_{k-1}, *args)``, and prunes to density
  ``d^(k/n)`` of each budget pool (the whole prunable set for ``Global``,
  each layer at its final allocated density for ``Uniform``/``ERK``/``ER``),
  keeping only entries of ``m_{k-1}``. The final round gives exactly the
  counts of ``topk_mask(S_n, sparsity, budget=...)``. All rounds run in one
  compiled ``lax.fori_loop``; ``score_fn`` is traced once.

  Args:
    score_fn: pure ``(params, mask, *args) -> scores`` (higher kept), e.g.
      :func:`magnitude` or ``functools.partial(snip, bn_mode='eval')``. It is a
      static ``jit`` argument: pass the same object to reuse the compilation.
    params: params pytree.
    mask: initial bool mask (e.g. ``masks.ones_like(params)``).
    sparsity: final sparsity in [0, 1) (``None`` with an ``NM`` budget).
    rounds: number of rounds n ≥ 1 (1 is one-shot pruning).
    *args: further pytree arguments of ``score_fn`` (arrays, an
      :class:`ApplyFn`, stacked batches); traced.
    budget: a :mod:`sparsejax.budgets` object: ``Global()`` (default),
      ``Uniform()``, ``ERK()``, ``ER()``, ``NM(n, m)`` (intermediate rounds
      keep ``round(M · d^(k/n))`` per group, at least ``N``; the last exactly
      ``N``), optionally ``.with_overrides(...)``.
    prunable: as in :func:`sparsejax.masks.topk_mask`.

  Returns:
    The final bool mask.
  """
  sparsity = _check_prune_args(params, mask, sparsity, rounds, budget)
  return _iterative(
    score_fn, params, mask, args, sparsity, int(rounds), budget, _flags_static(params, prunable)
  )


@functools.partial(
  jax.jit,
  static_argnames=("input_shape", "sparsity", "rounds", "budget", "flags", "train", "dtype"),
)
def _synflow(
  params, mask, apply_fn: ApplyFn, input_shape, sparsity, rounds, budget, flags, train, dtype
):
  abs_params, abs_fn = _synflow_linearise(params, apply_fn, dtype)
  x = jnp.ones((1, *input_shape), dtype)
  score_fn = lambda p, m: _synflow_round(p, m, abs_fn, x, train)
  return _iterate(score_fn, abs_params, mask, sparsity, rounds, budget, _flags_tree(params, flags))


def synflow(
  params: PyTree,
  mask: PyTree,
  apply_fn,
  input_shape: Sequence[int],
  sparsity: float | None,
  rounds: int = 100,
  *,
  budget: budgets.Budget = budgets.Global(),
  prunable=None,
  bn_mode: str = "eval",
  dtype=jnp.float32,
) -> PyTree:
  """Iterative SynFlow (Tanaka et al. 2020) as one compiled program.

  Round ``k = 1..n``: ``S = |∂R/∂θ ⊙ θ|`` of :func:`synflow_scores` with the
  current mask, then prune to density ``d^(k/n)`` (see :func:`iterative`). The
  network is abs'd once; the loop is a ``lax.fori_loop``, so ``apply_fn`` is
  traced once for any number of rounds.

  Known failure (reported, not hidden): at extreme sparsity SynFlow can remove
  all of a 1×1 shortcut conv; check with :func:`sparsejax.diagnostics.report`.

  Args:
    params, mask, apply_fn, input_shape, bn_mode, dtype: as in
      :func:`synflow_scores` (defaults: BN eval, float32).
    sparsity: final sparsity in [0, 1) (``None`` with an ``NM`` budget).
    rounds: n, default 100 (the reference).
    budget: a :mod:`sparsejax.budgets` object, ``Global()`` by default (the
      reference); see :func:`iterative`.
    prunable: as in :func:`sparsejax.masks.topk_mask`.

  Returns:
    The final bool mask.
  """
  sparsity = _check_prune_args(params, mask, sparsity, rounds, budget)
  with precision_scope(dtype):
    return _synflow(
      params,
      mask,
      as_apply_fn(apply_fn),
      tuple(input_shape),
      sparsity,
      int(rounds),
      budget,
      _flags_static(params, prunable),
      _bn_train(bn_mode),
      np.dtype(dtype),
    )


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

_METHOD_KWARGS = {
  "random": (),
  "magnitude": (),
  "snip": ("bn_mode",),
  "grasp": ("temperature", "bn_mode"),
  "synflow": ("bn_mode", "dtype"),
}


def _random_score_fn(params, mask, key):
  del mask
  return random_scores(key, params)


# The score functions of prune_at_init are static arguments of the compiled
# iterative loop: frozen dataclasses compare by value, so equal settings reuse
# the compilation (a new functools.partial per call would recompile).


@dataclasses.dataclass(frozen=True)
class _SnipScore:
  bn_mode: str = "eval"

  def __call__(self, params, mask, apply_fn, batches):
    return snip(params, mask, apply_fn, batches, bn_mode=self.bn_mode)


@dataclasses.dataclass(frozen=True)
class _GraspScore:
  flags: tuple[bool, ...]
  temperature: float = 200.0
  bn_mode: str = "train"

  def __call__(self, params, mask, apply_fn, batches):
    return grasp(
      params,
      mask,
      apply_fn,
      batches,
      temperature=self.temperature,
      bn_mode=self.bn_mode,
      prunable=_flags_tree(params, self.flags),
    )


def prune_at_init(
  method: str,
  params: PyTree,
  *,
  sparsity: float | None = None,
  budget: budgets.Budget = budgets.Global(),
  key: jax.Array | None = None,
  apply_fn=None,
  batches=None,
  input_shape: Sequence[int] | None = None,
  prunable=None,
  rounds: int | None = None,
  **method_kw,
) -> PyTree:
  """A pruning-at-initialisation mask with exact counts (SPEC §2).

  Args:
    method: ``'random'``, ``'magnitude'``, ``'snip'``, ``'grasp'``,
      ``'synflow'``, or ``'iterative_<method>'`` (default 100 rounds).
    params: params pytree at initialisation (pruned from the dense mask).
    sparsity: fraction in [0, 1) of the prunable weights to prune; ``None``
      (the default) only with an ``NM`` budget, which implies ``1 - n/m``.
    budget: a :mod:`sparsejax.budgets` object: ``Global()`` (default; the
      reference for every method), ``Uniform()``, ``ERK()``, ``ER()``,
      ``NM(n, m)`` (e.g. ``NM(2, 4)``), optionally ``.with_overrides({regex:
      sparsity})``; see :func:`sparsejax.masks.topk_mask`.
    key: PRNG key, required for ``'random'``.
    apply_fn: model, required for SNIP, GraSP and SynFlow; see the module doc.
    batches: scoring data, required for SNIP and GraSP (reference: 10 examples
      per class, :func:`sparsejax.data.class_balanced_batch`).
    input_shape: shape of one example, required for SynFlow.
    prunable: see :func:`sparsejax.masks.prunable_tree`.
    rounds: number of pruning rounds; ``None`` means one-shot, except SynFlow
      and ``'iterative_*'`` methods which default to 100.
    **method_kw: ``bn_mode`` (SNIP default ``'eval'``, GraSP ``'train'``,
      SynFlow ``'eval'``), ``temperature`` (GraSP, default 200), ``dtype``
      (SynFlow, default float32).

  Returns:
    A bool mask parallel to ``params``.

  Raises:
    ValueError: unknown method, or missing ``key``/``apply_fn``/``batches``/
      ``input_shape``; TypeError: a keyword the method does not take.

  Warns:
    RuntimeWarning: when the mask collapses a layer (no weight kept), e.g.
      magnitude at high sparsity, or SynFlow removing a 1×1 shortcut conv.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import scores
    >>> params = {"w": jnp.array([[0.5, -3.0], [2.0, -0.1]]), "b": jnp.zeros(2)}
    >>> mask = scores.prune_at_init("magnitude", params, sparsity=0.5)
    >>> mask["w"].tolist(), mask["b"].tolist()  # |w| 3.0 and 2.0 kept; b not prunable
    ([[False, True], [True, False]], [True, True])
  """
  base = method[len("iterative_") :] if method.startswith("iterative_") else method
  if base not in METHODS:
    raise ValueError(
      f"unknown method {method!r}; valid: {', '.join(METHODS)} and 'iterative_<method>'"
    )
  unexpected = set(method_kw) - set(_METHOD_KWARGS[base])
  if unexpected:
    raise TypeError(
      f"method {base!r} takes no keyword(s) {sorted(unexpected)}; it "
      f"takes {list(_METHOD_KWARGS[base])}"
    )
  if rounds is None and (base == "synflow" or base != method):
    rounds = 100
  budgets.check(budget)
  sparsity = budget.resolve_sparsity(sparsity)

  def need(value, name, hint):
    if value is None:
      raise ValueError(f"method {method!r} needs {name}= ({hint})")

  if base in ("snip", "grasp", "synflow"):
    need(
      apply_fn,
      "apply_fn",
      "apply_fn(params, x, train) -> logits, or sparsejax.scores.linen_apply_fn(model, variables)",
    )
  mask = masks.ones_like(params)
  common = dict(budget=budget, prunable=prunable)
  if base == "synflow":
    need(input_shape, "input_shape", "the shape of one example, e.g. (32, 32, 3)")
    return _warn_collapse(
      method,
      synflow(params, mask, apply_fn, input_shape, sparsity, rounds, **common, **method_kw),
      prunable,
    )
  if base == "random":
    need(key, "key", "a PRNG key, e.g. jax.random.key(0)")
    score_fn, args = _random_score_fn, (key,)
  elif base == "magnitude":
    score_fn, args = magnitude, ()
  else:
    need(
      batches, "batches", "scoring data (x, y), e.g. sparsejax.data.class_balanced_batch(ds, 10)"
    )
    args = (as_apply_fn(apply_fn), stack_batches(batches))
    if base == "snip":
      score_fn = _SnipScore(**method_kw)
    else:
      kw = {k: float(v) if k == "temperature" else v for k, v in method_kw.items()}
      score_fn = _GraspScore(_flags_static(params, prunable), **kw)
  if rounds is None:
    new_mask = masks.topk_mask(score_fn(params, mask, *args), sparsity, **common)
  else:
    new_mask = iterative(score_fn, params, mask, sparsity, rounds, *args, **common)
  return _warn_collapse(method, new_mask, prunable)


def _warn_collapse(method: str, mask: PyTree, prunable) -> PyTree:
  """Warns when a prunable layer kept no weight (layer collapse).

  Skipped under ``jit`` (a traced mask has no counts to report yet).
  """
  if any(isinstance(m, jax.core.Tracer) for m in jax.tree.leaves(mask)):
    return mask
  collapsed = masks.summary(mask, prunable).collapsed
  if collapsed:
    warnings.warn(
      f"{method} pruned every weight of {list(collapsed)} (layer "
      "collapse): the network is disconnected unless residual "
      "shortcuts bypass them",
      RuntimeWarning,
      stacklevel=3,
    )
  return mask
