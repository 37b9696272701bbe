"""sparsejax: sparse neural-network training in JAX.

Submodules:
  masks: pytree masks, prunability, exact sparsity budgets (global/uniform/ERK).
  optim: ``masked(inner, mask)``, the optax wrapper that keeps pruned weights 0.
  models: CIFAR ResNets, ResNet-18, VGG-bn, MobileNetV2, LeNet-5, MLP (linen).
  data: dataset loaders and the on-device input pipeline.
  scores: pruning-at-initialisation scores (SNIP, GraSP, SynFlow, magnitude,
    random), iterative pruning, ``prune_at_init``.
  diagnostics: effective sparsity and layer collapse of a mask.
  lottery: lottery tickets (iterative magnitude pruning with rewinding), the
    random re-initialisation and re-pruning controls, ticket files.
  train: train state, sharded train/eval steps, schedules, checkpointed ``fit``.
"""

from sparsejax import data
from sparsejax import diagnostics
from sparsejax import lottery
from sparsejax import masks
from sparsejax import models
from sparsejax import optim
from sparsejax import scores
from sparsejax import train

__version__ = "0.1.0"

__all__ = ["data", "diagnostics", "lottery", "masks", "models", "optim", "scores", "train"]
