"""Datasets and the on-device input pipeline.

Design
------
The image-classification datasets used by sparsejax are small enough to keep in
accelerator memory as ``uint8`` (CIFAR-10/100: 150 MB, Tiny-ImageNet: 1.2 GB), so
there is no host-side input pipeline during training:

1. :func:`load` reads a dataset once into host memory as a :class:`Dataset`
   (``uint8`` images in NHWC layout, ``int32`` labels, per-channel mean/std computed
   from the training images).
2. The caller puts ``train_images``/``train_labels`` on the device once
   (``jax.device_put``).
3. Shuffling is an index permutation that is a pure function of ``(seed, epoch)``
   (:func:`epoch_permutation`); a train step slices its batch indices out of it
   (:func:`batch_indices`) and gathers ``images[idx]`` on the device.
4. Augmentation (:func:`augment`, random crop with zero padding plus horizontal
   flip) and normalisation (:func:`normalize`) run inside the jitted step, so the
   only thing crossing the host-device boundary per step is a step counter.

Because the order of examples depends only on ``(seed, epoch)`` and augmentation
only on a key derived from the step, a run is reproducible and can resume
mid-epoch from a checkpoint that stores just the step number.

Evaluation uses :func:`eval_batches`: fixed-size, zero-padded batches with a
validity mask, so the eval step compiles once and the tail is counted exactly.

Example (scikit-learn's digits, offline)::

    >>> import jax
    >>> from sparsejax import data
    >>> ds = data.load("digits")
    >>> ds.image_shape, ds.num_classes, ds.num_train
    ((8, 8, 1), 10, 1437)
    >>> images = jax.device_put(ds.train_images)  # once, as uint8
    >>> perm = data.epoch_permutation(0, 0, ds.num_train)  # seed 0, epoch 0
    >>> idx = data.batch_indices(perm, 0, 128)  # the first step of the epoch
    >>> x = data.normalize(images[idx], ds.mean, ds.std)
    >>> x.shape, x.dtype
    ((128, 8, 8, 1), dtype('float32'))
    >>> data.num_batches(ds.num_train, 128)  # full batches per epoch
    11

A training loop (sketch)::

    ds = load("cifar10")
    x_train, y_train = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)
    n, bs = len(ds.train_labels), 128
    steps = num_batches(n, bs)

    @jax.jit
    def train_step(state, perm, step_in_epoch, key):
        idx = batch_indices(perm, step_in_epoch, bs)
        x = augment(key, x_train[idx]) if ds.augment else x_train[idx]
        x = normalize(x, ds.mean, ds.std)
        ...  # loss on (x, y_train[idx])

    for epoch in range(num_epochs):
        perm = epoch_permutation(seed, epoch, n)
        for s in range(steps):
            key = jax.random.fold_in(aug_key, epoch * steps + s)
            state = train_step(state, perm, s, key)

Data sources
------------
``cifar10`` / ``cifar100``
    tensorflow-datasets (only when ``data_dir`` is None and tensorflow is
    installed), else the official python archives from
    https://www.cs.toronto.edu/~kriz/cifar.html, either extracted
    (``cifar-10-batches-py/``, ``cifar-100-python/``) or as the downloaded
    ``.tar.gz`` (read in place, never extracted to disk).
``tiny_imagenet``
    The official folder layout from http://cs231n.stanford.edu/tiny-imagenet-200.zip
    (unzipped); the labelled ``val`` split serves as the test set.
``digits``
    scikit-learn's bundled 8x8 digits (1797 images, no download), upscaled in
    value to ``uint8`` 0..255 and split 1437/360 with a fixed stratified split.

Without ``data_dir`` the on-disk search looks in ``$SPARSEJAX_DATA_DIR``,
``~/.sparsejax/data`` and ``~/tensorflow_datasets``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import importlib.util
import io
import math
import os
from pathlib import Path
import pickle
import posixpath
import tarfile
from typing import Any
from typing import BinaryIO
from typing import NamedTuple
import zlib

import jax
import jax.numpy as jnp
import numpy as np

try:  # numpy >= 2
  from numpy._core import multiarray as _np_multiarray
  from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
  from numpy.core import multiarray as _np_multiarray
  from numpy.core import numeric as _np_numeric

__all__ = [
  "DATASET_NAMES",
  "DATA_DIR_ENV",
  "IMAGE_SHAPES",
  "Dataset",
  "DatasetFormatError",
  "EvalBatch",
  "augment",
  "batch_indices",
  "canonical_name",
  "class_balanced_batch",
  "class_balanced_indices",
  "epoch_permutation",
  "eval_batches",
  "load",
  "max_train_subset",
  "normalize",
  "num_batches",
]

DATASET_NAMES = ("cifar10", "cifar100", "tiny_imagenet", "digits")
"""Names accepted by :func:`load`."""

IMAGE_SHAPES = {
  "cifar10": (32, 32, 3),
  "cifar100": (32, 32, 3),
  "tiny_imagenet": (64, 64, 3),
  "digits": (8, 8, 1),
}
"""``(H, W, C)`` of one example of each dataset, known without loading it."""

DATA_DIR_ENV = "SPARSEJAX_DATA_DIR"
"""Environment variable naming an extra directory searched by :func:`load`."""


class DatasetFormatError(ValueError):
  """A dataset file or folder exists but is corrupt, truncated or incomplete."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory image-classification dataset.

  Attributes:
    name: canonical dataset name (one of :data:`DATASET_NAMES`).
    num_classes: number of classes; labels lie in ``[0, num_classes)``.
    train_images: ``uint8 [N_train, H, W, C]``.
    train_labels: ``int32 [N_train]``.
    test_images: ``uint8 [N_test, H, W, C]``.
    test_labels: ``int32 [N_test]``.
    mean: per-channel mean of the full training split, in [0, 1] pixel units.
    std: per-channel standard deviation of the full training split, in [0, 1]
      pixel units.
    augment: whether random crop + horizontal flip is the standard augmentation
      for this dataset (True for CIFAR and Tiny-ImageNet, False for digits).
  """

  name: str
  num_classes: int
  train_images: np.ndarray = dataclasses.field(repr=False)
  train_labels: np.ndarray = dataclasses.field(repr=False)
  test_images: np.ndarray = dataclasses.field(repr=False)
  test_labels: np.ndarray = dataclasses.field(repr=False)
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: bool

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
          f"{split}_images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
        )
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
          f"{split}_labels must be int32 [{images.shape[0]}], got {labels.dtype} {labels.shape}"
        )
    if self.test_images.shape[1:] != self.train_images.shape[1:]:
      raise ValueError(
        f"train/test image shapes differ: {self.train_images.shape[1:]} "
        f"vs {self.test_images.shape[1:]}"
      )
    channels = self.train_images.shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(f"mean/std need {channels} entries, got {len(self.mean)}/{len(self.std)}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of a single image."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    """Number of training examples."""
    return int(self.train_images.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test examples."""
    return int(self.test_images.shape[0])


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_ALIASES = {
  "cifar10": "cifar10",
  "cifar-10": "cifar10",
  "cifar_10": "cifar10",
  "cifar100": "cifar100",
  "cifar-100": "cifar100",
  "cifar_100": "cifar100",
  "tiny_imagenet": "tiny_imagenet",
  "tiny-imagenet": "tiny_imagenet",
  "tinyimagenet": "tiny_imagenet",
  "tiny_imagenet_200": "tiny_imagenet",
  "tiny-imagenet-200": "tiny_imagenet",
  "digits": "digits",
}


