r"""Trains any registry model on any dataset, dense or with a static mask.

Usage (the Flax examples convention)::

  python -m experiments.train --config experiments/configs/default.py \
      --workdir runs/resnet20_mag90 \
      --config.pruner=magnitude --config.sparsity=0.9 --config.budget=global

The mask is chosen once at initialisation by any method of
:func:`sparsejax.scores.prune_at_init` (``config.pruner``; ``dense`` trains
without one), reported (nominal and effective sparsity, per-layer density,
layer collapse) and kept fixed: it lives in the optimiser state
(:func:`sparsejax.optim.sparse`), so pruned weights stay exactly zero. The
pruning and the run are those of :mod:`experiments.common`; training is
:func:`sparsejax.train.fit`: checkpoints every epoch and on SIGTERM,
automatic resume, ``metrics.jsonl`` and TensorBoard events.

The run directory receives ``run.json`` (its signature: the runner and the
config without the fields that cannot change the result, checked before
anything else is written), ``config.json`` (the resolved config),
``pruning.json``/``pruning.txt`` (the mask report), ``metrics.jsonl``,
``tb/``, ``checkpoints/`` and, at the end, ``results.json`` (final metrics and
the per-layer mask summary). ``experiments.prune_at_init`` is the same run
with the SPEC §8 SynFlow protocol as its default config.

A workdir that holds another run (another runner, or a config that differs in
any field of its signature, e.g. ``sparsity``, ``dst`` or ``train.num_epochs``) is
refused with one ``error:`` line naming each differing field, and left as it
was; a finished run rerun with the same config trains nothing and says
``already finished: <workdir> (results.json); nothing to do``.

Exit status: 0 when training completed; 143 when stopped by SIGTERM after
saving a checkpoint (rerun the same command to resume); 1 on an error, printed
as one ``error:`` line plus the loader's details where there are any (rerun
with ``--verbosity=1`` for the traceback).
"""

from __future__ import annotations

from experiments import common
from experiments.common import EXIT_PREEMPTED  # noqa: F401  (the public names of this runner)
from experiments.common import PRUNABLE  # noqa: F401  (the public names of this runner)
from experiments.common import PRUNERS  # noqa: F401  (the public names of this runner)
from experiments.common import resolve_config  # noqa: F401  (the public names of this runner)
from experiments.common import run  # noqa: F401  (the public names of this runner)

main = common.make_main(run)


if __name__ == "__main__":
  common.define_flags()
  common.app_run(main)
