"""Tests for sparsejax.data: loaders on fake official layouts, and the on-device pipeline."""

import collections
import os
from pathlib import Path
import pickle
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from sparsejax import data

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Fake official CIFAR files
# --------------------------------------------------------------------------------------


def _to_cifar_rows(images_nhwc):
  """NHWC uint8 -> official [N, 3072] rows (R plane, G plane, B plane, each row-major)."""
  return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def _dump(path, payload):
  with open(path, "wb") as f:
    pickle.dump(payload, f, protocol=2)


def _fake_cifar10(root, sizes=(3, 3, 3, 3, 3), test_size=4, seed=0):
  """Writes root/cifar-10-batches-py/ and returns (train_x, train_y, test_x, test_y)."""
  rng = np.random.default_rng(seed)
  folder = root / "cifar-10-batches-py"
  folder.mkdir(parents=True)
  train_x, train_y = [], []
  for b, size in enumerate(sizes, start=1):
    x = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, 10, size)]
    _dump(
      folder / f"data_batch_{b}",
      {
        b"batch_label": f"training batch {b} of 5".encode(),
        b"labels": y,
        b"data": _to_cifar_rows(x),
        b"filenames": [b"f"] * size,
      },
    )
    train_x.append(x)
    train_y += y
  test_x = rng.integers(0, 256, (test_size, 32, 32, 3), dtype=np.uint8)
  test_y = [int(v) for v in rng.integers(0, 10, test_size)]
  _dump(
    folder / "test_batch",
    {b"batch_label": b"testing batch 1 of 1", b"labels": test_y, b"data": _to_cifar_rows(test_x)},
  )
  return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def _tar_gz(folder, archive):
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname=folder.name)


def test_cifar10_folder_layout_and_label_order(tmp_path):
  train_x, train_y, test_x, test_y = _fake_cifar10(tmp_path)
  ds = data.load("cifar10", tmp_path)
  assert ds.name == "cifar10" and ds.num_classes == 10 and ds.augment
  assert ds.train_images.shape == (15, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  assert ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(ds.train_images, train_x)
  np.testing.assert_array_equal(ds.train_labels, train_y)  # batches 1..5 in order
  np.testing.assert_array_equal(ds.test_images, test_x)
  np.testing.assert_array_equal(ds.test_labels, test_y)
  expected_mean = train_x.reshape(-1, 3).mean(0) / 255
  expected_std = train_x.reshape(-1, 3).std(0) / 255
  np.testing.assert_allclose(ds.mean, expected_mean, rtol=1e-12)
  np.testing.assert_allclose(ds.std, expected_std, rtol=1e-9)
  # data_dir may also be the extracted folder itself.
  again = data.load("CIFAR-10", tmp_path / "cifar-10-batches-py")
  np.testing.assert_array_equal(again.train_images, train_x)


def test_cifar_pixel_planes_map_to_nhwc_exactly(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  row = np.zeros(3072, np.uint8)
  row[:1024], row[1024:2048], row[2048:] = 10, 20, 30  # R, G, B planes
  row[1] = 200  # R at (y=0, x=1)
  row[1024 + 32] = 201  # G at (y=1, x=0)
  row[2048 + 32 * 31 + 31] = 202  # B at (y=31, x=31)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    _dump(folder / name, {b"data": row[None], b"labels": [7]})
  image = data.load("cifar10", tmp_path).train_images[0]
  expected = np.empty((32, 32, 3), np.uint8)
  expected[..., 0], expected[..., 1], expected[..., 2] = 10, 20, 30
  expected[0, 1, 0], expected[1, 0, 1], expected[31, 31, 2] = 200, 201, 202
  np.testing.assert_array_equal(image, expected)


def test_cifar10_tar_gz_read_in_place(tmp_path):
  src = tmp_path / "src"
  train_x, train_y, test_x, test_y = _fake_cifar10(src)
  data_dir = tmp_path / "downloads"
  data_dir.mkdir()
  _tar_gz(src / "cifar-10-batches-py", data_dir / "cifar-10-python.tar.gz")
  ds = data.load("cifar10", data_dir)
  np.testing.assert_array_equal(ds.train_images, train_x)
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, test_x)
  np.testing.assert_array_equal(ds.test_labels, test_y)
  assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # nothing extracted


def test_cifar100_folder_and_archive(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "src" / "cifar-100-python"
  folder.mkdir(parents=True)
  splits = {}
  for split, n in (("train", 6), ("test", 3)):
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, n)]
    _dump(
      folder / split,
      {b"data": _to_cifar_rows(x), b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]},
    )
    splits[split] = (x, fine)
  archive_dir = tmp_path / "archive"
  archive_dir.mkdir()
  _tar_gz(folder, archive_dir / "cifar-100-python.tar.gz")
  for data_dir in (tmp_path / "src", archive_dir):
    ds = data.load("cifar100", data_dir)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.train_images, splits["train"][0])
    np.testing.assert_array_equal(ds.train_labels, splits["train"][1])  # fine labels
    np.testing.assert_array_equal(ds.test_images, splits["test"][0])
    np.testing.assert_array_equal(ds.test_labels, splits["test"][1])


