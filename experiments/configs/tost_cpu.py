"""The CPU grid of ToST (``experiments.tost``), about 45 minutes on 2 cores.

ResNet-20 on the offline CIFAR-10 copy (JPEG-decoded images) at 98%
sparsity (global budget), with masks from random, SNIP, SynFlow and a
lottery ticket, each trained with the baseline protocol (``none``), ToST's
``ghost`` schedule and the released code's ``always_on`` recipe, plus a
one-technique-at-a-time ablation (soft neurons, ghost skips, label smoothing,
LRsI alone) on the SNIP mask; 2 seeds: 32 cells, and per seed one lottery
run of 3 trainings. ToST's released recipe (``tost_cifar.py``) shrunk to a
CPU budget:

* a class-balanced 2,000-image subset, 6 epochs of batch 64 (31 steps per
  epoch, 186 steps; SGD momentum 0.9, lr 0.1 cosine to 0, weight decay 2e-4
  as in ToST's recipe, crop and flip), tested once at the end on all 10,000
  test images. The ghost schedules are in fractions of training (β, γ held
  for the first 10%, 0 at 50%), so they keep their shape;
* LRsI with 30 Adam iterations on batches of 32 (the recipe: 180 of 128;
  its second-order objective costs several training steps per iteration on
  a CPU), other settings as released (lr 1e-2, η = 0.1, bound and clip 1,
  floors 0.01 / 0);
* the lottery ticket: IMP from the initialisation (rewind step 0) of the
  cell's seed, 2 levels of 85.86% each (1 - √0.02), so level 2 is at 98%,
  trained like the cells, no controls; it then trains from its own init.

Calibration (README, ToST section): measured on the 2-core AMD EPYC under a
load of about 7 (three other jobs), a 92-step cut of a cell took 166 s
(baseline) and 912 s (``ghost``, of which about 710 s LRsI with its
second-order compilation, compiled once per model thanks to the persistent
cache); the ghost step costs about 1.1x the plain step. Idle (0.27 s per
step, 15 s per test), a cell of 186 steps takes about 60 s without LRsI and
100 s with it (the LRsI compilation is paid once per model), the grid about
45 minutes. The grid is resumable: rerun the same command
to continue.

  python -m experiments.tost --config experiments/configs/tost_cpu.py \\
      --config.data.dir=/path/to/data --workdir runs/tost_cpu
"""

import math

import ml_collections

from experiments.configs import tost_cifar


def get_config():
  """Returns the CPU grid."""
  config = tost_cifar.get_config("cifar10")
  config.model.name = "resnet20"
  config.data.train_subset = 2000
  config.train.num_epochs = 6
  config.train.batch_size = 64
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 2e-4
  config.tost_lrsi = ml_collections.ConfigDict(dict(steps=30, batch_size=32))
  config.mask_sources = ("random", "snip", "synflow", "ticket")
  config.recipes = ("none", "ghost", "always_on")
  config.ablation_sources = ("snip",)
  config.ablation_recipes = ("soft_neurons", "ghost_skips", "label_smoothing", "lrsi")
  config.sparsities = (0.98,)
  config.seeds = (0, 1)
  config.ticket = ml_collections.ConfigDict(
    dict(levels=2, prune_fraction=1 - math.sqrt(0.02), rewind_step=0, eval_every_epochs=1000)
  )
  # Test once, at the end (also when --config.train.num_epochs is changed).
  config.train.eval_every_epochs = config.train.get_ref("num_epochs")
  config.train.tensorboard = False
  config.train.progress_bar = False
  return config