def canonical_name(name: str) -> str:
  """The name in :data:`DATASET_NAMES` of ``name`` or an alias (``"cifar-10"``).

  Raises:
    ValueError: an unknown name.
  """
  canonical = _ALIASES.get(name.lower())
  if canonical is None:
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
  return canonical


_Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x/y, test x/y


def load(
  name: str, data_dir: str | os.PathLike | None = None, *, train_subset: int | None = None
) -> Dataset:
  """Loads a dataset into host memory.

  Args:
    name: ``"cifar10"``, ``"cifar100"``, ``"tiny_imagenet"`` or ``"digits"``
      (case-insensitive; ``"cifar-10"``, ``"tiny-imagenet"`` etc. also accepted).
    data_dir: directory holding the data. For CIFAR it may contain the
      extracted ``cifar-10-batches-py/`` / ``cifar-100-python/`` folder or the
      downloaded ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, or be
      the extracted folder itself; for Tiny-ImageNet it contains
      ``tiny-imagenet-200/`` (``num_classes`` is the number of entries in its
      ``wnids.txt``, 200 for the official data). If None, CIFAR is first tried through
      tensorflow-datasets (no download), then ``$SPARSEJAX_DATA_DIR``,
      ``~/.sparsejax/data`` and ``~/tensorflow_datasets`` are searched. Ignored
      for ``digits``, which ships with scikit-learn.
    train_subset: if given, keep only this many training examples, chosen
      deterministically and class-balanced (``train_subset // num_classes`` per
      class, the remainder spread one each over the lowest class ids; subsets
      of increasing size are nested). ``mean``/``std`` are still those of the
      full training split, so normalisation does not depend on the subset.

  Returns:
    The :class:`Dataset`.

  Raises:
    FileNotFoundError: the dataset was not found; the message lists every
      place that was looked at and how to provide the data.
    DatasetFormatError: a dataset file exists but is corrupt or incomplete; the
      message names the file.
    ValueError: unknown ``name`` or a ``train_subset`` outside ``[num_classes,
      max_train_subset(...)]``; the message names that range.
  """
  canonical = canonical_name(name)
  if canonical == "digits":
    splits, num_classes, augment_default = _load_digits(), 10, False
  elif canonical == "tiny_imagenet":
    splits, num_classes = _load_tiny_imagenet(data_dir)
    augment_default = True
  else:
    spec = _CIFAR[canonical]
    splits, num_classes, augment_default = _load_cifar(spec, data_dir), spec.num_classes, True

  train_x, train_y, test_x, test_y = (np.ascontiguousarray(a) for a in splits)
  for split, labels in (("train", train_y), ("test", test_y)):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise DatasetFormatError(f"{canonical} {split} labels outside [0, {num_classes})")
  train_y, test_y = train_y.astype(np.int32), test_y.astype(np.int32)
  mean, std = _channel_stats(train_x)
  if train_subset is not None:
    largest = max_train_subset(train_y, num_classes)
    if not num_classes <= train_subset <= largest:
      sizes = np.bincount(train_y, minlength=num_classes)
      smallest = int(np.argmin(sizes))
      raise ValueError(
        f"train_subset must lie in [{num_classes}, {largest}] for {canonical}, got "
        f"{train_subset}: the subset is class-balanced and class {smallest}, the "
        f"smallest, has {sizes[smallest]} of the {len(train_y)} training examples "
        "(None keeps them all)"
      )
    base, extra = divmod(train_subset, num_classes)
    counts = [base + (c < extra) for c in range(num_classes)]
    idx = _sample_per_class(train_y, counts, seed=0)
    train_x, train_y = train_x[idx], train_y[idx]
  return Dataset(
    name=canonical,
    num_classes=num_classes,
    train_images=train_x,
    train_labels=train_y,
    test_images=test_x,
    test_labels=test_y,
    mean=mean,
    std=std,
    augment=augment_default,
  )


