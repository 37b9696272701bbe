"""Lottery tickets on CIFAR-10 ResNet-20, the OpenLTH protocol (SPEC §3, §8).

The ResNet-20 defaults of OpenLTH (facebookresearch/open_lth,
``models/cifar_resnet.py``): SGD with momentum 0.9 (not Nesterov), lr 0.1,
batch 128, 160 epochs, lr x0.1 at epochs 80 and 120 (the GraSP protocol's 50%
and 75%), weight decay 1e-4, random crop with 4-pixel padding and horizontal
flip, per-channel normalisation. Iterative magnitude pruning removes 20% of
the remaining prunable weights per level, one global ranking over every conv
and dense kernel (stem, shortcut convs and classifier included), and rewinds
to step 500 (Frankle et al. 2020; ``--config.rewind_epochs=1`` rewinds to the
end of epoch 1 instead, ``--config.rewind_step=0`` to the initialisation).

16 levels reach density 0.8^16 = 2.8%. Each of the 17 ticket trainings and
2 x 16 control trainings runs from step 500 to step 62,400 (390 steps per
epoch): 49 trainings of ~160 epochs, sized for an accelerator::

  python -m experiments.lottery --config experiments/configs/lottery_openlth.py \
      --workdir runs/lth_resnet20 [--config.data.dir=DIR]

Interrupted runs resume where they stopped when the same command is rerun.
"""

from ml_collections import config_dict

from experiments.configs import default


def get_config():
  """Returns the OpenLTH ResNet-20 lottery configuration."""
  config = default.get_config()
  # Pruning is the lottery procedure below, not a mask at initialisation.
  del config["pruner"]
  del config["sparsity"]
  config.model.name = "resnet20"
  config.data.name = "cifar10"
  default.sgd_protocol(config, nesterov=False, lr_decay_epochs=(80, 120))

  # --- Lottery ------------------------------------------------------------------
  # Pruning levels after the dense level 0: density (1 - prune_fraction)^levels.
  config.levels = 16
  # Fraction of the *remaining* prunable weights removed per level (SPEC: 0.2).
  config.prune_fraction = 0.2
  # IMP allocation: "global" (one magnitude ranking over all prunable layers)
  # or "uniform" (the same fraction of every layer). Which kernels are
  # prunable: config.prunable ("kernels", "keep_first", ...).
  config.budget = "global"
  # The rewind point: global step k (0 = the initialisation θ_0), or, when
  # rewind_epochs is set, round(rewind_epochs * steps_per_epoch).
  config.rewind_step = 500
  config.rewind_epochs = config_dict.placeholder(float)
  # Controls at every level >= 1, on the ticket's mask: "reinit" (same mask,
  # another initialisation) and "reprune" (same per-layer counts, random
  # positions). () turns them off.
  config.controls = ("reinit", "reprune")
  # Seed of the controls' initialisations and random masks.
  config.control_seed = 1
  return config
