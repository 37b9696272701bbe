r"""Gradient flow in sparse networks (Evci et al. 2022; SPEC §5): the comparison.

Usage::

  # the CPU run on the offline CIFAR-10 copy (LeNet-5, 95%, 3 seeds)
  python -m experiments.gradient_flow \
      --config experiments/configs/gradient_flow_cpu.py \
      --config.data.dir=/path/to/data --workdir runs/gradient_flow_cpu

  # the paper's LeNet-5 setting, on any dataset sparsejax loads
  python -m experiments.gradient_flow \
      --config experiments/configs/gradient_flow_lenet5.py \
      --config.data.name=cifar10 --workdir runs/gradient_flow_lenet5

At one sparsity ``config.sparsity``, for each seed, from the same data order
(the seed's) and the same initial network ``θ_0`` (the seed's, unless said
otherwise), the methods of ``config.methods`` train and log their gradient
flow (:class:`sparsejax.gradient_flow.GradientFlow`: the L2 norm of the
masked gradient of the plain cross-entropy on a held-out, class-balanced
batch of ``flow_examples_per_class`` training examples per class, removed
from the training set; every ``flow_every`` steps and just before and after
each mask update):

* ``dense``: the dense network;
* ``pruned``: gradual magnitude pruning (:func:`sparsejax.dst.gmp_optimizer`) of the
  dense network from ``θ_0`` to ``sparsity`` between ``prune_start`` and
  ``prune_end`` every ``prune_every`` steps (the end moved up to the next
  update step, so the last update reaches ``sparsity``): *the pruned
  solution*;
* ``lottery``: the lottery ticket: the pruned solution's mask on ``θ_0``,
  trained again with a fresh optimiser (rewinding to step 0);
* ``scratch``: the same mask on another initialisation ``θ'_0`` from the
  model's dense initialiser (the paper's "Scratch");
* ``scratch_plus``: the same mask on ``θ'_0`` re-initialised by
  :func:`sparsejax.gradient_flow.sparse_init` ("Scratch+");
* ``rigl``: RigL (:func:`sparsejax.dst.rigl_optimizer`) from a random mask under
  ``rigl_budget`` (ERK) on ``θ_0`` masked; ``rigl_plus``: the same with
  :func:`~sparsejax.gradient_flow.sparse_init` weights;
* ``small_dense``: a dense network of the same family with about as many
  weights as the sparse ones (:func:`small_dense_kwargs`: LeNet-5's
  ``width``, the MLP's ``hidden``).

``lottery``, ``scratch`` and ``scratch_plus`` need ``pruned`` (it runs
first). Cells live in ``WORKDIR/cells/<method>_seed<seed>/`` (a
:func:`sparsejax.train.fit` run directory plus ``initial/`` and ``final/``:
the mask and the weights at the start and the end, in
:func:`sparsejax.lottery.save_ticket`'s format); a cell is finished when its
``results.json`` exists, a rerun skips it and an interrupted cell resumes from
its last checkpoint. The grid and every cell hold their signature
(``run.json``, :mod:`experiments.workdir`), all checked before anything is
written: a directory of another runner or config is refused, and a finished
grid rerun with the same config does nothing.

Outputs in ``WORKDIR`` (rebuilt from the finished cells by every run and by
``--report_only``):

* ``results.csv``: one row per cell (:data:`CSV_FIELDS`);
* ``results.md``: per method, mean ± std over the seeds: test accuracy, final
  training loss, gradient flow at initialisation, the L2 distance of the
  initial and of the final weights to the pruned solution (SPEC §5 claim 3;
  the same-architecture methods only) and, for the methods that change
  their mask, the mean ratio of the flow just after to just before a mask
  update;
* ``gradient_flow.png``: the gradient norm against the step, one line per
  method (mean ± std over seeds, log scale);
* ``mask_updates.png``: the gradient norm just before and just after every
  mask update of the RigL methods.
"""

from __future__ import annotations

import os
import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common
from experiments import results
from experiments import sweep
from experiments import workdir as workdir_lib
from experiments.configs import default as default_config
from sparsejax import _paths
from sparsejax import budgets
from sparsejax import dst
from sparsejax import gradient_flow
from sparsejax import lottery
from sparsejax import masks
from sparsejax import metrics_log
from sparsejax import models
from sparsejax import schedules
from sparsejax import state as state_lib
from sparsejax import train