def max_train_subset(labels: np.ndarray, num_classes: int) -> int:
  """The largest ``train_subset`` of :func:`load` that ``labels`` allow.

  The subset takes ``n // num_classes`` examples of every class and one more
  of each of the ``n % num_classes`` lowest class ids, so with ``m`` examples
  in the smallest class the largest is ``m * num_classes`` plus the number of
  leading classes (0, 1, ...) with more than ``m`` examples.
  """
  sizes = np.bincount(np.asarray(labels), minlength=num_classes)[:num_classes]
  m = int(sizes.min())
  above = sizes > m
  leading = int(np.argmin(above)) if not above.all() else num_classes
  return m * num_classes + leading


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of ``uint8 [N, H, W, C]`` in [0, 1] units."""
  flat = images.reshape(-1, images.shape[-1])
  total = np.zeros(flat.shape[1])
  total_sq = np.zeros(flat.shape[1])
  chunk = 1 << 20  # pixels per chunk: bounds the float64 temporary to 8 MB * C
  for start in range(0, flat.shape[0], chunk):
    block = flat[start : start + chunk].astype(np.float64)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  count = max(flat.shape[0], 1)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return tuple(float(m) / 255.0 for m in mean), tuple(float(s) / 255.0 for s in std)


def _search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
  """Directories searched on disk, in order, without duplicates."""
  if data_dir is not None:
    return [Path(data_dir).expanduser()]
  candidates = []
  if os.environ.get(DATA_DIR_ENV):
    candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
  candidates += [Path("~/.sparsejax/data").expanduser(), Path("~/tensorflow_datasets").expanduser()]
  roots: list[Path] = []
  for root in candidates:
    if root.absolute() not in [r.absolute() for r in roots]:
      roots.append(root)
  return roots


def _not_found(name: str, looked: list[str], how: list[str]) -> FileNotFoundError:
  lines = [f"Dataset {name!r} not found. Looked in:"]
  lines += [f"  - {place}" for place in looked]
  lines.append("To provide it:")
  lines += [f"  - {step}" for step in how]
  return FileNotFoundError("\n".join(lines))


# ---- digits ----------------------------------------------------------------------------

_DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


def _load_digits() -> _Splits:
  """scikit-learn's 8x8 digits as uint8 [N, 8, 8, 1], fixed stratified 1437/360 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  train_idx, test_idx = train_test_split(
    np.arange(len(labels)),
    test_size=_DIGITS_TEST_SIZE,
    stratify=labels,
    random_state=_DIGITS_SPLIT_SEED,
  )
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# ---- CIFAR -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CifarSpec:
  name: str
  num_classes: int
  folder: str  # extracted folder name inside the archive
  archive: str  # official download file name
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  label_key: bytes


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