def test_corrupt_cifar_files_are_named(tmp_path):
  _fake_cifar10(tmp_path / "a")
  bad = tmp_path / "a" / "cifar-10-batches-py" / "data_batch_3"
  bad.write_bytes(b"not a pickle")
  with pytest.raises(data.DatasetFormatError, match="data_batch_3"):
    data.load("cifar10", tmp_path / "a")

  (tmp_path / "b").mkdir()
  archive = tmp_path / "b" / "cifar-10-python.tar.gz"
  archive.write_bytes(b"\x1f\x8b truncated gzip")
  with pytest.raises(data.DatasetFormatError, match="cifar-10-python.tar.gz"):
    data.load("cifar10", tmp_path / "b")

  _fake_cifar10(tmp_path / "c")
  (tmp_path / "c" / "cifar-10-batches-py" / "test_batch").unlink()
  with pytest.raises(data.DatasetFormatError, match="missing test_batch"):
    data.load("cifar10", tmp_path / "c")


def test_batch_pickle_cannot_run_code(tmp_path):
  _fake_cifar10(tmp_path)

  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  _dump(tmp_path / "cifar-10-batches-py" / "data_batch_1", {b"data": Evil(), b"labels": []})
  with pytest.raises(data.DatasetFormatError, match="refusing to load global"):
    data.load("cifar10", tmp_path)


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
  env_dir = tmp_path / "env"
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  with pytest.raises(FileNotFoundError) as info:
    data.load("cifar10")
  message = str(info.value)
  for place in (
    env_dir / "cifar-10-batches-py",
    env_dir / "cifar-10-python.tar.gz",
    tmp_path / "home" / ".sparsejax" / "data" / "cifar-10-python.tar.gz",
    tmp_path / "home" / "tensorflow_datasets" / "cifar-10-batches-py",
  ):
    assert str(place) in message
  assert "tensorflow-datasets" in message
  assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
  assert "make_cifar10_batches.py" in message

  with pytest.raises(FileNotFoundError) as info:
    data.load("tiny_imagenet", tmp_path / "nowhere")
  assert str(tmp_path / "nowhere" / "tiny-imagenet-200") in str(info.value)
  assert "tiny-imagenet-200.zip" in str(info.value)

  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("mnist")


def test_tfds_is_used_first_when_available(monkeypatch):
  rng = np.random.default_rng(0)
  train = {
    "image": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
    "label": np.arange(20) % 10,
  }
  test = {"image": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), "label": np.arange(5)}
  calls = []

  class FakeTfds:
    @staticmethod
    def load(name, **kwargs):
      calls.append((name, kwargs))
      return [train, test]

    @staticmethod
    def as_numpy(tree):
      return tree

  monkeypatch.setattr(data, "_import_tfds", lambda: FakeTfds)
  ds = data.load("cifar10")
  assert calls == [("cifar10", {"split": ["train", "test"], "batch_size": -1, "download": False})]
  np.testing.assert_array_equal(ds.train_images, train["image"])
  np.testing.assert_array_equal(ds.test_labels, test["label"])
  assert ds.train_labels.dtype == np.int32


# --------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------


