"""Canonical-layout convolutions for loop bodies on XLA:CPU.

Part of the CPU fast path of :mod:`sparsejax._xla_cpu` (which re-exports
:func:`canonical_convs`); the library reaches it through
:func:`sparsejax.modeling.loop_body` only.

XLA:CPU runs a convolution with its fast (Eigen) kernel only when the
dimension numbers are canonical, input ``NHWC`` and kernel ``HWIO``. Its
``ConvCanonicalization`` pass rewrites other convolutions into that form with
explicit transposes, but it only visits the entry computation: a convolution
inside a ``while`` body (``lax.fori_loop``, ``lax.scan``) or a ``cond`` branch
keeps its original dimension numbers and falls back to a naive loop nest
(jax-ml/jax#12868). The backward pass of an ``NHWC`` network is full of
such convolutions (the input gradient uses the kernel as ``HWOI``, the weight
gradient treats the batch as the contraction dimension), so on CPU 100
SynFlow rounds inside one ``fori_loop`` ran 3-5x slower than the same
rounds dispatched one by one.

:func:`canonical_convs` applies the rewrite at the jaxpr level instead, so it
reaches every convolution wherever XLA puts it. It changes layouts only:
results are those of the original function up to float rounding. GPU and TPU
compilers choose convolution layouts themselves, so the rewrite is only
lowered for CPU.

The rewrite walks jaxprs through ``jax.extend.core``, whose details change
between JAX releases. When the installed JAX does not look as expected (no
convolution primitive there, or re-evaluating a jaxpr fails), the function
runs as it is, with the CPU slowdown above, and on CPU one ``RuntimeWarning``
says so.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import functools
import threading
from typing import Any
import warnings

import jax
from jax import lax
import jax.extend.core as jex
import numpy as np

try:
  import jax.extend.source_info_util as _source_info  # pylint: disable=g-import-not-at-top
except ImportError:  # a JAX release without it: equations lose their names
  _source_info = None

# Call-like primitives whose body is evaluated in place: no layout-relevant
# semantics is lost (the jaxpr has already been differentiated). Optional: one
# a JAX release lacks is rewritten like any other primitive with jaxpr params.
_INLINE_NAMES = {
  "jit_p": "jaxpr",
  "closed_call_p": "call_jaxpr",
  "custom_jvp_call_p": "call_jaxpr",
  "custom_vjp_call_p": "call_jaxpr",
}


def _lookup(primitives) -> tuple[Any, dict[Any, str]] | None:
  """``(conv_general_dilated_p, {call primitive: jaxpr param})`` from
  ``primitives`` (``jax.extend.core.primitives``); ``None`` without the
  convolution primitive, the one the rewrite cannot do without."""
  conv = getattr(primitives, "conv_general_dilated_p", None)
  if conv is None:
    return None
  inline = {
    getattr(primitives, name): param
    for name, param in _INLINE_NAMES.items()
    if getattr(primitives, name, None) is not None
  }
  return conv, inline


SCOPE = "sparsejax_cpu_canonical_conv"
"""Named scope of the transposes and convolutions :func:`canonical_convs`
lowers for CPU (a ``sparsejax._xla_cpu.CPU_SCOPE`` name)."""

_found = _lookup(getattr(jex, "primitives", None))
_conv_p, _INLINE = _found if _found else (None, {})

_warn_lock = threading.Lock()
_warned = False


def _warn_fallback(reason: str) -> None:
  """One ``RuntimeWarning`` per process that the rewrite is off, when JAX's
  default backend is the CPU (elsewhere the rewrite is never lowered)."""
  global _warned
  if jax.default_backend() != "cpu":
    return
  with _warn_lock:
    if _warned:
      return
    warnings.warn(
      f"sparsejax: canonical-layout convolutions are off ({reason[:300]}); "
      f"the installed JAX {jax.__version__} does not look as sparsejax "
      "expects. Results are unchanged, but scores and loops with "
      "convolutions can be several times slower on CPU (see "
      "sparsejax/_conv_layout.py).",
      RuntimeWarning,
      stacklevel=2,
    )
    _warned = True


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
  """``conv_general_dilated`` with NHWC input, HWIO kernel and NHWC output."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  n = len(lhs_spec)
  canonical = lax.ConvDimensionNumbers(
    lhs_spec=(0, n - 1, *range(1, n - 1)),
    rhs_spec=(n - 1, n - 2, *range(n - 2)),
    out_spec=(0, n - 1, *range(1, n - 1)),
  )
  if tuple(dimension_numbers) == tuple(canonical):
    return _conv_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
  # lhs (batch, spatial..., feature); rhs (spatial..., in, out).
  lhs_t = lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs_t = lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = _conv_p.bind(lhs_t, rhs_t, dimension_numbers=canonical, **params)
  # out's axis i is the original output axis perm[i]; put it back there.
  perm = (out_spec[0], *out_spec[2:], out_spec[1])
  return lax.transpose(out, tuple(int(i) for i in np.argsort(perm)))