_CIFAR = {
  "cifar10": _CifarSpec(
    "cifar10",
    10,
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    b"labels",
  ),
  "cifar100": _CifarSpec(
    "cifar100",
    100,
    "cifar-100-python",
    "cifar-100-python.tar.gz",
    ("train",),
    ("test",),
    b"fine_labels",
  ),
}


def _load_cifar(spec: _CifarSpec, data_dir: str | os.PathLike | None) -> _Splits:
  looked = []
  if data_dir is None:
    splits, reason = _load_tfds(spec.name)
    if splits is not None:
      return splits
    looked.append(f"tensorflow-datasets {spec.name!r} (its default data_dir): {reason}")
  for root in _search_roots(data_dir):
    folders = [root / spec.folder]
    if root.name == spec.folder:
      folders.insert(0, root)
    for folder in folders:
      if folder.is_dir():
        return _read_cifar_folder(spec, folder)
      looked.append(f"{folder}/ (not found)")
    archive = root / spec.archive
    if archive.is_file():
      return _read_cifar_archive(spec, archive)
    looked.append(f"{archive} (not found)")
  how = [
    f"download {_CIFAR_URL}{spec.archive} and put it (or the {spec.folder}/ folder "
    f"it contains) in DATA_DIR; then call load({spec.name!r}, data_dir=DATA_DIR) or "
    f"set {DATA_DIR_ENV}=DATA_DIR",
    f"or install tensorflow and run tensorflow_datasets.builder({spec.name!r})"
    ".download_and_prepare()",
  ]
  if spec.name == "cifar10":
    how.append(
      "offline: `python make_cifar10_batches.py DATA_DIR` (next to "
      "cifar10-jpeg.tar.gz in the shared data folder) writes "
      "DATA_DIR/cifar-10-batches-py/"
    )
  raise _not_found(spec.name, looked, how)


def _import_tfds():
  """Imports tensorflow_datasets, failing fast when tensorflow itself is absent."""
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError("tensorflow is not installed")
  import tensorflow_datasets as tfds

  return tfds


def _load_tfds(name: str) -> tuple[_Splits | None, str]:
  """Returns ``(splits, "")`` from prepared tfds data, or ``(None, reason)``."""
  try:
    tfds = _import_tfds()
    train, test = tfds.as_numpy(
      tfds.load(name, split=["train", "test"], batch_size=-1, download=False)
    )
  # tfds reports missing data and missing backends with assorted exception types
  # (ImportError, AssertionError, DatasetNotFoundError, ...); all mean "not here".
  except Exception as e:  # noqa: BLE001
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return None, f"{type(e).__name__}: {first_line}"
  return (
    np.asarray(train["image"], np.uint8),
    np.asarray(train["label"]),
    np.asarray(test["image"], np.uint8),
    np.asarray(test["label"]),
  ), ""


def _read_cifar_folder(spec: _CifarSpec, folder: Path) -> _Splits:
  def read(files):
    parts = []
    for file in files:
      path = folder / file
      if not path.is_file():
        raise DatasetFormatError(f"incomplete {spec.name} folder {folder}: missing {file}")
      with open(path, "rb") as f:
        parts.append(_parse_cifar_batch(f, str(path), spec))
    return _concat(parts)

  return (*read(spec.train_files), *read(spec.test_files))


