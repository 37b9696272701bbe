r"""Prunes at initialisation with one method at one sparsity, then trains.

Usage (the SPEC §8 SynFlow protocol by default: ResNet-18 on CIFAR-10, SGD
with Nesterov momentum, lr 0.1, batch 128, 160 epochs, lr x0.1 at epochs 60
and 120)::

  python -m experiments.prune_at_init \
      --config experiments/configs/prune_at_init.py:vgg16,cifar100 \
      --config.pruner=snip --config.sparsity=0.99 --workdir runs/vgg16_snip99

``config.pruner`` is any method of :func:`sparsejax.scores.prune_at_init`
(``random``, ``magnitude``, ``snip``, ``grasp``, ``synflow`` or
``iterative_<method>``). Data-dependent scores (SNIP, GraSP) use a
class-balanced batch of ``config.score_samples_per_class`` training examples
per class; SynFlow is data-free (100 rounds by default); batch-norm modes
follow SPEC §2 unless ``config.score_bn_mode`` is set. After pruning, the
mask report -- nominal and effective sparsity, per-layer density, collapsed
layers -- is printed and saved as ``WORKDIR/pruning.json`` and
``WORKDIR/pruning.txt`` together with the scoring time; a collapsed mask is
reported and trained, not refused. Training is :func:`sparsejax.train.fit`
(checkpointed, resumable); ``WORKDIR/results.json`` holds the final metrics.
This is the run of :func:`experiments.common.run`, shared with
``experiments.train`` and every cell of ``experiments.sweep``: the workdir's
signature (``run.json``: this runner and the config) is checked before
anything is written, so a workdir of another run is refused and a finished
run is not trained again.

Exit status: 0 when training completed; 143 when stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume); 1 on an error (one
``error:`` line), including ``pruner=dense``.
"""

from __future__ import annotations

from experiments import common


def run(config, workdir: str):
  """:func:`experiments.common.run` for a pruned network.

  Raises:
    ValueError: ``config.pruner`` is ``"dense"`` (use ``experiments.train``).
  """
  if config.pruner == "dense":
    raise ValueError(
      "experiments.prune_at_init needs a pruning method: set "
      f"--config.pruner to one of {common.PRUNERS[1:]}"
    )
  return common.run(config, workdir, runner="experiments.prune_at_init")


main = common.make_main(run)


if __name__ == "__main__":
  common.define_flags()
  common.app_run(main)
