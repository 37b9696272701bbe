"""The CPU grid of Sup-tickets (``experiments.suptickets``), about 40 minutes.

ResNet-20 on the offline CIFAR-10 copy at 95% sparsity: RigL and GraNet
alone, and each with Sup-tickets in the same total epochs; 3 seeds, 12 cells.
The DST CPU grid's setting (``dst_cpu.py``) shrunk further: a class-balanced
2,500-image subset, batch 64 (39 steps per epoch), SGD momentum 0.9, lr 0.1
cosine to 0, weight decay 1e-4, crop and flip, mask updates every ΔT = 25
steps; RigL from a random ERK mask (drop fraction 0.3 cosine-decayed to 0 at
75%), GraNet from an ERK mask at density 0.5 (pruned over the first half,
regrowth 0.5 until 75%). Every run has E = 12 epochs (468 steps); Sup-tickets
trains the DST method with these schedules over E − C·M = 6 epochs, then
M = 3 cycles of C = 2 epochs (78 steps each; cyclic lr 0.001 → 0.005 → 0.001
per iteration, one drop-and-regrow of half of each layer at each cycle
start, cumulative mean, global re-pruning, batch-norm statistics recomputed
on the 2,500 training images). Tested once at the end on all 10,000 test
images (and each ticket and superposed model at its cycle end).

Calibration (2-core AMD EPYC Zen 4, idle): a batch-64 step of ResNet-20 takes
about 0.2 s and the test set about 15 s, so a plain cell takes about 2.5
minutes and a Sup-tickets cell (3 cycle ends: statistics pass, ticket and
superposed evaluations) about 4; the grid about 40 minutes. Resumable:
rerun the same command to continue.

  python -m experiments.suptickets --config experiments/configs/suptickets_cpu.py \\
      --config.data.dir=/path/to/data --workdir runs/suptickets_cpu
"""

from experiments.configs import dst_cpu


def get_config():
  """Returns the CPU grid."""
  config = dst_cpu.get_config()
  config.data.train_subset = 2500
  config.train.num_epochs = 12
  config.dst_update_every = 25
  config.sup_cycles = 3
  config.sup_cycle_epochs = 2
  config.sup_lr1 = 0.001
  config.sup_lr2 = 0.005
  plain = config.variants.to_dict()
  rigl, granet = plain["rigl"], plain["granet"]
  config.variants = {
    "rigl": rigl,
    "rigl_sup": dict(rigl, suptickets=True),
    "granet": granet,
    "granet_sup": dict(granet, suptickets=True),
  }
  config.methods = ("rigl", "rigl_sup", "granet", "granet_sup")
  config.sparsities = (0.95,)
  config.seeds = (0, 1, 2)
  config.density_plot_sparsity = 0.95
  return config
