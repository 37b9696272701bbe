"""Sparsity budgets as objects: how the kept entries are spread (SPEC §1).

A budget says how the prunable entries of a network share one sparsity:

* :class:`Global` -- one ranking over all prunable entries (SNIP, GraSP,
  SynFlow, IMP).
* :class:`Uniform` -- every prunable layer gets the sparsity ``s``.
* :class:`ERK` -- Erdős–Rényi-Kernel: layer density ∝
  ``((Σ dims) / (Π dims)) ** power`` (``power`` 0 is uniform), layers that
  would exceed density 1 made dense (:meth:`ERK.densities`).
* :class:`ER` -- Erdős–Rényi: the same over the last two dims only,
  ``(c_in + c_out) / (c_in · c_out)``.
* :class:`NM` -- ``NM(n, m)``: exactly ``n`` kept in every group of ``m``
  consecutive weights along the input dimension (axis -2: ``din`` of a dense
  ``[din, dout]`` kernel, ``c_in`` of a conv kernel ``[kh, kw, c_in, c_out]``,
  one set of groups per ``(kh, kw, c_out)``), the pattern GPU sparse tensor
  cores accelerate (``NM(2, 4)``). Its sparsity ``1 - n/m`` is implied: a
  function taking a ``sparsity`` takes ``None`` (or that same value) with it.
* :class:`ConstantFanIn` -- ``ConstantFanIn(base)``: layer sparsities from
  ``base`` (``Uniform()`` or ``ERK()``), and every output unit of a layer (a
  column of a dense ``[d_in, d_out]`` kernel, an output channel of a conv
  kernel over ``kh · kw · c_in``) keeps exactly ``k`` inputs, ``k =
  max(1, round((1 - s_l) · fan_in))`` (:func:`sparsejax.masks.kept_count` of
  one unit), ties to the lower flat index: the starting mask of SRigL and
  of condensed layers (:mod:`sparsejax.condensed`).
* :class:`Overrides` -- any of them with per-layer sparsities fixed by path
  pattern, e.g. ``ERK().with_overrides({"Dense_0": 0.0})``; the budget is then
  spread over the remaining prunable layers.

Every budget follows one protocol, :meth:`Budget.pools`: from the shapes of
the prunable layers and the requested sparsity it returns the :class:`Pool`\\ s
of the exact selection -- which layers are ranked together, at which
sparsity, whole, within N:M groups or per output unit.
:func:`sparsejax.masks.topk_mask`,
``scores.prune_at_init`` / ``iterative`` / ``synflow``, ``masks.random_mask``,
``lottery.prune_level`` and the DST methods take budget objects only; a
string is refused with one error naming :func:`parse`, which turns the
command-line names (``"global"``, ``"uniform"``, ``"erk"``, ``"er"``,
``"2:4"``, ``"cfi"``, ``"cfi-erk"``) into objects.

Budgets are frozen dataclasses: hashable (usable as static ``jit``
arguments) and equal when their fields are.

Example:

  >>> from sparsejax import budgets
  >>> budgets.parse("erk"), budgets.parse("2:4")
  (ERK(power=1.0), NM(n=2, m=4))
  >>> budgets.NM(2, 4).sparsity
  0.5
  >>> shapes = {"stem/kernel": (3, 3, 3, 16), "head/kernel": (16, 10)}
  >>> budgets.Uniform().with_overrides({"^head": 0.0}).layer_sparsities(shapes, 0.9)
  {'stem/kernel': 0.9, 'head/kernel': 0.0}
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
import math
import re
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Shapes = Mapping[str, tuple[int, ...]]

#: The command-line names of :func:`parse` (an ``"N:M"`` string is one too).
NAMES = ("global", "uniform", "erk", "er", "cfi", "cfi-erk")

_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_sparsity(sparsity, name: str = "sparsity") -> None:
  """Raises ``ValueError`` unless ``0 <= sparsity < 1`` (skipped when traced)."""
  if _is_traced(sparsity):
    return
  s = float(np.asarray(sparsity))
  if not (math.isfinite(s) and 0.0 <= s < 1.0):
    raise ValueError(
      f"{name} must be in [0, 1), got {s!r}: sparsity is the fraction of "
      "prunable weights set to zero (0.98 keeps 2%); 1.0 would prune everything."
    )


class Pool(NamedTuple):
  """Prunable layers that share one exact selection.

  Attributes:
    paths: the layers (leaf paths) of the pool.
    sparsity: the pool's sparsity (a Python float, or traced for
      :class:`Global` and :class:`Uniform`); an N:M pool's is ``1 - n/m``.
    joint: ``True``: one ranking over every entry of the pool (its count
      ``max(1, round(d · N_pool))``); ``False``: each layer ranked alone.
    group: ``(n, m)`` for an N:M pool: ``n`` kept in every group of ``m``
      along axis -2 of each layer (``n`` may be traced, see
      :meth:`scheduled`); ``None`` otherwise.
    per_unit: ``True`` for a constant fan-in pool (:class:`ConstantFanIn`):
      every output unit (last axis) of each layer keeps its top
      ``max(1, round(d · fan_in))`` inputs, ``fan_in`` the product of the
      other axes.
  """

  paths: frozenset
  sparsity: Any
  joint: bool = False
  group: tuple[Any, int] | None = None
  per_unit: bool = False

  def scheduled(self, exponent) -> Pool:
    """The pool pruned to density ``d ** exponent`` (an iterative round).

    An N:M pool keeps ``clip(round(m · (n/m) ** exponent), n, m)`` entries of
    every group: never fewer than ``n``, so the last round can keep ``n``.
    ``exponent`` may be traced.
    """
    if self.group is not None:
      n, m = self.group
      k = jnp.clip(jnp.round(m * (n / m) ** exponent), n, m).astype(jnp.int32)
      return self._replace(group=(k, m))
    return self._replace(sparsity=1.0 - (1.0 - self.sparsity) ** exponent)


def _layer_pools(layer_sparsity: Mapping[str, Any]) -> list[Pool]:
  """Per-layer pools, layers of equal sparsity sharing one."""
  groups: dict[Any, set] = {}
  for p, s in layer_sparsity.items():
    groups.setdefault(s, set()).add(p)
  return [Pool(frozenset(ps), s) for s, ps in groups.items()]


@dataclasses.dataclass(frozen=True)
class Budget:
  """The budget protocol (see the module doc); subclasses are the budgets."""

  def resolve_sparsity(self, sparsity):
    """The sparsity this budget prunes to, checked.

    ``sparsity`` is required (in ``[0, 1)``, may be traced where the budget
    allows); :class:`NM` implies its own.
    """
    if sparsity is None:
      raise ValueError(
        f"{self!r} needs a sparsity in [0, 1); only an NM(n, m) budget implies its own"
      )
    check_sparsity(sparsity)
    return sparsity

  def pools(self, shapes: Shapes, sparsity) -> tuple[Pool, ...]:
    """The pools of the exact selection over the prunable layers ``shapes``.

    Args:
      shapes: ``{path: shape}`` of the prunable layers, in flattening order.
      sparsity: the requested sparsity (``None`` for :class:`NM`).

    Returns:
      Disjoint :class:`Pool`\\ s covering every path of ``shapes``.
    """
    raise NotImplementedError

  def layer_sparsities(self, shapes: Shapes, sparsity: float) -> dict[str, float]:
    """``{path: sparsity}`` of a per-layer allocation (Uniform, ERK, ER).

    Raises:
      ValueError: for :class:`Global` and :class:`NM`, which have no per-layer
        allocation before scores are known.
    """
    raise ValueError(
      f"{self!r} has no per-layer allocation before scores are known; use Uniform(), ERK() or ER()"
    )

  def with_overrides(self, overrides: Mapping[str, float]) -> Overrides:
    """This budget with the layers matching ``overrides`` at their own sparsity.

    Args:
      overrides: ``{regex: sparsity}`` (``re.search`` on each prunable path).
    """
    return Overrides(self, overrides)


@dataclasses.dataclass(frozen=True)
class Global(Budget):
  """One ranking over all prunable entries; ``sparsity`` may be traced."""

  def pools(self, shapes, sparsity):
    sparsity = self.resolve_sparsity(sparsity)
    return (Pool(frozenset(shapes), sparsity, joint=True),) if shapes else ()


@dataclasses.dataclass(frozen=True)
class Uniform(Budget):
  """Every prunable layer at the same sparsity; ``sparsity`` may be traced."""

  def pools(self, shapes, sparsity):
    sparsity = self.resolve_sparsity(sparsity)
    if not _is_traced(sparsity):
      sparsity = float(sparsity)
    return (Pool(frozenset(shapes), sparsity),) if shapes else ()

  def layer_sparsities(self, shapes, sparsity):
    sparsity = float(self.resolve_sparsity(sparsity))
    return {p: sparsity for p in shapes}


@dataclasses.dataclass(frozen=True)
class ERK(Budget):
  """Erdős–Rényi-Kernel: layer density ∝ ``((Σ dims) / (Π dims)) ** power``.

  Attributes:
    power: in [0, 1]; softens ERK toward uniform (0 = uniform, 1 = ERK).
      Default 1.0.
  """

  power: float = 1.0

  def __post_init__(self):
    if not 0.0 <= float(self.power) <= 1.0:
      raise ValueError(f"power must be in [0, 1], got {self.power!r}")
    object.__setattr__(self, "power", float(self.power))

  def resolve_sparsity(self, sparsity):
    sparsity = super().resolve_sparsity(sparsity)
    if _is_traced(sparsity):
      raise ValueError(
        f"an {self!r} budget needs a Python float sparsity, not "
        "a traced value (its allocation is computed from static "
        "shapes)"
      )
    return sparsity

  def raw_density(self, shape: Sequence[int]) -> float:
    """``p_l = ((Σ dims) / (Π dims)) ** power`` of a kernel of ``shape``."""
    return (sum(shape) / math.prod(shape)) ** self.power

  def densities(self, shapes: Shapes, density: float) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi(-Kernel) allocation.

    Finds ε such that ``Σ_l ε · p_l · N_l = density · Σ_l N_l`` where ``p_l``
    is :meth:`raw_density`. Any layer with ``ε · p_l > 1`` is made dense and
    ε is recomputed, until no layer exceeds 1 (the RigL reference algorithm).

    Args:
      shapes: ``{path: kernel shape}`` of the layers sharing the budget.
      density: total density ``1 - s`` of those layers.

    Returns:
      ``{path: density}`` with ``Σ density_l · N_l = density · Σ N_l``.

    Example:

      >>> from sparsejax import budgets
      >>> d = budgets.ERK().densities({"small": (2, 2), "big": (100, 100)}, 0.5)
      >>> d["small"], round(d["big"], 6)  # small would exceed 1: made dense
      (1.0, 0.4998)
    """
    n = {p: math.prod(s) for p, s in shapes.items()}
    dense: set[str] = set()
    while True:
      rhs, divisor, probs = 0.0, 0.0, {}
      for p, shape in shapes.items():
        if p in dense:
          rhs -= n[p] * (1.0 - density)
        else:
          rhs += n[p] * density
          probs[p] = self.raw_density(tuple(shape))
          divisor += probs[p] * n[p]
      if not probs:
        break
      eps = rhs / divisor
      max_prob = max(probs.values())
      if max_prob * eps <= 1.0:
        break
      dense |= {p for p, pr in probs.items() if pr == max_prob}
    return {p: (1.0 if p in dense else eps * probs[p]) for p in shapes}

  def layer_sparsities(self, shapes, sparsity):
    sparsity = float(self.resolve_sparsity(sparsity))
    if not shapes:
      return {}
    return {p: 1.0 - d for p, d in self.densities(shapes, 1.0 - sparsity).items()}

  def pools(self, shapes, sparsity):
    return tuple(_layer_pools(self.layer_sparsities(shapes, sparsity)))