def _read_cifar_archive(spec: _CifarSpec, archive: Path) -> _Splits:
  wanted = {f"{spec.folder}/{file}": file for file in spec.train_files + spec.test_files}
  parsed = {}
  try:
    # Stream mode reads the gzip once, in archive order, without seeking back.
    with tarfile.open(archive, "r|*") as tar:
      for member in tar:
        file = wanted.get(posixpath.normpath(member.name))
        if file is not None and member.isfile():
          source = f"{archive}:{member.name}"
          blob = io.BytesIO(tar.extractfile(member).read())
          parsed[file] = _parse_cifar_batch(blob, source, spec)
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DatasetFormatError(f"corrupt {spec.name} archive {archive}: {e}") from e
  missing = sorted(set(wanted.values()) - set(parsed))
  if missing:
    raise DatasetFormatError(
      f"incomplete {spec.name} archive {archive}: missing "
      + ", ".join(f"{spec.folder}/{m}" for m in missing)
    )
  train = _concat([parsed[f] for f in spec.train_files])
  test = _concat([parsed[f] for f in spec.test_files])
  return (*train, *test)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that only builds numpy arrays, so a batch file cannot run code.

  The official batches (Python 2 cPickle) and those re-pickled by numpy >= 2 at
  protocols 2-5 reference only these globals.
  """

  _ALLOWED = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
  }

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _parse_cifar_batch(f: BinaryIO, source: str, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one pickled batch into ``(uint8 [N, 32, 32, 3], int64 [N])``."""
  try:
    batch = _CifarUnpickler(f, encoding="bytes").load()
  # A damaged pickle can fail with almost any exception type (UnpicklingError,
  # EOFError, ValueError, KeyError, ...); all of them mean "this file is corrupt".
  except Exception as e:  # noqa: BLE001
    raise DatasetFormatError(f"corrupt {spec.name} batch file {source}: {e!r}") from e
  if not isinstance(batch, dict):
    raise DatasetFormatError(
      f"corrupt {spec.name} batch file {source}: expected a dict, got {type(batch).__name__}"
    )
  batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
  if b"data" not in batch or spec.label_key not in batch:
    raise DatasetFormatError(
      f"corrupt {spec.name} batch file {source}: needs keys "
      f"b'data' and {spec.label_key!r}, has {sorted(batch)}"
    )
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[spec.label_key])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DatasetFormatError(
      f"corrupt {spec.name} batch file {source}: b'data' must be "
      f"uint8 [N, 3072], got {data.dtype} {data.shape}"
    )
  if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise DatasetFormatError(
      f"corrupt {spec.name} batch file {source}: "
      f"{spec.label_key!r} must hold {data.shape[0]} integers"
    )
  # Each row holds the 1024-pixel R plane, then G, then B, each row-major.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int64)


# ---- Tiny-ImageNet ---------------------------------------------------------------------

_TINY_FOLDER = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _load_tiny_imagenet(data_dir: str | os.PathLike | None) -> tuple[_Splits, int]:
  """Returns the splits and the number of classes (200 for the official data)."""
  looked = []
  for root in _search_roots(data_dir):
    folders = [root / _TINY_FOLDER]
    if root.name == _TINY_FOLDER:
      folders.insert(0, root)
    for folder in folders:
      if folder.is_dir():
        return _read_tiny_imagenet(folder)
      looked.append(f"{folder}/ (not found)")
  how = [
    f"download {_TINY_URL} and unzip it into DATA_DIR (giving "
    f"DATA_DIR/{_TINY_FOLDER}/); then call load('tiny_imagenet', data_dir=DATA_DIR) "
    f"or set {DATA_DIR_ENV}=DATA_DIR"
  ]
  raise _not_found("tiny_imagenet", looked, how)


