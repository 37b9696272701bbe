"""The JAX versions sparsejax is tested with, and the import-time check.

sparsejax leans on JAX internals that change between minor releases: the
canonical-layout convolution rewrite walks jaxprs through
``jax.extend.core`` (``DropVar`` is there from JAX 0.10; see
``sparsejax/_conv_layout.py``), the XLA:CPU options of
``sparsejax/_xla_cpu.py`` are only known to recent ``jaxlib`` binaries, and
SynFlow's float64 and ``diagnostics.effective_mask`` use ``jax.enable_x64``.
So the JAX requirement is a range, the one CI tests: the floor runs a subset
of the suite (``.ci/floor``), the newest minor the whole suite (``.ci/run``).

:data:`FLOOR` and :data:`BELOW` are the one place that holds the range;
``pyproject.toml`` (the core dependency and the ``cuda12``/``cuda13`` extras)
and ``requirements-tpu.txt`` pin :data:`SPEC`, and a test checks that they
agree. When sparsejax is imported under a JAX outside the range anyway (from
``PYTHONPATH``, or an image's own JAX), :func:`warn_if_untested` warns once, at
import; the rewrites that rely on internals then fall back where those
internals differ (each with its own warning), so results stay correct.
"""

from __future__ import annotations

import re
import warnings

import jax

#: The oldest tested JAX, ``(major, minor)``: every release of it is supported.
FLOOR = (0, 10)
#: The first untested minor: the newest tested is the minor below it.
BELOW = (0, 11)
#: The requirement specifier of the tested range, as pinned by pyproject.toml.
SPEC = f">={FLOOR[0]}.{FLOOR[1]}.0,<{BELOW[0]}.{BELOW[1]}"


def minor_version(version: str) -> tuple[int, int] | None:
  """``(major, minor)`` of a version string (``"0.10.2rc1"`` -> ``(0, 10)``).

  ``None`` when the string does not start with ``major.minor``.
  """
  match = re.match(r"\s*(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def is_tested(version: str) -> bool:
  """Whether JAX ``version`` lies in the tested range :data:`SPEC`."""
  minor = minor_version(version)
  return minor is not None and FLOOR <= minor < BELOW


def warn_if_untested(version: str | None = None) -> bool:
  """Warns (``RuntimeWarning``) unless JAX ``version`` is in the tested range.

  Called once by ``import sparsejax``.

  Args:
    version: a JAX version string; default the imported ``jax.__version__``.

  Returns:
    Whether it warned.
  """
  version = jax.__version__ if version is None else version
  if is_tested(version):
    return False
  warnings.warn(
    f"sparsejax: JAX {version} is outside the range sparsejax is tested with "
    f"(jax{SPEC}). Its JAX-internal rewrites fall back where JAX differs "
    "(results unchanged, CPU training possibly slower), but other parts may "
    "break; install a tested JAX (pip install 'jax" + SPEC + "') or see the "
    "README's set-up section for how the range is widened.",
    RuntimeWarning,
    stacklevel=2,
  )
  return True
