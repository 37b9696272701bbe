"""The RigL CIFAR-10 protocol for ``experiments.dst`` (Evci et al. 2020; SPEC §4, §9).

WRN-22-2 on CIFAR-10 at 90% and 95% sparsity with an ERK budget, 3 seeds:
static ERK (a random ERK mask that never changes), SET and RigL, beside the
dense network. SPEC §9: RigL 92.9 / 91.8, static ERK 91.5 / 89.0. Needs an
accelerator (250 epochs, 27 cells)::

  python -m experiments.dst --config experiments/configs/dst_rigl_cifar.py \\
      --workdir runs/dst_rigl_wrn22

Training: batch 128, 250 epochs, SGD momentum 0.9, lr 0.1, weight decay
5e-4, random crop and flip. The learning-rate decay (x0.2 at 30%, 60% and 80%
of training) is sparsejax's choice where the paper's step schedule could not
be checked; change ``optimizer.decay_epochs`` / ``optimizer.decay_factor`` to match another
reference. DST (SPEC §4 defaults): ΔT = 100 steps, drop fraction 0.3 with a
cosine decay to 0 at 75% of training, the weight update skipped on mask-update
steps, every conv/dense kernel prunable.
"""

from ml_collections import config_dict

from experiments.configs import default


def variants(budget: str = "erk") -> dict:
  """Static sparse training, SET and RigL from the same random ``budget`` mask."""
  start = {"pruner": "random", "budget": budget}
  return {"static": dict(start), "set": dict(start, dst="set"), "rigl": dict(start, dst="rigl")}


def get_config():
  """Returns the RigL CIFAR-10 grid."""
  config = default.get_config()
  config.data.name = "cifar10"
  config.model.name = "wrn22_2"
  config.train.num_epochs = 250
  config.train.batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = "multistep"
  config.optimizer.decay_epochs = (0.3, 0.6, 0.8)
  config.optimizer.decay_factor = 0.2
  config.dst_update_every = 100
  config.dst_alpha = 0.3
  config.dst_end = 0.75
  config.methods = ("static", "set", "rigl")
  config.variants = variants()
  config.sparsities = (0.0, 0.9, 0.95)
  config.seeds = (0, 1, 2)
  config.density_plot_sparsity = config_dict.placeholder(float)
  config.train.max_to_keep = 1
  return config
