"""Constant fan-in sparsity and condensed layers (SRigL, Lasby et al. 2024).

A mask has *constant fan-in* when every output unit of a kernel keeps the
same number ``k`` of active inputs: for a dense kernel ``[d_in, d_out]`` the
fan-in of unit ``o`` is column ``o`` (``d_in`` entries); for a conv kernel
``[kh, kw, c_in, c_out]`` it is output channel ``o`` over its
``kh · kw · c_in`` receptive field. Units may be *ablated* (``k = 0``, all
inputs pruned), as SRigL's neuron ablation does; the other units then keep
the same ``k``.

Such a layer is stored *condensed*: values ``[n_rows, k]`` and input indices
``[n_rows, k]``, one row per non-ablated unit, and computed as a gather and a
small dense product, ``y[b, o] = Σ_j x[b, idx[o, j]] · val[o, j] + bias[o]``:
``out · k`` multiply-adds per example instead of ``out · d_in`` (10% at 90%
sparsity), with no sparse-matrix kernel.

* :func:`constant_fan_in_mask` / :func:`constant_fan_in`: the exact
  constant fan-in mask of scores (one kernel / a pytree), the top ``k`` of
  every unit, ties to the lower flat index; ``k`` follows the one rounding
  rule of :func:`sparsejax.masks.kept_count` applied to a unit's fan-in.
* :func:`fan_in_counts`, :func:`check_constant_fan_in`: the active inputs of
  every unit, and the check.
* :func:`condense`: ``variables`` with every constant fan-in ``nn.Dense``
  kernel (and with ``convs=True`` every supported ``nn.Conv`` kernel) as a
  :class:`CondensedKernel`; :func:`apply` runs the unchanged linen model with
  them (``flax.linen.intercept_methods``); :func:`param_nbytes` counts bytes.
  :func:`sparsejax.sparse_io.save_condensed` writes them to a file.

Speed (CPU): a condensed dense layer costs a gather of ``rows · k`` inputs
per example, and XLA:CPU's gather costs 0.5–0.8 ns per gathered input
against ≈0.1 ns per dense multiply-add. At batch 1 the condensed MLP
784-1024-1024-10 was 1.6x faster than the dense matrix-vector products at
95% sparsity and 6x at 99%, but not faster at 90% (0.8–1.3x;
``benchmarks/structured_inference.py``, README "What sparsity saves"); at large batches XLA:CPU's gather is far slower per element than
its matrix product, so a layer run on more than ``gather_max_rows`` rows
scatters its kernel back to dense and multiplies (the same result; the
saving is then only in memory). Condensed convolutions gather from im2col
patches (``kh · kw`` times the input): they save memory, not time, on CPU
and are off by default.

SRigL (:func:`sparsejax.dst.srigl_optimizer`) builds on this module: its
starting mask is :func:`sparsejax.masks.random_mask` with a
``budgets.ConstantFanIn(budgets.ERK())`` budget (the selection of
:func:`constant_fan_in_mask`, shared through ``sparsejax._select``), every
update caps and regrows each unit with :func:`constant_fan_in_mask` and a
per-unit ``k`` array (0 for ablated units), and every mask it makes passes
:func:`check_constant_fan_in`.

Example::

  mask = condensed.constant_fan_in(scores, 0.9)           # exact k per unit
  cvars = condensed.condense(model, variables, mask, x[:1])
  logits = jax.jit(lambda v, x: condensed.apply(model, v, x))(cvars, x)

The logits equal the masked dense model's within float rounding (the sums
run in another order).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from sparsejax import _select
from sparsejax import masks
from sparsejax import sparse_inference

PyTree = Any

# ----------------------------------------------------------------------------
# Constant fan-in masks
# ----------------------------------------------------------------------------


def fan_in_counts(mask_leaf: jax.Array) -> np.ndarray:
  """Active inputs of every output unit of a kernel mask: ``int [d_out]``.

  ``mask_leaf`` is ``[d_in, d_out]`` or ``[kh, kw, c_in, c_out]`` (any
  ``[..., d_out]``); the fan-in of unit ``o`` runs over every axis but the last.
  """
  m = np.asarray(jax.device_get(mask_leaf))
  if m.ndim < 2:
    raise ValueError(f"a fan-in needs a kernel of ndim >= 2, got shape {m.shape}")
  return m.reshape(-1, m.shape[-1]).sum(axis=0)


def constant_fan_in_mask(
  scores_leaf: jax.Array, k, *, within: jax.Array | None = None
) -> jax.Array:
  """The exact constant fan-in mask of one kernel: the top ``k`` inputs of every unit.

  Pure and ``jit``-compatible (``k`` may be traced). Unit ``o`` keeps exactly
  ``min(k_o, fan_in)`` entries of its fan-in (all axes but the last): the
  highest scores, ties to the lower flat index, NaN lowest (as every
  sparsejax mask).

  Args:
    scores_leaf: float scores ``[d_in, d_out]`` or ``[kh, kw, c_in, c_out]``.
    k: kept inputs per unit: an int, a traced int scalar, or an int array
      ``[d_out]`` (a per-unit count, e.g. 0 for ablated units).
    within: optional bool mask of ``scores_leaf``'s shape: only its entries
      can be kept, ``min(k_o, available)`` per unit (e.g. the growth
      candidates of a drop-and-grow step).

  Returns:
    bool mask of ``scores_leaf``'s shape.

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import condensed
    >>> scores = jnp.array([[3., 1.], [1., 1.], [2., 5.]])   # [d_in=3, d_out=2]
    >>> condensed.constant_fan_in_mask(scores, 1)  # column 1: 5 beats the tied 1s
    Array([[ True, False],
           [False, False],
           [False,  True]], dtype=bool)
    >>> condensed.constant_fan_in_mask(scores, 2)  # column 1: the tied 1s go to row 0
    Array([[ True,  True],
           [False, False],
           [ True,  True]], dtype=bool)
  """
  shape = tuple(jnp.shape(scores_leaf))
  if len(shape) < 2:
    raise ValueError(f"constant fan-in needs a kernel of ndim >= 2, got shape {shape}")
  return _select.fan_in_keep(scores_leaf, k, within)


def unit_k(fan_in: int, sparsity) -> Any:
  """Kept inputs per unit of a layer of ``fan_in`` at ``sparsity``:
  :func:`sparsejax.masks.kept_count` of one unit's pool, ``max(1, round((1 - s) fan_in))``.

  >>> from sparsejax import condensed
  >>> condensed.unit_k(784, 0.9), condensed.unit_k(1024, 0.9), condensed.unit_k(9, 0.99)
  (78, 102, 1)
  """
  return masks.kept_count(fan_in, sparsity)


def constant_fan_in(scores: PyTree, sparsity, prunable=None) -> PyTree:
  """The constant fan-in mask of a scores pytree: every unit keeps its top ``k``.

  Every prunable leaf (``ndim >= 2``) gets :func:`constant_fan_in_mask` with
  ``k = unit_k(fan_in, s_layer)`` (the rounding rule of
  :func:`sparsejax.masks.kept_count` applied per unit, so the layer keeps
  ``d_out · k`` entries, a multiple of its units); other leaves are all True.

  Args:
    scores: float pytree (e.g. magnitudes, SNIP scores, random scores).
    sparsity: a float in ``[0, 1)`` for every prunable layer, or a mapping
      ``{path: sparsity}`` naming every prunable path (e.g. the ERK
      sparsities of :func:`sparsejax.masks.layer_sparsities`).
    prunable: which leaves are pruned; see :func:`sparsejax.masks.prunable_tree`.

  Returns:
    bool mask pytree of ``scores``' structure.

  Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import condensed
    >>> scores = {"w": jax.random.normal(jax.random.key(0), (10, 4)), "b": jnp.ones(4)}
    >>> mask = condensed.constant_fan_in(scores, 0.7)
    >>> condensed.fan_in_counts(mask["w"]).tolist(), bool(mask["b"].all())
    ([3, 3, 3, 3], True)
  """
  flags = dict(masks.named_leaves(masks.prunable_tree(scores, prunable)))
  if isinstance(sparsity, Mapping):
    missing = [p for p, f in flags.items() if f and p not in sparsity]
    if missing:
      raise ValueError(f"sparsity mapping misses the prunable paths {missing[:5]}")

  def one(path, leaf):
    if not flags[path]:
      return jnp.ones(jnp.shape(leaf), bool)
    shape = jnp.shape(leaf)
    if len(shape) < 2:
      raise ValueError(
        f"constant fan-in needs kernels of ndim >= 2; prunable leaf "
        f"{path!r} has shape {shape}: make it non-prunable"
      )
    s = sparsity[path] if isinstance(sparsity, Mapping) else sparsity
    masks.check_sparsity(s, f"sparsity of {path!r}")
    return constant_fan_in_mask(leaf, unit_k(int(np.prod(shape[:-1])), s))

  return masks.map_with_path(one, scores)


def check_constant_fan_in(
  mask: PyTree, prunable=None, *, allow_ablated: bool = True
) -> dict[str, int]:
  """Raises ``ValueError`` unless every prunable kernel of ``mask`` has constant fan-in.

  Args:
    mask: bool mask pytree (concrete).
    prunable: which leaves are checked; see :func:`sparsejax.masks.prunable_tree`.
    allow_ablated: units with no active input (``k = 0``) are allowed beside
      the units with ``k`` (default True, SRigL's ablated neurons).

  Returns:
    ``{path: k}`` of the checked leaves (``k = 0`` when every unit is ablated).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import condensed
    >>> condensed.check_constant_fan_in({"w": jnp.array([[1, 0], [0, 0], [1, 0]], bool)})
    {'w': 2}
    >>> condensed.check_constant_fan_in({"w": jnp.array([[1, 1], [0, 0], [1, 0]], bool)})
    Traceback (most recent call last):
    ...
    ValueError: 'w' has no constant fan-in: unit 0 keeps 2 inputs, unit 1 keeps 1
  """
  flags = dict(masks.named_leaves(masks.prunable_tree(mask, prunable)))
  out = {}
  for path, leaf in masks.named_leaves(mask):
    if not flags[path]:
      continue
    counts = fan_in_counts(leaf)
    active = counts[counts > 0] if allow_ablated else counts
    k = int(active[0]) if active.size else 0
    bad = np.flatnonzero((counts != k) & ((counts != 0) | (not allow_ablated)))
    if bad.size:
      first = int(np.flatnonzero(counts == k)[0]) if (counts == k).any() else 0
      raise ValueError(
        f"{path!r} has no constant fan-in: unit {first} keeps {k} "
        f"inputs, unit {int(bad[0])} keeps {int(counts[bad[0]])}"
      )
    out[path] = k
  return out


# ----------------------------------------------------------------------------
# Condensed kernels
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CondensedKernel:
  """A constant fan-in kernel, condensed, in place of the dense kernel param.

  Attributes:
    values: ``[n_rows, k]`` the kept weights of each non-ablated unit.
    indices: ``[n_rows, k]`` their positions in the unit's fan-in, ascending:
      the input feature of a dense kernel; for a conv kernel the feature of
      ``lax.conv_general_dilated_patches`` (``c_in``-major: ``(c, i, j)`` is
      ``c · kh · kw + i · kw + j``). ``uint16`` when the fan-in is at most
      65536, else ``int32``.
    units: ``int32 [n_rows]``, the output unit of each row, ascending; the
      other units are ablated (output = bias).
    shape: the dense kernel's shape (static).
  """

  values: jax.Array
  indices: jax.Array
  units: jax.Array
  shape: tuple[int, ...]

  @property
  def k(self) -> int:
    return int(self.values.shape[1])

  @property
  def kind(self) -> str:
    return "dense" if len(self.shape) == 2 else "conv"

  def todense(self) -> jax.Array:
    """The dense kernel (pruned entries 0), of shape ``shape``."""
    return _dense_kernel(self)


jax.tree_util.register_dataclass(
  CondensedKernel, data_fields=["values", "indices", "units"], meta_fields=["shape"]
)


def _is_condensed(x) -> bool:
  return isinstance(x, CondensedKernel)


def _index_dtype(fan_in: int):
  return np.uint16 if fan_in <= 65536 else np.int32


def _fan_in_of(shape) -> int:
  return int(np.prod(shape[:-1]))


def _patch_order(kernel: np.ndarray) -> np.ndarray:
  """A kernel ``[..., out]`` as ``[fan_in, out]`` in its layer's input-feature order."""
  if kernel.ndim == 2:
    return kernel
  kh, kw, cin, cout = kernel.shape
  return kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


def to_condensed_kernel(kernel, mask=None) -> CondensedKernel:
  """A constant fan-in kernel as a :class:`CondensedKernel` (concrete input).

  Args:
    kernel: ``[d_in, d_out]`` or ``[kh, kw, c_in, c_out]``.
    mask: optional bool mask of its shape (default: the nonzero entries);
      must have constant fan-in (ablated units allowed).

  Raises:
    ValueError: the mask has no constant fan-in.
  """
  kernel = np.asarray(jax.device_get(kernel))
  if kernel.ndim not in (2, 4):
    raise ValueError(f"a condensed kernel is 2-D (dense) or 4-D (conv), got shape {kernel.shape}")
  m = (kernel != 0) if mask is None else np.asarray(jax.device_get(mask), bool)
  k = check_constant_fan_in({"kernel": m})["kernel"]
  w = _patch_order(np.where(m, kernel, np.zeros((), kernel.dtype)))
  mt = _patch_order(m).T  # [out, F]
  units = np.flatnonzero(mt.any(axis=1)).astype(np.int32)
  if k == 0:
    units = np.zeros((0,), np.int32)
  # Row-major argwhere: each unit's kept inputs in ascending order.
  idx = np.nonzero(mt[units])[1].reshape(len(units), k)
  values = np.take_along_axis(w.T[units], idx, axis=1)
  return CondensedKernel(
    jnp.asarray(values),
    jnp.asarray(idx.astype(_index_dtype(w.shape[0]))),
    jnp.asarray(units),
    tuple(kernel.shape),
  )


def _dense_kernel(kernel: CondensedKernel) -> jax.Array:
  w = _patch_kernel(kernel)
  if len(kernel.shape) == 2:
    return w
  kh, kw, cin, cout = kernel.shape
  return w.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


def _patch_kernel(kernel: CondensedKernel) -> jax.Array:
  f, out = _fan_in_of(kernel.shape), kernel.shape[-1]
  rows = jnp.broadcast_to(kernel.units[:, None], kernel.indices.shape)
  return (
    jnp.zeros((f, out), kernel.values.dtype)
    .at[kernel.indices.astype(jnp.int32), rows]
    .set(kernel.values)
  )


def _gather_columns(x2d: jax.Array, indices: jax.Array) -> jax.Array:
  """``x2d[:, indices]``: ``[M, F]``, ``[R, k]`` → ``[M, R, k]`` (in bounds)."""
  dn = lax.GatherDimensionNumbers(offset_dims=(0,), collapsed_slice_dims=(1,), start_index_map=(1,))
  return lax.gather(
    x2d, indices[..., None], dn, (x2d.shape[0], 1), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )


def _condensed_matmul(kernel: CondensedKernel, x2d: jax.Array, gather_max_rows: int) -> jax.Array:
  """``x2d [M, F] @ W [F, out]`` for the condensed ``W``."""
  out = kernel.shape[-1]
  values = kernel.values.astype(x2d.dtype)
  if x2d.shape[0] > gather_max_rows:
    return x2d @ _patch_kernel(kernel).astype(x2d.dtype)
  if x2d.shape[0] == 1:  # online inference: one gather of rows · k inputs
    dn = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
    g = lax.gather(
      x2d[0], kernel.indices[..., None], dn, (1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS
    )
    # The row sums as a matrix-vector product: faster on XLA:CPU than a
    # reduction fused with the gather (measured, benchmarks/structured_inference.py).
    y = jnp.dot(g * values, jnp.ones((values.shape[1],), values.dtype))[None]
  else:
    y = jnp.einsum("mrk,rk->mr", _gather_columns(x2d, kernel.indices), values)
  if kernel.units.shape[0] == out:  # no ablated unit: rows are units 0..out-1
    return y
  return (
    jnp.zeros((x2d.shape[0], out), y.dtype)
    .at[:, kernel.units]
    .set(y, indices_are_sorted=True, unique_indices=True)
  )


def _layer(module, kernel: CondensedKernel, x: jax.Array, gather_max_rows: int):
  dtype = module.dtype or jnp.result_type(x, kernel.values)
  x = jnp.asarray(x, dtype)
  if isinstance(module, nn.Dense):
    lead = x.shape[:-1]
    y = _condensed_matmul(kernel, x.reshape(-1, x.shape[-1]), gather_max_rows)
    y = y.reshape(*lead, y.shape[-1])
  else:
    kh, kw, _, cout = kernel.shape
    patches = lax.conv_general_dilated_patches(
      x,
      (kh, kw),
      sparse_inference._pairs(module.strides, 2),  # pylint: disable=protected-access
      sparse_inference._conv_padding(module.padding, 2),  # pylint: disable=protected-access
      rhs_dilation=sparse_inference._pairs(module.kernel_dilation, 2),  # pylint: disable=protected-access
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = _condensed_matmul(kernel, patches.reshape(-1, patches.shape[-1]), gather_max_rows)
    y = y.reshape(*patches.shape[:-1], cout)
  y = y.astype(dtype)
  if module.use_bias:
    y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
  return y


def _interceptor(gather_max_rows: int):
  return sparse_inference.kernel_interceptor(
    _is_condensed, lambda module, kernel, x: _layer(module, kernel, x, gather_max_rows)
  )


def apply(
  model: nn.Module,
  variables: Mapping[str, PyTree],
  x: jax.Array,
  *,
  gather_max_rows: int = 32,
  **kwargs,
) -> Any:
  """``model.apply(variables, x, **kwargs)`` with the condensed layers condensed.

  Jit-compatible (``variables`` is an ordinary pytree argument). Evaluation
  only: pass ``train=False`` to models with batch norm.

  Args:
    model: any linen module.
    variables: from :func:`condense` (dense variables work too).
    x: the input batch.
    gather_max_rows: a condensed layer applied to at most this many rows
      (batch × positions) gathers its ``rows · k`` inputs; above it, it
      multiplies by its kernel scattered back to dense (XLA:CPU's gather is
      slower than its matrix product at large batches). Default 32.
    **kwargs: further arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    What ``model.apply`` returns, e.g. logits ``[B, num_classes]``.
  """
  with nn.intercept_methods(_interceptor(int(gather_max_rows))):
    return model.apply(variables, x, **kwargs)


def condense(
  model: nn.Module,
  variables: Mapping[str, PyTree],
  mask: PyTree | None,
  x: jax.Array,
  *,
  convs: bool = False,
  max_density: float = 0.5,
  **kwargs,
) -> dict:
  """``variables`` with every constant fan-in Dense (and Conv) kernel condensed.

  A kernel is condensed when its mask has constant fan-in (ablated units
  allowed) and its density is at most ``max_density``; the others stay dense
  (masked). Found by tracing ``model.apply`` abstractly
  (:func:`sparsejax.sparse_inference.layer_paths`).

  Args:
    model: the linen module.
    variables: ``{'params': ..., 'batch_stats'?: ...}`` of the trained model.
    mask: bool mask parallel to ``variables['params']`` (every param is masked
      with it), or ``None``: the kernels' nonzero entries.
    x: an example input batch (only its shape is used), e.g. ``x[:1]``.
    convs: also condense supported ``nn.Conv`` kernels (2-D, no feature
      groups); default False (on CPU they save memory, not time).
    max_density: condense only layers at this density or below; default 0.5
      (a condensed entry costs its value and a 2- or 4-byte index).
    **kwargs: further arguments of ``model.apply`` for tracing (``train=False``).

  Returns:
    A copy of ``variables`` for :func:`apply`.
  """
  params = variables["params"]
  if mask is not None:
    masks.check_mask(mask, params)
    params = masks.apply(params, mask)
  flat_mask = dict(masks.named_leaves(mask)) if mask is not None else {}
  kinds = sparse_inference.layer_paths(model, variables, x, convs=convs, **kwargs)

  def convert(path, leaf):
    if path not in kinds:
      return leaf
    leaf = np.asarray(jax.device_get(leaf))
    m = np.asarray(flat_mask[path], bool) if path in flat_mask else leaf != 0
    if m.mean() > max_density:
      return leaf
    try:
      check_constant_fan_in({"kernel": m})
    except ValueError:
      return leaf
    return to_condensed_kernel(leaf, m)

  return {**variables, "params": masks.map_with_path(convert, params)}


def condensed_layers(variables: PyTree) -> dict[str, tuple[int, int, tuple[int, ...]]]:
  """``{path: (n_rows, k, dense shape)}`` of the :class:`CondensedKernel` leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_condensed)
  return {
    masks.path_str(p): (int(leaf.values.shape[0]), leaf.k, leaf.shape)
    for p, leaf in leaves
    if _is_condensed(leaf)
  }


def uncondense(variables: PyTree) -> PyTree:
  """``variables`` with every :class:`CondensedKernel` back as its dense kernel."""
  return jax.tree.map(
    lambda x: x.todense() if _is_condensed(x) else x, variables, is_leaf=_is_condensed
  )


def param_nbytes(tree: PyTree) -> int:
  """Bytes of every array of ``tree``; a :class:`CondensedKernel` counts its
  values, indices and units."""
  return sum(
    int(np.prod(jnp.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )
