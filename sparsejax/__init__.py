"""sparsejax: sparse neural-network training in JAX.

Submodules:
  masks: pytree masks, prunability, exact sparsity budgets (global/uniform/ERK).
  optim: ``masked(inner, mask)``, the optax wrapper that keeps pruned weights 0.
  models: CIFAR ResNets, ResNet-18, VGG-bn, MobileNetV2, LeNet-5, MLP (linen).
  data: dataset loaders and the on-device input pipeline.
"""

from sparsejax import data
from sparsejax import masks
from sparsejax import models
from sparsejax import optim

__version__ = "0.1.0"

__all__ = ["data", "masks", "models", "optim"]
