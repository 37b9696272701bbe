"""Run-directory paths: local directories and any ``etils.epath`` location.

Every file a run writes (metrics, checkpoints, tickets, signatures, results)
goes through ``etils.epath``, which Orbax itself uses, so a workdir may be a
local directory or a URI such as ``gs://bucket/run`` on a TPU VM. Plain local
paths are made absolute (as ``os.path.abspath`` did); a URI is kept as given
(``os.path.abspath("gs://b/run")`` would turn it into ``<cwd>/gs:/b/run``).
"""

from __future__ import annotations

import os

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URI (``scheme://...``, e.g. ``gs://``), not a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``; a plain local path made absolute."""
  if isinstance(path, epath.Path) and is_uri(path):
    return path
  text = os.fspath(path)
  return epath.Path(text if is_uri(text) else os.path.abspath(text))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` through a ``.tmp`` sibling and a rename, so a
  reader never sees half a file (an interrupted write leaves any old one)."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Like :func:`write_text` for bytes."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)