@dataclasses.dataclass(frozen=True)
class ER(ERK):
  """Erdős–Rényi: layer density ∝ ``((c_in + c_out) / (c_in · c_out)) ** power``.

  :class:`ERK` over the last two dims of each kernel only.
  """

  def raw_density(self, shape: Sequence[int]) -> float:
    """``p_l = ((c_in + c_out) / (c_in · c_out)) ** power`` (the last two dims)."""
    return super().raw_density(tuple(shape)[-2:])


@dataclasses.dataclass(frozen=True)
class NM(Budget):
  """Exactly ``n`` kept in every group of ``m`` weights along axis -2.

  The sparsity is ``1 - n/m`` (``NM(2, 4)``: 0.5); every N:M layer needs an
  input dimension (axis -2) divisible by ``m`` (layers kept out of the budget
  by :meth:`Budget.with_overrides` are pruned per layer instead). Ties go to the
  lower flat index, NaN ranks lowest, as in every sparsejax mask.

  Attributes:
    n: kept weights per group, ``1 <= n <= m``.
    m: group size.
  """

  n: int
  m: int

  def __post_init__(self):
    for name in ("n", "m"):
      v = getattr(self, name)
      if isinstance(v, bool) or int(v) != v:
        raise ValueError(f"NM {name} must be an integer, got {v!r}")
      object.__setattr__(self, name, int(v))
    if not 1 <= self.n <= self.m:
      raise ValueError(f"an N:M budget needs 1 <= N <= M, got {self.n}:{self.m}")

  @property
  def sparsity(self) -> float:
    """``1 - n/m``."""
    return 1.0 - self.n / self.m

  def __str__(self) -> str:
    return f"{self.n}:{self.m}"

  def resolve_sparsity(self, sparsity):
    """``1 - n/m``; a ``sparsity`` other than ``None`` must be that value."""
    if sparsity is None:
      return self.sparsity
    if _is_traced(sparsity):
      raise ValueError(
        f"{self!r} implies its sparsity {self.sparsity:g}; got a "
        "traced sparsity: pass sparsity=None"
      )
    check_sparsity(sparsity)
    if not math.isclose(float(sparsity), self.sparsity, rel_tol=0.0, abs_tol=1e-9):
      raise ValueError(
        f"{self!r} keeps {self.n} of every {self.m} weights, sparsity "
        f"{self.sparsity:g}; got sparsity={float(sparsity)!r}: leave the "
        "sparsity out (None), an N:M budget implies it"
      )
    return self.sparsity

  def check_shape(self, path: str, shape: Sequence[int]) -> None:
    """Raises ``ValueError`` unless a layer of ``shape`` can be N:M."""
    shape = tuple(shape)
    if len(shape) < 2:
      raise ValueError(
        f"an N:M budget groups weights along the input dimension (axis -2); "
        f"prunable leaf {path!r} has shape {shape}: make it non-prunable"
      )
    if shape[-2] % self.m:
      raise ValueError(
        f"an N:M budget needs the input dimension (axis -2) of every prunable "
        f"layer to be divisible by M={self.m}; {path!r} has shape {shape} "
        f"(input dimension {shape[-2]}). Keep it out of the budget, e.g. "
        f"prunable=masks.KEEP_FIRST_DENSE (with order=) or budget="
        f"{self!r}.with_overrides({{{path.rsplit('/', 1)[0]!r}: 0.0}})"
      )

  def pools(self, shapes, sparsity):
    sparsity = self.resolve_sparsity(sparsity)
    for path, shape in shapes.items():
      self.check_shape(path, shape)
    return (Pool(frozenset(shapes), sparsity, group=(self.n, self.m)),) if shapes else ()


