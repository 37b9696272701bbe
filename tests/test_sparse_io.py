"""Compressed sparse model files: bitwise round trips, sizes, clear errors."""

import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax import models
from sparsejax import sparse_io


def _random_like(abstract, seed=0):
  """Numpy normal values for a tree of ShapeDtypeStructs (no compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)


def _bits(x):
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}")


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(_bits(x), _bits(y))


def _global_magnitude_mask(params, sparsity):
  """Exact global top-|w| over the kernels, in numpy (no compilation;
  masks.topk_mask is tested in test_masks.py)."""
  named = masks.named_leaves(params)
  kernels = [p for _, p in named if p.ndim > 1]
  flat = np.concatenate([np.abs(p).ravel() for p in kernels])
  keep = np.zeros(flat.size, bool)
  keep[np.argsort(-flat, kind="stable")[: masks.kept_count(flat.size, sparsity)]] = True
  out, offset = [], 0
  for _, p in named:
    if p.ndim > 1:
      out.append(keep[offset : offset + p.size].reshape(p.shape))
      offset += p.size
    else:
      out.append(np.ones(p.shape, bool))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def _masked(params, mask):
  return jax.tree.map(lambda p, m: np.where(m, p, np.zeros((), p.dtype)), params, mask)


def _resnet20_variables():
  model = models.get("resnet20", num_classes=10)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return _random_like(abstract)


def test_linen_round_trip_is_bitwise_with_and_without_target(tmp_path):
  variables = _resnet20_variables()
  params = variables["params"]
  mask = _global_magnitude_mask(params, 0.9)
  tree = {"params": _masked(params, mask), "batch_stats": variables["batch_stats"]}
  full_mask = {"params": mask, "batch_stats": masks.ones_like(tree["batch_stats"])}
  path = tmp_path / "m.sparse"
  info = sparse_io.save(path, tree, full_mask, metadata={"model": "resnet20"})
  assert info.kept == round(0.1 * 270896) and info.total == 270896
  got, got_mask = sparse_io.load(path, target=tree)
  _assert_bitwise(tree, got)
  _assert_bitwise(jax.tree.map(np.asarray, full_mask), got_mask)
  # Without a target: nested dicts keyed by path, same leaves.
  got2, _ = sparse_io.load(path)
  _assert_bitwise(jax.tree.map(np.asarray, tree), got2)
  assert sparse_io.read_header(path)["metadata"] == {"model": "resnet20"}


def test_without_mask_nonzeros_are_kept_bitwise_including_negative_zero(tmp_path):
  w = np.array([[0.0, -0.0, 1.5], [np.nan, 0.0, -np.inf]], np.float32)
  tree = {
    "layer": {"kernel": w, "bias": np.zeros(3, np.float32)},
    "emb": np.array([[0, 3], [0, 0]], np.int32),
    "half": np.array([[0, 2.5]], jnp.bfloat16),
    "f64": np.array([[1e-300, 0.0]], np.float64),
    "step": np.int32(7),
  }
  path = tmp_path / "m.sparse"
  sparse_io.save(path, tree)
  got, mask = sparse_io.load(path, target=tree)
  _assert_bitwise(tree, got)
  np.testing.assert_array_equal(mask["layer"]["kernel"], [[False, True, True], [True, False, True]])
  assert mask["layer"]["bias"].all()  # not prunable: dense
  header = sparse_io.read_header(path)
  kinds = {l["path"]: l["kind"] for l in header["leaves"]}
  assert kinds == {
    "emb": "sparse",
    "f64": "sparse",
    "half": "sparse",
    "layer/bias": "dense",
    "layer/kernel": "sparse",
    "step": "dense",
  }


def test_nnx_state_round_trip(tmp_path):

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(self.conv(x).mean((1, 2)))

  model = Net(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  mask = jax.tree.map(lambda p: rng.random(p.shape) < (0.25 if p.ndim > 1 else 2), state)
  nnx.update(model, jax.tree.map(lambda p, m: np.where(m, p, np.float32(0)), state, mask))
  state = nnx.state(model, nnx.Param)
  path = tmp_path / "nnx.sparse"
  sparse_io.save(path, state, mask)
  got, got_mask = sparse_io.load(path, target=state)
  assert isinstance(got, nnx.State)
  _assert_bitwise(state, got)
  fresh = Net(nnx.Rngs(1))
  nnx.update(fresh, got)
  _assert_bitwise(state, nnx.state(fresh, nnx.Param))
  assert int(sum(m.sum() for m in jax.tree.leaves(got_mask))) == int(
    sum(np.sum(m) for m in jax.tree.leaves(mask))
  )


def test_resnet20_at_99_percent_size_is_exact_and_about_6_percent(tmp_path):
  variables = _resnet20_variables()
  params = variables["params"]
  mask = _global_magnitude_mask(params, 0.99)
  tree = {"params": _masked(params, mask), "batch_stats": variables["batch_stats"]}
  full_mask = {"params": mask, "batch_stats": masks.ones_like(tree["batch_stats"])}
  sparse = sparse_io.save(tmp_path / "sparse", tree, full_mask)
  dense = sparse_io.save(tmp_path / "dense", tree, masks.ones_like(tree))
  # Payload bytes by hand: prunable kernels cost ceil(n/8) mask bytes plus 4
  # bytes per kept weight; the rest (BN params and statistics, the classifier
  # bias) 4 bytes per entry.
  prunable = 270896
  kept = round(0.01 * prunable)
  other = sum(x.size for x in jax.tree.leaves(tree)) - prunable
  kernels = [m.size for p, m in masks.named_leaves(mask) if m.ndim > 1]
  payload = sum(math.ceil(n / 8) for n in kernels) + 4 * kept + 4 * other
  assert sparse.kept == kept == 2709
  assert sparse.nbytes == sparse.header_nbytes + payload
  assert dense.nbytes == dense.header_nbytes + 4 * (prunable + other)
  assert os.path.getsize(tmp_path / "sparse") == sparse.nbytes
  # 33862 mask bytes + 10836 value bytes + 4 * 3146 dense bytes = 57282 of
  # 1096168 dense bytes: 5.23%; the header adds under 1.5%.
  assert other == 3146 and payload == 57282
  assert 4 * (prunable + other) == 1096168
  ratio = sparse.nbytes / dense.nbytes
  assert 0.0522 < payload / 1096168 < ratio < 0.0523 + 0.015
  # zlib: the mostly-zero mask bits deflate well.
  zipped = sparse_io.save(tmp_path / "zlib", tree, full_mask, compression="zlib")
  assert zipped.nbytes < 0.6 * sparse.nbytes
  _assert_bitwise(tree, sparse_io.load(tmp_path / "zlib", target=tree)[0])


def test_corrupted_truncated_and_foreign_files_are_refused(tmp_path):
  tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8) % 3}
  path = tmp_path / "m.sparse"
  sparse_io.save(path, tree)
  blob = path.read_bytes()
  for name, bad in [
    ("flip", blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]),
    ("truncated", blob[:-10]),
    ("cut", blob[: len(blob) // 2]),
  ]:
    (tmp_path / name).write_bytes(bad)
    with pytest.raises(sparse_io.SparseFileError, match="corrupted or truncated"):
      sparse_io.load(tmp_path / name)
  (tmp_path / "short").write_bytes(blob[:20])
  with pytest.raises(sparse_io.SparseFileError, match="truncated"):
    sparse_io.load(tmp_path / "short")
  (tmp_path / "npy").write_bytes(b"\x93NUMPY" + b"\0" * 100)
  with pytest.raises(sparse_io.SparseFileError, match="not a sparsejax"):
    sparse_io.load(tmp_path / "npy")
  newer = bytearray(blob)
  newer[8] = sparse_io.FORMAT_VERSION + 1
  (tmp_path / "newer").write_bytes(bytes(newer))
  with pytest.raises(
    sparse_io.SparseFileError, match=f"format version {sparse_io.FORMAT_VERSION + 1}"
  ):
    sparse_io.load(tmp_path / "newer")
  with pytest.raises(sparse_io.SparseFileError, match=r"only in the target \['v'\]"):
    sparse_io.load(path, target={"v": tree["w"]})
  with pytest.raises(sparse_io.SparseFileError, match=r"\(8, 8\) float32 in the file"):
    sparse_io.load(path, target={"w": np.zeros((8, 8), np.float16)})


def test_nonzero_pruned_entries_are_refused_and_the_old_file_survives(tmp_path):
  tree = {"w": np.ones((4, 4), np.float32)}
  path = tmp_path / "m.sparse"
  sparse_io.save(path, tree)
  mask = {"w": np.eye(4, dtype=bool)}
  with pytest.raises(ValueError, match="12 nonzero entries where the mask prunes"):
    sparse_io.save(path, tree, mask)
  _assert_bitwise(tree, sparse_io.load(path)[0])  # the previous file is intact
  assert [p.name for p in tmp_path.iterdir()] == ["m.sparse"]  # no temp files
  with pytest.raises(ValueError, match="does not match the structure"):
    sparse_io.save(path, tree, {"v": mask["w"]})


def test_a_params_mask_stores_the_other_collections_dense(tmp_path):
  # README: sparse_io.save(path, {"params": ..., "batch_stats": ...}, state.mask).
  params = {"conv": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bias": jnp.ones(2)}}
  mask = {"conv": {"kernel": jnp.array([[True, False], [False, True]]), "bias": jnp.ones(2, bool)}}
  variables = {"params": params, "batch_stats": {"bn": {"mean": jnp.array([0.5, 0.0])}}}
  info = sparse_io.save(tmp_path / "m.sparse", variables, mask)
  back, back_mask = sparse_io.load(tmp_path / "m.sparse", target=variables)
  np.testing.assert_array_equal(back["params"]["conv"]["kernel"], params["conv"]["kernel"])
  np.testing.assert_array_equal(back["batch_stats"]["bn"]["mean"], [0.5, 0.0])
  assert bool(back_mask["batch_stats"]["bn"]["mean"].all())  # dense, its 0 kept
  np.testing.assert_array_equal(back_mask["params"]["conv"]["kernel"], mask["conv"]["kernel"])
  assert (info.kept, info.total) == (2, 4)  # only the kernel is stored sparse
  with pytest.raises(ValueError, match="mask does not match the structure"):
    sparse_io.save(tmp_path / "x.sparse", variables, {"other": jnp.ones(2, bool)})
