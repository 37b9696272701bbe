"""Compressed sparse model files: kept values plus a bit-packed mask.

A trained sparse model stored densely (an Orbax checkpoint, ``np.save``) costs
as much disk as the dense model. :func:`save` writes each masked leaf as its
kept values and its mask packed 8 entries to a byte (``np.packbits``), every
other leaf as it is, so a float32 layer at sparsity ``s`` costs
``n / 8 + 4 (1 - s) n`` bytes instead of ``4 n`` (at 99%: 4.1% of dense, the
mask bits being three quarters of it). :func:`load` gives the saved arrays back
bitwise, and the mask.

File layout (format version 1, all integers little-endian)::

  b"SJSPARSE"              8 bytes, the magic
  format version           uint32
  header length H          uint64
  header                   H bytes of UTF-8 JSON: format_version, compression,
                           payload_nbytes, metadata, and per leaf in flattening
                           order: path, shape, dtype, kind ("sparse" | "dense"),
                           kept, offset and nbytes in the payload
  payload                  per leaf: sparse = packbits(mask) then the kept
                           values in flat order; dense = the raw values
                           (zlib-compressed as a whole with compression="zlib")
  sha256                   32 bytes, of everything before it

Format version 2 is version 1 plus a ``condensed`` header entry: the
*condensed* files of :func:`save_condensed` (constant fan-in layers of
:mod:`sparsejax.condensed` as their values, indices and units, each stored
dense under ``<kernel path>/values`` etc.; the entry maps every kernel path to
its dense shape). :func:`save` still writes version 1 files; :func:`load`
refuses a condensed file (read it with :func:`load_condensed`).

A truncated or corrupted file fails the sha256 check and :func:`load` raises
:class:`SparseFileError` naming the file; it never returns a wrong model.
Files are written atomically (a temporary file in the same directory, then
``os.replace``), so an interrupted save leaves any previous file intact; a
path on an object store (``gs://...``, any ``etils.epath`` location) is
written as one object, which appears only once complete.

Works on any params pytree (Flax linen ``variables``, Flax NNX ``State``,
plain dicts); leaves are read with ``np.asarray`` (``jax.Array`` on any
device, numpy). Example::

  info = sparse_io.save("model.sparse", variables, mask=None)   # nonzeros
  print(info)   # 0.27 MB, 4.4% of the 6.1 MB dense arrays
  variables2, mask = sparse_io.load("model.sparse", target=variables)
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import json
import os
import struct
import sys
import tempfile
from typing import Any
import zlib

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import _paths
from sparsejax import masks

PyTree = Any

MAGIC = b"SJSPARSE"
FORMAT_VERSION = 2
"""The newest format version read (plain files are written as version 1,
condensed files as version 2)."""
_PLAIN_VERSION = 1
COMPRESSIONS = ("none", "zlib")
_PREFIX = struct.Struct("<8sIQ")  # magic, format version, header length
_DIGEST = 32  # sha256


class SparseFileError(ValueError):
  """A file that is not a readable sparse model file (wrong magic, newer
  format, truncated or corrupted, or not matching the target)."""


@dataclasses.dataclass(frozen=True)
class FileInfo:
  """Sizes of a sparse model file.

  Attributes:
    path: the file.
    nbytes: size of the file in bytes (header and checksum included).
    dense_nbytes: bytes of the same arrays stored densely (``Σ leaf.nbytes``).
    kept: kept entries of the leaves stored sparse.
    total: all entries of the leaves stored sparse.
    header_nbytes: bytes of the prefix, header and checksum.
  """

  path: str
  nbytes: int
  dense_nbytes: int
  kept: int
  total: int
  header_nbytes: int

  @property
  def ratio(self) -> float:
    """``nbytes / dense_nbytes``."""
    return self.nbytes / self.dense_nbytes if self.dense_nbytes else float("nan")

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "ratio": self.ratio}

  def __str__(self) -> str:
    return (
      f"{self.path}: {self.nbytes / 1e6:.3f} MB, {100 * self.ratio:.1f}% of "
      f"the {self.dense_nbytes / 1e6:.3f} MB dense arrays "
      f"({self.kept} of {self.total} masked entries kept)"
    )


def _check_little_endian() -> None:
  if sys.byteorder != "little":
    raise SparseFileError(
      "sparse model files are little-endian; this host is "
      f"{sys.byteorder}-endian, which sparse_io does not support"
    )


def _bits(a: np.ndarray) -> np.ndarray:
  """The array's bit patterns as unsigned integers of its item size."""
  return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def _dtype(name: str) -> np.dtype:
  try:
    return np.dtype(jnp.dtype(name))  # knows bfloat16 & co. (ml_dtypes)
  except TypeError as e:
    raise SparseFileError(f"unknown dtype {name!r} in the header") from e


