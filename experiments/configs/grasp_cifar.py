"""The GraSP reference protocol (Wang et al. 2020; SPEC §8).

SGD with momentum 0.9, lr 0.1, batch 128, 160 epochs, lr x0.1 at 50% and 75%
of training, weight decay 1e-4 (ResNets) / 5e-4 (VGG), random crop with
4-pixel padding and horizontal flip, per-channel normalisation. GraSP's
ResNet-32 is twice as wide (``model.kwargs.width = 2``).

The optional config argument is ``MODEL[,DATASET]``, e.g.::

  python -m experiments.train \
      --config experiments/configs/grasp_cifar.py:resnet32,cifar100 \
      --config.pruner=random --config.sparsity=0.95 --workdir runs/r32_c100
"""

from experiments.configs import default


def get_config(arg: str | None = None):
  """Returns the GraSP protocol for ``arg = "MODEL[,DATASET]"``."""
  model, _, dataset = (arg or "vgg19,cifar10").partition(",")
  config = default.get_config()
  config.model.name = model
  config.data.name = dataset or "cifar10"
  if model == "resnet32":
    config.model.kwargs.width = 2
  default.sgd_protocol(config, nesterov=False, lr_decay_epochs=(0.5, 0.75))
  return config
