"""Host-to-device placement on an interleaved mesh, as one process of a group.

Usage (run by tests/test_multihost.py)::

  python tests/multihost_placement.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT

``WORKDIR`` is shared by the processes (as a pod's ``gs://`` run directory).

Two processes with 2 CPU devices each form one ``jax.distributed`` group on
localhost (gloo collectives). The mesh interleaves the hosts,
``[p0d0, p1d0, p0d1, p1d1]``, as ``jax.make_mesh`` can order a TPU pod's
devices by torus position: no process holds one contiguous block of a batch.
Checked: :func:`sparsejax.mesh.put_batch` and
:func:`sparsejax.mesh.put_replicated` give every device its rows;
:func:`sparsejax.train.evaluate` matches the contiguous mesh;
:func:`sparsejax.train.fit` trains and evaluates on it;
:func:`sparsejax.mesh.make_mesh` takes the same number of devices from each
process (or refuses); a process that loaded other data makes ``fit`` fail
naming it. Process 0 writes what it measured to ``OUT`` (JSON).
"""

import json
import os
import sys

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
workdir, out = sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
  coordinator_address=f"127.0.0.1:{port}",
  num_processes=num_processes,
  process_id=process_id,
  local_device_ids=[0, 1],
)

import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import sparsejax as sj  # pylint: disable=g-import-not-at-top

assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
by_process = {p: [d for d in jax.devices() if d.process_index == p] for p in (0, 1)}
order = [by_process[0][0], by_process[1][0], by_process[0][1], by_process[1][1]]
mesh = sj.mesh.make_mesh(devices=order)
assert list(mesh.devices.flat) == order, mesh.devices
report = {}

# Every device holds exactly the rows (the whole array) its index names.
x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
for name, placed in (
  ("batch", sj.mesh.put_batch(x, mesh)),
  ("replicated", sj.mesh.put_replicated(x, mesh)),
):
  for shard in placed.addressable_shards:
    np.testing.assert_array_equal(
      np.asarray(shard.data), x[shard.index], err_msg=f"{name} on {shard.device}"
    )
  total = jax.jit(
    lambda a: (a * np.arange(1, 9)[:, None]).sum(), out_shardings=sj.mesh.replicated(mesh)
  )(placed)
  report[f"{name}_weighted_sum"] = float(total)
report["expected_weighted_sum"] = float((x * np.arange(1, 9)[:, None]).sum())

# evaluate on the interleaved mesh equals evaluate on the contiguous one.
ds = sj.data.load("digits")
model = sj.models.get("mlp", 10)
for name, m in (("interleaved", mesh), ("contiguous", sj.mesh.make_mesh())):
  state = sj.mesh.put_replicated(
    sj.state.create_train_state(
      model, optax.sgd(0.1), np.zeros((1, *ds.image_shape), np.float32), jax.random.key(0)
    ),
    m,
  )
  report[f"eval_{name}"] = sj.train.evaluate(
    model, state, ds.test_images, ds.test_labels, mean=ds.mean, std=ds.std, batch_size=100, mesh=m
  )

# A whole run on the interleaved mesh (its evaluation puts batches too).
init = lambda: sj.state.create_train_state(
  model,
  sj.schedules.make_optimizer(0.1),
  np.zeros((1, *ds.image_shape), np.float32),
  jax.random.key(0),
)
fit_args = dict(
  init=init,
  num_epochs=1,
  batch_size=64,
  mesh=mesh,
  options=sj.train.FitOptions(progress_bar=False, tensorboard=False, async_checkpointing=False),
)
result = sj.train.fit(model, ds, os.path.join(workdir, "run"), **fit_args)
report["fit_test_accuracy"] = result.history[-1]["test_accuracy"]

# make_mesh(n < all devices): the same number from each process, or refused.
small = sj.mesh.make_mesh(2)
report["make_mesh_2_processes"] = sorted(d.process_index for d in small.devices.flat)
try:
  sj.mesh.make_mesh(3)
  report["make_mesh_3_error"] = None
except ValueError as e:
  report["make_mesh_3_error"] = str(e)

# Process 1 loads another subset: fit refuses before training, naming it.
other = ds if process_id == 0 else sj.data.load("digits", train_subset=1000)
try:
  sj.train.fit(model, other, os.path.join(workdir, "mismatch"), **fit_args)
  report["mismatch_error"] = None
except ValueError as e:
  report["mismatch_error"] = str(e)
report["mismatch_wrote"] = os.path.exists(os.path.join(workdir, "mismatch", "checkpoints"))

if process_id == 0:
  with open(out, "w") as f:
    json.dump(report, f)
print(json.dumps({"process": process_id, "mismatch_error": report["mismatch_error"]}), flush=True)
