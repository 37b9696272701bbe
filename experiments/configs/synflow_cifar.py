"""The SynFlow reference protocol (Tanaka et al. 2020; SPEC §8).

SGD with Nesterov momentum 0.9, lr 0.1, batch 128, 160 epochs, lr x0.1 at
epochs 60 and 120, weight decay 1e-4 (ResNets) / 5e-4 (VGG), random crop with
4-pixel padding and horizontal flip, per-channel normalisation.

The optional config argument is ``MODEL[,DATASET]``, e.g.::

  python -m experiments.train \
      --config experiments/configs/synflow_cifar.py:vgg16,cifar100 \
      --config.pruner=magnitude --config.sparsity=0.9 --workdir runs/vgg16_c100
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  """Returns the SynFlow protocol for ``arg = "MODEL[,DATASET]"``."""
  model, _, dataset = (arg or "resnet18,cifar10").partition(",")
  config = default.get_config()
  config.model.name = model
  config.data.name = dataset or "cifar10"
  default.sgd_protocol(config, nesterov=True, lr_decay_epochs=(60, 120))
  return config
