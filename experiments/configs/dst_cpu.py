"""The CPU grid of dynamic sparse training (``experiments.dst``), about two hours.

ResNet-20 on the offline CIFAR-10 copy (JPEG-decoded images); at 90% and 95%
sparsity: static ERK (a random ERK mask, fixed), SET, RigL and GraNet, beside
the dense network; 3 seeds, 27 cells. The RigL protocol
(``dst_rigl_cifar.py``) shrunk to a CPU budget, favouring epochs over images
since DST needs time to explore: a class-balanced 4,000-image subset, 12
epochs of batch 64 (744 steps; SGD momentum 0.9, lr 0.1 cosine to 0, weight
decay 1e-4, crop and flip), tested once at the end on all 10,000 test images.
Mask updates every ΔT = 50 steps until 75% of training (11 updates), drop
fraction 0.3 cosine-decayed; GraNet from an ERK mask at density 0.5, pruned
from step 0 to 50% of training, regrowth 0.5 cosine-decayed until 75%.

Calibration (2-core AMD EPYC, idle): a batch-64 step of ResNet-20 takes about
0.3 s, the test set about 15 s, so a cell takes about 4 minutes and the grid
about 2 hours. The grid is resumable: rerun the same command to continue.

  python -m experiments.dst --config experiments/configs/dst_cpu.py \\
      --config.data.dir=/path/to/data --workdir runs/dst_cpu
"""

from experiments.configs import dst_rigl_cifar


def get_config():
  """Returns the CPU grid."""
  config = dst_rigl_cifar.get_config()
  config.model.name = "resnet20"
  config.data.train_subset = 4000
  config.train.num_epochs = 12
  config.train.batch_size = 64
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "cosine"
  config.dst_update_every = 50
  config.methods = ("static", "set", "rigl", "granet")
  config.variants = dict(
    dst_rigl_cifar.variants(),
    granet={
      "pruner": "dense",
      "dst": "granet",
      "budget": "erk",
      "dst_initial_sparsity": 0.5,
      "dst_alpha": 0.5,
    },
  )
  config.dst_prune_epochs = (0.0, 0.5)
  # Test once, at the end (also when --config.train.num_epochs is changed).
  config.train.eval_every_epochs = config.train.get_ref("num_epochs")
  config.train.tensorboard = False
  config.train.progress_bar = False
  return config
