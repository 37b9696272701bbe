# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of sparsejax
#
# Sparse neural networks in JAX, end to end: the library in one optax loop, pruning at
# initialisation with its diagnostics, a lottery ticket, dynamic sparse training (SET,
# RigL), ToST on a fixed mask, gradient flow with `sparse_init`, and Sup-tickets'
# superposition. Every section is short and runs on a CPU (the whole notebook takes a
# few minutes) on the digits dataset that ships with scikit-learn, so it needs no
# download; CIFAR-10 through tensorflow-datasets comes last, where the notebook can
# download.
#
# `SPEC.md`'s sections are named in each heading; the numbers here come from a tiny
# network (LeNet-300-100 on 8×8 digits) trained for a few seconds, so they illustrate the
# API, not the papers' claims (the README's CPU grids test those).

# %%
# Set-up. In Colab: install sparsejax from its repository, with the JAX build of the
# selected runtime (GPU or TPU). Anywhere else this cell only checks the import.
import importlib.util
import os
import shutil
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
SPARSEJAX_REPO = "https://github.com/sparsejax/sparsejax"  # where sparsejax is published
if IN_COLAB and importlib.util.find_spec("sparsejax") is None:
  extra = ""
  if shutil.which("nvidia-smi"):
    extra = "[cuda12]"                   # the GPU runtime
  elif os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax[tpu]"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                  f"sparsejax{extra} @ git+{SPARSEJAX_REPO}"], check=True)

# %%
import json
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sparsejax as sj  # import it before running any JAX computation (CPU flags)

print("JAX", jax.__version__, "on", jax.devices())
WORK = tempfile.mkdtemp(prefix="sparsejax-tour-")  # every run's checkpoints and logs

# %% [markdown]
# ## 1. The library in one optax loop (SPEC §1)
#
# A mask is a pytree of booleans parallel to the params. `sj.optim.sparse` wraps any optax
# optimiser: the mask lives in the optimiser state and pruned weights stay exactly zero.
# That is the one line a plain optax training loop needs.

# %%
ds = sj.data.load("digits")  # 8×8 grey digits, uint8 [N, 8, 8, 1]
print(ds.num_train, "training and", ds.num_test, "test images,", ds.num_classes, "classes")

model = sj.models.get("mlp", ds.num_classes)  # LeNet-300-100
sample = jnp.zeros((1,) + ds.image_shape)
params = model.init(jax.random.key(0), sample)["params"]

# A 90%-sparse mask: exact global top-k of |θ| (any score tree works the same way).
mask = sj.masks.topk_mask(jax.tree.map(jnp.abs, params), 0.9, budget=sj.budgets.Global())
print(sj.masks.summary(mask))

tx = sj.optim.sparse(optax.sgd(0.05, momentum=0.9), mask)  # the one extra line
params = sj.masks.apply(params, mask)
opt_state = tx.init(params)

x_train = sj.data.normalize(ds.train_images, ds.mean, ds.std)
y_train = jnp.asarray(ds.train_labels)
x_test = sj.data.normalize(ds.test_images, ds.mean, ds.std)


@jax.jit
def step(params, opt_state, x, y):
  def loss_fn(p):
    logits = model.apply({"params": p}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


batch = 64
for epoch in range(10):
  perm = np.random.default_rng(epoch).permutation(ds.num_train)
  for i in range(ds.num_train // batch):
    idx = perm[i * batch:(i + 1) * batch]
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])

logits = model.apply({"params": params}, x_test, train=False)
accuracy = float((logits.argmax(-1) == ds.test_labels).mean())
pruned_nonzero = sum(int(jnp.sum((p != 0) & ~m)) for p, m in
                     zip(jax.tree.leaves(params), jax.tree.leaves(mask)))
print(f"test accuracy {accuracy:.3f}; nonzero pruned weights: {pruned_nonzero}")
assert pruned_nonzero == 0

