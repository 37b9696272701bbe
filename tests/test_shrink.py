"""shrink: a smaller dense model of the same family with the masked model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import condensed
from sparsejax import masks
from sparsejax import models
from sparsejax import shrink


def _init(model, x, seed=0):
  """Numpy normal variables (nonzero biases, positive variances), no compilation."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype) * 0.5, abstract)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, variables["batch_stats"])
  return variables


def _logits(model, variables, x):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def test_hand_computed_mlp_ablated_unit_folded_and_unread_unit_cut():
  model = models.MLP(num_classes=2, hidden=(3,))
  params = {
    "Dense_0": {
      "kernel": np.array([[1.0, 4.0, 1.0], [-2.0, 4.0, 1.0]], np.float32),
      "bias": np.array([0.0, 2.0, 5.0], np.float32),
    },
    "Dense_1": {
      "kernel": np.array([[1.0, 2.0], [3.0, -1.0], [7.0, 7.0]], np.float32),
      "bias": np.array([0.5, 0.5], np.float32),
    },
  }
  mask = {
    "Dense_0": {
      "kernel": np.array([[1, 0, 1], [1, 0, 1]], bool),  # unit 1 ablated
      "bias": np.ones(3, bool),
    },
    "Dense_1": {
      "kernel": np.array([[1, 1], [1, 1], [0, 0]], bool),  # unit 2 unread
      "bias": np.ones(2, bool),
    },
  }
  result = shrink.shrink(model, {"params": params}, mask, jnp.zeros((1, 2)))
  assert result.model.hidden == (1,)
  assert result.report["layers"]["Dense_0"] == {"before": 3, "after": 1, "dead": 2, "kept_dead": {}}
  p = result.variables["params"]
  np.testing.assert_array_equal(p["Dense_0"]["kernel"], [[1.0], [-2.0]])
  np.testing.assert_array_equal(p["Dense_0"]["bias"], [0.0])
  np.testing.assert_array_equal(p["Dense_1"]["kernel"], [[1.0, 2.0]])
  # relu(2) = 2 from the ablated unit, folded: 0.5 + 2 * (3, -1).
  np.testing.assert_array_equal(p["Dense_1"]["bias"], [6.5, -1.5])
  x = jnp.array([[0.3, -0.2], [-1.0, 0.25], [2.0, 1.0]])
  np.testing.assert_allclose(
    _logits(result.model, result.variables, x),
    _logits(model, {"params": masks.apply(params, mask)}, x),
    rtol=1e-6,
  )
  assert result.report["params_before"] == 17 and result.report["params_after"] == 7


