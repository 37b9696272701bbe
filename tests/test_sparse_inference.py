"""Sparse (BCOO) inference gives the dense logits of any linen model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax import models
from sparsejax import sparse_inference


class _Net(nn.Module):
  """Strided/padded/dilated convs with and without bias, a grouped conv,
  nested modules, Dense with and without bias, batch norm."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 0), (0, 1)))(x)
    x = nn.Conv(8, (3, 3), kernel_dilation=2, padding="SAME", use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Conv(8, (1, 1), feature_group_count=2)(x)  # stays dense
    x = nn.relu(x).reshape(x.shape[0], -1)
    x = nn.Dense(16, use_bias=False)(x)
    return nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(5)])(x)


def _init(model, x, **kwargs):
  """Numpy normal variables of the model's shapes (no compilation)."""
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda k, x: model.init(k, x, **kwargs), jax.random.key(0), x)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)
  if "batch_stats" in variables:  # variances must be positive
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  return variables


def _magnitude_mask(params, sparsity, keep_dense=()):
  """Per-kernel magnitude mask in numpy (masks.topk_mask is tested elsewhere)."""

  def leaf(path, p):
    if p.ndim < 2 or any(k in path for k in keep_dense):
      return np.ones(p.shape, bool)
    k = masks.kept_count(p.size, sparsity)
    flat = np.zeros(p.size, bool)
    flat[np.argsort(-np.abs(p).ravel(), kind="stable")[:k]] = True
    return flat.reshape(p.shape)

  return masks.map_with_path(leaf, params)


def _pruned(model, x, sparsity):
  variables = _init(model, x, train=False)
  mask = _magnitude_mask(variables["params"], sparsity)
  params = jax.tree.map(lambda p, m: np.where(m, p, np.float32(0)), variables["params"], mask)
  return {**variables, "params": params}, mask


@pytest.mark.parametrize("convs", [False, True])
def test_same_logits_as_dense_for_any_linen_model(convs):
  model = _Net()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9, 9, 3)), jnp.float32)
  variables, _ = _pruned(model, x, 0.97)
  sparse_vars = sparse_inference.sparsify(model, variables, x[:1], convs=convs, train=False)
  layers = sparse_inference.sparse_layers(sparse_vars)
  # (Sequential's layers are named in its parent's scope.)
  dense_layers = {"params/Dense_0/kernel", "params/Dense_1/kernel", "params/Dense_2/kernel"}
  conv_layers = {"params/Conv_0/kernel", "params/Conv_1/kernel"}  # not grouped Conv_2
  assert set(layers) == dense_layers | (conv_layers if convs else set())
  ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  got = jax.jit(lambda v, x: sparse_inference.apply(model, v, x, train=False))(sparse_vars, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert sparse_inference.param_nbytes(sparse_vars["params"]) < sparse_inference.param_nbytes(
    variables["params"]
  )


def test_lenet_with_a_mask_and_the_size_threshold():
  model = models.get("lenet5", num_classes=10)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)), jnp.float32)
  variables = _init(model, x)
  mask = _magnitude_mask(variables["params"], 0.96, keep_dense=("Dense_2",))
  mask["Dense_2"]["kernel"][::2] = False  # 50% sparse
  sparse_vars = sparse_inference.sparsify(model, variables, x, mask, convs=True)
  layers = sparse_inference.sparse_layers(sparse_vars)
  # Dense_2 at 50% sparsity stays dense (masked): below min_sparsity=0.95, and
  # its BCOO (12 bytes per kept float32) would be larger than the dense kernel
  # even with min_sparsity=0.
  assert "params/Dense_2/kernel" not in layers
  assert "params/Dense_2/kernel" not in sparse_inference.sparse_layers(
    sparse_inference.sparsify(model, variables, x, mask, min_sparsity=0.0)
  )
  assert layers["params/Dense_0/kernel"] == (masks.kept_count(784 * 120, 0.96), (784, 120))
  assert set(layers) == {
    "params/Conv_0/kernel",
    "params/Conv_1/kernel",
    "params/Dense_0/kernel",
    "params/Dense_1/kernel",
  }
  apply = jax.jit(model.apply)
  ref = apply(
    {"params": jax.tree.map(lambda p, m: np.where(m, p, np.float32(0)), variables["params"], mask)},
    x,
  )
  got = jax.jit(lambda v, x: sparse_inference.apply(model, v, x))(sparse_vars, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_sparse_kernel_round_trip():
  rng = np.random.default_rng(2)
  for shape, kind in [((6, 5), "dense"), ((3, 2, 4, 5), "conv")]:
    k = rng.normal(size=shape).astype(np.float32) * (rng.random(shape) < 0.2)
    sk = sparse_inference.to_sparse_kernel(k, kind)
    assert sk.nse == int(np.count_nonzero(k)) and sk.shape == shape
    np.testing.assert_array_equal(sk.todense(), k)
  with pytest.raises(ValueError, match="kind must be"):
    sparse_inference.to_sparse_kernel(np.ones((2, 2)), "conv")