# %% [markdown]
# `sj.train.fit` is the same step, jit-compiled with data parallelism over all devices,
# checkpointed (it resumes where it stopped), logged to `metrics.jsonl`, and extended
# through step hooks, callbacks, per-step scalars and an optional loss. It starts from a
# train state, or a function making one (`sj.state.create_train_state`: the model's
# params, the optimiser, the mask). The rest of the tour uses it.


# %%
OPTIONS = sj.train.FitOptions(eval_batch_size=512, max_to_keep=1,
                              async_checkpointing=False, progress_bar=False,
                              tensorboard=False)


def optimizer(num_epochs=10, learning_rate=0.05, steps_per_epoch=None):
  """SGD with momentum 0.9, weight decay 5e-4 and a cosine learning rate."""
  lr = sj.schedules.lr_schedule(learning_rate, num_epochs=num_epochs,
                                steps_per_epoch=steps_per_epoch or SPE, kind="cosine")
  return sj.schedules.make_optimizer(lr, momentum=0.9, weight_decay=5e-4)


def start(mask=None, tx=None, net=None):
  """``init`` of fit: the state of ``net`` (default ``model``, seed 0) with ``tx``
  (default ``optimizer()``) and ``mask``."""
  net = model if net is None else net
  return lambda: sj.state.create_train_state(net, tx or optimizer(), sample,
                                             jax.random.key(0), mask=mask)


def fit(name, init, *, net=None, dataset=None, num_epochs=10, batch_size=64, **kwargs):
  """``sj.train.fit`` of ``init`` in ``run_dir(name)``, 10 epochs of 64 by default."""
  return sj.train.fit(model if net is None else net, ds if dataset is None else dataset,
                      run_dir(name), init=init, num_epochs=num_epochs,
                      batch_size=batch_size, options=OPTIONS, **kwargs)


def steps_log(workdir):
  """The per-step hook logs that fit wrote (steps.jsonl)."""
  return sj.metrics_log.read_jsonl(os.path.join(workdir, sj.metrics_log.STEPS_FILE))


def run_dir(name):
  return os.path.join(WORK, name)


SPE = sj.schedules.steps_per_epoch(ds.num_train, 64)  # optimiser steps per epoch

# %% [markdown]
# ## 2. Pruning at initialisation (SPEC §2) and its diagnostics (SPEC §1)
#
# `sj.scores.prune_at_init` prunes an initialised network with random, magnitude, SNIP,
# GraSP or SynFlow scores, with exact counts under a global, uniform or ERK budget (or
# N:M). `sj.diagnostics.report` gives the per-layer density, the *effective* density
# (weights on some input–output path) and layer collapse.

# %%
variables = model.init(jax.random.key(0), sample)
init_params, apply_fn = sj.scores.linen_apply_fn(model, variables)
scoring_batch = sj.data.class_balanced_batch(ds, 10)  # 10 examples per class
SPARSITY = 0.95

pai_masks, reports = {}, {}
for method in sj.scores.METHODS:
  pai_masks[method] = sj.scores.prune_at_init(
      method, init_params, sparsity=SPARSITY, budget=sj.budgets.Global(),
      key=jax.random.key(1), apply_fn=apply_fn, batches=scoring_batch,
      input_shape=ds.image_shape)
  reports[method] = sj.diagnostics.report(pai_masks[method], init_params, apply_fn,
                                          ds.image_shape)
print(reports["snip"])

# %%
layers = list(reports["snip"]["layers"])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
width = 0.8 / len(reports)
for i, (method, rep) in enumerate(reports.items()):
  pos = np.arange(len(layers)) + i * width
  for ax, key in zip(axes, ("density", "effective_density")):
    ax.bar(pos, [rep["layers"][l][key] for l in layers], width, label=method)