def test_tiny_imagenet_fake_tree(tmp_path):
  root = tmp_path / "tiny-imagenet-200"
  wnids = ["n03", "n01", "n02"]  # label = position in wnids.txt, not sorted order
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  colors = {"n03": (250, 10, 10), "n01": (10, 250, 10), "n02": (10, 10, 250)}
  for wnid in wnids:
    image_dir = root / "train" / wnid / "images"
    image_dir.mkdir(parents=True)
    for i in range(2):
      Image.new("RGB", (64, 64), colors[wnid]).save(image_dir / f"{wnid}_{i}.JPEG", quality=95)
    (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
  Image.new("L", (64, 64), 128).save(root / "train" / "n02" / "images" / "n02_2.JPEG")
  val = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n03")]
  for file, wnid in val:
    Image.new("RGB", (64, 64), colors[wnid]).save(root / "val" / "images" / file, quality=95)
  (root / "val" / "val_annotations.txt").write_text(
    "".join(f"{file}\t{wnid}\t0\t0\t63\t63\n" for file, wnid in val)
  )

  ds = data.load("tiny-imagenet", tmp_path)
  assert ds.name == "tiny_imagenet" and ds.num_classes == 3 and ds.augment
  assert ds.train_images.shape == (7, 64, 64, 3) and ds.train_images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ds.test_labels, [2, 0])
  assert ds.test_images.shape == (2, 64, 64, 3)
  for image, label in zip(ds.train_images[:6], ds.train_labels[:6]):
    np.testing.assert_allclose(image.mean((0, 1)), colors[wnids[label]], atol=3)
  np.testing.assert_allclose(ds.train_images[6], 128, atol=1)  # grayscale -> RGB
  np.testing.assert_allclose(ds.test_images[1].mean((0, 1)), colors["n03"], atol=3)

  (root / "val" / "images" / "val_0.JPEG").write_bytes(b"garbage")
  with pytest.raises(data.DatasetFormatError, match="val_0.JPEG"):
    data.load("tiny_imagenet", tmp_path)


# --------------------------------------------------------------------------------------
# Digits and subsets
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


def test_digits_shapes_counts_and_determinism(digits):
  from sklearn.datasets import load_digits

  assert digits.name == "digits" and digits.num_classes == 10 and not digits.augment
  assert digits.train_images.shape == (1437, 8, 8, 1)
  assert digits.test_images.shape == (360, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int32
  assert digits.train_images.max() == 255 and digits.train_images.min() == 0
  assert set(np.unique(digits.test_labels)) == set(range(10))
  assert np.bincount(digits.test_labels).min() >= 35  # stratified: ~36 per class
  # Train + test is exactly the bundled set, scaled 0..16 -> 0..255.
  bunch = load_digits()
  expected = np.round(bunch.images * 255 / 16).astype(np.uint8).reshape(len(bunch.target), -1)
  got = np.concatenate([digits.train_images, digits.test_images]).reshape(len(expected), -1)
  got_labels = np.concatenate([digits.train_labels, digits.test_labels])
  as_rows = lambda x, y: collections.Counter(  # noqa: E731
    (row.tobytes(), int(label)) for row, label in zip(x, y)
  )
  assert as_rows(got, got_labels) == as_rows(expected, bunch.target)
  again = data.load("digits")
  np.testing.assert_array_equal(again.train_images, digits.train_images)
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)
  assert again.mean == digits.mean and again.std == digits.std


def test_train_subset_is_balanced_deterministic_and_nested(digits):
  small = data.load("digits", train_subset=100)
  assert small.train_images.shape == (100, 8, 8, 1)
  np.testing.assert_array_equal(np.bincount(small.train_labels), [10] * 10)
  assert small.mean == digits.mean  # statistics of the full training split
  np.testing.assert_array_equal(small.test_labels, digits.test_labels)
  odd = data.load("digits", train_subset=105)
  np.testing.assert_array_equal(np.bincount(odd.train_labels), [11] * 5 + [10] * 5)
  as_set = lambda ds: {x.tobytes() for x in ds.train_images}  # noqa: E731
  assert as_set(small) <= as_set(odd)
  np.testing.assert_array_equal(
    data.load("digits", train_subset=100).train_images, small.train_images
  )
  with pytest.raises(ValueError, match="train_subset"):
    data.load("digits", train_subset=5)


def test_train_subset_error_names_the_valid_range(digits):
  # digits' smallest training class (8) has 139 of the 1437 examples: 139 of
  # every class plus one more of classes 0..7 (all larger) is the most.
  assert data.max_train_subset(digits.train_labels, 10) == 1398
  assert data.load("digits", train_subset=1398).num_train == 1398
  for n in (1399, 1437, 5):
    with pytest.raises(
      ValueError,
      match=rf"train_subset must lie in \[10, 1398\] "
      rf"for digits, got {n}: .*class 8, the smallest, has 139 "
      r"of the 1437 training examples \(None keeps them all\)",
    ):
      data.load("digits", train_subset=n)