#: The runner named in the signatures of the grid and its cells.
RUNNER = "experiments.gradient_flow"
#: Every method, in the order the cells of a seed run.
METHODS = (
  "dense",
  "pruned",
  "lottery",
  "scratch",
  "scratch_plus",
  "rigl",
  "rigl_plus",
  "small_dense",
)
#: Methods that train the pruned solution's mask.
NEED_PRUNED = ("lottery", "scratch", "scratch_plus")
#: Names in the table and plots.
LABELS = {
  "dense": "Dense",
  "pruned": "Pruned (GMP)",
  "lottery": "Lottery",
  "scratch": "Scratch",
  "scratch_plus": "Scratch+",
  "rigl": "RigL",
  "rigl_plus": "RigL+",
  "small_dense": "Small dense",
}
#: Fields of the experiment (not in ``default.py``); the grid fields among
#: them are not part of a cell's config.
GRID_FIELDS = ("methods", "seeds")
CSV_FIELDS = (
  "method",
  "seed",
  "test_accuracy",
  "train_loss",
  "grad_norm_init",
  "dist_init_to_pruned",
  "dist_final_to_pruned",
  "update_flow_ratio",
  "weights",
  "sparsity",
  "training_seconds",
  "cell",
)
# Key folds of the seed's key: the other initialisation of Scratch, the
# sparse_init draw, the random RigL mask.
_SCRATCH_KEY, _SPARSE_INIT_KEY, _RIGL_MASK_KEY = 7, 8, 9


def add_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the experiment's fields (with defaults) to a ``default.py`` config."""
  config.methods = METHODS
  config.seeds = (0, 1, 2)
  config.sparsity = 0.95
  # Gradient flow: measured every flow_every steps on flow_examples_per_class
  # held-out training examples per class.
  config.flow_every = 100
  config.flow_examples_per_class = 25
  # Gradual magnitude pruning of the "pruned" run: from dense at prune_start to
  # `sparsity` at prune_end (steps if >= 1, fractions of training if < 1),
  # every prune_every steps, one global magnitude ranking.
  config.prune_start = 0.3
  config.prune_end = 0.7
  config.prune_every = 100
  # RigL: its starting mask's budget; dst_update_every, dst_alpha, dst_end
  # (default.py) set its schedule.
  config.rigl_budget = "erk"
  # sparse_init of Scratch+ and RigL+ (scale: the model's init_gain).
  config.init_mode = "fan_in"
  config.init_distribution = "normal"
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses unknown or missing methods and bad values."""
  methods = tuple(config.methods)
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods or len(set(methods)) != len(methods):
    raise ValueError(f"config.methods must be distinct names of {METHODS}, got {methods}")
  if any(m in methods for m in NEED_PRUNED) and "pruned" not in methods:
    raise ValueError(f"config.methods {NEED_PRUNED} train the pruned solution's mask: add 'pruned'")
  masks.check_sparsity(config.sparsity)
  if config.init_mode not in gradient_flow.MODES:
    raise ValueError(f"config.init_mode must be one of {gradient_flow.MODES}")
  if config.init_distribution not in gradient_flow.DISTRIBUTIONS:
    raise ValueError(f"config.init_distribution must be one of {gradient_flow.DISTRIBUTIONS}")
  for name in ("flow_every", "prune_every"):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be an integer >= 1, got {value!r}")


def _step(value: float, total: int) -> int:
  """A point of training: steps if ``value >= 1``, else a fraction of ``total``."""
  return int(value) if value >= 1 else round(float(value) * total)


def cell_name(method: str, seed: int) -> str:
  return f"{method}_seed{seed}"


def cells(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """``(method, seed)`` of every cell, by seed, in :data:`METHODS` order."""
  order = [m for m in METHODS if m in tuple(config.methods)]
  return [(m, int(s)) for s in config.seeds for m in order]


def cell_config(
  config: ml_collections.ConfigDict, method: str, seed: int
) -> ml_collections.ConfigDict:
  """The config of one cell: without the grid fields, with its seed."""
  fields = {k: v for k, v in config.to_dict().items() if k not in GRID_FIELDS}
  fields["method"] = method
  fields["train"] = dict(fields["train"], seed=seed)
  return ml_collections.ConfigDict(fields)


def _kernel_count(model, sample) -> int:
  params = jax.eval_shape(lambda: state_lib.init_variables(model, sample, jax.random.key(0)))[
    "params"
  ]
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params) if len(p.shape) > 1)


def small_dense_kwargs(config: ml_collections.ConfigDict, num_classes: int, input_shape) -> dict:
  """Model fields of a dense network with about ``(1 − sparsity)·N`` kernel weights.

  ``N`` is the kernel-weight count of ``config.model.name``; LeNet-5 is narrowed
  with ``width`` and the MLP's ``hidden`` widths are scaled, the factor found
  by bisection (the count closest to the target).

  Raises:
    ValueError: a model without a fractional width.
  """
  kwargs = common.model_kwargs(config)
  sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  if config.model.name == "lenet5":
    make = lambda w: dict(kwargs, width=w)
  elif config.model.name == "mlp":
    hidden = tuple(kwargs.get("hidden", (300, 100)))
    make = lambda w: dict(kwargs, hidden=tuple(max(1, round(w * h)) for h in hidden))
  else:
    raise ValueError(
      f"small_dense needs a model with a fractional width (lenet5, mlp), not {config.model.name!r}"
    )
  count = lambda w: _kernel_count(models.get(config.model.name, num_classes, **make(w)), sample)
  target = (1 - float(config.sparsity)) * count(1.0)
  lo, hi = 1e-3, 1.0
  for _ in range(30):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
  best = min((lo, hi), key=lambda w: abs(count(w) - target))
  return make(best)


def _save(directory: str, mask, params, **meta) -> None:
  lottery.save_ticket(directory, jax.device_get(mask), jax.device_get(params), meta)


def _pruned_solution(workdir: str, seed: int):
  """``(mask, final params)`` of the seed's pruned run."""
  mask, params, _ = lottery.load_ticket(
    os.path.join(workdir, "cells", cell_name("pruned", seed), "final")
  )
  return mask, params


