"""The CPU fast path of sparsejax: every XLA:CPU-specific rewrite, in one place.

Nothing else in the library imports this module but ``sparsejax/__init__.py``
(which calls :func:`apply` first) and :mod:`sparsejax.modeling`, the one
closure that applies models; models, scores and recipes never see it. Its
parts:

* :func:`apply`: XLA:CPU options, set by ``import sparsejax``.
* :func:`fast_path`: a ``flax.linen.intercept_methods`` context, entered by
  :func:`sparsejax.modeling.apply_model` around every ``model.apply``, that
  gives the models' convolutions (:class:`sparsejax.models.activations.Conv`)
  a materialised input (:func:`conv_general_dilated`) and their training-mode
  batch norm (:meth:`sparsejax.models.norm.BatchNorm.normalize_batch`) GEMV
  statistics (:func:`batch_norm_train`).
* :func:`plain_ops`: turns those two off for a trace that differentiates twice
  (entered by :func:`sparsejax.modeling.second_order`).
* :func:`canonical_convs` (:mod:`sparsejax._conv_layout`): canonical conv
  layouts in loop bodies (:func:`sparsejax.modeling.loop_body`).

Every rewrite is lowered for CPU only (``lax.platform_dependent``): GPU and TPU
programs are free of it (``tests/test_lowering.py``).

XLA:CPU hands convolutions to YNNPACK library fusions by default. For the
kernel gradient of a convolution (a convolution whose window is the whole
image, with the batch as the contracted feature dimension) that path is very
slow on some CPUs: on a 2-core AMD EPYC (Zen 3, AVX2) the kernel gradient of
one 3x3 convolution (128x32x32x16 -> 16) took 173-251 ms with YNNPACK and
19 ms with XLA's own (Eigen) convolution, and a ResNet-20 training gradient
(batch 128) went from 2.7 s to 0.9 s. ``benchmarks/cpu_step.py`` measures the
difference on the machine at hand.

:func:`apply` appends ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK
fusions) to ``XLA_FLAGS`` before the CPU backend starts. It is called once, by
``import sparsejax``. The rules:

* A flag the user already set in ``XLA_FLAGS`` is never overridden; their own
  flags are kept and ours are appended.
* ``SPARSEJAX_XLA_CPU_DEFAULTS=0`` in the environment turns this off.
* XLA aborts the process on an unknown flag, and these option names change
  between releases, so a flag is only set when the installed ``jaxlib``
  binary defines it. Otherwise nothing is set and one warning says so
  (training is then correct, only slower).
* XLA reads ``XLA_FLAGS`` once, when JAX's first backend starts. If that
  happened before ``import sparsejax``, the settings cannot take effect in
  this process: one warning names the fix (import sparsejax first, or export
  the flag before starting Python).

These are CPU options: GPU and TPU compilation is unchanged.

:func:`conv_general_dilated` is ``lax.conv_general_dilated`` with its input
passed through a data-dependent identity on CPU (a ``lax.cond`` whose
branches both return the input), which XLA cannot fuse through;
:func:`fast_path` does the same to the input of every model convolution.
XLA:CPU otherwise fuses the
whole batch-norm / ReLU / residual chain that produced a convolution's input
into the layout transpose that feeds the convolution's kernel gradient (the
Eigen kernel wants ``[C, H, W, N]``), recomputing the chain at every element
of a transposed, strided write: on ResNet-20 those fused transposes took
about 40% of a training step. With the input materialised, the transpose is
a plain copy. Values are unchanged; GPU and TPU lower the plain convolution
(``lax.platform_dependent``), and so does CPU under
``SPARSEJAX_XLA_CPU_DEFAULTS=0`` (XLA's defaults throughout).

:func:`batch_norm_train` is the training-mode batch norm that
:func:`fast_path` puts in place of the models' own
(:class:`sparsejax.models.norm.BatchNorm`). XLA:CPU lowers a reduction over
the batch and spatial axes of an NHWC tensor (the batch statistics, and in
the backward pass the gradients of the scale and bias) to a split
``reduce-window`` that runs at a fraction of memory bandwidth: on ResNet-20
they were a third of the step's CPU time. On CPU the statistics and those
gradients are computed as matrix-vector products ``ones[M] @ x[M, C]``
(Eigen GEMV) by a ``custom_vjp`` with batch norm's closed-form backward pass;
other platforms, and CPU under ``SPARSEJAX_XLA_CPU_DEFAULTS=0``, compute the
same formulas with ``jnp.mean`` and let autodiff derive the backward pass.

Both rewrites add branches (``lax.platform_dependent``, ``lax.cond``) to every
convolution and batch norm. That pays in a training step but not in programs
that differentiate twice, where autodiff multiplies the branches: LRsI's
objective (ToST) on a ghost ResNet-20 took 121 s to trace with them and 36 s
without (2-core AMD EPYC Zen 4, shared with other jobs), and minutes more to
compile. Such programs (LRsI, GraSP) are traced inside :func:`plain_ops`,
which turns both rewrites off for the trace. A function jitted elsewhere and
already traced with the rewrites at the same shapes keeps that trace inside
the context (and one first traced inside keeps the plain one): JAX's jit
cache does not know about the context.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import mmap
import os
import threading
import warnings

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from sparsejax._conv_layout import canonical_convs  # noqa: F401  (the loop-body part)

FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
"""Flags :func:`apply` adds to ``XLA_FLAGS`` (each as ``--name=value``)."""

OPT_OUT = "SPARSEJAX_XLA_CPU_DEFAULTS"
"""Environment variable; ``0`` (or ``false``/``no``/``off``) disables :func:`apply`
and the materialisation of :func:`conv_general_dilated` (read when a step is
traced)."""


CPU_SCOPE = "sparsejax_cpu"
"""Prefix of the ``jax.named_scope`` of every CPU-only rewrite of sparsejax.