def _read_tiny_imagenet(folder: Path) -> tuple[_Splits, int]:
  """Reads the official layout; labels follow the order of ``wnids.txt``."""
  wnids_file = folder / "wnids.txt"
  annotations = folder / "val" / "val_annotations.txt"
  for required in (wnids_file, annotations):
    if not required.is_file():
      raise DatasetFormatError(
        f"incomplete Tiny-ImageNet folder {folder}: missing {required.relative_to(folder)}"
      )
  wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
  class_of = {wnid: i for i, wnid in enumerate(wnids)}

  train_paths, train_labels = [], []
  for wnid in wnids:
    image_dir = folder / "train" / wnid / "images"
    if not image_dir.is_dir():
      raise DatasetFormatError(
        f"incomplete Tiny-ImageNet folder {folder}: missing train/{wnid}/images/"
      )
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    train_paths += files
    train_labels += [class_of[wnid]] * len(files)

  test_paths, test_labels = [], []
  for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 2 or fields[1] not in class_of:
      raise DatasetFormatError(
        f"{annotations}, line {line_no}: expected "
        f"'<file>\\t<wnid from wnids.txt>\\t...', got {line!r}"
      )
    test_paths.append(folder / "val" / "images" / fields[0])
    test_labels.append(class_of[fields[1]])

  if not train_paths:
    raise DatasetFormatError(f"Tiny-ImageNet folder {folder} has no training images")
  train_x = _decode_images(train_paths)
  test_x = _decode_images(test_paths, shape=train_x.shape[1:])
  splits = (train_x, np.asarray(train_labels, np.int64), test_x, np.asarray(test_labels, np.int64))
  return splits, len(wnids)


