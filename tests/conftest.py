"""Suite-wide set-up: one persistent XLA compilation cache per test session.

Many tests build their own jitted train steps (every ``fit`` call does) for
the same small models, so the same programs are compiled over and over. A
persistent compilation cache in a fresh temporary folder, shared by the xdist
workers, the subprocesses and the notebook kernel through the environment,
compiles each program once per session (measured: ``tests/test_dst_fit.py``
took 69 s of CPU instead of 112 s on a 2-core AMD EPYC Zen 4). It starts
empty every session, so no result depends on an earlier run, and a cache the
user set (``JAX_COMPILATION_CACHE_DIR``) is left alone.
"""

import os
import shutil
import tempfile

_OWNED = "_SPARSEJAX_TEST_CACHE_OWNED"


def pytest_configure(config):
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # an xdist worker (inherits the controller's) or the user's own cache
  path = tempfile.mkdtemp(prefix="sparsejax-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ[_OWNED] = path


def pytest_unconfigure(config):
  path = os.environ.get(_OWNED)
  if path and not hasattr(config, "workerinput"):
    shutil.rmtree(path, ignore_errors=True)
