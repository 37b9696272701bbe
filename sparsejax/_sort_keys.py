"""Sort keys of float scores, shared by the exact top-k selections.

:func:`sortable_bits` maps float scores to unsigned integers in the same
order, the keys of :func:`sparsejax.masks.keep_top` (the radix select of
every mask) and of the N:M group selections of :mod:`sparsejax.nm`. It lives
here, below both modules, so that neither imports the other for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sortable_bits(scores: jax.Array) -> jax.Array:
  """Unsigned integers ordered like the floats (NaN lowest, -0.0 == +0.0).

  float64 scores give ``uint64`` keys, every other float dtype ``uint32``.
  """
  x = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  # -0.0 -> +0.0 by a select: XLA simplifies ``x + 0.0`` to ``x`` under jit.
  x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
  utype = jnp.uint64 if x.dtype == jnp.float64 else jnp.uint32
  x = x.astype(jnp.float64 if utype == jnp.uint64 else jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, utype)
  sign = jnp.array(1, utype) << (8 * jnp.dtype(utype).itemsize - 1)
  # Negative floats: flip every bit (reverses their order below the positives);
  # non-negative floats: set the sign bit.
  return jnp.where(bits & sign, ~bits, bits | sign)