for ax, title in zip(axes, ("density", "effective density")):
  ax.set_xticks(np.arange(len(layers)) + 0.4, [l.split("/")[0] for l in layers])
  ax.set_title(f"{title} per layer at {SPARSITY:.0%} sparsity")
  ax.set_yscale("log")
axes[0].legend()
plt.show()
for method, rep in reports.items():
  print(f"{method:>9}: effective sparsity {rep['effective_sparsity']:.4f}, "
        f"collapsed layers {rep['collapsed'] or '-'}")

# %% [markdown]
# Each mask trains from the same initialisation and data order, as the mask of the
# initial state:

# %%
pai_accuracy = {}
for method, m in pai_masks.items():
  result = fit(f"pai_{method}", start(mask=m))
  pai_accuracy[method] = result.history[-1]["test_accuracy"]
print({k: round(v, 3) for k, v in pai_accuracy.items()})  # a collapsed mask: chance

# %% [markdown]
# ## 3. A lottery ticket (SPEC §3)
#
# Iterative magnitude pruning with rewinding: train dense, keep the largest trained
# weights (`sj.lottery.prune_level`), rewind the survivors to their initial values
# (`sj.lottery.rewind_state`) and train again. The control re-initialises the same mask
# at random.

# %%
tx_dense = optimizer()
point = sj.state.create_train_state(model, tx_dense, sample, jax.random.key(0),
                                    mask=sj.masks.ones_like)  # the rewind point, step 0
dense = fit("lt_dense", point)

fraction = 1 - np.sqrt(1 - 0.9)  # two levels of IMP reach 90% sparsity
ticket_mask, ticket = point.mask, dense
for level in (1, 2):
  ticket_mask = sj.lottery.prune_level(ticket.state.params, ticket_mask, level, fraction)
  ticket = fit(f"lt_level{level}", sj.lottery.rewind_state(point, ticket_mask))
other_init = model.init(jax.random.key(7), sample)["params"]
control = fit("lt_reinit", sj.lottery.rewind_state(point, ticket_mask,
                                                   params=other_init))
print(f"sparsity {sj.masks.summary(ticket_mask).sparsity:.3f}: "
      f"ticket {ticket.history[-1]['test_accuracy']:.3f}, "
      f"random re-init {control.history[-1]['test_accuracy']:.3f}, "
      f"dense {dense.history[-1]['test_accuracy']:.3f}")

# %% [markdown]
# ## 4. Dynamic sparse training: SET and RigL (SPEC §4)
#
# The mask changes on device every ΔT steps inside `tx.update`, under `lax.cond`: no
# recompilation and no host round trip. SET grows at random, RigL where the dense gradient
# is largest. `MaskChurn` (a step hook and an epoch-end callback) records how much of the
# mask moved in each epoch.

# %%
DST_SPARSITY, EPOCHS = 0.95, 12
total = EPOCHS * SPE
start_mask = sj.masks.random_mask(jax.random.key(2), init_params, DST_SPARSITY,
                                  budget=sj.budgets.ERK())
inner = optax.sgd(optax.cosine_decay_schedule(0.05, total), momentum=0.9)
dst_runs = {}
for name, tx in {
    "static": sj.optim.sparse(inner, start_mask),
    "SET": sj.dst.set_optimizer(inner, start_mask, update_every=20, end_step=int(0.75 * total),
                      drop_fraction=sj.dst.cosine_drop_fraction(0.3, int(0.75 * total))),
    "RigL": sj.dst.rigl_optimizer(inner, start_mask, update_every=20, end_step=int(0.75 * total)),
}.items():
  churn = sj.dst.MaskChurn()
  dst_runs[name] = fit(f"dst_{name}", start(tx=tx), num_epochs=EPOCHS,
                       hooks=[churn.hook()], callbacks=[churn.callback()]).history

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, history in dst_runs.items():
  epochs = [r["epoch"] for r in history]
  axes[0].plot(epochs, [r["test_accuracy"] for r in history], label=name)
  axes[1].plot(epochs, [r["mask_churn"] for r in history], label=name)
