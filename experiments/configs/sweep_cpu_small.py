"""A small pruning-at-initialisation grid that runs on a CPU in about 35 minutes.

ResNet-20 on CIFAR-10, the five methods of the SynFlow paper at 90%, 99% and
99.9% sparsity, one seed: 15 cells. The SynFlow-paper grid
(``sweep_synflow_paper.py``) shrunk to a CPU budget: each cell trains on a
class-balanced subset of 7,000 training images for 2 epochs (218 steps of
batch 64; SGD with Nesterov momentum 0.9, lr 0.1 with a cosine decay to 0,
weight decay 1e-4, random crop and flip) and is evaluated once, at the end,
on the full 10,000-image test set. Scoring is as in the paper (10 examples
per class for SNIP and GraSP, 100 SynFlow rounds, global budget).

Calibration (2 CPU cores, another job on the other one): a training step of
64 images takes 0.33-0.55 s, the full test set 13-15 s, the scoring 1-15 s
(SynFlow the slowest), so one cell takes 100-150 s in all and the 15 cells
about 35 minutes (measured: two cells, magnitude and SynFlow at 99.9%, in
255 s of wall time, start-up included).

The accuracies are those of 2 epochs on 7,000 images, far below the
160-epoch numbers of SPEC §9; the comparison between methods (which collapse,
which keep the network connected at extreme sparsity) is the point. With the
offline copy of CIFAR-10 the images are JPEG-decoded, not the original PNG
pixels.

``data.dir`` has no default: pass the directory that holds
``cifar-10-batches-py/`` (or the downloaded archive)::

  python -m experiments.sweep --config experiments/configs/sweep_cpu_small.py \
      --config.data.dir=/path/to/data --workdir runs/sweep_cpu_small
"""

from experiments.configs import sweep_synflow_paper


def get_config():
  """Returns the small CPU grid."""
  config = sweep_synflow_paper.get_config("resnet20,cifar10")
  config.sparsities = (0.9, 0.99, 0.999)
  config.seeds = (0,)
  config.data.train_subset = 7000
  config.train.num_epochs = 2
  config.train.batch_size = 64
  config.optimizer.schedule = "cosine"
  # Test once, at the end (also when --config.train.num_epochs is changed).
  config.train.eval_every_epochs = config.train.get_ref("num_epochs")
  config.train.tensorboard = False
  config.train.progress_bar = False
  return config
