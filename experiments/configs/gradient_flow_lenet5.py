"""The paper's LeNet-5 setting of ``experiments.gradient_flow`` (Evci et al. 2022).

LeNet-5 at 95% sparsity; the pruned solution by gradual magnitude pruning
from step 3000 to step 7000, every 100 steps; 25 epochs of batch 128, SGD
momentum 0.9, lr 0.05 with a cosine decay, weight decay 5e-4; RigL with
ΔT = 100, drop fraction 0.3 cosine-decayed until 75% of training; the
gradient flow every 100 steps on 50 held-out training examples per class;
3 seeds. Dense, pruned, lottery ticket, Scratch, Scratch+, RigL, RigL+ and a
small dense LeNet-5 with about as many weights. For any dataset sparsejax
loads (``--config.data.name``, ``--config.data.dir``; default CIFAR-10, about
9,750 steps)::

  python -m experiments.gradient_flow \\
      --config experiments/configs/gradient_flow_lenet5.py \\
      --config.data.dir=/path/to/data --workdir runs/gradient_flow_lenet5
"""

from experiments import gradient_flow


def get_config():
  """Returns the paper's LeNet-5 setting."""
  config = gradient_flow.get_base_config()
  config.data.name = "cifar10"
  config.model.name = "lenet5"
  config.sparsity = 0.95
  config.train.num_epochs = 25
  config.train.batch_size = 128
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "cosine"
  config.prune_start = 3000
  config.prune_end = 7000
  config.prune_every = 100
  config.dst_update_every = 100
  config.dst_alpha = 0.3
  config.dst_end = 0.75
  config.flow_every = 100
  config.flow_examples_per_class = 50
  config.seeds = (0, 1, 2)
  config.train.max_to_keep = 1
  return config