def run_cell(
  config: ml_collections.ConfigDict, method: str, seed: int, workdir: str, dataset, flow_batch
) -> train.FitResult:
  """Trains one cell (resumes it if started); writes its files.

  The cell directory is claimed first (:func:`experiments.workdir.claim`):
  one of another run is refused before anything is written; a finished cell
  is not trained again (its result is read back, without a state).
  """
  cfg = common.resolve_config(cell_config(config, method, seed))
  cell_dir = os.path.join(workdir, "cells", cell_name(method, seed))
  if workdir_lib.claim(cell_dir, RUNNER, cfg):
    return common.finished_result(cell_dir)
  common.write_json(os.path.join(cell_dir, "config.json"), cfg.to_dict())
  kwargs = common.model_kwargs(cfg)
  if method == "small_dense":
    kwargs = small_dense_kwargs(config, dataset.num_classes, dataset.image_shape)
  model = models.get(cfg.model.name, dataset.num_classes, **kwargs)
  spe = schedules.steps_per_epoch(dataset.num_train, cfg.train.batch_size)
  total = int(cfg.train.num_epochs) * spe
  inner = common.make_optimizer(cfg, spe)
  sample = jnp.zeros((1, *dataset.image_shape), jnp.float32)
  key = jax.random.key(seed)
  prunable = common.make_prunable(cfg.prunable, model, dataset.image_shape)
  base = state_lib.create_train_state(model, inner, sample, key)
  theta0 = base.params
  init_gain = getattr(model, "init_gain", None)
  reinit = lambda params, mask: gradient_flow.sparse_init(
    jax.random.fold_in(key, _SPARSE_INIT_KEY),
    params,
    mask,
    scale=init_gain,
    mode=cfg.init_mode,
    distribution=cfg.init_distribution,
  )
  update_steps = None
  fit_kw: dict = {}
  if method == "pruned":
    start, end = _step(cfg.prune_start, total), _step(cfg.prune_end, total)
    every = int(cfg.prune_every)
    # The last pruning step must be an update step to reach the sparsity.
    end = start + -(-(end - start) // every) * every
    tx = dst.gmp_optimizer(
      inner,
      masks.ones_like(theta0),
      final_sparsity=float(cfg.sparsity),
      start_step=start,
      end_step=end,
      update_every=every,
      prunable=prunable,
      seed=seed,
    )
    update_steps = gradient_flow.UpdateSteps(every, start, end + 1)
    fit_kw = dict(tx=tx)
  elif method in NEED_PRUNED:
    mask, _ = _pruned_solution(workdir, seed)
    mask = jax.tree.map(jnp.asarray, mask)
    if method == "lottery":
      fit_kw = dict(mask=mask)  # θ_0 ⊙ m: the same seed, the same init
    else:
      state = state_lib.create_train_state(model, inner, sample, key, mask=mask)
      other = state_lib.init_variables(model, sample, jax.random.fold_in(key, _SCRATCH_KEY))[
        "params"
      ]
      params = reinit(other, mask) if method == "scratch_plus" else other
      fit_kw = dict(initial_state=state.replace(params=masks.apply(params, mask)))
  elif method in ("rigl", "rigl_plus"):
    mask = masks.random_mask(
      jax.random.fold_in(key, _RIGL_MASK_KEY),
      theta0,
      float(cfg.sparsity),
      budget=budgets.parse(cfg.rigl_budget),
      prunable=prunable,
    )
    every, end = int(cfg.dst_update_every), round(float(cfg.dst_end) * total)
    fraction = (
      dst.cosine_drop_fraction(float(cfg.dst_alpha), end)
      if cfg.dst_drop_schedule == "cosine"
      else float(cfg.dst_alpha)
    )
    tx = dst.rigl_optimizer(
      inner,
      mask,
      end_step=end,
      drop_fraction=fraction,
      update_every=every,
      skip_update=bool(cfg.dst_skip_update),
      prunable=prunable,
      seed=seed,
    )
    update_steps = gradient_flow.UpdateSteps(every, None, end)
    if method == "rigl":
      fit_kw = dict(tx=tx)
    else:
      state = state_lib.create_train_state(model, tx, sample, key)
      fit_kw = dict(initial_state=state.replace(params=reinit(state.params, mask)))
  flow = gradient_flow.GradientFlow(
    model, flow_batch, every=int(cfg.flow_every), update_steps=update_steps, prunable=prunable
  )
  # The state fit starts from (without a checkpoint; saved in initial/).
  if "initial_state" in fit_kw:
    start = fit_kw["initial_state"]
  elif fit_kw:
    start = state_lib.create_train_state(
      model, fit_kw.get("tx", inner), sample, key, mask=fit_kw.get("mask")
    )
  else:
    start = base
  if not epath.Path(os.path.join(cell_dir, "initial", lottery.TICKET_META)).exists():
    _save(
      os.path.join(cell_dir, "initial"),
      start.mask if start.mask is not None else masks.ones_like(start.params),
      start.params,
      method=method,
      seed=seed,
    )
  t0 = time.perf_counter()
  result = train.fit(
    model,
    dataset,
    cell_dir,
    init=start,
    hooks=[flow.hook()],
    callbacks=[flow.callback()],
    loss_fn=common.default_loss(cfg),
    **common.fit_args(cfg),
  )
  if result.preempted:
    return result
  state = result.state
  mask = state.mask if state.mask is not None else masks.ones_like(state.params)
  _save(os.path.join(cell_dir, "final"), mask, state.params, method=method, seed=seed)
  kernels = masks.prunable_tree(state.params, None)
  weights = sum(
    int(np.sum(m)) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(kernels)) if f
  )
  common.write_json(
    os.path.join(cell_dir, common.RESULTS_FILE),
    {
      "final": result.history[-1] if result.history else {},
      "epochs": len(result.history),
      "train_seconds": sum(r["epoch_seconds"] for r in result.history),
      "wall_seconds": time.perf_counter() - t0,
      "weights": weights,
      "model_kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, tuple, list))},
      "mask": masks.summary(mask).as_dict(),
    },
  )
  return result


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _steps(cell_dir: str) -> list[dict]:
  return metrics_log.read_jsonl(os.path.join(cell_dir, metrics_log.STEPS_FILE))


