"""A CPU-sized run on the offline digits dataset (scikit-learn's 8x8 digits).

Trains LeNet-300-100 (``mlp``) in seconds; handy for smoke tests::

  python -m experiments.train --config experiments/configs/digits.py \
      --config.pruner=magnitude --config.sparsity=0.9 --workdir runs/digits
"""

from experiments.configs import default


def get_config():
  """Returns the digits configuration."""
  config = default.get_config()
  config.data.name = "digits"
  config.model.name = "mlp"
  config.train.num_epochs = 20
  config.train.batch_size = 64
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.train.eval_batch_size = 512
  config.train.log_every_steps = 20
  return config
