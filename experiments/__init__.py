"""Runnable experiments: ``python -m experiments.<name> --config ... --workdir DIR``.

Each module follows the Flax examples convention: an ``ml_collections`` config
file from ``experiments/configs/`` (``--config=path.py[:arg]``), overrides
``--config.key=value`` and a run directory ``--workdir``.
"""