def _named_arrays(tree: PyTree, what: str) -> list[tuple[str, np.ndarray]]:
  named = [(p, np.asarray(jax.device_get(x))) for p, x in masks.named_leaves(tree)]
  seen = set()
  for p, _ in named:
    if p in seen:
      raise ValueError(
        f"two leaves of the {what} have the path {p!r}; sparse files name leaves by path"
      )
    seen.add(p)
  return named


def _leaf_dtype(x) -> np.dtype:
  """The leaf's own dtype (numpy float64 stays float64 without x64)."""
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.dtype(jnp.result_type(x))


def dense_nbytes(tree: PyTree) -> int:
  """``Σ leaf.nbytes``: the bytes of ``tree``'s arrays stored densely."""
  return sum(int(np.prod(jnp.shape(x))) * _leaf_dtype(x).itemsize for x in jax.tree.leaves(tree))


def full_mask(tree: PyTree, mask: PyTree | None) -> PyTree | None:
  """``mask`` for the whole ``tree``: a mask of ``tree["params"]`` alone is
  extended with all-``True`` masks of the other collections (``batch_stats``).

  A mask with the structure of ``tree`` (or ``None``) is returned unchanged.
  """
  if (
    mask is None
    or not isinstance(tree, Mapping)
    or "params" not in tree
    or jax.tree.structure(mask) == jax.tree.structure(tree)
    or jax.tree.structure(mask) != jax.tree.structure(tree["params"])
  ):
    return mask
  return {k: (mask if k == "params" else masks.ones_like(v)) for k, v in tree.items()}


def encode(
  tree: PyTree,
  mask: PyTree | None = None,
  *,
  prunable=None,
  metadata: Mapping[str, Any] | None = None,
  compression: str = "none",
  _condensed: Mapping[str, Any] | None = None,
) -> tuple[bytes, FileInfo]:
  """The bytes of the sparse model file of ``tree`` (see :func:`save`)."""
  _check_little_endian()
  if compression not in COMPRESSIONS:
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
  named = _named_arrays(tree, "tree")
  mask = full_mask(tree, mask)
  if mask is not None:
    masks.check_mask(mask, tree)
    mask_leaves = [np.asarray(jax.device_get(m)) for m in jax.tree.leaves(mask)]
  else:
    flags = jax.tree.leaves(masks.prunable_tree(tree, prunable))
    mask_leaves = [(_bits(a) != 0) if f else None for (_, a), f in zip(named, flags)]
  leaves, chunks, offset, kept, total = [], [], 0, 0, 0
  for (path, a), m in zip(named, mask_leaves):
    entry = {"path": path, "shape": list(a.shape), "dtype": a.dtype.name}
    if m is None or bool(m.all()):
      data = [np.ascontiguousarray(a).tobytes()]
      entry.update(kind="dense", kept=int(a.size))
    else:
      outside = (_bits(a) != 0) & ~m
      if outside.any():
        raise ValueError(
          f"leaf {path!r} has {int(outside.sum())} nonzero entries where the "
          "mask prunes; they would load back as 0. Apply the mask first "
          "(sparsejax.masks.apply(params, mask)) or pass mask=None to keep "
          "every nonzero"
        )
      flat = m.ravel()
      data = [np.packbits(flat).tobytes(), np.ascontiguousarray(a).ravel()[flat].tobytes()]
      entry.update(kind="sparse", kept=int(flat.sum()))
      kept += entry["kept"]
      total += int(a.size)
    nbytes = sum(len(d) for d in data)
    entry.update(offset=offset, nbytes=nbytes)
    offset += nbytes
    leaves.append(entry)
    chunks += data
  payload = b"".join(chunks)
  stored = zlib.compress(payload, 9) if compression == "zlib" else payload
  version = _PLAIN_VERSION if _condensed is None else FORMAT_VERSION
  fields = {
    "format_version": version,
    "compression": compression,
    "payload_nbytes": len(payload),
    "stored_nbytes": len(stored),
    "metadata": dict(metadata or {}),
    "leaves": leaves,
  }
  if _condensed is not None:
    fields["condensed"] = dict(_condensed)
  header = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
  body = _PREFIX.pack(MAGIC, version, len(header)) + header + stored
  blob = body + hashlib.sha256(body).digest()
  info = FileInfo(
    path="",
    nbytes=len(blob),
    dense_nbytes=dense_nbytes(tree),
    kept=kept,
    total=total,
    header_nbytes=_PREFIX.size + len(header) + _DIGEST,
  )
  return blob, info


