"""Sparse inference: evaluate a pruned linen model with BCOO sparse matrices.

Masked training computes with dense arrays whose pruned entries are zero, so a
sparse network trains and runs at dense cost. This module stores the pruned
kernels of a trained model as ``jax.experimental.sparse.BCOO`` matrices (kept
values plus their indices) and evaluates any Flax linen model with them, with
no change to the model: :func:`apply` runs ``model.apply`` under
``flax.linen.intercept_methods``, and every ``nn.Dense`` (and, with
``convs=True``, ``nn.Conv``) whose kernel is a :class:`SparseKernel` computes
its output as a sparse-dense product. Everything else (batch norm, pooling,
activations, other layers) runs as usual. Linen only: Flax NNX modules are
not intercepted.

* Dense layers: ``y = (Wᵀ_sparse @ xᵀ)ᵀ + b``, ``Wᵀ`` of shape
  ``[d_out, d_in]`` with ``nse`` kept entries: ``O(nse · batch)`` work instead
  of ``O(d_in · d_out · batch)``. On CPU this pays off only at high sparsity
  (XLA lowers it to a gather of ``[nse, batch]`` inputs and a scatter-add):
  in one run it was 4-8x slower than the dense matmul at 90% sparsity and
  1.4-6x faster at 98-99%, hence :func:`sparsify`'s ``min_sparsity=0.95``.
* Conv layers (``convs=True``): im2col (``lax.conv_general_dilated_patches``)
  times the sparse ``[c_out, c_in · kh · kw]`` matrix. The patch matrix is
  ``kh · kw`` times the input, and XLA:CPU's gather/scatter kernels are far
  slower per multiply-add than its convolution, so this does not pay off on
  CPU at 90–99% sparsity (see ``benchmarks/sparse_inference.py``); it is off
  by default and kept for memory and for accelerators.

Memory: a float32 kernel of ``n`` entries at density ``d`` costs ``4 n`` bytes
dense and ``(4 + 2 · 4) · d · n`` as BCOO (the value and two int32 indices per
kept entry), smaller than dense below density 1/3. :func:`param_nbytes`
counts both.

Usage::

  sparse_vars = sparse_inference.sparsify(model, variables, x[:1], mask)
  logits = jax.jit(lambda v, x: sparse_inference.apply(model, v, x))(sparse_vars, x)

The logits equal the dense evaluation of the masked model within float
rounding (the sums run in another order).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import sparse
import jax.numpy as jnp
import numpy as np

from sparsejax import masks

PyTree = Any
_INDEX_BYTES = 4  # int32 BCOO indices


@dataclasses.dataclass(frozen=True)
class SparseKernel:
  """A pruned kernel as a BCOO matrix, in place of the dense kernel param.

  Attributes:
    matrix: ``BCOO [out_features, in_features]``: the transposed dense kernel
      ``[d_in, d_out]``, or a conv kernel ``[kh, kw, c_in, c_out]`` as
      ``[c_out, c_in · kh · kw]`` (the feature order of
      ``lax.conv_general_dilated_patches``).
    shape: the dense kernel's shape (static).
  """

  matrix: sparse.BCOO
  shape: tuple[int, ...]

  def todense(self) -> jax.Array:
    """The dense kernel, of shape ``shape``."""
    dense = self.matrix.todense()
    if len(self.shape) == 2:
      return dense.T
    kh, kw, cin, cout = self.shape
    return dense.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)

  @property
  def nse(self) -> int:
    return int(self.matrix.nse)


jax.tree_util.register_dataclass(SparseKernel, data_fields=["matrix"], meta_fields=["shape"])


def _is_sparse(x) -> bool:
  return isinstance(x, SparseKernel)


def _supported_conv(module: nn.Conv, x: jax.Array) -> bool:
  return (
    len(module.kernel_size) == 2
    and x.ndim == 4
    and module.feature_group_count == 1
    and getattr(module, "mask", None) is None
    and (
      module.input_dilation in (None, 1) or tuple(np.atleast_1d(module.input_dilation)) == (1, 1)
    )
    and not (isinstance(module.padding, str) and module.padding.upper() in ("CIRCULAR", "CAUSAL"))
  )


def _pairs(value, n: int, default: int = 1) -> tuple[int, ...]:
  if value is None:
    return (default,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _conv_padding(padding, n: int):
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding)] * n
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _matmul(kernel: SparseKernel, x2d: jax.Array) -> jax.Array:
  """``x2d [M, in] @ kernel [in, out]`` as ``(Wᵀ_sparse @ x2dᵀ)ᵀ``."""
  return (kernel.matrix @ x2d.T).T


def _sparse_dense_layer(module: nn.Dense, kernel: SparseKernel, x: jax.Array):
  dtype = module.dtype or jnp.result_type(x, kernel.matrix.data)
  x = jnp.asarray(x, dtype)
  lead = x.shape[:-1]
  y = _matmul(kernel, x.reshape(-1, x.shape[-1]))
  y = y.reshape(*lead, y.shape[-1]).astype(dtype)
  if module.use_bias:
    y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
  return y


def _sparse_conv_layer(module: nn.Conv, kernel: SparseKernel, x: jax.Array):
  dtype = module.dtype or jnp.result_type(x, kernel.matrix.data)
  x = jnp.asarray(x, dtype)
  kh, kw, _, cout = kernel.shape
  patches = jax.lax.conv_general_dilated_patches(
    x,
    (kh, kw),
    _pairs(module.strides, 2),
    _conv_padding(module.padding, 2),
    rhs_dilation=_pairs(module.kernel_dilation, 2),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  y = _matmul(kernel, patches.reshape(-1, patches.shape[-1]))
  y = y.reshape(*patches.shape[:-1], cout).astype(dtype)
  if module.use_bias:
    y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
  return y


def kernel_interceptor(replaced, layer):
  """A ``flax.linen.intercept_methods`` interceptor for kernels stored another way.

  Every ``nn.Dense`` / ``nn.Conv`` call whose ``kernel`` param satisfies
  ``replaced(kernel)`` returns ``layer(module, kernel, x)``; every other call
  runs as usual. Shared by this module's BCOO kernels and
  :mod:`sparsejax.condensed`'s condensed ones.
  """

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name != "__call__"
      or not isinstance(module, (nn.Dense, nn.Conv))
      or not module.has_variable("params", "kernel")
    ):
      return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if not replaced(kernel):
      return next_fun(*args, **kwargs)
    return layer(module, kernel, args[0] if args else kwargs["inputs"])

  return intercept


def _sparse_layer(module, kernel, x):
  if isinstance(module, nn.Dense):
    return _sparse_dense_layer(module, kernel, x)
  if _supported_conv(module, x):
    return _sparse_conv_layer(module, kernel, x)
  raise ValueError(
    f"sparse_inference cannot run conv {'/'.join(module.path)} as a sparse "
    "matrix (grouped, input-dilated, circular/causal or non-2-D conv); "
    "sparsify with convs=False"
  )


_interceptor = kernel_interceptor(_is_sparse, _sparse_layer)


def apply(model: nn.Module, variables: Mapping[str, PyTree], x: jax.Array, **kwargs) -> jax.Array:
  """``model.apply(variables, x, **kwargs)`` with the :class:`SparseKernel` layers sparse.

  Jit-compatible (``variables`` is an ordinary pytree argument). Evaluation
  only: pass ``train=False`` to models with batch norm (read-only state).

  Args:
    model: any linen module.
    variables: from :func:`sparsify` (dense variables work too).
    x: the input batch.
    **kwargs: further arguments of ``model.apply`` (e.g. ``train=False``).

  Returns:
    What ``model.apply`` returns, e.g. logits ``[B, num_classes]``.
  """
  with nn.intercept_methods(_interceptor):
    return model.apply(variables, x, **kwargs)


def layer_paths(
  model: nn.Module, variables: Mapping[str, PyTree], x: jax.Array, *, convs: bool = False, **kwargs
) -> dict[str, str]:
  """``{kernel path: "dense" | "conv"}`` of the layers :func:`apply` can make sparse.

  Found by tracing ``model.apply`` abstractly (``jax.eval_shape``: no FLOPs):
  every ``nn.Dense``, and with ``convs`` every supported ``nn.Conv`` (2-D,
  batched input, no feature groups, input dilation or ``mask=``, padding not
  circular/causal), that has a ``kernel`` param. Paths are relative to ``variables['params']``
  (``"Dense_0/kernel"``).
  """
  found: dict[str, str] = {}

  def record(next_fun, args, kwargs_, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and isinstance(module, (nn.Dense, nn.Conv))
      and module.has_variable("params", "kernel")
    ):
      path = "/".join(module.path + ("kernel",))
      inp = args[0] if args else kwargs_["inputs"]
      if isinstance(module, nn.Dense):
        found[path] = "dense"
      elif convs and _supported_conv(module, inp):
        found[path] = "conv"
    return next_fun(*args, **kwargs_)

  def run(v, inp):
    with nn.intercept_methods(record):
      return model.apply(v, inp, **kwargs)

  jax.eval_shape(run, variables, x)
  return found


def to_sparse_kernel(kernel: jax.Array, kind: str = "dense") -> SparseKernel:
  """A dense kernel (pruned entries 0) as a :class:`SparseKernel` (concrete input).

  Args:
    kernel: ``[d_in, d_out]`` (``kind="dense"``) or ``[kh, kw, c_in, c_out]``
      (``kind="conv"``); its nonzero entries are kept.
    kind: ``"dense"`` or ``"conv"``.
  """
  kernel = np.asarray(jax.device_get(kernel))
  if kind == "dense" and kernel.ndim == 2:
    matrix = kernel.T
  elif kind == "conv" and kernel.ndim == 4:
    kh, kw, cin, cout = kernel.shape
    matrix = kernel.transpose(3, 2, 0, 1).reshape(cout, cin * kh * kw)
  else:
    raise ValueError(
      f"kind must be 'dense' (2-D kernel) or 'conv' (4-D), got {kind!r} for shape {kernel.shape}"
    )
  # Built on the host (no per-shape compilation); indices in row-major order.
  indices = np.argwhere(matrix != 0).astype(np.int32)
  data = matrix[tuple(indices.T)]
  bcoo = sparse.BCOO(
    (jnp.asarray(data), jnp.asarray(indices)),
    shape=matrix.shape,
    indices_sorted=True,
    unique_indices=True,
  )
  return SparseKernel(bcoo, tuple(kernel.shape))


def sparsify(
  model: nn.Module,
  variables: Mapping[str, PyTree],
  x: jax.Array,
  mask: PyTree | None = None,
  *,
  convs: bool = False,
  min_sparsity: float = 0.95,
  **kwargs,
) -> dict:
  """``variables`` with the pruned Dense (and Conv) kernels as :class:`SparseKernel`.

  Args:
    model: the linen module.
    variables: ``{'params': ..., 'batch_stats'?: ...}`` of the trained model.
    x: an example input batch (only its shape is used), e.g. ``x[:1]``.
    mask: optional bool mask parallel to ``variables['params']``; every
      param is masked with it first. Default: the kernels' nonzero entries
      are kept.
    convs: also make ``nn.Conv`` kernels sparse (im2col; slower than dense
      convolution on CPU, see the module doc). Default ``False``.
    min_sparsity: a layer becomes sparse only at this sparsity or above
      (default 0.95: on CPU, BCOO dense layers were 4-8x slower than dense
      matmuls at 90% sparsity and 1.4-6x faster at 98-99%, see
      ``benchmarks/sparse_inference.py``). A layer is never made sparse
      when its BCOO would be larger than the dense kernel (sparsity below
      ``1 - itemsize / (itemsize + 8)``, 2/3 for float32); pass 0.0 to
      convert every other pruned layer (e.g. to save memory).
    **kwargs: further arguments of ``model.apply`` for tracing (``train=False``).

  Returns:
    A copy of ``variables`` for :func:`apply`.
  """
  params = variables["params"]
  if mask is not None:
    masks.check_mask(mask, params)
  flat_mask = dict(masks.named_leaves(mask)) if mask is not None else {}
  kinds = layer_paths(model, variables, x, convs=convs, **kwargs)

  def convert(path, leaf):
    if path not in kinds:
      return leaf
    leaf = np.asarray(jax.device_get(leaf))
    if path in flat_mask:
      leaf = np.where(np.asarray(flat_mask[path]), leaf, np.zeros((), leaf.dtype))
    density = float(np.mean(leaf != 0))
    itemsize = leaf.dtype.itemsize
    threshold = max(1.0 - itemsize / (itemsize + 2 * _INDEX_BYTES), float(min_sparsity))
    if 1.0 - density < threshold:
      return leaf
    return to_sparse_kernel(leaf, kinds[path])

  out = masks.map_with_path(convert, params)
  if mask is not None:  # the layers left dense are masked too
    out = jax.tree.map(
      lambda o, m: o if _is_sparse(o) else masks.apply(o, m), out, mask, is_leaf=_is_sparse
    )
  return {**variables, "params": out}


def param_nbytes(tree: PyTree) -> int:
  """Bytes of every array of ``tree``; a :class:`SparseKernel` counts its BCOO
  values and indices."""
  return sum(
    int(np.prod(jnp.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )


def sparse_layers(variables: PyTree) -> dict[str, tuple[int, tuple[int, ...]]]:
  """``{path: (nse, dense shape)}`` of the :class:`SparseKernel` leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_sparse)
  return {masks.path_str(p): (leaf.nse, leaf.shape) for p, leaf in leaves if _is_sparse(leaf)}
