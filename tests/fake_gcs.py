"""A fake ``gs://`` backend for tests: every ``gs://BUCKET/...`` path lives
under a local root directory.

:func:`fake_gcs` routes ``etils.epath`` (``epath.testing.mock_epath``: the
``gs://`` paths of sparsejax and of Orbax's metadata) and TensorStore (Orbax's
array data: the ``gcs`` kvstore spec Orbax builds for a ``gs://`` path becomes
a ``file`` spec under the root) there. Paths keep their ``gs://`` form
everywhere else, so ``os.path`` on them would still mangle them: a run that
works under it does all its run-directory I/O through ``epath``.
"""

import contextlib
import os
from unittest import mock

from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root: str | os.PathLike):
  """Routes ``gs://...`` to ``root/...`` for epath and Orbax's TensorStore."""
  root = os.fspath(root).rstrip("/")

  def local(path) -> str:
    text = os.fspath(path)
    return root + "/" + text[len(PREFIX) :] if text.startswith(PREFIX) else text

  def remote(path: str) -> str:
    return PREFIX + path[len(root) + 1 :] if path.startswith(root + "/") else path

  def one(orig, path, *args, **kwargs):
    return orig(local(path), *args, **kwargs)

  def two(orig, path, dst, *args, **kwargs):
    return orig(local(path), local(dst), *args, **kwargs)

  def glob(orig, pattern):
    return [remote(os.fspath(p)) for p in orig(local(pattern))]

  def walk(orig, top, **kwargs):
    for dirpath, dirs, files in orig(local(top), **kwargs):
      yield remote(os.fspath(dirpath)), dirs, files

  def kvstore(path):
    return {"driver": "file", "path": local(path)}

  with (
    epath_testing.mock_epath(
      open=one,
      exists=one,
      isdir=one,
      listdir=one,
      makedirs=one,
      mkdir=one,
      remove=one,
      rmtree=one,
      stat=one,
      copy=two,
      rename=two,
      replace=two,
      glob=glob,
      walk=walk,
    ),
    mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore),
    mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False),
  ):
    yield
