"""Configuration of ``experiments.prune_at_init``: the SPEC §8 SynFlow protocol.

The SynFlow reference protocol of ``synflow_cifar.py`` (SGD with Nesterov
momentum 0.9, lr 0.1, batch 128, 160 epochs, lr x0.1 at epochs 60 and 120,
weight decay 1e-4 for ResNets / 5e-4 for VGG) with a pruning method and a
sparsity. The scoring fields (``score_samples_per_class``, ``pruning_rounds``,
``score_bn_mode``, ``grasp_temperature``, ``synflow_dtype``) are documented in
``default.py``.

The optional config argument is ``MODEL[,DATASET]``, e.g.::

  python -m experiments.prune_at_init \
      --config experiments/configs/prune_at_init.py:vgg16,cifar100 \
      --config.pruner=grasp --config.sparsity=0.99 --workdir runs/vgg16_grasp99
"""

from experiments.configs import synflow_cifar


def get_config(arg: str | None = None):
  """Returns the SynFlow protocol for ``arg = "MODEL[,DATASET]"``, pruned by SynFlow."""
  config = synflow_cifar.get_config(arg)
  config.pruner = "synflow"
  config.sparsity = 0.9
  return config