The rewrites' operations carry it in their names (the locations of a
lowering's ``as_text(debug_info=True)`` and XLA's op metadata), so a
lowering can be checked for them: ``tests/test_lowering.py`` asserts the
names are there when lowering for CPU and absent for GPU and TPU. A new
CPU-only trick runs under ``jax.named_scope(CPU_SCOPE + "_<what>")``."""

MATERIALIZE_SCOPE = CPU_SCOPE + "_materialize"
"""Named scope of :func:`conv_general_dilated`'s CPU materialisation."""

BN_GEMV_SCOPE = CPU_SCOPE + "_bn_gemv"
"""Named scope of :func:`batch_norm_train`'s CPU GEMV forward and backward."""


def _name(flag: str) -> str:
  return flag.lstrip("-").split("=", 1)[0]


def jaxlib_defines(name: str) -> bool:
  """Whether the installed ``jaxlib`` binaries define the XLA option ``name``.

  Searches the shared libraries of the ``jaxlib`` package for the option's
  name as a NUL-delimited string, the way XLA's flag table stores it.
  ``False`` when nothing can be read.
  """
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  root = os.path.dirname(jaxlib.__file__)
  needle = b"\0" + name.encode() + b"\0"
  # The XLA flag table lives in libjax_common.so in current releases; look
  # there first, then in every other library of the package.
  paths = sorted(
    glob.glob(os.path.join(root, "**", "*.so"), recursive=True),
    key=lambda p: os.path.basename(p) != "libjax_common.so",
  )
  for path in paths:
    try:
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def _backends_initialized() -> bool | None:
  """Whether a JAX backend has started; ``None`` if JAX cannot tell us."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except
    return None


def _default_backend_is_cpu() -> bool:
  try:
    import jax  # pylint: disable=g-import-not-at-top

    return jax.default_backend() == "cpu"
  except Exception:  # pylint: disable=broad-except
    return True


def _disabled(environ) -> bool:
  return environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


_local = threading.local()


def _plain() -> bool:
  """Whether the ops below trace their plain form (opt-out or :func:`plain_ops`)."""
  return getattr(_local, "plain", False) or _disabled(os.environ)


@contextlib.contextmanager
def plain_ops():
  """Traces :func:`conv_general_dilated` and :func:`batch_norm_train` plainly.

  Inside the context (in this thread) both lower to the plain XLA ops on every
  platform, as under ``SPARSEJAX_XLA_CPU_DEFAULTS=0``. For programs that
  differentiate twice (see the module docstring); call the jitted function
  inside it so that its trace happens there. Values are the same up to float
  rounding.
  """
  previous = getattr(_local, "plain", False)
  _local.plain = True
  try:
    yield
  finally:
    _local.plain = previous


def apply(environ=None, *, defines=jaxlib_defines, initialized=_backends_initialized) -> list[str]:
  """Appends :data:`FLAGS` to ``XLA_FLAGS`` where safe; returns those added.

  Args:
    environ: the environment to edit (default ``os.environ``).
    defines: ``name -> bool``, whether ``jaxlib`` knows an option
      (default :func:`jaxlib_defines`; injectable for tests).
    initialized: ``() -> bool | None``, whether a JAX backend has started.

  Returns:
    The flags appended (empty when disabled, all already set by the user,
    unknown to this ``jaxlib``, or too late).

  Warns:
    ``RuntimeWarning`` once when a flag is unknown to the installed
    ``jaxlib``, or when JAX's backend started before this call, so the
    flags cannot take effect in this process.
  """
  environ = os.environ if environ is None else environ
  if _disabled(environ):
    return []
  current = environ.get("XLA_FLAGS", "")
  present = {_name(tok) for tok in current.split()}
  missing = [f for f in FLAGS if _name(f) not in present]
  if not missing:
    return []
  unknown = [f for f in missing if not defines(_name(f))]
  if unknown:
    warnings.warn(
      "sparsejax: the installed jaxlib has no XLA option "
      f"{', '.join(_name(f) for f in unknown)}; training on CPU uses XLA's "
      "default convolution path, which is correct but can be several times "
      "slower (see sparsejax/_xla_cpu.py). Set "
      f"{OPT_OUT}=0 to silence this.",
      RuntimeWarning,
      stacklevel=3,
    )
    missing = [f for f in missing if f not in unknown]
    if not missing:
      return []
  if initialized():
    if not _default_backend_is_cpu():
      return []  # an accelerator run: the CPU options would not matter
    warnings.warn(
      "sparsejax: JAX's backend was started before sparsejax was imported, "
      "so its faster XLA:CPU settings cannot take effect in this process. "
      "Import sparsejax before running any JAX computation, or start Python "
      f"with XLA_FLAGS='{' '.join(missing)}' (set {OPT_OUT}=0 to silence "
      "this).",
      RuntimeWarning,
      stacklevel=3,
    )
    return []
  environ["XLA_FLAGS"] = " ".join([current.strip(), *missing]).strip()
  return missing


def _first_is_finite(x: jax.Array) -> jax.Array:
  """A cheap runtime predicate: whether the first element of ``x`` is finite."""
  return lax.is_finite(lax.reshape(lax.slice(x, (0,) * x.ndim, (1,) * x.ndim), ()))


def _materialize(x: jax.Array) -> jax.Array:
  """``x``, through a data-dependent ``lax.cond`` that XLA cannot fuse across.

  One branch returns ``x``, the other ``x + 0`` (the same values, with -0.0
  becoming +0.0): branches XLA sees as identical would be merged and the
  conditional removed.
  """
  with jax.named_scope(MATERIALIZE_SCOPE):
    return lax.cond(_first_is_finite(x), lambda v: v, lambda v: v + jax.numpy.zeros((), v.dtype), x)


def conv_general_dilated(lhs, rhs, *args, **kwargs):
  """``lax.conv_general_dilated`` whose input is materialised first on CPU.

  Same signature and values as :func:`jax.lax.conv_general_dilated` (it is the
  ``conv_general_dilated`` field of the models' ``nn.Conv``). See the module
  docstring for why; other platforms lower the plain convolution.
  """
  return lax.conv_general_dilated(_materialized_on_cpu(lhs), rhs, *args, **kwargs)


def _materialized_on_cpu(x: jax.Array) -> jax.Array:
  """``x`` through :func:`_materialize` when lowered for CPU (unless plain)."""
  if not _plain() and jax.dtypes.issubdtype(x.dtype, jax.numpy.inexact):
    x = lax.platform_dependent(x, cpu=_materialize, default=lambda v: v)
  return x


def _column_sum(a: jax.Array) -> jax.Array:
  """``a.sum(0)`` of a float32 ``[M, C]`` matrix, as a matrix-vector product."""
  return jnp.dot(jnp.ones((a.shape[0],), a.dtype), a, precision=lax.Precision.HIGHEST)


def _bn_forward(x, scale, bias, epsilon):
  """Batch norm of ``x [..., C]`` over all leading axes, statistics as GEMVs."""
  with jax.named_scope(BN_GEMV_SCOPE):
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x2.shape[0]
    mean = _column_sum(x2) / m
    var = jnp.maximum(_column_sum(x2 * x2) / m - mean * mean, 0.0)
    rstd = lax.rsqrt(var + epsilon)
    y = ((x2 - mean) * (scale * rstd) + bias).reshape(x.shape)
  # x in its own dtype (half the residual memory for bfloat16); the backward
  # pass casts it again and returns dx in that dtype.
  return (y, mean, var), (x, scale, bias, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_gemv(x, scale, bias, epsilon):
  return _bn_forward(x, scale, bias, epsilon)[0]


def _bn_gemv_bwd(epsilon, residuals, cotangents):
  """Batch norm's closed-form backward pass; both reductions are GEMVs.

  With ``xhat = (x - mean) * rstd`` and ``y = xhat * scale + bias``:
  ``dbias = sum(dy)``, ``dscale = sum(dy * xhat)``, and
  ``dx = scale * rstd * (dy - dbias / M - xhat * dscale / M)``, plus the
  terms of the cotangents of the returned ``mean`` and ``var`` (zero when
  they only feed the running averages). Each gradient has the dtype of its
  input (``dx`` bfloat16 for a bfloat16 ``x``), as autodiff of the plain form
  gives it: the two are branches of one ``lax.platform_dependent``, whose
  result types must agree.
  """
  del epsilon
  with jax.named_scope(BN_GEMV_SCOPE):
    x, scale, bias, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = x2.shape[0]
    dy2 = dy.reshape(x2.shape).astype(jnp.float32)
    xhat = (x2 - mean) * rstd
    dbias = _column_sum(dy2)
    dscale = _column_sum(dy2 * xhat)
    dx = (
      (scale * rstd) * (dy2 - dbias / m - xhat * (dscale / m))
      + dmean / m
      + dvar * (2.0 / m) * (x2 - mean)
    )
    return (
      dx.reshape(x.shape).astype(x.dtype),
      dscale.astype(scale.dtype),
      dbias.astype(bias.dtype),
    )


_bn_gemv.defvjp(lambda x, s, b, eps: _bn_forward(x, s, b, eps), _bn_gemv_bwd)


def _bn_plain(x, scale, bias, epsilon):
  """The same batch norm with ``jnp.mean`` reductions and autodiff."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(jnp.mean(x32 * x32, axes) - mean * mean, 0.0)
  y = (x32 - mean) * (scale * lax.rsqrt(var + epsilon)) + bias
  return y, mean, var


def batch_norm_train(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm of ``x`` over all axes but the last.

  Args:
    x: ``[..., C]`` activations (any float dtype; statistics in float32).
    scale, bias: ``[C]`` float32 affine parameters.
    epsilon: added to the variance.

  Returns:
    ``(y, mean, var)``: ``y = (x - mean) * scale / sqrt(var + epsilon) + bias``
    (float32, shape of ``x``) and the batch statistics ``[C]`` (biased
    variance ``E[x^2] - E[x]^2``, as ``flax.linen.BatchNorm`` computes it).
    On CPU the reductions are GEMVs with a closed-form backward pass (see the
    module docstring); elsewhere, or with ``SPARSEJAX_XLA_CPU_DEFAULTS=0``,
    plain reductions. Same values and gradients up to float rounding.
  """
  if _plain():
    return _bn_plain(x, scale, bias, epsilon)
  return lax.platform_dependent(
    x, scale, bias, cpu=lambda *a: _bn_gemv(*a, epsilon), default=lambda *a: _bn_plain(*a, epsilon)
  )


def _intercept(next_fun, args, kwargs, context):
  """The ``flax.linen`` interceptor of :func:`fast_path`."""
  # Imported here: `import sparsejax` imports this module before the models.
  from sparsejax.models import activations  # pylint: disable=g-import-not-at-top
  from sparsejax.models import norm  # pylint: disable=g-import-not-at-top

  module, method = context.module, context.method_name
  if _plain():
    return next_fun(*args, **kwargs)
  if method == "__call__" and isinstance(module, activations.Conv) and args:
    # nn.Conv promotes its input to the computation dtype before the
    # convolution: promote here, so that the convolution's own input (the
    # value of _xla_cpu.conv_general_dilated's lhs) is what is materialised.
    x = jnp.asarray(args[0])
    dtype = (
      module.dtype if module.dtype is not None else jnp.result_type(x.dtype, module.param_dtype)
    )
    if jax.dtypes.issubdtype(dtype, jnp.inexact):
      x = _materialized_on_cpu(x.astype(dtype))
    return next_fun(x, *args[1:], **kwargs)
  if method == "normalize_batch" and isinstance(module, norm.BatchNorm):
    x, scale, bias = args
    return batch_norm_train(x, scale, bias, module.epsilon)
  return next_fun(*args, **kwargs)


def fast_path() -> contextlib.AbstractContextManager:
  """The CPU rewrites of the models, for the ``model.apply`` traced inside.

  Inside the context (a ``flax.linen.intercept_methods``), the input of every
  :class:`sparsejax.models.activations.Conv` is materialised on CPU (as by
  :func:`conv_general_dilated`) and every training-mode
  :class:`sparsejax.models.norm.BatchNorm` computes its statistics with
  :func:`batch_norm_train`; other modules run as they are. Entered by
  :func:`sparsejax.modeling.apply_model`, the only caller. Inside
  :func:`plain_ops`, or with ``SPARSEJAX_XLA_CPU_DEFAULTS=0``, it changes
  nothing. Values are the same up to float rounding; GPU and TPU lower the
  plain forms. Nested (an ``apply_model`` inside another), the inner context
  adds nothing: each convolution input is materialised once.
  """
  if getattr(_local, "fast_path", False):
    return contextlib.nullcontext()
  return _fast_path_context()


@contextlib.contextmanager
def _fast_path_context():
  _local.fast_path = True
  try:
    with nn.intercept_methods(_intercept):
      yield
  finally:
    _local.fast_path = False
