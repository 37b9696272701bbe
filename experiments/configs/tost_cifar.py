"""ToST's released recipe (Jaiswal et al. 2022; SPEC §7), for an accelerator.

ResNet-18 (CIFAR variant) on CIFAR-10 or CIFAR-100: SGD momentum 0.9, lr 0.1
x0.1 at epochs 90 and 135, batch 128, weight decay 2e-4, 182 epochs, random
crop and flip; LRsI with Adam on the scales (lr 1e-2), 180 iterations,
gradient-norm bound 1 and clip 1, weight scales floored at 0.01 and bias
scales at 0 (the defaults of ``sparsejax.tost.LRsI``). Masks from random,
SNIP, GraSP and SynFlow (global budget) at 90%, 95% and 98% sparsity, each
trained with the baseline protocol, ToST's ``ghost`` schedule and the
released code's ``always_on`` recipe; one-technique-at-a-time ablation on
the SNIP masks; 3 seeds.

The optional config argument is the dataset, ``cifar10`` (default) or
``cifar100``::

  python -m experiments.tost --config experiments/configs/tost_cifar.py:cifar100 \
      --workdir runs/tost_r18_c100

Lottery tickets: add ``ticket`` to ``mask_sources`` and set ``config.ticket``
(e.g. ``ml_collections.ConfigDict(dict(levels=18, prune_fraction=0.2,
rewind_epochs=...))``: the lottery runs first, per seed) or point
``config.mask_path`` at a ticket directory of ``experiments.lottery``.
"""

import ml_collections

from experiments.configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the released ToST recipe on ``arg`` (``cifar10`` or ``cifar100``)."""
  config = default.get_config()
  config.model.name = "resnet18"
  config.data.name = arg or "cifar10"
  config.train.num_epochs = 182
  config.train.batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.schedule = "multistep"
  config.optimizer.decay_epochs = (90, 135)
  config.optimizer.decay_factor = 0.1
  config.optimizer.weight_decay = 2e-4
  config.budget = "global"
  # The grid (experiments.tost).
  config.mask_sources = ("random", "snip", "grasp", "synflow")
  config.recipes = ("none", "ghost", "always_on")
  config.ablation_sources = ("snip",)
  config.ablation_recipes = ("soft_neurons", "ghost_skips", "label_smoothing", "lrsi")
  config.ticket = None
  config.sparsities = (0.9, 0.95, 0.98)
  config.seeds = (0, 1, 2)
  config.density_plot_sparsity = None
  return config
