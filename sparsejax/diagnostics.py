"""Effective sparsity and layer collapse of a mask (SPEC §1 "Effective sparsity").

A weight is *effectively pruned* when no input-to-output path passes through
it: all its upstream units are dead (unreachable from the input) or all its
downstream units are (they cannot reach the output). Pruned-at-init masks at
high sparsity often have many more effectively pruned weights than nominally
pruned ones, and can *collapse* a layer (zero active weights), disconnecting
the network.

The computation is generic over any model function and ``jit``-compatible; it
uses the SynFlow trick on a *path network* built from the mask alone:

* every kernel (leaf with ``ndim > 1``, layout ``(..., fan_in axes, out)``, as
  Flax ``Dense`` and ``Conv``) becomes ``m / max(1, a_o)`` where ``a_o`` is
  the number of active weights feeding output unit ``o``; the weights are
  non-negative and each unit averages its active inputs, so activations stay
  O(1) instead of under- or overflowing with depth;
* normalisation scales (leaves whose name is in ``scale_names``, default
  ``('scale',)``) become ``m`` (1 where kept) and every other leaf (biases,
  normalisation offsets) becomes 0, so a unit carries signal only through
  weights from the input;
* the state of an :class:`sparsejax.scores.ApplyFn` (batch-norm statistics)
  becomes the identity normalisation: leaves named ``'var'`` are 1, others
  (``'mean'``) 0. A plain ``apply_fn``'s closed-over statistics are used as
  they are (at initialisation they are the identity anyway).

With an all-ones input and ``R = Σ logits`` (batch norm always in eval mode:
train mode would centre the constant input to zero), a kept
weight ``w`` is effective iff ``∂R/∂w · w ≠ 0``: its input unit is reachable
(positive activation) and its output unit reaches a logit (non-zero
sensitivity). The computation runs in float64 (``jax.enable_x64`` scope) by
default. Max-pooling passes the gradient to one position per window; weight
sharing of convolutions makes this harmless for conv kernels in practice.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks
from sparsejax.scores import ApplyFn
from sparsejax.scores import as_apply_fn
from sparsejax.scores import precision_scope

PyTree = Any


def _leaf_name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def _path_network(mask: PyTree, state: PyTree, scale_names, dtype):
  """Params and state of the non-negative path network of ``mask``."""

  def param(path, m):
    m = m.astype(dtype)
    if m.ndim > 1:
      active_in = jnp.sum(m, axis=tuple(range(m.ndim - 1)))
      return m / jnp.maximum(active_in, 1.0)
    if _leaf_name(path) in scale_names:
      return m
    return jnp.zeros_like(m)

  def neutral(path, s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return s
    fill = 1.0 if _leaf_name(path) == "var" else 0.0
    return jnp.full(s.shape, fill, dtype)

  return (
    masks.map_with_path(param, mask),
    None if state is None else masks.map_with_path(neutral, state),
  )


@functools.partial(jax.jit, static_argnames=("input_shape", "scale_names", "dtype"))
def _effective_mask(mask, apply_fn: ApplyFn, input_shape, scale_names, dtype):
  w, state = _path_network(mask, apply_fn.state, scale_names, dtype)
  path_fn = apply_fn.replace(state=state)
  x = jnp.ones((1, *input_shape), dtype)
  g = jax.grad(lambda w_: jnp.sum(path_fn(w_, x, False)))(w)
  return jax.tree.map(lambda m, g_, w_: (m & (g_ * w_ != 0)) if m.ndim > 1 else m, mask, g, w)


def effective_mask(
  mask: PyTree,
  apply_fn,
  input_shape: Sequence[int],
  *,
  scale_names: Sequence[str] = ("scale",),
  dtype=jnp.float64,
) -> PyTree:
  """The mask of the weights that lie on some input-to-output path.

  Args:
    mask: bool mask pytree (structure of the model's params).
    apply_fn: ``apply_fn(params, x, train) -> logits`` or
      :class:`sparsejax.scores.ApplyFn` (e.g. from
      :func:`sparsejax.scores.linen_apply_fn`); only the structure of its
      params is used, the values come from ``mask`` (see the module doc).
    input_shape: shape of one example, e.g. ``(32, 32, 3)``.
    scale_names: leaf names of multiplicative normalisation params.
    dtype: computation dtype, default ``jnp.float64``.

  Returns:
    The bool mask ``mask`` with the effectively pruned kernel entries set to
    ``False``; leaves with ``ndim <= 1`` are returned unchanged.
  """
  with precision_scope(dtype):
    return _effective_mask(
      mask, as_apply_fn(apply_fn), tuple(input_shape), tuple(scale_names), np.dtype(dtype)
    )


def effective_sparsity(
  mask: PyTree, apply_fn, input_shape: Sequence[int], prunable=None, **kwargs
) -> float:
  r"""Fraction of the prunable weights that are effectively pruned.

  Args:
    mask, apply_fn, input_shape, \*\*kwargs: as in :func:`effective_mask`.
    prunable: which leaves count; see :func:`sparsejax.masks.prunable_tree`.
  """
  eff = effective_mask(mask, apply_fn, input_shape, **kwargs)
  return masks.summary(eff, prunable).sparsity


def layer_collapse(mask: PyTree, prunable=None) -> list[str]:
  """Paths of the prunable layers with zero active weights (layer collapse)."""
  return list(masks.summary(mask, prunable).collapsed)


class Report(dict):
  """The dict returned by :func:`report`; ``str()`` gives a printable table."""

  def __str__(self) -> str:
    layers = self["layers"]
    width = max([len(p) for p in layers] + [5])
    rows = [
      f"{'layer':<{width}}  {'total':>10}  {'kept':>10}  {'eff. kept':>10}  "
      f"{'density':>8}  {'eff. dens.':>10}"
    ]
    for p, l in layers.items():
      flag = (
        "  COLLAPSED"
        if l["kept"] == 0
        else "  EFFECTIVELY COLLAPSED"
        if l["effective_kept"] == 0
        else ""
      )
      rows.append(
        f"{p:<{width}}  {l['total']:>10}  {l['kept']:>10}  "
        f"{l['effective_kept']:>10}  {l['density']:8.4f}  "
        f"{l['effective_density']:10.4f}{flag}"
      )
    rows.append(
      f"{'total':<{width}}  {self['total']:>10}  {self['kept']:>10}  "
      f"{self['effective_kept']:>10}  {1 - self['sparsity']:8.4f}  "
      f"{1 - self['effective_sparsity']:10.4f}"
    )
    rows.append(
      f"sparsity {self['sparsity']:.4f}, effective sparsity {self['effective_sparsity']:.4f}"
    )
    if self["collapsed"] or self["effectively_collapsed"]:
      rows.append(
        f"layer collapse: {self['collapsed']}; effectively: {self['effectively_collapsed']}"
      )
    return "\n".join(rows)


def report(
  mask: PyTree, params: PyTree, apply_fn, input_shape: Sequence[int], prunable=None, **kwargs
) -> Report:
  r"""Nominal and effective sparsity of a mask, per layer, and layer collapse.

  Args:
    mask: bool mask pytree, checked against ``params``.
    params: the params the mask belongs to (structure and shapes are checked).
    apply_fn, input_shape, \*\*kwargs: as in :func:`effective_mask`.
    prunable: which leaves are reported; see :func:`sparsejax.masks.prunable_tree`.

  Returns:
    A :class:`Report` (a dict; ``print`` it for a table) with keys
    ``sparsity``, ``effective_sparsity``, ``kept``, ``effective_kept``,
    ``total``, ``collapsed`` and ``effectively_collapsed`` (lists of paths) and
    ``layers``: ``{path: {total, kept, effective_kept, density,
    effective_density}}``.
  """
  masks.check_mask(mask, params)
  nominal = masks.summary(mask, prunable)
  effective = masks.summary(effective_mask(mask, apply_fn, input_shape, **kwargs), prunable)
  layers = {
    n.path: {
      "total": n.total,
      "kept": n.kept,
      "effective_kept": e.kept,
      "density": 1.0 - n.sparsity,
      "effective_density": 1.0 - e.sparsity,
    }
    for n, e in zip(nominal.layers, effective.layers)
  }
  return Report(
    sparsity=nominal.sparsity,
    effective_sparsity=effective.sparsity,
    kept=nominal.kept,
    effective_kept=effective.kept,
    total=nominal.total,
    collapsed=list(nominal.collapsed),
    effectively_collapsed=list(effective.collapsed),
    layers=layers,
  )