axes[0].set(xlabel="epoch", ylabel="test accuracy", title=f"{DST_SPARSITY:.0%} sparse")
axes[1].set(xlabel="epoch", ylabel="fraction of the mask changed", title="mask churn")
axes[0].legend()
plt.show()
print({name: round(h[-1]["test_accuracy"], 3) for name, h in dst_runs.items()})

# %% [markdown]
# ## 5. ToST: train any mask better (SPEC §7)
#
# The same 95%-sparse SNIP mask, initialisation and data order, trained plainly and with
# ToST's `ghost` recipe: soft neurons (β ramps from 1 to 0), label smoothing (α ramps from
# 0.1 to 0) and LRsI, a learned rescaling of the masked initialisation. β and α are
# per-step scalars evaluated inside the jitted step, so changing them never recompiles.
# The MLP has no residual blocks, so the ghost skips are left out here. On a network this
# small, trained this briefly, ToST need not help; the README's CPU grid tests the paper's
# claim at 98% sparsity.

# %%
tost_acc = {}
for name, recipe in {"baseline": sj.tost.preset("none"),
                     "ToST": sj.tost.preset("ghost", ghost_skips=None,
                                            lrsi=sj.tost.LRsI(steps=30, batch_size=64))
                     }.items():
  net = recipe.model("mlp", 10)
  result = fit(f"tost_{name}", start(mask=pai_masks["snip"], net=net), net=net,
               scalars=recipe.scalars(10 * SPE), loss_fn=recipe.loss_fn(),
               callbacks=recipe.callbacks())
  tost_acc[name] = result.history[-1]["test_accuracy"]
print({k: round(v, 3) for k, v in tost_acc.items()})

# %% [markdown]
# The ghost skips belong to the residual models: `sj.tost.ghost_model` adds two dense
# 1×1 paths per block, scaled by γ. At γ = 0 the ghost model computes exactly what the
# plain model computes with the exported (ghost-free) params:

# %%
ghost = sj.tost.ghost_model("resnet20", 10)
images = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
ghost_vars = ghost.init(jax.random.key(0), images[:1])
plain_vars = sj.tost.export(ghost_vars)
ghost_logits, _ = sj.modeling.apply_model(ghost, ghost_vars, images, train=False,
                                         scalars={"ghost_coef": 0.0})
plain_logits = sj.models.get("resnet20", 10).apply(plain_vars, images, train=False)
print("max |difference| at γ = 0:", float(jnp.abs(ghost_logits - plain_logits).max()))

# %% [markdown]
# ## 6. Gradient flow and sparse-aware initialisation (SPEC §5)
#
# A sparse network initialised with the dense initialiser has a small gradient at
# initialisation; `sj.gradient_flow.sparse_init` redraws each active weight with variance
# `2 / fan_in(o)`, counting only the unit's *active* inputs. `GradientFlow`'s step hook
# measures the norm of the masked gradient on a held-out batch inside the train step.

# %%
train_ds, held_out = sj.gradient_flow.held_out_split(ds, per_class=10)
flow_mask = sj.masks.random_mask(jax.random.key(4), init_params, 0.98, budget=sj.budgets.ERK())
flows = {}
for name, weights in {
    "Scratch (dense init)": sj.masks.apply(init_params, flow_mask),
    "Scratch+ (sparse_init)": sj.gradient_flow.sparse_init(jax.random.key(5), init_params,
                                                           flow_mask)}.items():
  point = sj.state.create_train_state(model, tx_dense, sample, jax.random.key(0),
                                      mask=flow_mask)
  point = sj.lottery.rewind_state(point, flow_mask, params=weights)
  flow = sj.gradient_flow.GradientFlow(model, held_out, every=5)
  workdir = f"flow_{name.split()[0]}"
  result = fit(workdir, point, dataset=train_ds, hooks=[flow.hook()],
               callbacks=[flow.callback()])
  flows[name] = (steps_log(run_dir(workdir)), result.history[-1]["test_accuracy"])

