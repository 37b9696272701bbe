"""sparsejax: sparse neural-network training in JAX.

Submodules:
  budgets: sparsity budgets as objects (Global, Uniform, ERK, ER, NM(n, m),
    per-layer overrides) and ``parse`` for command-line names.
  masks: pytree masks, prunability, exact top-k under a budget, random masks.
  nm: N:M masks (``budgets.NM(2, 4)``): checks and the group helpers.
  optim: ``sparse(inner, mask)``, the optax wrapper that keeps pruned weights 0.
  models: CIFAR ResNets, ResNet-18, VGG-bn, MobileNetV2, LeNet-5, MLP (linen).
  modeling: the one closure that applies a model (model state, per-step
    scalars, the CPU fast path): ``apply_model``, ``loss_and_logits``.
  data: dataset loaders and the on-device input pipeline.
  scores: pruning-at-initialisation scores (SNIP, GraSP, SynFlow, magnitude,
    random), iterative pruning, ``prune_at_init``.
  diagnostics: effective sparsity and layer collapse of a mask.
  dst: dynamic sparse training (SET, RigL, gradual magnitude pruning,
    GraNet) as optax wrappers with on-device mask updates.
  gradient_flow: sparse-aware initialisation (``sparse_init``) and the
    gradient-flow measurement hook (SPEC §5).
  suptickets: Sup-tickets (cyclic-rate tickets after DST, superposed,
    re-pruned, batch-norm statistics recomputed).
  lottery: lottery tickets (iterative magnitude pruning with rewinding), the
    random re-initialisation and re-pruning controls, ticket files.
  tost: ToST, the training recipe for any mask (ghost soft neurons, ghost
    skips, label smoothing, LRsI) and its presets.
  methods: every method as a registered frozen dataclass of one protocol
    (mask, optimiser, scalars, loss, hooks, ...), ``from_config``, ``compose``.
  state: the train state (``TrainState``, ``create_train_state``).
  train: the carry, sharded train/eval steps, checkpointed ``fit`` and its
    extension points (initial state, per-step scalars, loss, hooks, callbacks).
  hooks: step hooks ``StepHook(init, update)`` and host ``Callback`` s,
    through which methods extend ``fit``.
  schedules: the optimiser and its learning-rate schedule, steps per epoch,
    per-step scalar schedules.
  losses: the softmax cross-entropy and the default training loss.
  mesh: the data-parallel mesh and array placement.
  checkpoints: Orbax checkpoints with quarantine, run signatures, the
    "is this the same run?" check.
  metrics_log: ``metrics.jsonl`` / TensorBoard and ``steps.jsonl``.
  sparse_io: compressed sparse model files (kept values + bit-packed mask).
  sparse_inference: evaluate a pruned linen model with BCOO sparse kernels.
  condensed: constant fan-in masks (SRigL) and condensed layers (values +
    indices per unit, a gather and a small product) for inference.
  shrink: a physically smaller dense model of the same family with the
    logits of a masked one (dead units and channels cut out).

sparsejax is tested with the JAX versions of ``sparsejax/_jax_range.py``
(the range pyproject.toml pins); imported under another JAX it warns once.

Importing sparsejax appends XLA:CPU options that make convolution training
several times faster on some CPUs to ``XLA_FLAGS`` (never overriding the
user's own; ``SPARSEJAX_XLA_CPU_DEFAULTS=0`` turns this off). Import it before
running any JAX computation; see ``sparsejax/_xla_cpu.py``.
"""

from sparsejax import _jax_range
from sparsejax import _xla_cpu

_jax_range.warn_if_untested()
_xla_cpu.apply()  # before any submodule can start a JAX backend

from sparsejax import budgets
from sparsejax import checkpoints
from sparsejax import condensed
from sparsejax import data
from sparsejax import diagnostics
from sparsejax import dst
from sparsejax import gradient_flow
from sparsejax import hooks
from sparsejax import losses
from sparsejax import lottery
from sparsejax import masks
from sparsejax import mesh
from sparsejax import methods
from sparsejax import metrics_log
from sparsejax import modeling
from sparsejax import models
from sparsejax import nm
from sparsejax import optim
from sparsejax import schedules
from sparsejax import scores
from sparsejax import shrink
from sparsejax import sparse_inference
from sparsejax import sparse_io
from sparsejax import state
from sparsejax import suptickets
from sparsejax import tost
from sparsejax import train

__version__ = "0.1.0"

__all__ = [
  "budgets",
  "checkpoints",
  "condensed",
  "data",
  "diagnostics",
  "dst",
  "gradient_flow",
  "hooks",
  "losses",
  "lottery",
  "masks",
  "mesh",
  "methods",
  "metrics_log",
  "modeling",
  "models",
  "nm",
  "optim",
  "schedules",
  "scores",
  "shrink",
  "sparse_inference",
  "sparse_io",
  "state",
  "suptickets",
  "tost",
  "train",
]
