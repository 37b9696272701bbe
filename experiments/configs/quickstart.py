"""Configuration of ``experiments.quickstart``: sparsity vs accuracy on digits.

About a minute on a laptop CPU::

  python -m experiments.quickstart --config experiments/configs/quickstart.py \
      --workdir runs/quickstart
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the quickstart configuration."""
  config = ml_collections.ConfigDict()
  for group in ("data", "model", "optimizer", "train"):
    config[group] = ml_collections.ConfigDict()
  # Data and model: the offline digits set and LeNet-300-100.
  config.data.name = "digits"
  config.model.name = "mlp"
  # Computation dtype, "float32" or "bfloat16" (see default.py).
  config.model.dtype = "float32"
  # Pruning at initialisation: every method at every sparsity, global budget,
  # all kernels prunable. Sparsity 0 is the dense baseline.
  config.methods = ("random", "magnitude", "snip", "grasp", "synflow")
  # SNIP and GraSP score on this many training examples per class (SPEC §2).
  config.score_samples_per_class = 10
  config.sparsities = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
  # "global", "uniform", "erk" or "er".
  config.budget = "global"
  # Training (the same for every run; one compiled step serves all masks).
  config.train.num_epochs = 30
  config.train.batch_size = 64
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"
  config.train.seed = 0
  config.train.eval_batch_size = 512
  return config