def test_max_train_subset_counts_the_leading_larger_classes():
  labels = np.array([0] * 4 + [1] * 3 + [2] * 4)
  assert data.max_train_subset(labels, 3) == 3 * 3 + 1  # class 0 only; 2 is not leading
  assert data.max_train_subset(np.array([0, 0, 1, 1]), 2) == 4
  assert data.max_train_subset(np.array([0, 1, 1]), 3) == 2  # class 2 has none


def test_class_balanced_indices():
  labels = np.array([0, 1, 2] * 5 + [2, 2])
  idx = data.class_balanced_indices(labels, 3, seed=0)
  assert idx.shape == (9,) and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [3, 3, 3])
  np.testing.assert_array_equal(idx, data.class_balanced_indices(labels, 3, seed=0))
  assert any(
    not np.array_equal(idx, data.class_balanced_indices(labels, 3, seed=s)) for s in range(1, 5)
  )
  assert set(idx) <= set(data.class_balanced_indices(labels, 4, seed=0))
  with pytest.raises(ValueError, match="class 0 has 5 examples"):
    data.class_balanced_indices(labels, 6, seed=0)
  with pytest.raises(ValueError, match="class 3 has 0 examples"):
    data.class_balanced_indices(labels, 1, seed=0, num_classes=4)


def test_class_balanced_batch(digits):
  images, labels = data.class_balanced_batch(digits)
  assert images.shape == (100, 8, 8, 1) and images.dtype == jnp.float32
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(np.bincount(np.asarray(labels)), [10] * 10)
  idx = data.class_balanced_indices(digits.train_labels, 10, 0, num_classes=10)
  expected = (digits.train_images[idx] / 255 - digits.mean[0]) / digits.std[0]
  np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# On-device pipeline
# --------------------------------------------------------------------------------------


def test_normalize_values_and_jit():
  images = np.array([[[[0, 255, 51]]]], np.uint8)  # [1, 1, 1, 3]
  mean, std = (0.5, 0.5, 0.2), (0.25, 0.5, 0.1)
  out = jax.jit(data.normalize, static_argnums=(1, 2))(images, mean, std)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  np.testing.assert_allclose(out[0, 0, 0], [-2.0, 1.0, 0.0], atol=1e-6)