def save(
  path: str | os.PathLike,
  tree: PyTree,
  mask: PyTree | None = None,
  *,
  prunable=None,
  metadata: Mapping[str, Any] | None = None,
  compression: str = "none",
) -> FileInfo:
  """Writes ``tree`` as a compressed sparse model file, atomically.

  Leaves stored sparse (kept values + bit-packed mask):

  * with ``mask``: every leaf whose mask is not all ``True``. The pruned
    entries must be exactly zero (all bits, so ``-0.0`` counts as nonzero):
    the file could not restore anything else, so nonzero pruned entries raise
    instead of being lost.
  * without ``mask`` (default): every ``prunable`` leaf with a zero entry;
    its mask is its nonzero entries (by bit pattern, so ``-0.0`` is kept and
    loads back as ``-0.0``).

  Every other leaf (biases, batch-norm statistics, all-True masks) is stored
  densely.

  Args:
    path: the file to write (replaced atomically if it exists).
    tree: any pytree of arrays, e.g. ``{"params": ..., "batch_stats": ...}``
      or an NNX ``State``; leaves of any dtype, on any device.
    mask: optional bool pytree parallel to ``tree``, or, for a variables
      dict ``{"params": ..., "batch_stats": ...}``, parallel to its
      ``"params"`` alone (e.g. ``TrainState.mask``): the other collections
      are then stored dense.
    prunable: without ``mask``, which leaves may be stored sparse; see
      :func:`sparsejax.masks.prunable_tree` (default: ``ndim > 1``).
    metadata: JSON-serialisable dict stored in the header (e.g. the model
      name), returned by :func:`read_header`.
    compression: ``"none"`` (default; the size is exactly
      ``Σ sparse (⌈n/8⌉ + kept · itemsize) + Σ dense nbytes`` plus the header)
      or ``"zlib"`` (the payload deflated; smaller at high sparsity, where the
      mask bits are mostly zero).

  Returns:
    The :class:`FileInfo` (size against the dense arrays).

  Raises:
    ValueError: a mask that does not fit ``tree``, nonzero pruned entries, two
      leaves with the same path, metadata that is not JSON.
  """
  blob, info = encode(tree, mask, prunable=prunable, metadata=metadata, compression=compression)
  return _write(path, blob, info)


