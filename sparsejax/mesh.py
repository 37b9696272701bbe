"""The data-parallel mesh and the placement of arrays on it.

Every training function takes a :class:`jax.sharding.Mesh` with one axis named
:data:`DATA_AXIS` (``"data"``, :func:`make_mesh`): batches are sharded along
it (:func:`batch_sharding`, :func:`put_batch`), the train state and the
device-resident datasets are replicated (:func:`replicated`,
:func:`put_replicated`). The same code runs on one device (a mesh of one) and
on N devices; XLA inserts the gradient all-reduce.

Multi-host: build the mesh over ``jax.devices()`` (all processes' devices)
after ``jax.distributed.initialize()``. Every process passes the same host
data; :func:`put_replicated` and :func:`put_batch` assemble global arrays with
``jax.make_array_from_callback``, which hands each of this process's devices
the rows its shard holds wherever that device sits in the mesh (on a TPU pod
``jax.make_mesh`` orders devices by their torus position, so one process's
devices need not hold one contiguous block of the batch).
:func:`assert_same_across_processes` checks that the processes really hold the
same data.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import hashlib
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

PyTree = Any

#: Name of the mesh axis along which batches are sharded.
DATA_AXIS = "data"


def choose_devices(devices: Sequence[Any], num_devices: int) -> list[Any]:
  """``num_devices`` of ``devices``, the same number from every process.

  On one process: the first ``num_devices``. On several (devices with
  different ``process_index``): the first ``num_devices / P`` devices of each
  of the ``P`` processes, in the order of ``devices``, so that no process is
  left without a device of the mesh (it could not feed its data in).

  Args:
    devices: candidate devices (anything with a ``process_index``).
    num_devices: how many to take, in ``[1, len(devices)]``.

  Returns:
    The chosen devices, in the order of ``devices``.

  Raises:
    ValueError: ``num_devices`` out of range, not a multiple of the number of
      processes, or more per process than some process has.
  """
  devices = list(devices)
  n = int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} device(s) are available")
  processes = sorted({d.process_index for d in devices})
  if n == len(devices) or len(processes) == 1:
    return devices[:n]
  per_host = {p: [d for d in devices if d.process_index == p] for p in processes}
  fewest = min(len(v) for v in per_host.values())
  if n % len(processes) or n // len(processes) > fewest:
    raise ValueError(
      f"num_devices={n} cannot be split evenly over the {len(processes)} "
      f"processes (at most {fewest} device(s) each): every process needs the "
      f"same number of devices in the mesh; use a multiple of "
      f"{len(processes)} up to {fewest * len(processes)}, or None for all "
      f"{len(devices)}"
    )
  keep = {id(d) for v in per_host.values() for d in v[: n // len(processes)]}
  return [d for d in devices if id(d) in keep]


def make_mesh(
  num_devices: int | None = None, devices: Iterable[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """A one-axis ``("data",)`` mesh over ``num_devices`` devices.

  On several processes the same number of devices comes from each one
  (:func:`choose_devices`).

  Args:
    num_devices: mesh size; default all devices (of all processes).
    devices: devices to use; default ``jax.devices()``.

  Returns:
    A mesh with automatic (GSPMD) sharding propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None else int(num_devices)
  return jax.make_mesh(
    (n,), (DATA_AXIS,), devices=choose_devices(devices, n), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that replicates an array over every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _from_host(x, sharding: NamedSharding) -> jax.Array:
  """``x`` (the whole array, on every process) placed with ``sharding``.

  In JAX's canonical dtype (int64 becomes int32 unless x64 is on), as
  ``jax.device_put`` would give it.
  """
  x = np.asarray(x)
  x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index], dtype=x.dtype)


def put_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places every leaf of ``tree`` replicated on ``mesh``.

  Each process passes its own, identical, copy (multi-host safe).
  """
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: _from_host(x, sharding), tree)


def put_batch(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places a global batch sharded along its leading axis.

  Every process passes the same *global* batch; each of its devices gets the
  rows of its shard (``jax.make_array_from_callback``), for any order of the
  devices in the mesh. The batch size must be a multiple of the mesh size.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % mesh.size:
      raise ValueError(
        f"batch of {x.shape[0]} is not divisible by the {mesh.size} devices of the mesh"
      )
    return _from_host(x, sharding)

  return jax.tree.map(put, tree)


def fingerprint(tree: PyTree) -> str:
  """A SHA-256 hex digest of the leaves of ``tree`` (shapes, dtypes, bytes)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype.str}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def assert_same_across_processes(tree: PyTree, what: str = "data") -> None:
  """Raises unless every process holds the same ``tree`` (host arrays).

  Compares :func:`fingerprint` across processes
  (``jax.experimental.multihost_utils.process_allgather``); a no-op on one
  process. Call it on every process.

  Args:
    tree: host arrays, e.g. a dataset's images and labels.
    what: what ``tree`` is, for the message.

  Raises:
    ValueError: naming the processes whose ``tree`` differs from process 0's.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  digest = fingerprint(tree)
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))
  differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ValueError(
      f"the {what} differs between processes: process(es) "
      f"{', '.join(map(str, differ))} hold other {what} than process 0 "
      f"(SHA-256 {digest[:12]}... on process "
      f"{jax.process_index()}); every process must load the same {what} "
      "(same dataset files, subset and seed)"
    )