for name, (log, acc) in flows.items():
  plt.plot([r["step"] for r in log], [r["grad_norm"] for r in log],
           label=f"{name}: test {acc:.3f}")
  print(f"{name}: gradient norm at initialisation {log[0]['grad_norm_before']:.4f}")
plt.xlabel("step")
plt.ylabel("‖masked gradient‖₂ (held-out batch)")
plt.yscale("log")
plt.legend()
plt.show()

# %% [markdown]
# ## 7. Sup-tickets: superpose cheap tickets into one sparse network (SPEC §6)
#
# RigL for the first E − C·M epochs, then M cycles of C epochs, each starting with a large
# drop-and-regrow and running a cyclic learning rate. At each cycle end the `Superpose`
# callback averages the ticket into a running model, re-prunes it to the same count, recomputes
# batch-norm statistics (if any) and evaluates it; training continues from the ticket.

# %%
plan = sj.suptickets.Plan(num_epochs=EPOCHS, num_cycles=3, cycle_epochs=2,
                          steps_per_epoch=SPE)
lr = plan.learning_rate(optax.cosine_decay_schedule(0.05, plan.dst_steps), lr1=0.005,
                        lr2=0.02)
tx = sj.dst.rigl_optimizer(optax.sgd(lr, momentum=0.9), start_mask, update_every=20,
                 end_step=int(0.75 * plan.dst_steps),
                 extra_updates=plan.mask_updates(fraction=0.5))
superpose = sj.suptickets.Superpose(plan)  # its state: a step hook of its own
result = fit("suptickets", start(tx=tx), num_epochs=plan.num_epochs,
             hooks=[superpose.hook()], callbacks=[superpose])
for record in result.history:
  if "cycle" in record:
    print(f"cycle {record['cycle']}: ticket {record['ticket_test_accuracy']:.3f}, "
          f"superposed {record['superposed_test_accuracy']:.3f} "
          f"(sparsity {record['superposed_sparsity']:.3f})")
print(f"plain RigL in the same {EPOCHS} epochs (section 4): "
      f"{dst_runs['RigL'][-1]['test_accuracy']:.3f}")

# %% [markdown]
# ## 8. CIFAR-10 through tensorflow-datasets (where the notebook can download)
#
# The same calls on a real benchmark: SNIP at 90% on ResNet-20, two epochs. On Colab pick
# a GPU or TPU runtime first; `sj.data.load` fetches CIFAR-10 with tensorflow-datasets (or
# reads the official archive from `data_dir`). Skipped where there is no network.

# %%
RUN_CIFAR = IN_COLAB or os.environ.get("SPARSEJAX_TOUR_CIFAR") == "1"
if RUN_CIFAR:
  cifar = sj.data.load("cifar10")
  resnet = sj.models.get("resnet20", cifar.num_classes)
  cifar_vars = resnet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  cifar_params, cifar_apply = sj.scores.linen_apply_fn(resnet, cifar_vars)
  snip_mask = sj.scores.prune_at_init("snip", cifar_params, sparsity=0.9,
                                      apply_fn=cifar_apply,
                                      batches=sj.data.class_balanced_batch(cifar, 10))
  cifar_tx = optimizer(2, 0.1, sj.schedules.steps_per_epoch(cifar.num_train, 128))
  cifar_init = lambda: sj.state.create_train_state(
      resnet, cifar_tx, jnp.zeros((1, 32, 32, 3)), jax.random.key(0), mask=snip_mask)
  result = fit("cifar10_snip", cifar_init, net=resnet, dataset=cifar, num_epochs=2,
               batch_size=128)
  print(json.dumps(result.history[-1], indent=1))
else:
  print("CIFAR-10 section skipped (set SPARSEJAX_TOUR_CIFAR=1 where tfds can download)")
