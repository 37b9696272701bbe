"""The CPU run of ``experiments.gradient_flow`` on the offline CIFAR-10 copy.

The paper's LeNet-5 setting (``gradient_flow_lenet5.py``) shrunk to a 2-core
CPU budget: a class-balanced 6,000-image subset of which 250 (25 per class)
are held out for the gradient-flow measurement, so 5,750 train; 20 epochs of
batch 128 (45 steps each, 900 steps); the pruned solution by gradual
magnitude pruning from 30% to 70% of training every 25 steps (about the
paper's 3000 to 7000 of 9,750), RigL's mask updates every 25 steps until 75%;
the gradient flow every 25 steps; tested once, at the end, on all 10,000 test
images. 95% sparsity, 3 seeds, 8 methods: 24 cells.

Calibration (2-core AMD EPYC Zen 4, idle): an epoch of LeNet-5 (gradient flow
included) takes about 4 s, so a cell takes about 100 s with compilation and
testing and the grid about 40 minutes. Resumable: rerun the same command to
continue.

  python -m experiments.gradient_flow \\
      --config experiments/configs/gradient_flow_cpu.py \\
      --config.data.dir=/path/to/data --workdir runs/gradient_flow_cpu
"""

from experiments.configs import gradient_flow_lenet5


def get_config():
  """Returns the CPU run."""
  config = gradient_flow_lenet5.get_config()
  config.data.train_subset = 6000
  config.train.num_epochs = 20
  config.flow_examples_per_class = 25
  config.prune_start = 0.3
  config.prune_end = 0.7
  config.prune_every = 25
  config.dst_update_every = 25
  config.flow_every = 25
  # Test once, at the end (also when --config.train.num_epochs is changed).
  config.train.eval_every_epochs = config.train.get_ref("num_epochs")
  config.train.tensorboard = False
  config.train.progress_bar = False
  return config
