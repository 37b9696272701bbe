"""The SynFlow-paper grid for ``experiments.sweep`` (Tanaka et al. 2020; SPEC §8, §9).

Every method of the paper's comparison -- random, magnitude, SNIP, GraSP,
SynFlow -- at sparsities from 0 (the dense baseline) to 99.9% (compression
ratios 1 to 1000 in 1-2-5 steps), 3 seeds, each cell trained with the
SynFlow protocol of ``synflow_cifar.py``: SGD with Nesterov momentum 0.9,
lr 0.1, batch 128, 160 epochs, lr x0.1 at epochs 60 and 120, weight decay
1e-4 (ResNets) / 5e-4 (VGG), random crop with 4-pixel padding and horizontal
flip. Global budget, every conv/dense kernel prunable, scoring as in SPEC §2
(10 examples per class for SNIP and GraSP, 100 SynFlow rounds).

The optional config argument is ``MODEL[,DATASET]``; the paper's settings
are ``vgg16,cifar100`` and ``resnet18,cifar10``::

  python -m experiments.sweep \
      --config experiments/configs/sweep_synflow_paper.py:vgg16,cifar100 \
      --workdir runs/sweep_vgg16_c100

The grid fields (also used by ``sweep_cpu_small.py``):

* ``methods``: methods of ``sparsejax.scores.prune_at_init``;
* ``sparsities``: fractions in [0, 1); 0 is one dense cell per seed;
* ``seeds``: the run seeds (initialisation, data order, scoring batch);
* ``density_plot_sparsity``: the sparsity of ``layer_density.png``; None =
  the highest.
"""

from ml_collections import config_dict

from experiments.configs import synflow_cifar


def get_config(arg: str | None = None):
  """Returns the paper grid for ``arg = "MODEL[,DATASET]"`` (default resnet18,cifar10)."""
  config = synflow_cifar.get_config(arg)
  config.methods = ("random", "magnitude", "snip", "grasp", "synflow")
  config.sparsities = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
  config.seeds = (0, 1, 2)
  config.density_plot_sparsity = config_dict.placeholder(float)
  # A finished cell needs only its final checkpoint.
  config.train.max_to_keep = 1
  return config