@dataclasses.dataclass(frozen=True)
class ConstantFanIn(Budget):
  """Constant fan-in: every output unit of a layer keeps exactly ``k`` inputs.

  The layer sparsities ``s_l`` come from ``base``; in each layer every output
  unit (last axis: a column of a dense ``[d_in, d_out]`` kernel, an output
  channel of a conv ``[kh, kw, c_in, c_out]`` kernel) keeps the ``k`` highest
  scores of its fan-in (``F`` = the product of the other axes), ties to the
  lower flat index, with ``k = max(1, round((1 - s_l) · F))``, the one
  rounding rule of :func:`sparsejax.masks.kept_count` applied to one unit. A
  layer therefore keeps ``d_out · k`` entries, a multiple of its units
  (SPEC §1), and its sparsity is ``s_l`` only up to that rounding. With
  ``within`` (iterative pruning) every unit keeps ``min(k, available)``.

  Attributes:
    base: the per-layer allocation, ``Uniform()`` (default; the sparsity may
      then be traced) or ``ERK(power)`` / ``ER(power)``, optionally
      ``.with_overrides(...)`` (the overridden layers are then constant fan-in
      at their own sparsity). ``ConstantFanIn(b).with_overrides(...)`` instead
      prunes the overridden layers by a plain per-layer top-k.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import budgets, masks
    >>> budgets.parse("cfi-erk")
    ConstantFanIn(base=ERK(power=1.0))
    >>> scores = {"w": jnp.array([[3., 1.], [1., 1.], [2., 5.], [0., 4.]])}
    >>> m = masks.topk_mask(scores, 0.5, budget=budgets.ConstantFanIn())
    >>> m["w"].astype(int).tolist()  # 2 of the 4 inputs of each unit
    [[1, 0], [0, 0], [1, 1], [0, 1]]
  """

  base: Budget = Uniform()

  def __post_init__(self):
    check(self.base, "base")
    if isinstance(self.base, (Global, NM, ConstantFanIn)) or (
      isinstance(self.base, Overrides) and isinstance(self.base.base, (Global, NM, ConstantFanIn))
    ):
      raise ValueError(
        f"ConstantFanIn needs a per-layer allocation as base (Uniform(), "
        f"ERK(), ER(), optionally .with_overrides(...)), got {self.base!r}"
      )

  def resolve_sparsity(self, sparsity):
    return self.base.resolve_sparsity(sparsity)

  def layer_sparsities(self, shapes, sparsity):
    """The nominal ``{path: s_l}`` of ``base`` (each layer keeps
    ``d_out · k`` entries, see the class doc)."""
    return self.base.layer_sparsities(shapes, sparsity)

  def pools(self, shapes, sparsity):
    for path, shape in shapes.items():
      if len(tuple(shape)) < 2:
        raise ValueError(
          f"a constant fan-in budget needs kernels of ndim >= 2 (output units "
          f"on the last axis); prunable leaf {path!r} has shape "
          f"{tuple(shape)}: make it non-prunable"
        )
    return tuple(p._replace(per_unit=True, joint=False) for p in self.base.pools(shapes, sparsity))


