"""sparsejax: sparse neural-network training in JAX.

Submodules:
  masks: pytree masks, prunability, exact sparsity budgets (global/uniform/ERK).
  optim: ``masked(inner, mask)``, the optax wrapper that keeps pruned weights 0.
"""

from sparsejax import masks
from sparsejax import optim

__version__ = "0.1.0"

__all__ = ["masks", "optim"]
