"""Argument checks shared by the constructors of sparsejax (one message style).

Every numeric argument is checked where it is given, with one ``ValueError``
naming the argument, its value and the valid range. The table of checks is in
``docs/checks.md``.
"""

from __future__ import annotations

import math


def number(
  value,
  name: str,
  lo: float | None = None,
  hi: float | None = None,
  *,
  lo_open: bool = False,
  hi_open: bool = False,
  why: str = "",
) -> float:
  """``float(value)``; raises ``ValueError`` unless it is finite and in range.

  ``lo``/``hi`` are the bounds (``None``: unbounded), closed unless
  ``lo_open``/``hi_open``; ``why`` ends the message.
  """
  try:
    v = float(value)
  except (TypeError, ValueError):
    v = math.nan
  low_ok = lo is None or (v > lo if lo_open else v >= lo)
  high_ok = hi is None or (v < hi if hi_open else v <= hi)
  if math.isfinite(v) and low_ok and high_ok:
    return v
  left = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
  right = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
  raise ValueError(
    f"{name} must be in {left}, {right}, got {value!r}" + (f": {why}" if why else "")
  )


def fraction(value, name: str) -> float:
  """A fraction of a layer's active weights, in [0, 1]."""
  return number(value, name, 0.0, 1.0, why="a fraction of each layer's active weights")


def step(value, name: str, minimum: int = 0) -> int:
  """``int(value)``; raises ``ValueError`` unless it is an integer ``>= minimum``."""
  try:
    ok = not isinstance(value, bool) and int(value) == value and int(value) >= minimum
  except (TypeError, ValueError, OverflowError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)