def _write(path: str | os.PathLike, blob: bytes, info: FileInfo) -> FileInfo:
  """Writes ``blob`` to ``path`` atomically (one object on an object store)."""
  path = os.fspath(path)
  if _paths.is_uri(path):
    # An object store (gs://...) makes an object visible only once it is
    # written whole: write it directly.
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(blob)
    return dataclasses.replace(info, path=path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return dataclasses.replace(info, path=path)


def _read(path: str | os.PathLike) -> tuple[dict, bytes]:
  """``(header, stored payload)`` of a verified file."""
  path = os.fspath(path)
  blob = epath.Path(path).read_bytes()
  return decode_header(blob, path)


def decode_header(blob: bytes, name: str = "<bytes>") -> tuple[dict, bytes]:
  """Verifies ``blob`` (magic, version, sha256) and splits it into
  ``(header, stored payload)``; raises :class:`SparseFileError`."""
  _check_little_endian()
  if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
    raise SparseFileError(f"{name} is not a sparsejax sparse model file (no {MAGIC!r} magic)")
  if len(blob) < _PREFIX.size + _DIGEST:
    raise SparseFileError(
      f"{name} is truncated: {len(blob)} bytes, shorter than an empty sparse model file"
    )
  _, version, header_len = _PREFIX.unpack_from(blob)
  if version > FORMAT_VERSION:
    raise SparseFileError(
      f"{name} has format version {version}; this sparsejax "
      f"reads versions up to {FORMAT_VERSION} (upgrade sparsejax)"
    )
  body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
  if hashlib.sha256(body).digest() != digest:
    raise SparseFileError(
      f"{name} is corrupted or truncated ({len(blob)} bytes): its sha256 "
      "checksum does not match; refusing to load it"
    )
  end = _PREFIX.size + header_len
  header = json.loads(body[_PREFIX.size : end].decode("utf-8"))
  return header, body[end:]


def read_header(path: str | os.PathLike) -> dict:
  """The verified header of a sparse model file (paths, shapes, dtypes, kinds,
  sizes, metadata); raises :class:`SparseFileError` like :func:`load`."""
  return _read(path)[0]


def _nest(items: list[tuple[str, Any]]) -> dict:
  out: dict = {}
  for path, value in items:
    node = out
    *parents, last = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[last] = value
  return out


def decode(
  blob: bytes, target: PyTree | None = None, name: str = "<bytes>"
) -> tuple[PyTree, PyTree]:
  """``(tree, mask)`` of the bytes of a sparse model file (see :func:`load`)."""
  header, stored = decode_header(blob, name)
  if "condensed" in header:
    raise SparseFileError(
      f"{name} is a condensed model file (format version 2, "
      "constant fan-in layers); read it with "
      "sparse_io.load_condensed"
    )
  return _decode_payload(header, stored, target, name)


def _decode_payload(
  header: dict, stored: bytes, target: PyTree | None, name: str
) -> tuple[PyTree, PyTree]:
  payload = zlib.decompress(stored) if header["compression"] == "zlib" else stored
  if len(payload) != header["payload_nbytes"]:
    raise SparseFileError(
      f"{name}: payload is {len(payload)} bytes, the header says {header['payload_nbytes']}"
    )
  arrays, mask_leaves = [], []
  for entry in header["leaves"]:
    dtype, shape = _dtype(entry["dtype"]), tuple(entry["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    chunk = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
    if entry["kind"] == "dense":
      a = np.frombuffer(chunk, dtype, count=size).reshape(shape).copy()
      m = np.ones(shape, bool)
    else:
      nbits = (size + 7) // 8
      m = np.unpackbits(np.frombuffer(chunk[:nbits], np.uint8), count=size).astype(bool)
      values = np.frombuffer(chunk[nbits:], dtype, count=entry["kept"])
      a = np.zeros(size, dtype)
      a[m] = values
      a, m = a.reshape(shape), m.reshape(shape)
    arrays.append((entry["path"], a))
    mask_leaves.append((entry["path"], m))
  if target is None:
    return _nest(arrays), _nest(mask_leaves)
  by_path, mask_by_path = dict(arrays), dict(mask_leaves)
  target_named = masks.named_leaves(target)
  missing = [p for p, _ in target_named if p not in by_path]
  extra = [p for p in by_path if p not in {q for q, _ in target_named}]
  if missing or extra:
    raise SparseFileError(
      f"{name} does not match the target: paths only in the target "
      f"{missing[:5]}, only in the file {extra[:5]}"
    )
  for p, x in target_named:
    want = (tuple(jnp.shape(x)), _leaf_dtype(x))
    got = (by_path[p].shape, by_path[p].dtype)
    if want != got:
      raise SparseFileError(
        f"{name}: leaf {p!r} is {got[0]} {got[1]} in the file but {want[0]} {want[1]} in the target"
      )
  treedef = jax.tree.structure(target)
  return (
    jax.tree.unflatten(treedef, [by_path[p] for p, _ in target_named]),
    jax.tree.unflatten(treedef, [mask_by_path[p] for p, _ in target_named]),
  )


def load(path: str | os.PathLike, target: PyTree | None = None) -> tuple[PyTree, PyTree]:
  """Reads a sparse model file; the arrays come back bitwise as saved.

  Args:
    path: a file written by :func:`save`.
    target: optional pytree giving the structure to return (e.g. the
      ``variables`` of ``model.init``, an NNX ``State``, or
      ``jax.ShapeDtypeStruct`` leaves); its paths, shapes and dtypes must
      match the file. Without it the result is nested dicts keyed by the
      path components (list indices become string keys).

  Returns:
    ``(tree, mask)``: numpy arrays (bitwise the saved values; pruned entries
    ``+0``) and the bool mask (the saved mask; all ``True`` for dense
    leaves), both in ``target``'s structure.

  Raises:
    SparseFileError: not a sparse model file, a newer format version, a
      truncated or corrupted file (sha256 mismatch), or a file that does not
      match ``target`` (naming the paths).
  """
  path = os.fspath(path)
  blob = epath.Path(path).read_bytes()
  return decode(blob, target, path)


# ----------------------------------------------------------------------------
# Condensed files (constant fan-in layers, sparsejax.condensed)
# ----------------------------------------------------------------------------

_CONDENSED_FIELDS = ("values", "indices", "units")


def save_condensed(
  path: str | os.PathLike,
  variables: PyTree,
  *,
  metadata: Mapping[str, Any] | None = None,
  compression: str = "none",
) -> FileInfo:
  """Writes condensed ``variables`` (from :func:`sparsejax.condensed.condense`), atomically.

  Every :class:`sparsejax.condensed.CondensedKernel` is stored as its
  ``values`` ``[rows, k]``, ``indices`` ``[rows, k]`` (``uint16`` or
  ``int32``) and ``units`` ``[rows]``, each densely under ``<path>/values``
  etc., with its dense shape in the header's ``condensed`` entry (format
  version 2, see the module doc); every other leaf densely. So a float32
  layer of ``n`` entries at constant fan-in density ``d`` costs about
  ``6 d n`` bytes (``4 d n`` values, ``2 d n`` uint16 indices) instead of
  ``4 n``. :func:`load_condensed` gives every array back bitwise.

  Args:
    path: the file to write (replaced atomically if it exists).
    variables: the condensed variables (any pytree of arrays and condensed kernels).
    metadata: JSON-serialisable dict stored in the header.
    compression: ``"none"`` (default) or ``"zlib"``.

  Returns:
    The :class:`FileInfo`; its ``dense_nbytes`` counts every condensed kernel
    at its dense size (the uncondensed model's arrays).

  Example::

    cvars = condensed.condense(model, variables, mask, x[:1])
    sparse_io.save_condensed("model.condensed", cvars)
    cvars2 = sparse_io.load_condensed("model.condensed")
  """
  # Imported here: sparse_io itself needs no flax.
  from sparsejax import condensed  # pylint: disable=g-import-not-at-top

  leaves, _ = jax.tree_util.tree_flatten_with_path(variables, is_leaf=condensed._is_condensed)  # pylint: disable=protected-access
  flat, info, dense = {}, {}, 0
  for keypath, leaf in leaves:
    name = masks.path_str(keypath)
    if condensed._is_condensed(leaf):  # pylint: disable=protected-access
      info[name] = {"shape": list(leaf.shape)}
      dense += int(np.prod(leaf.shape)) * np.dtype(leaf.values.dtype).itemsize
      for field in _CONDENSED_FIELDS:
        flat[f"{name}/{field}"] = np.asarray(jax.device_get(getattr(leaf, field)))
    else:
      flat[name] = np.asarray(jax.device_get(leaf))
      dense += flat[name].nbytes
  tree = _nest(list(flat.items()))
  blob, file_info = encode(
    tree,
    None,
    prunable=lambda p, x: False,
    metadata=metadata,
    compression=compression,
    _condensed=info,
  )
  return _write(path, blob, dataclasses.replace(file_info, dense_nbytes=dense))


def load_condensed(path: str | os.PathLike) -> dict:
  """Reads a file of :func:`save_condensed`: the condensed variables, bitwise.

  Returns:
    Nested dicts (keyed by the path components) of numpy arrays, with every
    condensed kernel a :class:`sparsejax.condensed.CondensedKernel` (of
    ``jax.Array`` fields), ready for :func:`sparsejax.condensed.apply`.

  Raises:
    SparseFileError: as :func:`load`; a version 1 file (no condensed layers)
      loads as its plain arrays.
  """
  from sparsejax import condensed  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  header, stored = decode_header(epath.Path(path).read_bytes(), path)
  tree, _ = _decode_payload(header, stored, None, path)
  for name, entry in header.get("condensed", {}).items():
    *parents, last = name.split("/")
    node = tree
    for key in parents:
      node = node[key]
    fields = node[last]
    if sorted(fields) != sorted(_CONDENSED_FIELDS):
      raise SparseFileError(
        f"{path}: condensed layer {name!r} has the arrays "
        f"{sorted(fields)}, expected {list(_CONDENSED_FIELDS)}"
      )
    node[last] = condensed.CondensedKernel(
      *(jnp.asarray(fields[f]) for f in _CONDENSED_FIELDS), shape=tuple(entry["shape"])
    )
  return tree
