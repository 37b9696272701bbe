"""A lottery-ticket run in seconds: LeNet-300-100 on the offline digits dataset.

SPEC §3 as in ``lottery_openlth.py`` (20% of the remaining weights per level,
controls at every level) on scikit-learn's 8x8 digits, for smoke tests::

  python -m experiments.lottery --config experiments/configs/lottery_digits.py \
      --workdir runs/lth_digits
"""

from experiments.configs import digits
from experiments.configs import lottery_openlth


def get_config():
  """Returns the digits lottery configuration."""
  config = lottery_openlth.get_config()
  recipe = digits.get_config()  # the MLP training recipe of experiments.train
  for path in (
    "data.name",
    "model.name",
    "train.num_epochs",
    "train.batch_size",
    "optimizer.learning_rate",
    "optimizer.momentum",
    "optimizer.schedule",
    "optimizer.weight_decay",
    "train.eval_batch_size",
    "train.log_every_steps",
  ):
    group, name = path.split(".")
    config[group][name] = recipe[group][name]
  config.levels = 5
  config.rewind_step = 0
  config.train.tensorboard = False
  return config
