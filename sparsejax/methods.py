r"""Every sparse-training method as a registered object with one protocol.

A method is a small frozen dataclass (its settings, checked when it is built)
that implements only the parts of :class:`Method` it needs; every other part
is a no-op. The parts, in the order a run uses them:

============================  ===============================================
part                          what it does (default)
============================  ===============================================
``model(model)``              the model that trains (the given one)
``initial_mask(ctx, p, m)``   the starting mask of params ``p`` (``m``: none)
``learning_rate(fn, ctx)``    the lr schedule from ``fn(num_epochs)`` (as is)
``optimizer(inner, m, ctx)``  the optimiser around ``inner`` (``inner``)
``init_state(state, ctx)``    a changed initial train state (unchanged)
``scalars(total_steps)``      per-step scalar schedules (none)
``loss_fn()``                 the training loss (``None``: fit's default)
``hooks(ctx)``                traced step hooks (none)
``callbacks(ctx)``            epoch-end actions (none)
============================  ===============================================

The registered methods (:func:`names`):

* fixed masks, pruning at initialisation (SPEC §2): ``dense``
  (:class:`Dense`), ``random``, ``magnitude``, ``snip``, ``grasp``,
  ``synflow`` (:class:`Random`, ... :class:`SynFlow`; the iterative variants
  with ``rounds=n``), ``ticket`` (:class:`Ticket`, a saved lottery ticket);
* ``imp`` (:class:`IMP`): iterative magnitude pruning with rewinding, its
  level loop :meth:`IMP.run` (SPEC §3);
* dynamic sparse training (SPEC §4): ``set``, ``rigl``, ``srigl``, ``gmp``,
  ``granet`` (:class:`SET`, :class:`RigL`, :class:`SRigL`, :class:`GMP`,
  :class:`GraNet`);
* ``suptickets`` (:class:`SupTickets`): Sup-tickets over a DST method
  (SPEC §6);
* recipes for any mask: ``tost`` (:class:`ToST`, SPEC §7) and
  ``sparse_init`` (:class:`SparseInit`, SPEC §5).

:func:`compose` joins a mask method with a DST method and recipes; a method
never reads a config object: the runner builds it from its own sub-config
(:func:`from_config`) and passes what only the run knows in a
:class:`Context`. :func:`build` turns a method into the arguments of
:func:`sparsejax.train.fit`.

Example (RigL from an ERK random mask at 90%, the reference)::

  from sparsejax import methods

  method = methods.compose(methods.Random(0.9, budget="erk"), methods.RigL())
  ctx = methods.Context(seed=0, model=model, input_shape=(32, 32, 3),
                        steps_per_epoch=spe, num_epochs=160)
  built = methods.build(method, model, lambda lr: make_inner(lr), ctx,
                        base_lr=lambda epochs: my_schedule(epochs))
  result = train.fit(dataset=ds, workdir=workdir, num_epochs=160,
                     batch_size=128, **built.fit_kwargs())

Sup-tickets over it: ``methods.compose(methods.Random(0.9, budget="erk"),
methods.SupTickets(dst=methods.RigL(), cycles=3, cycle_epochs=8))``. IMP is a
loop of trainings (:func:`sparsejax.lottery.imp`)::

  imp = methods.IMP(schedule="linear", levels=100, final_sparsity=0.99,
                    prune_from_step=1000)
  result = imp.run(init_state, train_fn)  # train_fn(name, state, stop) -> state

A new method is one dataclass and :func:`register`::

  @methods.register("my_method")
  @dataclasses.dataclass(frozen=True)
  class MyMethod(methods.Method):
    kind = "mask"
    sparsity: float = 0.9

    def initial_mask(self, ctx, params, mask=None):
      return my_pruning(params, self.sparsity, prunable=ctx.prunable)
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import functools
from typing import Any
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sparsejax import _checks
from sparsejax import batch_stats
from sparsejax import budgets
from sparsejax import dst
from sparsejax import gradient_flow
from sparsejax import hooks as hooks_lib
from sparsejax import losses
from sparsejax import lottery
from sparsejax import masks
from sparsejax import models
from sparsejax import optim
from sparsejax import scores
from sparsejax import state as state_lib
from sparsejax import suptickets
from sparsejax import tost
from sparsejax.models import activations

PyTree = Any

#: ``fold_in`` indices of the run key ``key(seed)`` (the experiments' keys):
#: the pruning-at-initialisation random mask, the GMP/GraNet random start,
#: the sparse-aware initialisation draw.
MASK_KEY, DST_MASK_KEY, SPARSE_INIT_KEY = 1, 2, 8
#: Kinds of method; a composition holds at most one ``"mask"`` and one
#: ``"dst"`` method (``"imp"`` runs alone).
KINDS = ("mask", "dst", "imp", "recipe")


# ----------------------------------------------------------------------------
# Context and protocol
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
  """What only the run knows, for the parts of a :class:`Method`.

  Attributes:
    seed: the run seed; the keys are ``fold_in(key(seed), i)`` (see
      :data:`MASK_KEY`); the DST optimisers' seed. Default 0.
    model: the plain model (for the scores of SNIP, GraSP, SynFlow, and the
      ``init_gain`` of :class:`SparseInit`); default ``None``.
    apply_fn: the scores' model function instead of one made from ``model``
      (:func:`sparsejax.scores.linen_apply_fn`); default ``None``.
    model_state: the non-param collections (batch statistics) the scores use
      with ``model``; default those of a fresh ``model.init``.
    batches: scoring data of SNIP and GraSP
      (:func:`sparsejax.data.class_balanced_batch`).
    input_shape: the shape of one example, e.g. ``(32, 32, 3)``.
    prunable: which leaves are prunable (:func:`sparsejax.masks.prunable_tree`);
      default every kernel.
    steps_per_epoch: the length of an epoch in steps (DST schedules,
      Sup-tickets' plan).
    num_epochs: the length of training in epochs (DST schedules,
      Sup-tickets' plan).
  """

  seed: int = 0
  model: nn.Module | None = None
  apply_fn: Any = None
  model_state: Mapping[str, PyTree] | None = None
  batches: Any = None
  input_shape: tuple[int, ...] | None = None
  prunable: Any = None
  steps_per_epoch: int | None = None
  num_epochs: int | None = None

  @property
  def key(self) -> jax.Array:
    """``jax.random.key(seed)``."""
    return jax.random.key(int(self.seed))

  @property
  def total_steps(self) -> int:
    """``num_epochs · steps_per_epoch``.

    Raises:
      ValueError: either is unset.
    """
    if self.num_epochs is None or self.steps_per_epoch is None:
      raise ValueError(
        "this method needs the length of training: set "
        "Context.num_epochs and Context.steps_per_epoch"
      )
    return int(self.num_epochs) * int(self.steps_per_epoch)

  def score_apply_fn(self, params: PyTree):
    """The model function the scores use for ``params``: ``apply_fn``,
    else ``linen_apply_fn(model, {params, **model_state})``; ``None`` without
    either."""
    if self.apply_fn is not None:
      return self.apply_fn
    if self.model is None:
      return None
    state = self.model_state
    if state is None:
      if self.input_shape is None:
        raise ValueError(
          "scoring with Context.model needs Context.input_shape (or Context.model_state)"
        )
      state = _fresh_model_state(self.model, tuple(self.input_shape))
    return scores.linen_apply_fn(self.model, {"params": params, **state})[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fresh_model_state(model, input_shape) -> dict:
  """The non-param collections of a fresh ``model.init`` (batch statistics do
  not depend on the key)."""
  variables = state_lib.init_variables(model, jnp.zeros((1, *input_shape)), jax.random.key(0))
  return {k: v for k, v in variables.items() if k != "params"}


@dataclasses.dataclass(frozen=True)
class Method:
  """The protocol of every method; each part defaults to a no-op.

  Subclasses are frozen dataclasses whose fields are the method's settings,
  checked in ``__post_init__`` (one ``ValueError`` naming the field, its
  value and the valid range). Register one with :func:`register`.

  Attributes:
    name: the registered name (class attribute, set by :func:`register`).
    kind: ``"mask"`` (makes the starting mask), ``"dst"`` (wraps the
      optimiser to change the mask), ``"imp"`` or ``"recipe"`` (class
      attribute).
  """

  name: ClassVar[str] = ""
  kind: ClassVar[str] = "recipe"

  def model(self, model: nn.Module) -> nn.Module:
    """The model that trains, from the plain ``model``; default ``model``."""
    return model

  def initial_mask(self, ctx: Context, params: PyTree, mask: PyTree | None = None) -> PyTree | None:
    """The starting mask of ``params``; ``mask`` is the one made so far (by
    the methods before this one in a composition). Default ``mask``."""
    del ctx, params
    return mask

  def score_params(self, params: PyTree) -> PyTree:
    """The params the mask methods score (e.g. without ToST's ghost paths);
    default ``params``."""
    return params

  def lift_mask(self, mask: PyTree, params: PyTree) -> PyTree:
    """The mask of :meth:`score_params` extended to ``params``; default
    ``mask``."""
    del params
    return mask

  def learning_rate(
    self, schedule_fn: Callable[[int], optax.Schedule], ctx: Context
  ) -> optax.Schedule:
    """The learning rate, from ``schedule_fn(num_epochs)``, the run's
    schedule for a run of ``num_epochs``; default ``schedule_fn(ctx.num_epochs)``."""
    return schedule_fn(ctx.num_epochs)

  def optimizer(
    self, inner: optax.GradientTransformation, mask: PyTree | None, ctx: Context
  ) -> optax.GradientTransformation:
    """The optimiser around ``inner`` given the starting ``mask``; default
    ``inner`` (a fixed mask is applied by :func:`sparsejax.train.fit`'s
    ``mask=``)."""
    del mask, ctx
    return inner

  def init_state(self, state: state_lib.TrainState, ctx: Context) -> state_lib.TrainState:
    """A changed initial train state (e.g. re-initialised weights); default
    ``state``."""
    del ctx
    return state

  def scalars(self, total_steps: int) -> dict[str, optax.Schedule]:
    """Per-step scalar schedules for ``fit(scalars=...)``; default none."""
    del total_steps
    return {}

  def loss_fn(self) -> losses.LossFn | None:
    """The training loss; default ``None`` (``fit``'s)."""
    return None

  def hooks(self, ctx: Context) -> tuple[hooks_lib.StepHook, ...]:
    """Step hooks (traced in the train step); default none."""
    del ctx
    return ()

  def callbacks(self, ctx: Context) -> tuple[hooks_lib.Callback, ...]:
    """Host actions of :func:`sparsejax.train.fit` (epoch ends, a fresh
    start, every K steps); default none."""
    del ctx
    return ()


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
  """Class decorator: registers a :class:`Method` dataclass under ``name``.

  Raises:
    ValueError: ``name`` is taken, or the class is not a ``Method`` dataclass.
  """

  def decorate(cls):
    if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
      raise ValueError(f"register({name!r}) needs a Method dataclass, got {cls!r}")
    if name in _REGISTRY:
      raise ValueError(f"method name {name!r} is already registered ({_REGISTRY[name].__name__})")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return decorate


def names() -> list[str]:
  """The registered method names, in registration order."""
  return list(_REGISTRY)


def _lookup(name: str) -> type[Method]:
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
      f"unknown method {name!r}; valid: {', '.join(_REGISTRY)} and 'compose'"
    ) from None


def fields(name: str) -> tuple[str, ...]:
  """The fields of the method ``name`` (its sub-config's keys)."""
  return tuple(f.name for f in dataclasses.fields(_lookup(name)))


def _config_value(value: Any) -> Any:
  """A field's default as a config value: budgets as their command-line names,
  methods as ``{"name": ..., **fields}``, tuples kept, mappings as dicts."""
  if isinstance(value, Method):
    return {
      "name": value.name,
      **{f.name: _config_value(getattr(value, f.name)) for f in dataclasses.fields(value)},
    }
  if isinstance(value, budgets.Budget):
    return _budget_name(value)
  if isinstance(value, Mapping):
    return {k: _config_value(v) for k, v in value.items()}
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _config_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
  return value


def _budget_name(budget: budgets.Budget) -> str:
  for name in ("global", "uniform", "erk", "er"):
    if budgets.parse(name) == budget:
      return name
  if isinstance(budget, budgets.NM):
    return f"{budget.n}:{budget.m}"
  raise ValueError(f"budget {budget!r} has no command-line name: set it in Python")


def default_config(name: str) -> dict[str, Any]:
  """The sub-config of method ``name``: every field at its default.

  Budgets appear as their command-line names (:func:`sparsejax.budgets.parse`
  reads them back) and a method field (``SupTickets.dst``) as the nested
  sub-config of its default, with its ``name``; :func:`from_config` of the
  result builds the default method. The experiments' config files build
  ``config.method.<name>`` from it.

  Example:

    >>> from sparsejax import methods
    >>> methods.default_config("magnitude")
    {'sparsity': 0.9, 'budget': 'global', 'rounds': None, 'overrides': None}
  """
  cls = _lookup(name)
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      value = None
    out[f.name] = _config_value(value)
  return out


def get(name: str, **settings: Any) -> Method:
  """The method ``name`` with ``settings``: ``from_config(name, settings)``."""
  return from_config(name, settings)


def _plain(value: Any) -> Any:
  """Config values as plain Python: mappings to dicts, lists to tuples."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def from_config(name: str | Mapping[str, Any], mapping: Mapping[str, Any] | None = None) -> Method:
  """Builds a method from its own sub-config.

  ``from_config("rigl", {"update_every": 100})``, or one mapping with the
  name: ``from_config({"name": "rigl", "update_every": 100})`` (an
  ``ml_collections.ConfigDict`` works too). A field that takes a method
  (``SupTickets.dst``) takes a name or such a mapping; the name
  ``"compose"`` takes ``{"methods": [sub-config, ...]}``.

  Raises:
    ValueError: an unknown name, or one ValueError naming every unknown field
      and the valid fields; or a field's own check.
  """
  if not isinstance(name, str):
    settings = dict(_plain(name))
    if "name" not in settings:
      raise ValueError(
        f"a method config needs a 'name' (one of "
        f"{', '.join(_REGISTRY)}), got keys {sorted(settings)}"
      )
    name = settings.pop("name")
    settings.update(_plain(mapping or {}))
  else:
    settings = dict(_plain(mapping or {}))
  if name == "compose":
    unknown = sorted(set(settings) - {"methods"})
    if unknown:
      raise ValueError(f"compose: unknown field(s) {unknown}; valid fields: ['methods']")
    return compose(*(as_method(m) for m in settings.get("methods", ())))
  cls = _lookup(name)
  valid = fields(name)
  unknown = sorted(set(settings) - set(valid))
  if unknown:
    raise ValueError(f"method {name!r}: unknown field(s) {unknown}; valid fields: {sorted(valid)}")
  for key in getattr(cls, "method_fields", ()):
    if key in settings:
      settings[key] = as_method(settings[key])
  return cls(**settings)


def as_method(value: Method | str | Mapping[str, Any]) -> Method:
  """``value`` as a :class:`Method`: itself, :func:`get` of a name, or
  :func:`from_config` of a mapping with a ``name``."""
  if isinstance(value, Method):
    return value
  if isinstance(value, str):
    return get(value)
  return from_config(value)


def _no_prior_mask(method: Method, mask) -> None:
  if mask is not None:
    raise ValueError(
      f"{type(method).__name__} makes its own starting mask; compose it with no other mask method"
    )


def _choice(value, valid, name) -> None:
  if value not in valid:
    raise ValueError(f"{name} must be one of {tuple(valid)}, got {value!r}")


def _as_budget(value, name: str, overrides=None) -> budgets.Budget:
  """``value`` (a :class:`sparsejax.budgets.Budget` or its command-line name,
  :func:`sparsejax.budgets.parse`) as an object, with ``overrides`` applied."""
  try:
    budget = budgets.parse(value) if isinstance(value, str) else value
    budgets.check(budget, name)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  return budget.with_overrides(dict(overrides)) if overrides else budget


# ----------------------------------------------------------------------------
# Fixed masks: pruning at initialisation
# ----------------------------------------------------------------------------


@register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(Method):
  """Dense training: no mask (every part a no-op)."""

  kind: ClassVar[str] = "mask"


@dataclasses.dataclass(frozen=True)
class _PruneAtInit(Method):
  """A mask of :func:`sparsejax.scores.prune_at_init` (SPEC §2).

  Attributes:
    sparsity: fraction in [0, 1) of the prunable weights pruned; default 0.9.
      With an ``NM(n, m)`` budget ``None`` or ``1 − n/m`` (implied).
    budget: a :class:`sparsejax.budgets.Budget` or its command-line name
      (:func:`sparsejax.budgets.parse`: ``"global"`` (default),
      ``"uniform"``, ``"erk"``, ``"er"``, ``"N:M"``).
    rounds: ``None`` (one-shot) or ``n >= 1`` rounds of rescoring to
      ``d^(k/n)`` (the iterative variant).
    overrides: ``{regex: sparsity}`` per-layer overrides
      (:meth:`sparsejax.budgets.Budget.with_overrides`), or ``None``.
  """

  kind: ClassVar[str] = "mask"

  sparsity: float | None = 0.9
  budget: Any = "global"
  rounds: int | None = None
  overrides: Mapping[str, float] | None = None

  def __post_init__(self):
    cls = type(self).__name__
    budget = _as_budget(self.budget, f"{cls}.budget")
    if isinstance(budget, budgets.NM):
      if self.sparsity is not None and abs(self.sparsity - budget.sparsity) > 1e-9:
        raise ValueError(
          f"{cls}.sparsity must be None or {budget.sparsity:g} "
          f"(1 - N/M) with budget {self.budget!r}, got "
          f"{self.sparsity!r}"
        )
    else:
      _checks.number(self.sparsity, f"{cls}.sparsity", 0.0, 1.0, hi_open=True)
    if self.rounds is not None:
      _checks.step(self.rounds, f"{cls}.rounds", 1)

  @property
  def budget_object(self) -> budgets.Budget:
    """:attr:`budget` as a :class:`sparsejax.budgets.Budget`, overrides applied."""
    return _as_budget(self.budget, f"{type(self).__name__}.budget", self.overrides)

  def _method_kwargs(self, ctx: Context) -> dict:
    """The method's own keywords of ``prune_at_init``."""
    del ctx
    return {}

  def initial_mask(self, ctx, params, mask=None):
    """``prune_at_init(name, params, sparsity=..., budget=..., ...)``."""
    _no_prior_mask(self, mask)
    budget = self.budget_object
    nm = isinstance(_as_budget(self.budget, "budget"), budgets.NM)
    return scores.prune_at_init(
      self.name,
      params,
      sparsity=None if nm else float(self.sparsity),
      budget=budget,
      prunable=ctx.prunable,
      rounds=self.rounds,
      **self._method_kwargs(ctx),
      **self._data(ctx, params),
    )

  def _data(self, ctx, params) -> dict:
    return {}


def _with_model(ctx: Context, params) -> dict:
  apply_fn = ctx.score_apply_fn(params)
  return {} if apply_fn is None else {"apply_fn": apply_fn}


@register("random")
@dataclasses.dataclass(frozen=True)
class Random(_PruneAtInit):
  """Random pruning: i.i.d. ``N(0, 1)`` scores, exact counts under ``budget``.

  The key is ``fold_in(key(ctx.seed), MASK_KEY)``. Fields: those of
  :class:`Magnitude` (``sparsity``, ``budget``, ``rounds``, ``overrides``).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import methods
    >>> params = {"w": jnp.ones((4, 5))}
    >>> mask = methods.Random(0.75).initial_mask(methods.Context(), params)
    >>> int(mask["w"].sum())
    5
  """

  def _data(self, ctx, params):
    return {"key": jax.random.fold_in(ctx.key, MASK_KEY)}


@register("magnitude")
@dataclasses.dataclass(frozen=True)
class Magnitude(_PruneAtInit):
  """Magnitude pruning at initialisation: keep the largest ``|θ|``.

  Attributes:
    sparsity: fraction in [0, 1) of the prunable weights pruned; default 0.9.
    budget: ``"global"`` (default), ``"uniform"``, ``"erk"``, ``"er"`` or
      ``"N:M"``.
    rounds: ``None`` (one-shot) or the rounds of the iterative variant.
    overrides: ``{regex: sparsity}``, or ``None``.
  """


@register("snip")
@dataclasses.dataclass(frozen=True)
class SNIP(_PruneAtInit):
  """SNIP (Lee et al. 2019): keep the largest ``|g ⊙ θ|``, ``g`` summed over
  the scoring batches ``ctx.batches`` (model: ``ctx.model`` or
  ``ctx.apply_fn``). Fields: those of :class:`Magnitude` and the one below.

  Attributes:
    bn_mode: batch norm while scoring, ``"eval"`` (default) or ``"train"``.
  """

  bn_mode: str = "eval"

  def __post_init__(self):
    super().__post_init__()
    _choice(self.bn_mode, scores.BN_MODES, f"{type(self).__name__}.bn_mode")

  def _method_kwargs(self, ctx):
    return {"bn_mode": self.bn_mode}

  def _data(self, ctx, params):
    return dict(_with_model(ctx, params), batches=ctx.batches)


@register("grasp")
@dataclasses.dataclass(frozen=True)
class GraSP(SNIP):
  """GraSP (Wang et al. 2020): remove the largest ``−θ ⊙ (H g)`` (keep the
  largest ``θ ⊙ (H g)``), on logits divided by ``temperature``.

  Attributes:
    temperature: T > 0; default 200.
    bn_mode: ``"train"`` (default) or ``"eval"``; and the fields of
      :class:`Magnitude`.
  """

  bn_mode: str = "train"
  temperature: float = 200.0

  def __post_init__(self):
    super().__post_init__()
    _checks.number(self.temperature, "GraSP.temperature", 0.0, lo_open=True)

  def _method_kwargs(self, ctx):
    return {"bn_mode": self.bn_mode, "temperature": float(self.temperature)}


@register("synflow")
@dataclasses.dataclass(frozen=True)
class SynFlow(_PruneAtInit):
  """SynFlow (Tanaka et al. 2020): data-free, ``|∂R/∂θ ⊙ θ|`` on the abs'd
  network fed all-ones of ``ctx.input_shape``, ``rounds`` rounds to
  ``d^(k/n)``. Fields: those of :class:`Magnitude` and the ones below.

  Attributes:
    rounds: default 100 (the reference).
    bn_mode: ``"eval"`` (default) or ``"train"``.
    dtype: ``"float32"`` (default) or ``"float64"``.
  """

  rounds: int | None = 100
  bn_mode: str = "eval"
  dtype: str = "float32"

  def __post_init__(self):
    super().__post_init__()
    _choice(self.bn_mode, scores.BN_MODES, "SynFlow.bn_mode")
    _choice(self.dtype, ("float32", "float64"), "SynFlow.dtype")

  def _method_kwargs(self, ctx):
    return {"bn_mode": self.bn_mode, "dtype": jnp.dtype(self.dtype)}

  def _data(self, ctx, params):
    return dict(_with_model(ctx, params), input_shape=ctx.input_shape)


@register("ticket")
@dataclasses.dataclass(frozen=True)
class Ticket(Method):
  """The mask of a saved lottery ticket (:func:`sparsejax.lottery.load_ticket`).

  Attributes:
    path: the ticket directory (e.g. ``experiments.lottery``'s ``ticket/``).
  """

  kind: ClassVar[str] = "mask"

  path: str = ""

  def __post_init__(self):
    if not self.path:
      raise ValueError(f"Ticket.path must name a ticket directory, got {self.path!r}")

  def initial_mask(self, ctx, params, mask=None):
    """The ticket's mask, checked against ``params``."""
    _no_prior_mask(self, mask)
    loaded = jax.tree.map(jnp.asarray, lottery.load_ticket(self.path)[0])
    masks.check_mask(loaded, params)
    return loaded


# ----------------------------------------------------------------------------
# Lottery tickets
# ----------------------------------------------------------------------------


@register("imp")
@dataclasses.dataclass(frozen=True)
class IMP(Method):
  """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019;
  Frankle et al. 2020), SPEC §3.

  Train, prune by global magnitude to the next level's sparsity among the
  surviving weights, rewind them to step ``rewind_step`` (fresh optimiser
  state, same schedule and data order), retrain; :meth:`run` is the loop
  (:func:`sparsejax.lottery.imp`).

  Attributes:
    schedule: the per-level sparsity, ``"geometric"`` (default: ``1 − (1 −
      fraction)^L``), ``"linear"`` (``L / levels · final_sparsity``) or
      ``"explicit"`` (``sparsities``).
    levels: pruning levels; default 20 (``len(sparsities)`` when explicit).
    fraction: the geometric share of the remaining weights pruned per level;
      default 0.2.
    final_sparsity: the linear schedule's last sparsity.
    sparsities: the explicit levels' sparsities ``(s_1, s_2, ...)``.
    rewind_step: ``k >= 0``; default 0.
    prune_from_step: prune from the weights of this global step of each
      level's training (``> rewind_step``); default ``None``: the final ones.
    budget: ``Global()`` / ``"global"`` (default) or ``Uniform()`` /
      ``"uniform"`` (layer-wise IMP).

  Example:

    >>> from sparsejax import methods
    >>> imp = methods.IMP(schedule="linear", levels=4, final_sparsity=0.8)
    >>> imp.sparsities_per_level()
    (0.0, 0.2, 0.4, 0.6, 0.8)
  """

  kind: ClassVar[str] = "imp"

  schedule: str = "geometric"
  levels: int | None = None
  fraction: float = lottery.DEFAULT_FRACTION
  final_sparsity: float | None = None
  sparsities: tuple[float, ...] | None = None
  rewind_step: int = 0
  prune_from_step: int | None = None
  budget: Any = "global"

  def __post_init__(self):
    _choice(self.schedule, lottery.SCHEDULES, "IMP.schedule")
    if type(_as_budget(self.budget, "IMP.budget")) not in lottery.BUDGETS:
      raise ValueError(
        f"IMP.budget must be 'global' or 'uniform' (Global() or Uniform()), got {self.budget!r}"
      )
    _checks.step(self.rewind_step, "IMP.rewind_step")
    if self.prune_from_step is not None:
      _checks.step(self.prune_from_step, "IMP.prune_from_step", int(self.rewind_step) + 1)
    if self.sparsities is not None:
      object.__setattr__(self, "sparsities", tuple(self.sparsities))
    self.sparsities_per_level()  # checks the schedule's fields

  def sparsities_per_level(self) -> tuple[float, ...]:
    """``(0.0, s_1, ..., s_levels)`` (:func:`sparsejax.lottery.level_sparsities`)."""
    levels = self.levels
    if levels is None and self.schedule != "explicit":
      levels = 20
    return lottery.level_sparsities(
      levels,
      self.schedule,
      fraction=self.fraction,
      final_sparsity=self.final_sparsity,
      sparsities=self.sparsities,
    )

  def initial_mask(self, ctx, params, mask=None):
    """Level 0 is dense, in the sparse format: ``masks.ones_like(params)``."""
    _no_prior_mask(self, mask)
    return masks.ones_like(params)

  def run(
    self,
    init: state_lib.TrainState,
    train_fn: lottery.TrainFn,
    ctx: Context = Context(),
    callback: Callable[[lottery.Level, state_lib.TrainState], None] | None = None,
    known_masks: Mapping[int, PyTree] | None = None,
  ) -> lottery.IMPResult:
    """The level loop, :func:`sparsejax.lottery.imp` with these settings and
    ``ctx.prunable``."""
    return lottery.imp(
      init,
      train_fn,
      self.sparsities_per_level(),
      rewind_step=int(self.rewind_step),
      prune_from_step=self.prune_from_step,
      prunable=ctx.prunable,
      budget=_as_budget(self.budget, "IMP.budget"),
      callback=callback,
      known_masks=known_masks,
    )


# ----------------------------------------------------------------------------
# Dynamic sparse training
# ----------------------------------------------------------------------------


def _epoch_step(value: float, num_epochs: int, steps_per_epoch: int) -> int:
  """A point of training in epochs (>= 1) or as a fraction (< 1), in steps."""
  epochs = value * num_epochs if 0 < value < 1 else value
  return round(epochs * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class _DST(Method):
  """Shared fields of the DST methods (SPEC §4).

  Attributes:
    update_every: ``ΔT``, steps between mask updates.
    end: the fraction of training in (0, 1] after which the mask is fixed
      (RigL's ``T_end``; GraNet's regrowth end).
    skip_update: skip the weight update on mask-update steps (the
      reference); default True.
  """

  kind: ClassVar[str] = "dst"

  update_every: int = 100
  end: float = 0.75
  skip_update: bool = True

  def __post_init__(self):
    cls = type(self).__name__
    _checks.step(self.update_every, f"{cls}.update_every", 1)
    _checks.number(self.end, f"{cls}.end", 0.0, 1.0, lo_open=True, why="a fraction of training")

  def _common(self, ctx: Context, extra_updates) -> dict:
    return dict(
      update_every=int(self.update_every),
      skip_update=bool(self.skip_update),
      prunable=ctx.prunable,
      seed=int(ctx.seed),
      extra_updates=tuple(extra_updates),
    )

  def _end_step(self, ctx: Context) -> int:
    return round(float(self.end) * ctx.total_steps)

  def optimizer(self, inner, mask, ctx):
    """The DST optimiser around ``inner`` from ``mask``."""
    return self.dst_optimizer(inner, mask, ctx)

  def dst_optimizer(self, inner, mask, ctx: Context, extra_updates: dst.ExtraUpdates = ()):
    """:meth:`sparsejax.methods.Method.optimizer` with ``extra_updates`` (see
    :func:`sparsejax.dst.dynamic_sparse`), e.g. Sup-tickets' cycle starts."""
    raise NotImplementedError

  def _churn(self) -> dst.MaskChurn:
    return dst.MaskChurn(log_every_steps=int(self.update_every))

  def hooks(self, ctx):
    """``(dst.MaskChurn(log_every_steps=update_every).hook(),)``."""
    del ctx
    return (self._churn().hook(),)

  def callbacks(self, ctx):
    """``(dst.MaskChurn(...).callback(),)``: ``mask_churn`` per epoch."""
    del ctx
    return (self._churn().callback(),)


@dataclasses.dataclass(frozen=True)
class _DropAndGrow(_DST):
  """SET and RigL: drop the fraction ``f(t)`` of each layer's active weights
  by magnitude every ``ΔT`` steps until ``end``, regrow as many.

  Attributes:
    alpha: the drop fraction ``α``; default 0.3.
    drop_schedule: ``"cosine"`` (default, ``f(t) = (α/2)(1 + cos(π t /
      T_end))``) or ``"constant"`` (``f = α``).
    nm: ``None``, or an ``NM(n, m)`` budget (or its name ``"N:M"``) the
      updates keep.
    and those of the DST methods: ``update_every`` (100), ``end`` (0.75),
    ``skip_update`` (True).

  The starting mask comes from the mask method composed before it
  (reference: ``Random(sparsity, budget="erk")``).
  """

  alpha: float = 0.3
  drop_schedule: str = "cosine"
  nm: Any = None

  _wrapper: ClassVar[Callable[..., Any]]

  def __post_init__(self):
    super().__post_init__()
    cls = type(self).__name__
    _checks.fraction(self.alpha, f"{cls}.alpha")
    _choice(self.drop_schedule, ("cosine", "constant"), f"{cls}.drop_schedule")
    if self.nm is not None and not isinstance(_as_budget(self.nm, f"{cls}.nm"), budgets.NM):
      raise ValueError(f"{cls}.nm must be None or 'N:M' such as '2:4', got {self.nm!r}")

  def initial_mask(self, ctx, params, mask=None):
    """The mask of the composed mask method (required)."""
    if mask is None:
      raise ValueError(
        f"{type(self).__name__} needs a starting mask: compose it with a mask "
        f"method, e.g. methods.compose(methods.Random(0.9, budget='erk'), "
        f"methods.{type(self).__name__}())"
      )
    return mask

  def dst_optimizer(self, inner, mask, ctx, extra_updates=()):
    self.initial_mask(ctx, None, mask)
    end = self._end_step(ctx)
    fraction = (
      dst.cosine_drop_fraction(float(self.alpha), end)
      if self.drop_schedule == "cosine"
      else float(self.alpha)
    )
    return type(self)._wrapper(
      inner,
      mask,
      drop_fraction=fraction,
      end_step=end,
      nm=None if self.nm is None else _as_budget(self.nm, "nm"),
      **self._common(ctx, extra_updates),
    )


@register("set")
@dataclasses.dataclass(frozen=True)
class SET(_DropAndGrow):
  """SET (Mocanu et al. 2018): magnitude drop, uniform random regrowth
  (:func:`sparsejax.dst.set_optimizer`). Fields: see :class:`RigL`."""

  _wrapper = staticmethod(dst.set_optimizer)


@register("rigl")
@dataclasses.dataclass(frozen=True)
class RigL(_DropAndGrow):
  """RigL (Evci et al. 2020): magnitude drop, regrowth by dense gradient
  magnitude (:func:`sparsejax.dst.rigl_optimizer`).

  Every ``ΔT = update_every`` steps until ``T_end = end · T``, each layer
  drops ``⌊f(t) · n_active⌋`` weights of smallest ``|θ|`` and grows as many
  of largest ``|g|`` among the others, ``f(t) = (α/2)(1 + cos(π t / T_end))``.

  Attributes:
    alpha: ``α``; default 0.3.
    drop_schedule: ``"cosine"`` (default) or ``"constant"``.
    nm: ``None`` or an ``NM(n, m)`` (or ``"N:M"``) budget kept through every
      update.
    update_every: ``ΔT``; default 100.
    end: ``T_end`` as a fraction of training; default 0.75.
    skip_update: default True.
  """

  _wrapper = staticmethod(dst.rigl_optimizer)


@register("srigl")
@dataclasses.dataclass(frozen=True)
class SRigL(_DST):
  """SRigL (Lasby et al. 2024): RigL under constant fan-in, with neuron ablation
  (:func:`sparsejax.dst.srigl_optimizer`).

  Every active output unit keeps exactly ``k`` inputs; every ``ΔT`` steps until
  ``T_end`` each layer drops by ``|θ|`` and regrows by ``|g|`` per unit, and a
  unit with fewer than ``max(1, ⌊γ_sal · k⌋)`` salient weights is ablated (its
  ``k`` shared among the others). The starting mask comes from the mask
  method composed before it, constant fan-in, e.g. ``Random(0.9,
  budget="cfi-erk")``.

  Attributes:
    alpha: ``α``; default 0.3.
    drop_schedule: ``"cosine"`` (default) or ``"constant"``.
    ablation_threshold: ``γ_sal`` in [0, 1]; default 0.3 (0: no ablation).
    ablate_classifier: whether the classifier's units may be ablated;
      default False, as in the reference code.
    update_every: ``ΔT``; default 100.
    end: ``T_end``; default 0.75.
    skip_update: default True.
  """

  alpha: float = 0.3
  drop_schedule: str = "cosine"
  ablation_threshold: float = 0.3
  ablate_classifier: bool = False

  def __post_init__(self):
    super().__post_init__()
    _checks.fraction(self.alpha, "SRigL.alpha")
    _choice(self.drop_schedule, ("cosine", "constant"), "SRigL.drop_schedule")
    _checks.number(self.ablation_threshold, "SRigL.ablation_threshold", 0.0, 1.0)

  def initial_mask(self, ctx, params, mask=None):
    """The constant fan-in mask of the composed mask method (required)."""
    return _DropAndGrow.initial_mask(self, ctx, params, mask)

  def dst_optimizer(self, inner, mask, ctx, extra_updates=()):
    end = self._end_step(ctx)
    fraction = (
      dst.cosine_drop_fraction(float(self.alpha), end)
      if self.drop_schedule == "cosine"
      else float(self.alpha)
    )
    ablatable = None
    if not self.ablate_classifier:
      if ctx.model is None or ctx.input_shape is None:
        raise ValueError(
          "SRigL needs Context.model and Context.input_shape to "
          "keep the classifier's units (ablate_classifier=False)"
        )
      ablatable = dataclasses.replace(
        masks.KEEP_CLASSIFIER_DENSE,
        order=models.layer_order(
          ctx.model, jax.ShapeDtypeStruct((1, *ctx.input_shape), jnp.float32)
        ),
      )
    return dst.srigl_optimizer(
      inner,
      mask,
      end_step=end,
      drop_fraction=fraction,
      ablation_threshold=float(self.ablation_threshold),
      ablatable=ablatable,
      **self._common(ctx, extra_updates),
    )

  def callbacks(self, ctx):
    """Mask churn and ``ablated_units`` in every epoch record."""
    return (*super().callbacks(ctx), dst.AblatedUnits(ctx.prunable).callback())


@dataclasses.dataclass(frozen=True)
class _Gradual(_DST):
  """GMP and GraNet: global magnitude pruning along the cubic schedule.

  Attributes:
    sparsity: the final sparsity ``s_f``; default 0.9.
    initial_sparsity: ``s_i``: 0 (default) starts dense, else from a random
      mask at ``s_i`` under ``budget`` (key ``fold_in(key(seed),
      DST_MASK_KEY)``).
    budget: the random start's budget; default ``"erk"``.
    prune_epochs: ``(start, end)`` of the schedule, in epochs (``>= 1``) or
      fractions of training (``< 1``); default ``(0.0, 0.5)``.
  """

  sparsity: float = 0.9
  initial_sparsity: float = 0.0
  budget: Any = "erk"
  prune_epochs: tuple[float, float] = (0.0, 0.5)

  def __post_init__(self):
    super().__post_init__()
    cls = type(self).__name__
    _checks.number(self.sparsity, f"{cls}.sparsity", 0.0, 1.0, hi_open=True)
    _checks.number(
      self.initial_sparsity,
      f"{cls}.initial_sparsity",
      0.0,
      float(self.sparsity),
      why="at most the final sparsity",
    )
    if isinstance(_as_budget(self.budget, f"{cls}.budget"), budgets.NM):
      raise ValueError(
        f"{cls}.budget: gradual pruning is a global ranking and "
        f"cannot keep an N:M budget, got {self.budget!r}"
      )
    pe = tuple(self.prune_epochs)
    if len(pe) != 2:
      raise ValueError(f"{cls}.prune_epochs must be (start, end), got {pe!r}")
    start, stop = (_checks.number(v, f"{cls}.prune_epochs", 0.0) for v in pe)
    object.__setattr__(self, "prune_epochs", (start, stop))

  def initial_mask(self, ctx, params, mask=None):
    """Dense (``initial_sparsity = 0``) or a random mask at ``initial_sparsity``."""
    _no_prior_mask(self, mask)
    s0 = float(self.initial_sparsity)
    if s0 == 0:
      return masks.ones_like(params)
    return masks.random_mask(
      jax.random.fold_in(ctx.key, DST_MASK_KEY),
      params,
      s0,
      budget=_as_budget(self.budget, "budget"),
      prunable=ctx.prunable,
    )

  def _schedule_kwargs(self, ctx, extra_updates) -> dict:
    start, stop = (
      _epoch_step(v, int(ctx.num_epochs), int(ctx.steps_per_epoch)) for v in self.prune_epochs
    )
    total = ctx.total_steps
    if stop > total or start >= stop:
      raise ValueError(
        f"{type(self).__name__}.prune_epochs={self.prune_epochs} gives steps "
        f"{start} to {stop}: they must be increasing and within the "
        f"{total} steps of training ({ctx.num_epochs} epochs)"
      )
    return dict(
      final_sparsity=float(self.sparsity),
      initial_sparsity=float(self.initial_sparsity),
      start_step=start,
      end_step=stop,
      **self._common(ctx, extra_updates),
    )


@register("gmp")
@dataclasses.dataclass(frozen=True)
class GMP(_Gradual):
  """Gradual magnitude pruning (Zhu & Gupta 2017), :func:`sparsejax.dst.gmp_optimizer`.

  Every ``ΔT`` steps between ``prune_epochs``, the global top-``|θ|`` of the
  active weights at ``s_t = s_f + (s_i − s_f)(1 − progress)^3``.

  Attributes:
    sparsity: see :class:`GraNet`.
    initial_sparsity: see :class:`GraNet`.
    budget: see :class:`GraNet`.
    prune_epochs: see :class:`GraNet`.
    update_every: ``ΔT``; default 100.
    skip_update: default True.
    end: unused by GMP (no regrowth).
  """

  def dst_optimizer(self, inner, mask, ctx, extra_updates=()):
    return dst.gmp_optimizer(inner, mask, **self._schedule_kwargs(ctx, extra_updates))


@register("granet")
@dataclasses.dataclass(frozen=True)
class GraNet(_Gradual):
  """GraNet (Liu et al. 2021): GMP plus a RigL-style drop-and-regrow at every
  pruning step until ``end`` (:func:`sparsejax.dst.granet_optimizer`).

  Attributes:
    sparsity: ``s_f``; default 0.9.
    initial_sparsity: ``s_i``; default 0 (dense start).
    budget: the random start's budget; default ``"erk"``.
    prune_epochs: ``(start, end)`` of the cubic schedule; default
      ``(0.0, 0.5)``.
    alpha: the regrowth fraction, decayed by cosine to 0 at ``end``;
      default 0.5.
    update_every: ``ΔT``; default 1000.
    end: default 0.75.
    skip_update: default True.
  """

  update_every: int = 1000
  alpha: float = 0.5

  def __post_init__(self):
    super().__post_init__()
    _checks.fraction(self.alpha, "GraNet.alpha")

  def dst_optimizer(self, inner, mask, ctx, extra_updates=()):
    return dst.granet_optimizer(
      inner,
      mask,
      regrow_end_step=self._end_step(ctx),
      alpha=float(self.alpha),
      **self._schedule_kwargs(ctx, extra_updates),
    )


# ----------------------------------------------------------------------------
# Sup-tickets
# ----------------------------------------------------------------------------


@register("suptickets")
@dataclasses.dataclass(frozen=True)
class SupTickets(Method):
  """Sup-tickets (Yin et al. 2022) over a DST method, SPEC §6.

  Within ``E`` epochs, ``dst`` trains with its normal schedules compressed
  into the first ``E − C·M`` epochs; then ``M = cycles`` cycles of ``C =
  cycle_epochs`` epochs with the periodic mask updates off, one large
  drop-and-regrow of ``fraction`` of each layer at each cycle start and a
  cyclic learning rate ``lr1 → lr2 → lr1``; at each cycle end the weights
  are superposed into the running model, re-pruned to the tickets' count and
  its batch statistics recomputed (:class:`sparsejax.suptickets.Superpose`).

  Attributes:
    dst: the DST method (:class:`RigL`, :class:`SET`, :class:`GMP`,
      :class:`GraNet`); default ``RigL()``.
    cycles: ``M``; default 3.
    cycle_epochs: ``C``; default 8.
    lr1: the cyclic rate's first end; default 0.001.
    lr2: the cyclic rate's other end; default 0.005.
    lr_shape: ``"triangular"`` (default) or ``"cosine"``.
    fraction: the cycle-start drop-and-regrow fraction; default 0.5.
    ema: ``None`` (cumulative mean, default) or the EMA factor in (0, 1].
    bn_batch_size: the statistics pass's batch size (default: fit's).
    bn_variance: ``"pooled"`` (default) or ``"average"``.
    evaluate_tickets: also evaluate every ticket; default True.
  """

  kind: ClassVar[str] = "dst"
  method_fields: ClassVar[tuple[str, ...]] = ("dst",)

  dst: Method = dataclasses.field(default_factory=lambda: RigL())
  cycles: int = 3
  cycle_epochs: int = 8
  lr1: float = 0.001
  lr2: float = 0.005
  lr_shape: str = "triangular"
  fraction: float = 0.5
  ema: float | None = None
  bn_batch_size: int | None = None
  bn_variance: str = "pooled"
  evaluate_tickets: bool = True

  def __post_init__(self):
    if not isinstance(self.dst, _DST):
      raise ValueError(
        f"SupTickets.dst must be a DST method (set, rigl, gmp, granet), got {self.dst!r}"
      )
    _checks.step(self.cycles, "SupTickets.cycles", 1)
    _checks.step(self.cycle_epochs, "SupTickets.cycle_epochs", 1)
    _checks.number(self.lr1, "SupTickets.lr1", 0.0, lo_open=True)
    _checks.number(self.lr2, "SupTickets.lr2", 0.0, lo_open=True)
    _choice(self.lr_shape, suptickets.LR_SHAPES, "SupTickets.lr_shape")
    _checks.number(self.fraction, "SupTickets.fraction", 0.0, 1.0, lo_open=True)
    if self.ema is not None:
      _checks.number(self.ema, "SupTickets.ema", 0.0, 1.0, lo_open=True)
    if self.bn_batch_size is not None:
      _checks.step(self.bn_batch_size, "SupTickets.bn_batch_size", 1)
    _choice(self.bn_variance, batch_stats.BN_VARIANCE_MODES, "SupTickets.bn_variance")

  def plan(self, ctx: Context) -> suptickets.Plan:
    """The run's :class:`sparsejax.suptickets.Plan`."""
    if ctx.num_epochs is None or ctx.steps_per_epoch is None:
      raise ValueError("SupTickets needs Context.num_epochs and Context.steps_per_epoch")
    return suptickets.Plan(
      num_epochs=int(ctx.num_epochs),
      num_cycles=int(self.cycles),
      cycle_epochs=int(self.cycle_epochs),
      steps_per_epoch=int(ctx.steps_per_epoch),
    )

  def phase(self, ctx: Context) -> Context:
    """``ctx`` of the DST phase: ``num_epochs = E − C·M``."""
    return dataclasses.replace(ctx, num_epochs=self.plan(ctx).dst_epochs)

  def initial_mask(self, ctx, params, mask=None):
    """The DST method's starting mask."""
    return self.dst.initial_mask(self.phase(ctx), params, mask)

  def learning_rate(self, schedule_fn, ctx):
    """``schedule_fn(E − C·M)`` for the DST phase, then the cyclic rate
    (:meth:`sparsejax.suptickets.Plan.learning_rate`)."""
    plan = self.plan(ctx)
    return plan.learning_rate(
      schedule_fn(plan.dst_epochs), float(self.lr1), float(self.lr2), self.lr_shape
    )

  def optimizer(self, inner, mask, ctx):
    """The DST optimiser over the phase, with the cycle starts' large
    drop-and-regrow as extra mask updates."""
    plan = self.plan(ctx)
    extra = plan.mask_updates(float(self.fraction), ctx.prunable)
    return self.dst.dst_optimizer(inner, mask, self.phase(ctx), extra)

  def _superpose(self, ctx: Context) -> suptickets.Superpose:
    return suptickets.Superpose(
      self.plan(ctx),
      ema=self.ema,
      prunable=ctx.prunable,
      bn_batch_size=self.bn_batch_size,
      bn_variance=self.bn_variance,
      evaluate_tickets=bool(self.evaluate_tickets),
    )

  def hooks(self, ctx):
    """The DST method's hooks and the superposition's state
    (:meth:`sparsejax.suptickets.Superpose.hook`)."""
    return (*self.dst.hooks(ctx), self._superpose(ctx).hook())

  def callbacks(self, ctx):
    """The DST method's callbacks and the cycle-end superposition
    (:class:`sparsejax.suptickets.Superpose`)."""
    return (*self.dst.callbacks(ctx), self._superpose(ctx))


# ----------------------------------------------------------------------------
# Recipes for any mask
# ----------------------------------------------------------------------------


def _ramp(value, name: str) -> tost.Ramp | None:
  if value is None or isinstance(value, tost.Ramp):
    return value
  value = tuple(value)
  if len(value) != 4:
    raise ValueError(f"ToST.{name} must be a tost.Ramp or (start, end, hold, stop), got {value!r}")
  return tost.Ramp(*(float(v) for v in value))


@register("tost")
@dataclasses.dataclass(frozen=True)
class ToST(Method):
  """ToST (Jaiswal et al. 2022), the training recipe for any mask (SPEC §7).

  The preset of :data:`sparsejax.tost.PRESETS` with the given schedules (a
  given schedule switches its technique on) and LRsI settings; the parts
  delegate to :class:`sparsejax.tost.ToST`.

  Attributes:
    preset: ``"none"`` (default), ``"ghost"``, ``"always_on"``, ...
    soft_neurons: a :class:`sparsejax.tost.Ramp` or ``(start, end, hold,
      stop)``; ``None``: the preset's.
    ghost_skips: a :class:`sparsejax.tost.Ramp` or ``(start, end, hold,
      stop)``; ``None``: the preset's.
    label_smoothing: a :class:`sparsejax.tost.Ramp` or ``(start, end, hold,
      stop)``; ``None``: the preset's.
    lrsi: a :class:`sparsejax.tost.LRsI`, or a mapping of its fields replacing
      the preset's; ``None``: the preset's.
  """

  preset: str = "none"
  soft_neurons: Any = None
  ghost_skips: Any = None
  label_smoothing: Any = None
  lrsi: Any = None

  def __post_init__(self):
    _choice(self.preset, tost.PRESETS, "ToST.preset")
    for name in ("soft_neurons", "ghost_skips", "label_smoothing"):
      object.__setattr__(self, name, _ramp(getattr(self, name), name))
    if isinstance(self.lrsi, Mapping):
      known = {f.name for f in dataclasses.fields(tost.LRsI)}
      unknown = sorted(set(self.lrsi) - known)
      if unknown:
        raise ValueError(f"ToST.lrsi has unknown field(s) {unknown}; valid fields: {sorted(known)}")
    _ = self.recipe  # checks the ramps against the preset

  @property
  def recipe(self) -> tost.ToST:
    """The :class:`sparsejax.tost.ToST` of these settings."""
    recipe = tost.preset(self.preset)
    changes = {
      n: getattr(self, n)
      for n in ("soft_neurons", "ghost_skips", "label_smoothing")
      if getattr(self, n) is not None
    }
    if isinstance(self.lrsi, tost.LRsI):
      changes["lrsi"] = self.lrsi
    elif self.lrsi and recipe.lrsi is not None:
      changes["lrsi"] = dataclasses.replace(recipe.lrsi, **dict(self.lrsi))
    return dataclasses.replace(recipe, **changes)

  def model(self, model):
    """The blend activation with soft neurons (when the model's ``act`` is
    the default ReLU); the ghost-skip variant with ghost skips."""
    recipe = self.recipe
    changes = {}
    if recipe.soft_neurons is not None and getattr(model, "act", None) is activations.relu:
      changes["act"] = activations.blend()
    if recipe.ghost_skips is not None:
      if "ghost_skips" not in {f.name for f in dataclasses.fields(model)}:
        raise ValueError(
          f"ghost skip connections are defined for the basic blocks of "
          f"residual networks; {type(model).__name__} has none. Use ToST "
          "without them, e.g. ToST('ghost', ...) with another preset"
        )
      changes["ghost_skips"] = True
    return model.clone(**changes) if changes else model

  def score_params(self, params):
    """Without the ghost paths (:func:`sparsejax.tost.export`) with ghost skips."""
    return tost.export(params) if self.recipe.ghost_skips is not None else params

  def lift_mask(self, mask, params):
    """:func:`sparsejax.tost.lift_mask` with ghost skips."""
    if self.recipe.ghost_skips is None or mask is None:
      return mask
    return tost.lift_mask(mask, params)

  def scalars(self, total_steps):
    return self.recipe.scalars(total_steps)

  def loss_fn(self):
    return self.recipe.loss_fn()

  def callbacks(self, ctx):
    """``(tost.LRsICallback(lrsi),)`` with LRsI (it runs on fit's fresh start)."""
    del ctx
    return self.recipe.callbacks()


@register("sparse_init")
@dataclasses.dataclass(frozen=True)
class SparseInit(Method):
  """Sparse-aware initialisation (Evci et al. 2022), SPEC §5.

  Redraws every active kernel weight into unit ``o`` from ``N(0, scale /
  max(1, fan_in(o)))``, ``fan_in`` its active inputs
  (:func:`sparsejax.gradient_flow.sparse_init`, key ``fold_in(key(seed),
  SPARSE_INIT_KEY)``).

  Attributes:
    scale: variance gain; default ``None``: ``ctx.model.init_gain`` (else 2).
    mode: ``"fan_in"`` (default), ``"fan_out"`` or ``"fan_avg"``.
    distribution: ``"normal"`` (default), ``"truncated_normal"`` or
      ``"uniform"``.
  """

  scale: float | None = None
  mode: str = "fan_in"
  distribution: str = "normal"

  def __post_init__(self):
    if self.scale is not None:
      _checks.number(self.scale, "SparseInit.scale", 0.0, lo_open=True)
    _choice(self.mode, gradient_flow.MODES, "SparseInit.mode")
    _choice(self.distribution, gradient_flow.DISTRIBUTIONS, "SparseInit.distribution")

  def reinit(self, ctx: Context, params: PyTree, mask: PyTree) -> PyTree:
    """The redrawn params, masked."""
    scale = self.scale
    if scale is None:
      scale = getattr(ctx.model, "init_gain", None)
    new = gradient_flow.sparse_init(
      jax.random.fold_in(ctx.key, SPARSE_INIT_KEY),
      params,
      mask,
      scale=scale,
      mode=self.mode,
      distribution=self.distribution,
    )
    return masks.apply(new, mask)

  def init_state(self, state, ctx):
    """``state`` with :meth:`reinit` params (its mask; dense without one)."""
    mask = state.mask if state.mask is not None else masks.ones_like(state.params)
    return state.replace(params=self.reinit(ctx, state.params, mask))


# ----------------------------------------------------------------------------
# Composition
# ----------------------------------------------------------------------------

_ORDER = {"mask": 0, "dst": 1, "recipe": 2, "imp": 3}


@dataclasses.dataclass(frozen=True)
class Composed(Method):
  """Methods applied together (:func:`compose`).

  The mask method makes the starting mask (on :meth:`Method.score_params`
  of the recipes, then lifted back), the DST method wraps the optimiser,
  models and initial states are changed in order, scalars, hooks and
  callbacks are joined; at most one method gives a loss.

  Attributes:
    methods: the methods, in the order given.
  """

  methods: tuple[Method, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "methods", tuple(self.methods))
    for m in self.methods:
      if not isinstance(m, Method) or isinstance(m, Composed):
        raise ValueError(f"compose takes registered methods, got {m!r}")
    for kind in ("mask", "dst", "imp"):
      of_kind = [type(m).__name__ for m in self.methods if m.kind == kind]
      if len(of_kind) > 1:
        raise ValueError(f"compose takes at most one {kind} method, got {of_kind}")
    kinds = {m.kind for m in self.methods}
    if "imp" in kinds and len(self.methods) > 1:
      raise ValueError("IMP runs alone: compose it with no other method")
    if "dst" in kinds and any(isinstance(m, ToST) for m in self.methods):
      raise ValueError("ToST with a DST method is not supported: ToST trains a fixed mask")
    if sum(m.loss_fn() is not None for m in self.methods) > 1:
      raise ValueError("more than one composed method gives a loss")

  @property
  def ordered(self) -> tuple[Method, ...]:
    """The methods, mask method first, then DST, then recipes."""
    return tuple(sorted(self.methods, key=lambda m: _ORDER[m.kind]))

  def model(self, model):
    for m in self.methods:
      model = m.model(model)
    return model

  def score_params(self, params):
    for m in self.methods:
      params = m.score_params(params)
    return params

  def lift_mask(self, mask, params):
    for m in reversed(self.methods):
      mask = m.lift_mask(mask, params)
    return mask

  def initial_mask(self, ctx, params, mask=None):
    view = self.score_params(params)
    for m in self.ordered:
      if m.kind == "mask":
        mask = self.lift_mask(m.initial_mask(ctx, view, mask), params)
      else:
        mask = m.initial_mask(ctx, params, mask)
    return mask

  def learning_rate(self, schedule_fn, ctx):
    for m in self.methods:
      if type(m).learning_rate is not Method.learning_rate:
        return m.learning_rate(schedule_fn, ctx)
    return schedule_fn(ctx.num_epochs)

  def optimizer(self, inner, mask, ctx):
    for m in self.ordered:
      inner = m.optimizer(inner, mask, ctx)
    return inner

  def init_state(self, state, ctx):
    for m in self.methods:
      state = m.init_state(state, ctx)
    return state

  def scalars(self, total_steps):
    out: dict[str, optax.Schedule] = {}
    for m in self.methods:
      for k, v in m.scalars(total_steps).items():
        if k in out:
          raise ValueError(f"two composed methods give the scalar {k!r}")
        out[k] = v
    return out

  def loss_fn(self):
    for m in self.methods:
      if m.loss_fn() is not None:
        return m.loss_fn()
    return None

  def hooks(self, ctx):
    return tuple(h for m in self.ordered for h in m.hooks(ctx))

  def callbacks(self, ctx):
    return tuple(c for m in self.ordered for c in m.callbacks(ctx))


def compose(*methods: Method | str | Mapping[str, Any]) -> Method:
  """Joins a mask method, a DST method (or Sup-tickets) and recipes.

  ``compose(Random(0.9, budget="erk"), RigL())``,
  ``compose(SNIP(0.95), ToST("ghost"))``, ``compose(Magnitude(0.9),
  SparseInit())``, ``compose(Random(0.95, budget="erk"),
  SupTickets(dst=RigL()))``. One method is returned as is.

  Raises:
    ValueError: two mask (or DST) methods, IMP with another method, ToST
      with a DST method, or two methods giving a loss or the same scalar.
  """
  methods = tuple(as_method(m) for m in methods)
  if len(methods) == 1:
    return methods[0]
  return Composed(methods)


# ----------------------------------------------------------------------------
# Build: a method's parts as the arguments of fit
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
  """What :func:`build` returns: the parts of a run, as :func:`sparsejax.train.fit`
  takes them.

  Attributes:
    model: the model that trains.
    init: a zero-argument function making the initial train state (the
      starting mask in its optimiser state; :meth:`Method.init_state`
      applied). ``fit`` traces it for the checkpoint layout and calls it on a
      fresh start only, so a fixed mask (pruning at initialisation, a ticket)
      is scored only then; a DST start mask is computed by :func:`build`.
    scalars: for ``fit``.
    loss_fn: for ``fit``.
    hooks: for ``fit``.
    callbacks: for ``fit``.
  """

  model: nn.Module
  init: Callable[[], state_lib.TrainState]
  scalars: dict[str, optax.Schedule]
  loss_fn: losses.LossFn | None
  hooks: tuple[hooks_lib.StepHook, ...]
  callbacks: tuple[hooks_lib.Callback, ...]

  def fit_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of :func:`sparsejax.train.fit` besides ``dataset``,
    ``workdir``, the length of training and ``options``."""
    return dict(
      model=self.model,
      init=self.init,
      scalars=self.scalars or None,
      loss_fn=self.loss_fn,
      hooks=self.hooks,
      callbacks=self.callbacks,
    )


def _makes_mask(method: Method) -> bool:
  """Whether ``method`` makes a starting mask (not dense)."""
  if isinstance(method, Composed):
    return any(_makes_mask(m) for m in method.methods)
  return type(method).initial_mask is not Method.initial_mask and not isinstance(method, Dense)


def _is_traced(tree) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def build(
  method: Method,
  model: nn.Module,
  inner: optax.GradientTransformation | Callable[[optax.Schedule], optax.GradientTransformation],
  ctx: Context,
  *,
  base_lr: Callable[[int], optax.Schedule] | None = None,
) -> Built:
  """A method's parts for one run, independent of any config.

  1. ``trained = method.model(model)``;
  2. the optimiser: ``inner(method.learning_rate(base_lr, ctx))`` when
     ``inner`` is a function of the schedule (Sup-tickets changes the
     schedule), else ``inner``;
  3. ``tx = method.optimizer(inner, mask, ctx)``, the starting mask made on
     the params of ``create_train_state(trained, inner, zeros(1,
     *ctx.input_shape), key(ctx.seed))`` (the params ``fit`` initialises):
     by :func:`build` when ``tx`` holds the mask (DST), else inside
     ``Built.init`` (a fixed mask, given to ``create_train_state``);
  4. :meth:`Method.init_state` of that state, inside ``Built.init``.

  Args:
    method: any method (:func:`compose`).
    model: the plain model (scores and masks are computed on it).
    inner: the optimiser, or ``schedule -> optimiser``.
    ctx: the run's :class:`Context` (``input_shape`` required).
    base_lr: ``num_epochs -> schedule``, required when ``inner`` is a function.

  Returns:
    A :class:`Built`; :meth:`Built.fit_kwargs` for :func:`sparsejax.train.fit`.
  """
  if ctx.input_shape is None:
    raise ValueError("build needs Context.input_shape")
  trained = method.model(model)
  if callable(inner) and not isinstance(inner, optax.GradientTransformation):
    if base_lr is None:
      raise ValueError(
        "inner is a function of the learning rate: pass base_lr (num_epochs -> schedule)"
      )
    inner = inner(method.learning_rate(base_lr, ctx))
  ctx = dataclasses.replace(ctx, model=ctx.model if ctx.model is not None else model)
  sample = jnp.zeros((1, *ctx.input_shape), jnp.float32)
  abstract = jax.eval_shape(
    lambda: state_lib.create_train_state(trained, inner, sample, ctx.key)
  ).params
  probe = method.optimizer(inner, masks.ones_like(abstract), ctx)
  holds = optim.find_mask(jax.eval_shape(probe.init, abstract)) is not None
  if holds:  # DST: the optimiser holds its starting mask
    params = state_lib.create_train_state(trained, inner, sample, ctx.key).params
    tx = method.optimizer(inner, method.initial_mask(ctx, params), ctx)
    mask_arg = None
  else:
    tx = probe

    def mask_arg(params):
      if _is_traced(params):  # fit's layout trace: the layout of any mask
        return masks.ones_like(params)
      return method.initial_mask(ctx, params)

    if not _makes_mask(method):  # dense
      mask_arg = None

  def init() -> state_lib.TrainState:
    state = state_lib.create_train_state(trained, tx, sample, ctx.key, mask=mask_arg)
    return method.init_state(state, ctx)

  if ctx.num_epochs is not None and ctx.steps_per_epoch is not None:
    scalars = dict(method.scalars(ctx.total_steps))
  elif method.scalars(1):
    raise ValueError(
      "this method has per-step scalars: set Context.num_epochs and Context.steps_per_epoch"
    )
  else:
    scalars = {}
  return Built(
    model=trained,
    init=init,
    scalars=scalars,
    loss_fn=method.loss_fn(),
    hooks=tuple(method.hooks(ctx)),
    callbacks=tuple(method.callbacks(ctx)),
  )


__all__ = [
  "Built",
  "Composed",
  "Context",
  "DST_MASK_KEY",
  "Dense",
  "GMP",
  "GraNet",
  "GraSP",
  "IMP",
  "KINDS",
  "MASK_KEY",
  "Magnitude",
  "Method",
  "Random",
  "RigL",
  "SET",
  "SNIP",
  "SRigL",
  "SPARSE_INIT_KEY",
  "SparseInit",
  "SupTickets",
  "SynFlow",
  "Ticket",
  "ToST",
  "as_method",
  "build",
  "compose",
  "default_config",
  "fields",
  "from_config",
  "get",
  "names",
  "register",
]
