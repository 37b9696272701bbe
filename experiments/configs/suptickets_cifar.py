"""The Sup-tickets CIFAR protocol for ``experiments.suptickets`` (Yin et al. 2022; SPEC §6).

``MODEL[,DATASET]`` argument: ``resnet50,cifar10`` (default), ``vgg19`` or
``wrn28_10`` on ``cifar10`` or ``cifar100``. At density 0.05 (95% sparsity),
3 seeds: GraNet and RigL alone, and each with Sup-tickets, every run E = 250
epochs; Sup-tickets runs the DST method for E − C·M = 226 epochs, then M = 3
cycles of C = 8 epochs (cyclic learning rate 0.001 → 0.005 → 0.001 per
iteration, one drop-and-regrow of half of each layer at each cycle start,
superposition by cumulative mean, global re-pruning, batch-norm statistics
recomputed on the training set). Needs an accelerator (12 cells of 250
epochs)::

  python -m experiments.suptickets \\
      --config experiments/configs/suptickets_cifar.py:resnet50,cifar100 \\
      --workdir runs/suptickets_r50_c100

Training follows SPEC §8 (SGD momentum 0.9, lr 0.1, batch 128, x0.1 at 50% and
75%, weight decay 1e-4 / 5e-4 for VGG); each DST method's schedules (and the
learning-rate decays) are fractions of its DST phase: E epochs alone, 226
with Sup-tickets. GraNet (SPEC §4): ERK start at density 0.5, pruning every
1000 iterations over the first half, regrowth fraction 0.5 cosine-decayed to
0 at the end of pruning. RigL: a random ERK mask, ΔT = 100, α = 0.3
cosine-decayed to 0 at 75%.
"""

from experiments.configs import default


def variants() -> dict:
  """GraNet and RigL, each alone and with Sup-tickets (``<method>_sup``)."""
  plain = {
    "granet": {
      "pruner": "dense",
      "dst": "granet",
      "budget": "erk",
      "dst_initial_sparsity": 0.5,
      "dst_update_every": 1000,
      "dst_alpha": 0.5,
      "dst_end": 0.5,
    },
    "rigl": {
      "pruner": "random",
      "budget": "erk",
      "dst": "rigl",
      "dst_update_every": 100,
      "dst_alpha": 0.3,
      "dst_end": 0.75,
    },
  }
  out = {}
  for name, fields in plain.items():
    out[name] = fields
    out[f"{name}_sup"] = dict(fields, suptickets=True)
  return out


def get_config(arg: str | None = None):
  """Returns the Sup-tickets grid for ``arg = "MODEL[,DATASET]"``."""
  model, _, dataset = (arg or "resnet50,cifar10").partition(",")
  config = default.get_config()
  config.model.name = model
  config.data.name = dataset or "cifar10"
  default.sgd_protocol(config, nesterov=False, lr_decay_epochs=(0.5, 0.75))
  config.train.num_epochs = 250
  config.dst_prune_epochs = (0.0, 0.5)
  config.sup_cycles = 3
  config.sup_cycle_epochs = 8
  config.sup_lr1 = 0.001
  config.sup_lr2 = 0.005
  config.methods = ("granet", "granet_sup", "rigl", "rigl_sup")
  config.variants = variants()
  config.sparsities = (0.95,)
  config.seeds = (0, 1, 2)
  config.train.max_to_keep = 1
  return config