def _distance(a, b) -> float | None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or any(
    np.shape(x) != np.shape(y) for x, y in zip(la, lb)
  ):
    return None
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2) for x, y in zip(la, lb))))


def cell_row(workdir: str, method: str, seed: int) -> dict:
  """The ``results.csv`` row of a finished cell."""
  cell_dir = os.path.join(workdir, "cells", cell_name(method, seed))
  run = common.read_json(os.path.join(cell_dir, common.RESULTS_FILE))
  steps = _steps(cell_dir)
  first = [r for r in steps if r["step"] == 1]
  updates = [
    r["grad_norm"] / r["grad_norm_before"]
    for r in steps
    if r.get("mask_change", 0) > 0 and r["grad_norm_before"] > 0
  ]
  row = {
    "method": method,
    "seed": seed,
    "test_accuracy": run["final"].get("test_accuracy"),
    "train_loss": run["final"].get("train_loss"),
    "grad_norm_init": first[0]["grad_norm_before"] if first else None,
    "update_flow_ratio": float(np.mean(updates))
    if updates and method in ("rigl", "rigl_plus")
    else None,
    "weights": run["weights"],
    "sparsity": run["mask"]["sparsity"],
    "training_seconds": run["train_seconds"],
    "cell": cell_name(method, seed),
    "dist_init_to_pruned": None,
    "dist_final_to_pruned": None,
  }
  solution = os.path.join(workdir, "cells", cell_name("pruned", seed), "final")
  if lottery.ticket_exists(solution):
    _, pruned = _pruned_solution(workdir, seed)
    for when in ("initial", "final"):
      _, params, _ = lottery.load_ticket(os.path.join(cell_dir, when))
      short = "init" if when == "initial" else "final"
      row[f"dist_{short}_to_pruned"] = _distance(params, pruned)
  return row


