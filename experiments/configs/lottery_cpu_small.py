"""A CPU-sized lottery-ticket run: ResNet-20 on a CIFAR-10 subset, 3 levels.

The OpenLTH ResNet-20 recipe of ``lottery_openlth.py`` shrunk to run on a
2-core CPU in under 45 minutes, both controls included: 10 trainings (the
dense level 0, 3 ticket levels, 2 x 3 controls) of 150 steps each.

* A class-balanced subset of 6,400 training images (50 steps of 128 per
  epoch), 3 epochs, lr 0.1 with a cosine decay (the multistep decays at
  50% / 75% would leave a single epoch at lr 0.1); the full 10,000-image test
  set, evaluated only at the end of each training.
* **Half** of the remaining weights pruned per level instead of SPEC's 20%:
  with 3 levels, 20% per level stops at density 0.8^3 = 51%, where a ticket
  and its controls are indistinguishable; 50% per level reaches 12.5%
  (densities 50%, 25%, 12.5%), where they differ.
* Rewind to the initialisation (step 0, the original lottery-ticket
  procedure): 150 steps leave no "early training" to rewind to.

Calibration (2 shared CPU cores, another training on the other core): one
level with both controls at 100 steps per training took 137 s per training,
1.1 s per step plus 27 s of compilation, evaluation and checkpoints; 10
trainings of 150 steps extrapolate to about 32 minutes.

Run on the offline CIFAR-10 copy (``DIR/cifar-10-batches-py``)::

  python -m experiments.lottery --config experiments/configs/lottery_cpu_small.py \
      --config.data.dir=DIR --workdir runs/lth_cpu_small
"""

from experiments.configs import lottery_openlth


def get_config():
  """Returns the CPU-sized lottery configuration."""
  config = lottery_openlth.get_config()
  config.data.train_subset = 6400
  config.train.num_epochs = 3
  config.optimizer.schedule = "cosine"
  config.levels = 3
  config.prune_fraction = 0.5
  config.rewind_step = 0
  # Evaluate only at the end of each training (the last step always is).
  config.train.eval_every_epochs = 1000
  config.train.tensorboard = False
  config.train.progress_bar = False
  config.train.log_every_steps = 25
  return config