def test_mlp_with_ablated_and_unread_units_keeps_its_logits():
  model = models.get("mlp", num_classes=10, hidden=(64, 32))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 28, 28, 1)), jnp.float32)
  variables = _init(model, x[:1])
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, variables["params"]), 0.9)
  mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, :5].set(False)
  mask["Dense_2"]["kernel"] = mask["Dense_2"]["kernel"].at[:3, :].set(False)
  result = shrink.shrink(model, variables, mask, x[:1])
  layers = result.report["layers"]
  assert layers["Dense_0"]["dead"] >= 5 and layers["Dense_1"]["dead"] >= 3
  assert result.model.hidden == (64 - layers["Dense_0"]["dead"], 32 - layers["Dense_1"]["dead"])
  assert all(not r["kept_dead"] for r in layers.values())  # Dense readers absorb all
  ref = _logits(model, {"params": masks.apply(variables["params"], mask)}, x)
  got = _logits(result.model, result.variables, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  np.testing.assert_array_equal(  # the shrunk mask is the kept part of the mask
    jax.tree.map(
      lambda p, m: bool(np.all(np.asarray(p)[~np.asarray(m)] == 0)),
      result.variables["params"],
      result.mask,
    ),
    jax.tree.map(lambda _: True, result.mask),
  )


def test_resnet20_tiny_streams_mids_projection_fold_and_kept_channel():
  model = models.get("resnet20", num_classes=10, num_filters=4)  # 4 / 8 / 16 channels
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16, 16, 3)), jnp.float32)
  variables = _init(model, x[:1])
  p, stats = variables["params"], variables["batch_stats"]
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, p), 0.5)
  m = lambda path: _at(mask, path)
  # Mid channels 0, 1 of block 1 ablated: 0 reads relu(+0.5) (kept: a 3x3
  # padded conv reads it), 1 reads relu(-0.5) = 0 (cut).
  _set(mask, "BasicBlock_1/Conv_0/kernel", m("BasicBlock_1/Conv_0/kernel").at[..., :2].set(False))
  bn = p["BasicBlock_1"]["BatchNorm_0"]
  bn["scale"][:2], bn["bias"][:2] = 1.0, [0.5, -0.5]
  stats["BasicBlock_1"]["BatchNorm_0"]["mean"][:2] = 0.0
  # Stage-1 stream channel 2: no writer, read only by block 6's projection
  # (a spatially constant value, folded into norm_proj's mean).
  for path in (
    "BasicBlock_3/conv_proj",
    "BasicBlock_3/Conv_1",
    "BasicBlock_4/Conv_1",
    "BasicBlock_5/Conv_1",
  ):
    _set(mask, path + "/kernel", m(path + "/kernel").at[..., 2].set(False))
  for path in ("BasicBlock_4/Conv_0", "BasicBlock_5/Conv_0", "BasicBlock_6/Conv_0"):
    _set(mask, path + "/kernel", m(path + "/kernel").at[:, :, 2, :].set(False))
  for norm, offset in (
    ("BasicBlock_3/norm_proj", 1.0),
    ("BasicBlock_3/BatchNorm_1", 0.5),
    ("BasicBlock_4/BatchNorm_1", 0.0),
    ("BasicBlock_5/BatchNorm_1", 0.0),
  ):
    _at(p, norm)["bias"][2] = offset  # the stream carries relu(1.5) = 1.5
    _at(stats, norm)["mean"][2] = 0.0
  proj_mean = np.array(stats["BasicBlock_6"]["norm_proj"]["mean"])
  # Stage-2 channels 0..2: read by nobody (classifier rows and blocks 7, 8).
  _set(mask, "Dense_0/kernel", m("Dense_0/kernel").at[:3].set(False))
  for path in ("BasicBlock_7/Conv_0", "BasicBlock_8/Conv_0"):
    _set(mask, path + "/kernel", m(path + "/kernel").at[:, :, :3, :].set(False))

  result = shrink.shrink(model, variables, mask, x[:1])
  layers = result.report["layers"]
  assert result.model.stage_channels == (4, 7, 13)
  assert result.model.block_channels[1] == 3 and layers["BasicBlock_1/Conv_0"]["dead"] == 2
  assert list(layers["BasicBlock_1/Conv_0"]["kept_dead"]) == [0]
  assert (
    "3x3 zero-padded conv BasicBlock_1/Conv_1" in (layers["BasicBlock_1/Conv_0"]["kept_dead"][0])
  )
  assert "BasicBlock_1/Conv_0 unit 0 kept" in str(result.report)
  assert isinstance(result.model, models.ResNet)
  # 1.5 · (the kept 1x1 weights from channel 2) left block 6's projection mean.
  w = masks.apply(p, mask)["BasicBlock_6"]["conv_proj"]["kernel"][0, 0, 2]
  np.testing.assert_allclose(
    result.variables["batch_stats"]["BasicBlock_6"]["norm_proj"]["mean"],
    (proj_mean - 1.5 * np.asarray(w))[3:],
    rtol=1e-5,
  )
  assert np.abs(np.asarray(w)[3:]).max() > 0
  ref = _logits(model, {**variables, "params": masks.apply(p, mask)}, x)
  got = _logits(result.model, result.variables, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  assert result.report["params_after"] < result.report["params_before"]


def test_vgg_shrinks_its_config_and_keeps_its_logits():
  model = models.VGG(num_classes=10, config=(8, "M", 16, "M", 16))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = _init(model, x[:1])
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, variables["params"]), 0.5)
  mask["Conv_1"]["kernel"] = mask["Conv_1"]["kernel"].at[:, :, :3, :].set(False)
  mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:5].set(False)
  result = shrink.shrink(model, variables, mask, x[:1])
  assert result.model.config == (5, "M", 16, "M", 11)
  ref = _logits(model, {**variables, "params": masks.apply(variables["params"], mask)}, x)
  np.testing.assert_allclose(
    _logits(result.model, result.variables, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()
  )


def test_unsupported_models_are_refused():
  lenet = models.get("lenet5", num_classes=10)
  x = jnp.zeros((1, 28, 28, 1))
  v = jax.eval_shape(lenet.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="shrink supports the registry MLP.*got LeNet5"):
    shrink.shrink(lenet, v, masks.ones_like(v["params"]), x)
  ghost = models.get("resnet20", num_classes=10, ghost_skips=True)
  with pytest.raises(ValueError, match="ghost skips"):
    shrink.shrink(ghost, {"params": {}}, {}, x)


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _set(tree, path, value):
  *parents, last = path.split("/")
  for key in parents:
    tree = tree[key]
  tree[last] = value