@dataclasses.dataclass(frozen=True)
class Overrides(Budget):
  """``base`` with the layers matching a pattern at their own sparsity.

  The matched layers are pruned each on its own (exact per-layer top-k) at
  their override's sparsity, outside the shared budget; ``base`` spreads the
  requested sparsity over the other prunable layers. Every pattern must match
  a prunable path. Needs a Python float sparsity.

  Attributes:
    base: the budget of the other layers (an :class:`Overrides` base is
      merged into this one).
    overrides: ``{regex: sparsity}`` (``re.search`` on each prunable path),
      stored as a tuple of ``(pattern, sparsity)`` pairs.

  Example:

    >>> from sparsejax import budgets
    >>> budgets.Global().with_overrides({"Dense_0": 0.0})
    Overrides(base=Global(), overrides=(('Dense_0', 0.0),))
  """

  base: Budget
  overrides: Any = ()

  def __post_init__(self):
    check(self.base, "base")
    items = (
      tuple(self.overrides.items())
      if isinstance(self.overrides, Mapping)
      else tuple(tuple(kv) for kv in self.overrides)
    )
    for pattern, s in items:
      if not isinstance(pattern, str):
        raise ValueError(f"override patterns must be strings, got {pattern!r}")
      check_sparsity(s, f"override {pattern!r}")
    items = tuple((str(p), float(s)) for p, s in items)
    base = self.base
    if isinstance(base, Overrides):
      items, base = base.overrides + items, base.base
    object.__setattr__(self, "base", base)
    object.__setattr__(self, "overrides", items)

  def as_dict(self) -> dict[str, float]:
    """``{pattern: sparsity}``."""
    return dict(self.overrides)

  def resolve_sparsity(self, sparsity):
    sparsity = self.base.resolve_sparsity(sparsity)
    if _is_traced(sparsity) and self.overrides:
      raise ValueError("a budget with overrides needs a Python float sparsity, not a traced value")
    return sparsity

  def _split(self, shapes):
    fixed = resolve_overrides(list(shapes), self.as_dict())
    return fixed, {p: s for p, s in shapes.items() if p not in fixed}

  def pools(self, shapes, sparsity):
    sparsity = self.resolve_sparsity(sparsity)
    fixed, rest = self._split(shapes)
    return tuple(self.base.pools(rest, sparsity)) + tuple(_layer_pools(fixed))

  def layer_sparsities(self, shapes, sparsity):
    sparsity = self.resolve_sparsity(sparsity)
    fixed, rest = self._split(shapes)
    out = self.base.layer_sparsities(rest, sparsity) if rest else {}
    out.update(fixed)
    return {p: out[p] for p in shapes}