def _windows(image, pad):
  """Every shifted (and flipped) H x W window of the zero-padded image."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return {
    (dy, dx, flipped): (window[:, ::-1] if flipped else window)
    for dy in range(2 * pad + 1)
    for dx in range(2 * pad + 1)
    for flipped in (False, True)
    for window in [padded[dy : dy + h, dx : dx + w]]
  }


def test_augment_outputs_are_padded_windows():
  pad = 4
  # Distinct non-zero values, so every window of the padded image is unique.
  image = (np.arange(8 * 8 * 2).reshape(8, 8, 2) + 1).astype(np.uint8)
  images = np.broadcast_to(image, (512, 8, 8, 2))
  out = np.asarray(jax.jit(data.augment)(jax.random.key(0), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  windows = _windows(image, pad)
  seen = []
  for example in out:
    matches = [k for k, window in windows.items() if np.array_equal(example, window)]
    assert len(matches) == 1
    seen.append(matches[0])
  dys, dxs, flips = zip(*seen)
  assert set(dys) == set(dxs) == set(range(2 * pad + 1))  # every shift occurs
  assert 0.4 < np.mean(flips) < 0.6
  assert len(set(seen)) > 100  # independent draws per example


def test_augment_options_and_keys():
  images = jax.random.randint(jax.random.key(1), (16, 6, 6, 3), 0, 256).astype(jnp.uint8)
  key = jax.random.key(3)
  np.testing.assert_array_equal(data.augment(key, images, pad=0, flip=False), images)
  flipped_only = np.asarray(data.augment(key, images, pad=0))
  for got, original in zip(flipped_only, np.asarray(images)):
    assert np.array_equal(got, original) or np.array_equal(got, original[:, ::-1])
  a = data.augment(key, images)
  np.testing.assert_array_equal(a, data.augment(key, images))
  assert not np.array_equal(a, data.augment(jax.random.key(4), images))
  legacy = data.augment(jax.random.PRNGKey(3), images)  # raw uint32 keys work too
  assert legacy.shape == images.shape and legacy.dtype == jnp.uint8


def test_epoch_permutation():
  p = data.epoch_permutation(0, 0, 1000)
  assert p.dtype == jnp.int32 and p.shape == (1000,)
  np.testing.assert_array_equal(np.sort(p), np.arange(1000))
  np.testing.assert_array_equal(p, data.epoch_permutation(0, 0, 1000))
  assert not np.array_equal(p, data.epoch_permutation(0, 1, 1000))
  assert not np.array_equal(p, data.epoch_permutation(1, 0, 1000))
  traced = jax.jit(data.epoch_permutation, static_argnums=2)(0, jnp.int32(1), 1000)
  np.testing.assert_array_equal(traced, data.epoch_permutation(0, 1, 1000))


def test_num_batches_and_batch_indices():
  assert data.num_batches(10, 4) == 2
  assert data.num_batches(10, 4, drop_remainder=False) == 3
  assert data.num_batches(12, 4, drop_remainder=False) == 3
  perm = data.epoch_permutation(7, 2, 10)
  take = jax.jit(data.batch_indices, static_argnums=2)
  batches = [take(perm, jnp.int32(s), 4) for s in range(data.num_batches(10, 4))]
  np.testing.assert_array_equal(np.concatenate(batches), perm[:8])


@pytest.mark.parametrize("n,batch_size", [(10, 4), (12, 4), (3, 8)])
def test_eval_batches_cover_each_example_once(n, batch_size):
  images = np.arange(n * 2 * 2 * 1, dtype=np.uint8).reshape(n, 2, 2, 1) + 1
  labels = np.arange(n, dtype=np.int32)
  batches = list(data.eval_batches(images, labels, batch_size))
  assert len(batches) == data.num_batches(n, batch_size, drop_remainder=False)
  for batch in batches:
    assert batch.images.shape == (batch_size, 2, 2, 1) and batch.mask.dtype == bool
    assert not batch.images[~batch.mask].any()  # padding is zeros
  mask = np.concatenate([b.mask for b in batches])
  assert mask.sum() == n
  np.testing.assert_array_equal(np.concatenate([b.labels for b in batches])[mask], labels)
  np.testing.assert_array_equal(np.concatenate([b.images for b in batches])[mask], images)


# --------------------------------------------------------------------------------------
# Real CIFAR-10 (offline copy): converted once from ../shared/data when present
# --------------------------------------------------------------------------------------

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CONVERTED_CACHE = Path.home() / ".cache" / "sparsejax-test" / "cifar10-jpeg"


def _real_cifar10_dir():
  """A directory holding ``cifar-10-batches-py/``, or ``None``.

  Looks in ``$SPARSEJAX_TEST_CIFAR10``, ``../data`` and ``../shared/data``;
  failing those, decodes ``../shared/data/cifar10-jpeg.tar.gz`` with its
  ``make_cifar10_batches.py`` (about a minute) into a cache under ``~/.cache``.
  """
  candidates = [
    os.environ.get("SPARSEJAX_TEST_CIFAR10"),
    REPO_ROOT.parent / "data",
    SHARED_DATA,
    CONVERTED_CACHE,
  ]
  for candidate in candidates:
    if candidate and (Path(candidate) / "cifar-10-batches-py" / "test_batch").is_file():
      return Path(candidate)
  converter = SHARED_DATA / "make_cifar10_batches.py"
  if not converter.is_file():
    return None
  partial = CONVERTED_CACHE.with_name(CONVERTED_CACHE.name + ".partial")
  shutil.rmtree(partial, ignore_errors=True)
  subprocess.run([sys.executable, str(converter), str(partial)], check=True, capture_output=True)
  shutil.rmtree(CONVERTED_CACHE, ignore_errors=True)
  partial.rename(CONVERTED_CACHE)
  return CONVERTED_CACHE


@pytest.mark.slow
def test_real_cifar10_offline():
  data_dir = _real_cifar10_dir()
  if data_dir is None:
    pytest.skip(
      "real CIFAR-10 not found: no ../shared/data/make_cifar10_batches.py; "
      "set SPARSEJAX_TEST_CIFAR10=DIR containing cifar-10-batches-py/"
    )
  ds = data.load("cifar10", data_dir)
  assert ds.train_images.shape == (50000, 32, 32, 3)
  assert ds.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  np.testing.assert_allclose(ds.mean, (0.491, 0.482, 0.447), atol=3e-3)
  np.testing.assert_allclose(ds.std, (0.247, 0.243, 0.261), atol=6e-3)
