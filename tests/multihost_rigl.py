"""One RigL training through sparsejax.train.fit, as one process of a group.

Usage (run by tests/test_multihost.py)::

  python tests/multihost_rigl.py PROCESS_ID NUM_PROCESSES PORT DEVICES WORKDIR OUT

Each process has ``DEVICES`` CPU devices; with ``NUM_PROCESSES > 1`` they form
one ``jax.distributed`` group on localhost (gloo collectives), and ``fit``
trains over the global mesh of all devices. Process 0 writes the final mask,
params and per-epoch train losses to ``OUT`` (``.npz``).
"""

import os
import sys

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
workdir, out = sys.argv[5], sys.argv[6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top

if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=list(range(devices)),
  )

import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import sparsejax as sj  # pylint: disable=g-import-not-at-top

assert jax.device_count() == 8, jax.devices()
ds = sj.data.load("digits")
model = sj.models.get("lenet5", 10)
sample = jax.numpy.zeros((1, *ds.image_shape))
params = jax.eval_shape(lambda: sj.state.init_variables(model, sample, jax.random.key(0))["params"])
mask = sj.masks.random_mask(jax.random.key(1), params, 0.8, budget=sj.budgets.ERK())
tx = sj.dst.rigl_optimizer(optax.sgd(0.05, momentum=0.9), mask, end_step=80, update_every=8)
churn = sj.dst.MaskChurn()
result = sj.train.fit(
  model,
  ds,
  workdir,
  init=lambda: sj.state.create_train_state(model, tx, sample, jax.random.key(0)),
  num_epochs=2,
  batch_size=64,
  hooks=[churn.hook()],
  callbacks=[churn.callback()],
  options=sj.train.FitOptions(
    progress_bar=False, tensorboard=False, async_checkpointing=False, log_every_steps=11
  ),
)
state = result.state
leaves = {
  **{f"mask/{p}": np.asarray(jax.device_get(m)) for p, m in sj.masks.named_leaves(state.mask)},
  **{f"params/{p}": np.asarray(jax.device_get(x)) for p, x in sj.masks.named_leaves(state.params)},
}
if jax.process_index() == 0:
  np.savez(
    out,
    updates=int(jax.device_get(state.opt_state.mask_updates)),
    train_loss=np.array([r["train_loss"] for r in result.history]),
    churn=np.array([r["mask_churn"] for r in result.history]),
    **leaves,
  )