def check(budget, name: str = "budget") -> None:
  """Raises ``ValueError`` unless ``budget`` is a :class:`Budget` object.

  A string (a command-line name) is refused with the object :func:`parse`
  makes of it.
  """
  if isinstance(budget, Budget):
    return
  if isinstance(budget, str):
    try:
      hint = f": budgets.parse({budget!r}) is {parse(budget)!r}"
    except ValueError as e:
      hint = f" ({e})"
    raise ValueError(
      f"{name}={budget!r} is a string; sparsejax functions take a budget "
      f"object (budgets.Global(), Uniform(), ERK(), ER(), NM(n, m), "
      f"ConstantFanIn(base)); turn a "
      f"command-line name into one with sparsejax.budgets.parse{hint}"
    )
  raise ValueError(
    f"{name} must be a sparsejax.budgets.Budget (Global(), Uniform(), ERK(), "
    f"ER(), NM(n, m), ConstantFanIn(base), or one .with_overrides(...)), "
    f"got {budget!r}"
  )


def parse(text: str) -> Budget:
  """The budget of a command-line name: ``"global"``, ``"uniform"``,
  ``"erk"``, ``"er"``, ``"cfi"`` (``ConstantFanIn(Uniform())``),
  ``"cfi-erk"`` (``ConstantFanIn(ERK())``) or ``"N:M"`` (e.g. ``"2:4"``).

  Raises:
    ValueError: any other string, or an ``"N:M"`` with ``N < 1`` or ``N > M``.

  Example:

    >>> from sparsejax import budgets
    >>> budgets.parse("global"), budgets.parse(" 1:4 ")
    (Global(), NM(n=1, m=4))
  """
  if isinstance(text, Budget):
    return text
  if not isinstance(text, str):
    raise ValueError(f"budget must be a string such as 'erk' or '2:4', got {text!r}")
  name = text.strip()
  named = {
    "global": Global,
    "uniform": Uniform,
    "erk": ERK,
    "er": ER,
    "cfi": lambda: ConstantFanIn(Uniform()),
    "cfi-erk": lambda: ConstantFanIn(ERK()),
  }
  if name in named:
    return named[name]()
  match = _NM_PATTERN.match(name)
  if match is None:
    raise ValueError(f"budget must be one of {NAMES} or an N:M string such as '2:4', got {text!r}")
  return NM(int(match.group(1)), int(match.group(2)))


