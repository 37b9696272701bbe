"""SNIP, GraSP and SynFlow at 99% and 99.9% sparsity, 3 seeds, longer CPU training.

The two extreme columns of ``sweep_cpu_small.py`` with about 4x more training
per cell:
ResNet-20 on a class-balanced subset of 20,000 CIFAR-10 training images for
3 epochs (936 steps of batch 64; otherwise the protocol of the small grid:
SGD with Nesterov momentum 0.9, lr 0.1 with a cosine decay to 0, weight decay
1e-4, random crop and flip), tested once at the end on the full test set.
Scoring as in the paper (10 examples per class for SNIP and GraSP, 100
SynFlow rounds, global budget). 18 cells of about 5 minutes each on 2 CPU
cores, 90 minutes in all.

It asks whether the 99% ordering of the 2-epoch grid (GraSP > SNIP >
SynFlow) survives more training (SPEC §9 has the three within 1.1 points of
each other after 160 epochs), and whether SynFlow's lead at 99.9% holds over
seeds. With the offline copy of CIFAR-10 the images are JPEG-decoded::

  python -m experiments.sweep --config experiments/configs/sweep_cpu_long.py \
      --config.data.dir=/path/to/data --workdir runs/sweep_cpu_long
"""

from experiments.configs import sweep_cpu_small


def get_config():
  """Returns the extreme-sparsity grid with longer training."""
  config = sweep_cpu_small.get_config()
  config.methods = ("snip", "grasp", "synflow")
  config.sparsities = (0.99, 0.999)
  config.seeds = (0, 1, 2)
  config.data.train_subset = 20000
  config.train.num_epochs = 3
  return config