def _fmt(values, digits: int, scale: float = 1.0) -> str:
  values = [scale * v for v in values if v is not None]
  return results.fmt_mean_std(values, digits) if values else "–"


def format_table(config: ml_collections.ConfigDict, rows: list[dict]) -> str:
  """The markdown table of ``results.md`` (see the module doc)."""
  header = [
    "method",
    "weights",
    "test accuracy (%)",
    "train loss",
    "grad norm at init",
    "‖θ_init − θ_pruned‖",
    "‖θ_final − θ_pruned‖",
    "flow after / before mask update",
  ]
  body = []
  for method in [m for m in METHODS if m in tuple(config.methods)]:
    found = [r for r in rows if r["method"] == method]
    if not found:
      continue
    col = lambda k, d, s=1.0: _fmt([r[k] for r in found], d, s)  # noqa: B023 (used at once)
    body.append(
      [
        LABELS[method],
        f"{int(np.mean([r['weights'] for r in found]))}",
        col("test_accuracy", 1, 100),
        col("train_loss", 3),
        col("grad_norm_init", 3),
        col("dist_init_to_pruned", 1),
        col("dist_final_to_pruned", 1),
        col("update_flow_ratio", 3),
      ]
    )
  seeds = len(tuple(config.seeds))
  subset = (
    f"{config.data.train_subset} training images"
    if config.data.train_subset
    else "the full training set"
  )
  title = (
    f"{config.model.name} on {config.data.name} ({subset}, "
    f"{results.epochs_text(config.train.num_epochs)}) at "
    f"{results.fmt_sparsity(config.sparsity)} sparsity; mean ± std over "
    f"{seeds} seeds. Weights: active kernel weights. Distances: L2 over all "
    "parameters to the pruned (GMP) solution of the same seed."
  )
  return title + "\n\n" + results.markdown_table(header, body)


def _flow_series(workdir, config, methods, key="grad_norm"):
  series = {}
  every = int(config.flow_every)
  for method in methods:
    runs = []
    for seed in config.seeds:
      cell_dir = os.path.join(workdir, "cells", cell_name(method, int(seed)))
      steps = _steps(cell_dir)
      if not steps:
        continue
      points = [(0, r["grad_norm_before"]) for r in steps if r["step"] == 1]
      points += [(r["step"], r[key]) for r in steps if r["step"] % every == 0]
      runs.append(points)
    if runs:
      series[LABELS[method]] = runs
  return series


def _update_series(workdir, config, methods):
  series = {}
  for method in methods:
    for key, what in (("grad_norm_before", "before"), ("grad_norm", "after")):
      runs = []
      for seed in config.seeds:
        steps = _steps(os.path.join(workdir, "cells", cell_name(method, int(seed))))
        runs.append([(r["step"] - 1, r[key]) for r in steps if r.get("mask_change", 0) > 0])
      if any(runs):
        series[f"{LABELS[method]} {what} update"] = [r for r in runs if r]
  return series