def _decode_images(paths: Sequence[Path], shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Decodes image files to RGB ``uint8 [N, H, W, 3]``.

  All images must have ``shape`` (default: the shape of the first one).
  """
  from PIL import Image
  from PIL import UnidentifiedImageError

  out = np.zeros((len(paths), *shape), np.uint8) if shape is not None else None
  for i, path in enumerate(paths):
    try:
      with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
      raise DatasetFormatError(f"cannot read image {path}: {e}") from e
    if out is None:
      out = np.empty((len(paths), *pixels.shape), np.uint8)
    if pixels.shape != out.shape[1:]:
      raise DatasetFormatError(f"image {path} has shape {pixels.shape}, expected {out.shape[1:]}")
    out[i] = pixels
  return out


# --------------------------------------------------------------------------------------
# Class-balanced selection
# --------------------------------------------------------------------------------------


def _sample_per_class(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
  """Sorted indices with ``counts[c]`` examples of class ``c`` (classes 0..len-1)."""
  chosen = []
  for c, k in enumerate(counts):
    members = np.flatnonzero(labels == c)
    if members.size < k:
      raise ValueError(f"class {c} has {members.size} examples, fewer than the {k} requested")
    # One generator per class: the choice for class c does not depend on the
    # other classes, and larger k extends the same permutation (nested subsets).
    chosen.append(np.random.default_rng([seed, c]).permutation(members)[:k])
  return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def class_balanced_indices(
  labels: np.ndarray, k: int, seed: int, *, num_classes: int | None = None
) -> np.ndarray:
  """Indices of ``k`` examples of every class, deterministic in ``seed``.

  Args:
    labels: ``int [N]`` class labels.
    k: examples per class (>= 1).
    seed: selection seed; the same ``(labels, k, seed)`` always gives the
      same indices, and for a fixed seed a larger ``k`` is a superset.
    num_classes: if given, classes are ``0..num_classes-1`` (a class with no
      examples is an error); otherwise the distinct values in ``labels``.

  Returns:
    ``int64 [num_classes * k]`` indices into ``labels``, sorted ascending.

  Raises:
    ValueError: some class has fewer than ``k`` examples, or ``k < 1``.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  classes = np.arange(num_classes) if num_classes is not None else np.unique(labels)
  # Remap to 0..len(classes)-1 so that _sample_per_class seeds by class position.
  remapped = np.full(labels.shape, -1, np.int64)
  for i, c in enumerate(classes):
    remapped[labels == c] = i
  try:
    return _sample_per_class(remapped, [k] * len(classes), seed)
  except ValueError as e:
    raise ValueError(f"cannot take {k} examples per class: {e}") from None


def class_balanced_batch(ds: Dataset, k: int = 10, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """A normalised, class-balanced batch of training examples (e.g. for pruning scores).

  Args:
    ds: the dataset.
    k: examples per class (default 10).
    seed: selection seed (see :func:`class_balanced_indices`).

  Returns:
    ``(images float32 [num_classes * k, H, W, C], labels int32 [num_classes * k])``,
    images normalised with ``ds.mean``/``ds.std`` and not augmented, in index order.
  """
  idx = class_balanced_indices(ds.train_labels, k, seed, num_classes=ds.num_classes)
  return normalize(ds.train_images[idx], ds.mean, ds.std), jnp.asarray(ds.train_labels[idx])


# --------------------------------------------------------------------------------------
# On-device pipeline (pure, jit-compatible)
# --------------------------------------------------------------------------------------


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Maps ``uint8`` pixels to ``float32`` ``(x / 255 - mean) / std``.

  Args:
    images: ``uint8 [..., C]`` (typically ``[B, H, W, C]``).
    mean: ``C`` per-channel means in [0, 1] units (e.g. ``Dataset.mean``).
    std: ``C`` per-channel standard deviations in [0, 1] units.

  Returns:
    ``float32`` array of the same shape.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
  """Per-example random crop with zero padding and random horizontal flip.

  Each image is zero-padded by ``pad`` pixels on every side and an ``H x W``
  window is cut at an offset drawn uniformly from ``{0..2*pad}^2``; then, if
  ``flip``, the window is mirrored left-right with probability 1/2. All draws
  are independent per example. Vectorised and jit-compatible (``pad`` and
  ``flip`` are Python values, static under jit).

  Args:
    key: PRNG key (new-style or legacy ``uint32[2]``).
    images: ``[B, H, W, C]``, any dtype (normally ``uint8``).
    pad: padding / maximum shift in pixels (default 4, the CIFAR standard).
    flip: whether to apply random horizontal flips (default True).

  Returns:
    Augmented images, same shape and dtype as ``images``.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  out = images
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    crop = lambda image, off: jax.lax.dynamic_slice(  # noqa: E731
      image, (off[0], off[1], 0), (height, width, channels)
    )
    out = jax.vmap(crop)(padded, offsets)
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
    out = jnp.where(mirrored[:, None, None, None], out[:, :, ::-1, :], out)
  return out


def epoch_permutation(seed: int | jax.Array, epoch: int | jax.Array, n: int) -> jax.Array:
  """The shuffling order of epoch ``epoch``: a permutation of ``0..n-1``.

  A pure function of ``(seed, epoch)``: ``permutation(fold_in(key(seed), epoch), n)``.
  ``seed`` and ``epoch`` may be traced; ``n`` must be static.

  Returns:
    ``int32 [n]``.
  """
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, n).astype(jnp.int32)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches of ``batch_size`` in ``n`` examples.

  With ``drop_remainder`` (default) a final partial batch is not counted
  (``n // batch_size``); otherwise it is (``ceil(n / batch_size)``).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def batch_indices(perm: jax.Array, step_in_epoch: int | jax.Array, batch_size: int) -> jax.Array:
  """Example indices of batch ``step_in_epoch``: ``perm[step*bs : (step+1)*bs]``.

  Uses ``dynamic_slice`` so ``step_in_epoch`` may be traced; ``batch_size`` must
  be static. Valid for ``step_in_epoch < num_batches(len(perm), batch_size)``
  (beyond that ``dynamic_slice`` clamps the start to the last full window).

  Returns:
    ``[batch_size]`` indices, dtype of ``perm``.
  """
  return jax.lax.dynamic_slice_in_dim(perm, step_in_epoch * batch_size, batch_size)


class EvalBatch(NamedTuple):
  """One fixed-size evaluation batch; rows where ``mask`` is False are padding."""

  images: np.ndarray  # [batch_size, H, W, C], dtype of the input images
  labels: np.ndarray  # [batch_size], dtype of the input labels
  mask: np.ndarray  # bool [batch_size]


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[EvalBatch]:
  """Host-side iterator over ``ceil(N / batch_size)`` fixed-size batches in order.

  The last batch is padded with zero images and zero labels to ``batch_size``;
  ``mask`` marks the real rows, so every example is counted exactly once and an
  eval step sees a single shape (one compilation).

  Args:
    images: ``[N, H, W, C]`` host array.
    labels: ``[N]`` host array.
    batch_size: rows per batch (>= 1).

  Yields:
    :class:`EvalBatch` ``(images [batch_size, H, W, C], labels [batch_size],
    mask bool [batch_size])``.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, len(images), batch_size):
    x, y = images[start : start + batch_size], labels[start : start + batch_size]
    valid = len(x)
    if valid < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - valid, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((batch_size - valid, *y.shape[1:]), y.dtype)])
    yield EvalBatch(x, y, np.arange(batch_size) < valid)