def _transform_closed(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
  """``closed`` with canonical convolutions, same signature."""
  avals = [
    jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=getattr(v.aval, "weak_type", False))
    for v in closed.jaxpr.invars
  ]
  return jax.make_jaxpr(lambda *xs: _eval(closed.jaxpr, closed.consts, xs))(*avals)


def _transform_param(value):
  if isinstance(value, jex.ClosedJaxpr):
    return _transform_closed(value)
  if isinstance(value, tuple) and value and all(isinstance(v, jex.ClosedJaxpr) for v in value):
    return tuple(_transform_closed(v) for v in value)
  return value


def _source_context(eqn) -> contextlib.AbstractContextManager:
  """Re-binds ``eqn`` under its traceback and name stack, as
  ``jax.core.eval_jaxpr`` does, so that the rewritten program keeps the op
  names and locations of the original (and its named scopes, e.g. those of
  :mod:`sparsejax._xla_cpu`)."""
  info = getattr(eqn, "source_info", None)
  if _source_info is None or info is None:
    return contextlib.nullcontext()
  try:
    name_stack = _source_info.current_name_stack() + info.name_stack
    return _source_info.user_context(info.traceback, name_stack=name_stack)
  except Exception:  # pylint: disable=broad-except
    return contextlib.nullcontext()


def _eval(jaxpr: jex.Jaxpr, consts, args) -> list:
  """Evaluates ``jaxpr`` with every convolution in canonical form."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    with _source_context(eqn):
      if eqn.primitive is _conv_p:
        with jax.named_scope(SCOPE):
          outvals = [_canonical_conv(*invals, **eqn.params)]
      elif eqn.primitive in _INLINE:
        sub = eqn.params[_INLINE[eqn.primitive]]
        outvals = _eval(sub.jaxpr, sub.consts, invals)
      else:
        params = {k: _transform_param(v) for k, v in eqn.params.items()}
        with eqn.ctx.manager:
          outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
        if not eqn.primitive.multiple_results:
          outvals = [outvals]
    for var, value in zip(eqn.outvars, outvals):
      if not isinstance(var, jex.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def canonical_convs(fn: Callable) -> Callable:
  """``fn`` with every convolution it traces in NHWC/HWIO form on CPU.

  ``fn`` is traced once to a jaxpr; when the computation is lowered for CPU
  the jaxpr is evaluated with each convolution (including those ``jax.grad``
  and ``jax.jvp`` add, and those in nested ``jit``, ``cond``, ``while`` and
  ``scan`` bodies) bracketed by explicit transposes into the layout of
  XLA:CPU's fast kernel; for any other platform it is evaluated as it is
  (``lax.platform_dependent``, decided at lowering, not from the default
  backend).

  Meant for functions that are already differentiated (a score, a gradient
  step): on CPU, ``custom_jvp``/``custom_vjp`` functions inside ``fn`` are
  evaluated by their primal body, so differentiating the wrapper ignores their
  custom rules.

  Args:
    fn: a function of pytrees of arrays, traced once per call of the wrapper
      (normally inside an outer ``jit``).

  Returns:
    A function with the signature and results of ``fn`` (up to float
    rounding on CPU).

  Warns:
    ``RuntimeWarning``, once per process and only when JAX's default backend
    is the CPU, when the installed JAX lacks the convolution primitive or
    re-evaluating the jaxpr fails; ``fn`` then runs as it is.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    plain = jex.jaxpr_as_fun(closed)
    cpu = plain
    if _conv_p is None:
      _warn_fallback("jax.extend.core.primitives has no conv_general_dilated_p")
    else:
      # fn traced fine above; what can fail here is re-evaluating its jaxpr
      # through JAX internals. It is done in a trace of its own, so a failure
      # leaves nothing behind in the caller's trace.
      try:
        cpu = jex.jaxpr_as_fun(_transform_closed(closed))
      except MemoryError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        _warn_fallback(f"{type(e).__name__}: {e}")
    out = lax.platform_dependent(*jax.tree.leaves(args), cpu=cpu, default=plain)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped
