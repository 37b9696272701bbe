"""Constant fan-in masks, condensed layers and condensed files (sparsejax.condensed)."""

import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import condensed
from sparsejax import masks
from sparsejax import models
from sparsejax import sparse_io

REPO = Path(__file__).resolve().parents[1]


def _init(model, x, **kwargs):
  """Numpy normal variables of the model's shapes (no compilation)."""
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda k, x: model.init(k, x, **kwargs), jax.random.key(0), x)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
  return variables


def test_exact_k_per_unit_with_ties_by_flat_index():
  # Dense [d_in=4, d_out=3]; hand-computed top-2 of every column.
  scores = jnp.array([[1.0, 7.0, 2.0], [5.0, 7.0, 2.0], [5.0, 7.0, 2.0], [0.0, 1.0, jnp.nan]])
  got = np.asarray(condensed.constant_fan_in_mask(scores, 2))
  want = np.array(
    [
      [0, 1, 1],  # column 0: the tied 5s (rows 1, 2)
      [1, 1, 1],  # column 1: three tied 7s -> rows 0 and 1
      [1, 0, 0],  # column 2: three tied 2s -> rows 0 and 1; NaN lowest
      [0, 0, 0],
    ],
    bool,
  )
  np.testing.assert_array_equal(got, want)
  # Per-unit k (0: an ablated unit) and a traced k give the same rule.
  np.testing.assert_array_equal(
    np.asarray(condensed.constant_fan_in_mask(scores, jnp.array([2, 0, 1]))),
    np.array([[0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]], bool),
  )
  traced = jax.jit(condensed.constant_fan_in_mask)(scores, jnp.int32(2))
  np.testing.assert_array_equal(np.asarray(traced), want)
  # within: only the allowed entries, min(k, available) per unit.
  within = jnp.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0]], bool)
  np.testing.assert_array_equal(
    np.asarray(condensed.constant_fan_in_mask(scores, 2, within=within)),
    np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]], bool),
  )


def test_conv_fan_in_is_the_receptive_field_per_output_channel():
  # [kh=2, kw=1, c_in=2, c_out=2]: fan-in of channel o is the 4 entries [:, :, :, o]
  # in flat order (0,0,0), (0,0,1), (1,0,0), (1,0,1).
  s = np.zeros((2, 1, 2, 2), np.float32)
  s[..., 0] = [[[1.0, 3.0]], [[3.0, 2.0]]]  # two tied 3s: the lower flat index first
  s[..., 1] = [[[4.0, 4.0]], [[4.0, 4.0]]]
  m = np.asarray(condensed.constant_fan_in_mask(s, 1))
  assert m[..., 0].tolist() == [[[False, True]], [[False, False]]]
  assert m[..., 1].tolist() == [[[True, False]], [[False, False]]]
  np.testing.assert_array_equal(condensed.fan_in_counts(m), [1, 1])


def test_tree_level_k_follows_kept_count_and_the_check():
  params = {
    "a": {"kernel": np.random.default_rng(0).normal(size=(10, 6))},
    "b": {"kernel": np.random.default_rng(1).normal(size=(3, 3, 4, 5)), "bias": np.zeros(5)},
  }
  scores = jax.tree.map(np.abs, params)
  mask = condensed.constant_fan_in(scores, 0.75)
  # round(0.25 * 10) = round(2.5) = 2 (half to even, masks.kept_count); 0.25 * 36 = 9.
  assert condensed.check_constant_fan_in(mask) == {"a/kernel": 2, "b/kernel": 9}
  assert condensed.unit_k(10, 0.75) == masks.kept_count(10, 0.75) == 2
  assert bool(np.all(mask["b"]["bias"]))
  per_layer = condensed.constant_fan_in(scores, {"a/kernel": 0.5, "b/kernel": 0.99})
  assert condensed.check_constant_fan_in(per_layer) == {"a/kernel": 5, "b/kernel": 1}
  with pytest.raises(ValueError, match="misses the prunable paths"):
    condensed.constant_fan_in(scores, {"a/kernel": 0.5})
  with pytest.raises(ValueError, match=r"sparsity of 'a/kernel' must be in \[0, 1\)"):
    condensed.constant_fan_in(scores, 1.0)
  bad = {"w": np.array([[1, 1], [1, 0]], bool)}
  with pytest.raises(
    ValueError, match="'w' has no constant fan-in: unit 0 keeps 2 inputs, unit 1 keeps 1"
  ):
    condensed.check_constant_fan_in(bad)
  ablated = {"w": np.array([[1, 0], [1, 0]], bool)}
  assert condensed.check_constant_fan_in(ablated) == {"w": 2}
  with pytest.raises(ValueError, match="no constant fan-in"):
    condensed.check_constant_fan_in(ablated, allow_ablated=False)


def test_condensed_kernel_of_a_hand_computed_layer_with_an_ablated_unit():
  kernel = np.array(
    [[1.0, 0.0, 0.0], [0.0, 0.0, 4.0], [2.0, 0.0, 5.0]], np.float32
  )  # unit 1 ablated, k = 2
  ck = condensed.to_condensed_kernel(kernel)
  np.testing.assert_array_equal(np.asarray(ck.units), [0, 2])
  np.testing.assert_array_equal(np.asarray(ck.indices), [[0, 2], [1, 2]])
  np.testing.assert_array_equal(np.asarray(ck.values), [[1.0, 2.0], [4.0, 5.0]])
  assert ck.indices.dtype == jnp.uint16 and ck.k == 2
  np.testing.assert_array_equal(np.asarray(ck.todense()), kernel)
  # y[b, o] = sum_j x[b, idx[o, j]] * val[o, j]; the ablated unit gives 0.
  x = jnp.array([[1.0, 10.0, 100.0], [2.0, 0.0, 1.0]])
  for rows in (1, 2):  # the batch-1 path and the batched gather
    y = condensed._condensed_matmul(ck, x[:rows], gather_max_rows=32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x[:rows] @ kernel))
  np.testing.assert_array_equal(
    np.asarray(condensed._condensed_matmul(ck, x, gather_max_rows=1)), x @ kernel
  )
  # Every unit ablated (k = 0): no rows, the output is 0 (+ bias in a layer).
  empty = condensed.to_condensed_kernel(np.zeros((3, 2), np.float32))
  assert empty.values.shape == (0, 0) and empty.units.shape == (0,)
  for rows in (1, 2):
    np.testing.assert_array_equal(
      np.asarray(condensed._condensed_matmul(empty, x[:rows], gather_max_rows=32)),
      np.zeros((rows, 2)),
    )


@pytest.mark.parametrize("batch", [1, 7])
def test_condensed_mlp_logits_match_the_masked_dense_model(batch):
  model = models.get("mlp", num_classes=10, hidden=(64, 32))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(batch, 28, 28, 1)), jnp.float32)
  variables = _init(model, x[:1])
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, variables["params"]), 0.9)
  mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, 3].set(False)  # ablate
  cvars = condensed.condense(model, variables, mask, x[:1])
  assert condensed.condensed_layers(cvars) == {
    "params/Dense_0/kernel": (63, 78, (784, 64)),
    "params/Dense_1/kernel": (32, 6, (64, 32)),
    "params/Dense_2/kernel": (10, 3, (32, 10)),
  }
  ref = model.apply({"params": masks.apply(variables["params"], mask)}, x)
  fn = jax.jit(lambda v, x: condensed.apply(model, v, x))
  got = fn(cvars, x)
  assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 1e-6
  dense_bytes = condensed.param_nbytes(variables["params"])
  assert condensed.param_nbytes(cvars["params"]) < 0.2 * dense_bytes


def test_condensed_resnet_convs_match_and_non_constant_layers_stay_dense():
  model = models.get("resnet20", num_classes=10, num_filters=4)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = _init(model, x[:1], train=False)
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, variables["params"]), 0.9)
  # Unit 0 of the stem keeps its whole fan-in: no constant fan-in, stays dense.
  mask["Conv_0"]["kernel"] = mask["Conv_0"]["kernel"].at[..., 0].set(True)
  cvars = condensed.condense(model, variables, mask, x[:1], convs=True, train=False)
  layers = condensed.condensed_layers(cvars)
  assert "params/Conv_0/kernel" not in layers and len(layers) == 21
  ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    {**variables, "params": masks.apply(variables["params"], mask)}, x
  )
  for rows in (1, 10**9):
    fn = lambda v, x, rows=rows: condensed.apply(model, v, x, train=False, gather_max_rows=rows)
    got = jax.jit(fn)(cvars, x)
    assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) < 1e-6
  back = condensed.uncondense(cvars)
  for a, b in zip(
    jax.tree.leaves(back["params"]), jax.tree.leaves(masks.apply(variables["params"], mask))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_condensed_file_round_trip_is_bitwise(tmp_path):
  model = models.get("resnet20", num_classes=10, num_filters=4)
  x = jnp.zeros((1, 16, 16, 3))
  variables = _init(model, x, train=False)
  mask = condensed.constant_fan_in(jax.tree.map(np.abs, variables["params"]), 0.95)
  mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[:, 4].set(False)
  cvars = condensed.condense(model, variables, mask, x, convs=True, train=False)
  path = tmp_path / "model.condensed"
  info = sparse_io.save_condensed(path, cvars, metadata={"model": "resnet20"})
  assert info.nbytes == os.path.getsize(path)
  assert info.dense_nbytes == condensed.param_nbytes(condensed.uncondense(cvars))
  back = sparse_io.load_condensed(path)
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(cvars)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(back)
  assert tree_a == tree_b
  for (pa, a), (pb, b) in zip(flat_a, flat_b):
    a, b = np.asarray(a), np.asarray(b)
    assert pa == pb and a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), pa
  assert sparse_io.read_header(path)["format_version"] == 2
  assert sparse_io.read_header(path)["metadata"] == {"model": "resnet20"}
  with pytest.raises(sparse_io.SparseFileError, match="load_condensed"):
    sparse_io.load(path)
  fn = jax.jit(lambda v, x: condensed.apply(model, v, x, train=False))
  np.testing.assert_array_equal(np.asarray(fn(back, x)), np.asarray(fn(cvars, x)))
  # A plain file is still version 1 and loads with load_condensed too.
  plain = tmp_path / "plain.sparse"
  sparse_io.save(plain, {"w": np.eye(3, dtype=np.float32)})
  assert sparse_io.read_header(plain)["format_version"] == 1
  np.testing.assert_array_equal(sparse_io.load_condensed(plain)["w"], np.eye(3))


def test_benchmark_quick_run_finishes():
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  out = subprocess.run(
    [sys.executable, str(REPO / "benchmarks" / "structured_inference.py"), "--quick"],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=True,
  ).stdout
  assert out.splitlines()[0].startswith("CPU: ")
  last = out.strip().splitlines()[-1].split()
  assert last[0] == "speedup_vs_dense" and float(last[1]) > 0
