"""Test aid: the process sends itself SIGTERM after a given global step.

Exercises the preemption path of :func:`sparsejax.train.fit` at an exact step,
with a :class:`sparsejax.hooks.Callback` added to every ``fit`` call:

  with sigterm_at_step(50):
    result = experiments.common.run(config, workdir)   # stops after step 50

and, for a command-line runner in a subprocess::

  python -c "from tests.sigterm_helper import run_module; run_module('experiments.train', 30)" --config ...
"""

from __future__ import annotations

import contextlib
import functools
import os
import runpy
import signal
import sys

from sparsejax import hooks
from sparsejax import train


class SigtermAt(hooks.Callback):
  """Sends SIGTERM to this process after global step ``step``."""

  every_steps = 1

  def __init__(self, step: int):
    self.step = int(step)

  def __call__(self, step, carry, ctx):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGTERM)


def _patch_fit(step: int):
  original = train.fit

  @functools.wraps(original)
  def fit(*args, callbacks=(), **kwargs):
    return original(*args, callbacks=(*callbacks, SigtermAt(step)), **kwargs)

  train.fit = fit
  return original


@contextlib.contextmanager
def sigterm_at_step(step: int):
  """Within the block every ``sparsejax.train.fit`` call gets :class:`SigtermAt`."""
  original = _patch_fit(step)
  try:
    yield
  finally:
    train.fit = original


def run_module(module: str, step: int) -> None:
  """Runs ``python -m module`` with the arguments of this process, SIGTERM
  after global ``step``."""
  _patch_fit(step)
  sys.argv[0] = module
  runpy.run_module(module, run_name="__main__", alter_sys=True)
