"""Run logs: per-epoch ``metrics.jsonl`` (+ TensorBoard) and per-step ``steps.jsonl``.

Both files are append-only JSON lines, written by process 0 only, and
truncated on a resume to what the restored checkpoint had seen: records of
epochs (steps) after it are dropped, and the resumed run writes them again.
So an interrupted and resumed run ends with exactly the lines of one that
never stopped, each epoch (step) once, and no checkpoint has to carry the
history.

The run directory may be any ``etils.epath`` location (``gs://...``). Locally
a record is appended to its file; on an object store, which cannot append, the
file is rewritten whole. TensorBoard events go through tensorboardX, which
writes local directories, ``gs://`` (with ``google-cloud-storage`` installed)
and ``s3://`` itself; for any other location pass ``tensorboard=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
import json
import logging
import os

from etils import epath
import jax

from sparsejax import _paths

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The JSON records of ``path`` (``[]`` if missing); a line that does not
  parse (a write cut short by a crash) is skipped with a warning."""
  path = epath.Path(path)
  if not path.exists():
    return []
  records = []
  with path.open() as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logger.warning("%s: line %d is not JSON; dropped", path, n)
  return records


class _JsonLines:
  """An append-only JSON-lines file truncated to the records that ``keep``."""

  def __init__(self, path: epath.Path, keep: Callable[[dict], bool], create: bool = True):
    self._path = path
    self.path = str(path)
    self.active = jax.process_index() == 0
    self.records = [r for r in read_jsonl(path) if keep(r)]
    if self.active and (create or path.exists()):
      self._rewrite()

  def _rewrite(self) -> None:
    _paths.write_text(self._path, "".join(json.dumps(r) + "\n" for r in self.records))

  def append(self, records: Iterable[dict]) -> None:
    records = [dict(r) for r in records]
    self.records.extend(records)
    if not (self.active and records):
      return
    if _paths.is_uri(self._path):
      self._rewrite()
      return
    with self._path.open("a") as f:
      for record in records:
        f.write(json.dumps(record) + "\n")


class MetricsLog:
  """Per-epoch metrics: ``metrics.jsonl`` and TensorBoard events.

  On a resume from a checkpoint taken after ``epochs_done`` epochs, the records
  of later epochs are dropped from ``metrics.jsonl`` (they were written before
  the checkpoint of their epoch committed) and TensorBoard discards later
  events (``purge_step``). :attr:`history` is the records kept plus those
  written since.

  Args:
    workdir: the run directory (any ``etils.epath`` location).
    epochs_done: epochs completed by the restored state; 0 starts a new file.
    tensorboard: also write TensorBoard events to ``workdir/tb`` (see the
      module docstring for the locations tensorboardX can write).
  """

  def __init__(self, workdir: str | os.PathLike, epochs_done: int = 0, tensorboard: bool = True):
    workdir = _paths.resolve(workdir)
    self._file = _JsonLines(workdir / METRICS_FILE, lambda r: int(r.get("epoch", 0)) <= epochs_done)
    self.path = self._file.path
    kept = [int(r["epoch"]) for r in self._file.records]
    if len(kept) != len(set(kept)) or (epochs_done and not kept):
      logger.warning(
        "%s holds epochs %s for a checkpoint after epoch %d", self.path, kept, epochs_done
      )
    self.writer = None
    if tensorboard and self._file.active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self.writer = SummaryWriter(
        str(workdir / "tb"), purge_step=epochs_done + 1 if epochs_done else None
      )

  @property
  def history(self) -> list[dict]:
    """The epoch records, oldest first."""
    return self._file.records

  def write(self, record: dict) -> None:
    """Appends one epoch's record to the history, the file and TensorBoard."""
    self._file.append([record])
    if self.writer is not None:
      epoch = record["epoch"]
      for k, v in record.items():
        if k in ("epoch", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
          continue
        split, _, name = k.partition("_")
        tag = f"{split}/{name}" if split in ("train", "test") and name else k
        self.writer.add_scalar(tag, v, epoch)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class StepLog:
  """Per-step records (``steps.jsonl``): what hooks measure every K steps.

  Each record is ``{"step": s, ...}`` with ``s`` the number of optimiser steps
  taken when it was measured. On a resume from step ``steps_done`` the records
  with a larger ``step`` are dropped. The file is created by the first write.
  """

  def __init__(self, workdir: str | os.PathLike, steps_done: int = 0):
    self._file = _JsonLines(
      _paths.resolve(workdir) / STEPS_FILE,
      lambda r: int(r.get("step", 0)) <= steps_done,
      create=False,
    )
    self.path = self._file.path

  @property
  def records(self) -> list[dict]:
    return self._file.records

  def write(self, records: Iterable[dict]) -> None:
    """Appends ``records`` (dicts with a ``"step"``)."""
    self._file.append(records)
