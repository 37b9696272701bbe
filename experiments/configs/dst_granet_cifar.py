"""The GraNet CIFAR protocol for ``experiments.dst`` (Liu et al. 2021; SPEC §4).

CIFAR ResNet-50 (``MODEL[,DATASET]`` argument; default ``resnet50,cifar10``,
also e.g. ``vgg19,cifar100``) at 90% and 95% sparsity, 3 seeds: GraNet from an
ERK mask at density 0.5, gradual magnitude pruning (the same schedule without
regrowth) from dense, and RigL from a random ERK mask, beside the dense
network. SPEC §4's reference: pruning every 1000 iterations from epoch 0 to
epoch 80 of 160, regrowth fraction 0.5 decayed by cosine, gradient growth.
Training follows SPEC §8 (SGD momentum 0.9, lr 0.1, batch 128, 160 epochs,
x0.1 at 50% and 75%, weight decay 1e-4 / 5e-4 for VGG). Needs an
accelerator::

  python -m experiments.dst --config experiments/configs/dst_granet_cifar.py \\
      --workdir runs/dst_granet_r50
"""

from ml_collections import config_dict

from experiments.configs import default


def get_config(arg: str | None = None):
  """Returns the GraNet grid for ``arg = "MODEL[,DATASET]"``."""
  model, _, dataset = (arg or "resnet50,cifar10").partition(",")
  config = default.get_config()
  config.model.name = model
  config.data.name = dataset or "cifar10"
  default.sgd_protocol(config, nesterov=False, lr_decay_epochs=(0.5, 0.75))
  config.dst_update_every = 1000
  config.dst_prune_epochs = (0, 80)
  # GraNet's regrowth: fraction 0.5, cosine-decayed until the end of pruning.
  config.dst_alpha = 0.5
  config.dst_end = 0.5
  config.methods = ("granet", "gmp", "rigl")
  config.variants = {
    "granet": {"pruner": "dense", "dst": "granet", "budget": "erk", "dst_initial_sparsity": 0.5},
    "gmp": {"pruner": "dense", "dst": "gmp"},
    "rigl": {
      "pruner": "random",
      "budget": "erk",
      "dst": "rigl",
      "dst_update_every": 100,
      "dst_alpha": 0.3,
      "dst_end": 0.75,
    },
  }
  config.sparsities = (0.0, 0.9, 0.95)
  config.seeds = (0, 1, 2)
  config.density_plot_sparsity = config_dict.placeholder(float)
  config.train.max_to_keep = 1
  return config