def write_report(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> dict:
  """Writes ``results.csv``, ``results.md`` and the plots (nothing with
  ``write=False``); returns ``{"rows", "table", "missing"}``."""
  all_cells = cells(config)
  finished = [
    (m, s)
    for m, s in all_cells
    if epath.Path(os.path.join(workdir, "cells", cell_name(m, s), common.RESULTS_FILE)).exists()
  ]
  rows = [cell_row(workdir, m, s) for m, s in finished]
  table = format_table(config, rows)
  report = {
    "rows": rows,
    "table": table,
    "missing": [cell_name(m, s) for m, s in all_cells if (m, s) not in finished],
  }
  if not write:
    return report
  results.write_csv(os.path.join(workdir, "results.csv"), rows, CSV_FIELDS)
  with epath.Path(os.path.join(workdir, "results.md")).open("w") as f:
    f.write(table + "\n")
  done = sorted({m for m, _ in finished}, key=METHODS.index)
  title = (
    f"{config.model.name} on {config.data.name}, {results.fmt_sparsity(config.sparsity)} sparsity"
  )
  series = _flow_series(workdir, config, done)
  if series:
    results.plot_series(
      os.path.join(workdir, "gradient_flow.png"),
      series,
      xlabel="training step",
      logy=True,
      ylabel="‖masked gradient‖₂ (held-out batch)",
      title=f"Gradient flow: {title}",
    )
  series = _update_series(workdir, config, [m for m in done if m in ("rigl", "rigl_plus")])
  if series:
    results.plot_series(
      os.path.join(workdir, "mask_updates.png"),
      series,
      xlabel="mask-update step",
      logy=True,
      ylabel="‖masked gradient‖₂ (held-out batch)",
      title=f"Gradient flow at RigL's mask updates: {title}",
    )
  return report


def run(config: ml_collections.ConfigDict, workdir: str, *, report_only: bool = False) -> dict:
  """Runs the unfinished cells, then writes the table and the plots.

  The grid directory and every started cell are checked before anything is
  written (:func:`experiments.sweep.claim_grid`, this runner's name); a grid
  finished already (every cell and ``results.csv``, ``results.md``) is left
  as it is.

  Returns:
    ``{"rows", "table", "missing", "ran", "skipped", "preempted",
    "finished"}`` (as :func:`experiments.sweep.run`).
  """
  check_config(config)
  workdir = str(_paths.resolve(workdir))
  todo = cells(config)
  if sweep.claim_grid(
    workdir,
    RUNNER,
    config,
    [(os.path.join(workdir, "cells", cell_name(m, s)), cell_config(config, m, s)) for m, s in todo],
    report_only=report_only,
  ):
    report = write_report(config, workdir, write=False)
    return dict(
      report, ran=[], skipped=[cell_name(m, s) for m, s in todo], preempted=False, finished=True
    )
  ran, skipped, preempted = [], [], False
  if not report_only:
    common.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    dataset, flow_batch = gradient_flow.held_out_split(
      common.load_dataset(config), int(config.flow_examples_per_class)
    )
    for i, (method, seed) in enumerate(todo, 1):
      name = cell_name(method, seed)
      if epath.Path(os.path.join(workdir, "cells", name, common.RESULTS_FILE)).exists():
        logging.info("cell %s: finished already, skipped", name)
        skipped.append(name)
        continue
      print(f"cell {i}/{len(todo)}: {name}", flush=True)
      result = run_cell(config, method, seed, workdir, dataset, flow_batch)
      if result.preempted:
        preempted = True
        break
      ran.append(name)
      final = result.history[-1] if result.history else {}
      print(
        f"cell {i}/{len(todo)}: {name}: test accuracy "
        f"{100 * final.get('test_accuracy', float('nan')):.2f}%, training "
        f"{sum(r['epoch_seconds'] for r in result.history):.0f} s",
        flush=True,
      )
  report = write_report(config, workdir)
  return dict(report, ran=ran, skipped=skipped, preempted=preempted, finished=False)


def get_base_config() -> ml_collections.ConfigDict:
  """``default.py`` with the experiment's fields (for the config files)."""
  return add_fields(default_config.get_config())


def main(argv):
  sweep.main(argv, run_fn=run)


if __name__ == "__main__":
  sweep.define_flags()
  common.app_run(main)
