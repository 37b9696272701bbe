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
``jax.make_array_from_process_local_data`` (replicated arrays from each
process's identical copy; each batch from this process's contiguous slice of
the global batch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any

#: Name of the mesh axis along which batches are sharded.
DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None,
              devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A one-axis ``("data",)`` mesh over the first ``num_devices`` devices.

  Args:
    num_devices: mesh size; default all devices (of all processes).
    devices: devices to use; default ``jax.devices()``.

  Returns:
    A mesh with automatic (GSPMD) sharding propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} device(s) are available")
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that replicates an array over every device of ``mesh``."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding that splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_replicated(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places every leaf of ``tree`` replicated on ``mesh``.

  Each process passes its own, identical, copy (multi-host safe).
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def put_batch(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places a global batch sharded along its leading axis.

  Every process passes the same *global* batch; each one hands JAX only the
  contiguous rows that its devices hold under the sharding
  (``jax.make_array_from_process_local_data``). The batch size must be a
  multiple of the mesh size.
  """
  sharding = batch_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % mesh.size:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by the "
                       f"{mesh.size} devices of the mesh")
    rows = [index[0].indices(x.shape[0])[:2] for index in
            sharding.addressable_devices_indices_map(x.shape).values()]
    lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)

  return jax.tree.map(put, tree)