def resolve_overrides(
  prunable_paths: Sequence[str], overrides: Mapping[str, float] | None
) -> dict[str, float]:
  """``{path: sparsity}`` for the prunable paths matched by ``overrides``.

  Args:
    prunable_paths: the paths of the prunable leaves.
    overrides: ``{regex: sparsity}`` (``re.search`` on each path), or ``None``.

  Returns:
    The sparsity of every matched path; unmatched paths are left out.

  Raises:
    ValueError: a sparsity outside [0, 1), a pattern that matches no path, or
      a path matched by two patterns with different sparsities.

  Example:

    >>> from sparsejax import budgets
    >>> budgets.resolve_overrides(["stem/kernel", "head/kernel"], {"^head": 0.0})
    {'head/kernel': 0.0}
  """
  resolved: dict[str, float] = {}
  for pattern, s in (overrides or {}).items():
    check_sparsity(s, f"override {pattern!r}")
    hits = [p for p in prunable_paths if re.search(pattern, p)]
    if not hits:
      raise ValueError(
        f"override pattern {pattern!r} matches no prunable path; prunable "
        f"paths are {list(prunable_paths)}"
      )
    for p in hits:
      if p in resolved and resolved[p] != float(s):
        raise ValueError(f"path {p!r} is matched by several overrides with different sparsities")
      resolved[p] = float(s)
  return resolved
