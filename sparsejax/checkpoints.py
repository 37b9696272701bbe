"""Checkpoints of a run, and the one "is this the same run?" check.

* :class:`Checkpoints`: Orbax checkpoints of a pytree plus a JSON ``meta``
  item, saved asynchronously, the last N kept; :meth:`Checkpoints.restore_latest`
  tries them newest first and moves (never deletes) an unreadable one to a
  quarantine directory.
* :func:`tree_signature`: a short hash of a pytree's structure, shapes and
  dtypes (not its values), to recognise the state layout of a run.
* :func:`check_same_run`: compares what a run directory recorded (checkpoint
  meta, a ticket's ``meta.json``, a run directory's signature ``run.json``)
  with what the current call expects, and raises :class:`CheckpointMismatchError`
  naming every field that differs. :func:`sparsejax.train.fit`,
  ``experiments.lottery`` and ``experiments.workdir`` (every runner) use it.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
import dataclasses
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sparsejax import _paths
from sparsejax import masks as masks_lib

PyTree = Any
logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """A run directory holds the records of a different run."""


def abstract(tree: PyTree, sharding=None) -> PyTree:
  """``tree`` as ``jax.ShapeDtypeStruct`` leaves (with ``sharding``), e.g. the
  target layout of :meth:`Checkpoints.restore`."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding), tree
  )


def _static_fields(x) -> list[str]:
  if not dataclasses.is_dataclass(x) or isinstance(x, type):
    return []
  return [f.name for f in dataclasses.fields(x) if not f.metadata.get("pytree_node", True)]


def _without_static_fields(tree: PyTree) -> PyTree:
  """``tree`` with the static (non-pytree) fields of Flax struct dataclasses
  set to ``None``: their values (e.g. a train state's optimiser functions) are
  code, not layout, and print differently in every process."""

  def strip(x):
    names = _static_fields(x)
    if not names:
      return x
    data = {
      f.name: _without_static_fields(getattr(x, f.name))
      for f in dataclasses.fields(x)
      if f.name not in names
    }
    return dataclasses.replace(x, **data, **dict.fromkeys(names))

  return jax.tree.map(strip, tree, is_leaf=lambda x: bool(_static_fields(x)))


def tree_signature(tree: PyTree) -> str:
  """A short hash of a pytree's paths, shapes, dtypes and structure.

  Values are ignored, and so are the static fields of Flax struct dataclasses
  (e.g. ``tx`` of :class:`sparsejax.state.TrainState`): two trees with the same
  signature restore into each other's layout.
  """
  tree = _without_static_fields(tree)
  spec = [
    (path, list(jnp.shape(x)), str(jnp.result_type(x))) for path, x in masks_lib.named_leaves(tree)
  ]
  spec.append(str(jax.tree.structure(tree)))
  return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def check_same_run(
  recorded: Mapping[str, Any],
  expected: Mapping[str, Any],
  *,
  where: str,
  fields: Iterable[str] | None = None,
  ignore: Iterable[str] = (),
  what: str = "",
) -> None:
  """Raises unless ``recorded`` agrees with ``expected``: "is this the same run?".

  Values are compared after a JSON round trip (tuples and lists are equal, as
  they are once written to disk). A field missing on one side counts as
  ``None``.

  Args:
    recorded: what the run directory holds (checkpoint meta, ``meta.json``,
      ``config.json``).
    expected: what this call would write.
    where: the file or directory named in the message.
    fields: the fields to compare; default every field of either side.
    ignore: fields never compared (e.g. ones that do not change results).
    what: what may differ, for the message (e.g. ``"another model, mask or
      seed"``).

  Raises:
    CheckpointMismatchError: naming each differing field with both values.
  """

  def normal(mapping):
    return json.loads(json.dumps(dict(mapping), default=repr))

  recorded, expected = normal(recorded), normal(expected)
  names = set(recorded) | set(expected) if fields is None else set(fields)
  diff = sorted(k for k in names - set(ignore) if recorded.get(k) != expected.get(k))
  if diff:
    details = ", ".join(
      f"{k}: {_short(recorded.get(k))} there, {_short(expected.get(k))} here" for k in diff
    )
    kind = f": {what}" if what else ""
    raise CheckpointMismatchError(
      f"{where} is from another run ({details}{kind}). Use a new workdir, or "
      "the config that wrote it."
    )


class Checkpoints:
  """Orbax checkpoints of a run: ``{state, metrics}`` pytree plus JSON meta.

  Wraps ``ocp.CheckpointManager(directory)`` with asynchronous saves, the last
  ``max_to_keep`` checkpoints kept and steps named by the global step.
  :meth:`restore_latest` tries the checkpoints newest first; one that cannot be
  read is reported with a warning naming it, moved (never deleted) into
  ``quarantine_dir`` so that the run can write that step again, and the
  previous one is tried. ``directory`` may be any path Orbax accepts (a local
  directory, ``gs://...``); a relative local one is made absolute.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    quarantine_dir: str | os.PathLike | None = None,
    async_save: bool = True,
  ):
    self.directory = str(_paths.resolve(directory))
    self.quarantine_dir = str(
      _paths.resolve(quarantine_dir or self.directory.rstrip("/") + ".unreadable")
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )
    self._noise_filters = None

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or ``None``."""
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    """The directory of checkpoint ``step``."""
    return str(epath.Path(self.directory) / str(step))

  def save(self, step: int, tree: PyTree, meta: dict) -> None:
    """Starts an (asynchronous) save of ``tree`` and ``meta`` as ``step``."""
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore(self, step: int, abstract_tree: PyTree) -> PyTree:
    """Restores the ``state`` item of ``step`` into ``abstract_tree``'s layout."""
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree))
    )
    return restored["state"]

  def restore_meta(self, step: int) -> dict:
    """Reads the JSON ``meta`` item of ``step``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if not isinstance(meta, Mapping):
      raise ValueError(f"meta is a {type(meta).__name__}, not a JSON object")
    return dict(meta)

  def _quarantine(self, step: int) -> str:
    """Moves the directory of ``step`` into :attr:`quarantine_dir`; returns it."""
    src = epath.Path(self.step_dir(step))
    quarantine = epath.Path(self.quarantine_dir)
    dst = quarantine / str(step)
    k = 1
    while dst.exists():
      dst = quarantine / f"{step}.{k}"
      k += 1
    if jax.process_index() == 0 and src.exists():
      quarantine.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"sparsejax_quarantine_{step}")
    self.manager.reload()
    return str(dst)

  def _mute_failed_restore_noise(self) -> None:
    """Silences the fallout of a failed Orbax restore (see :meth:`restore_latest`).

    When one read of a restore fails, Orbax abandons the other concurrent
    reads: their asyncio tasks end up logged as "Task exception was never
    retrieved" (one page of TensorStore spec each, or the TensorStore error
    naming a file of this directory), and TensorStore callbacks
    into the closed event loop raise ``RuntimeError('Event loop is closed')``
    through ``sys.unraisablehook``. The warning of :meth:`restore_latest`
    already says what happened, so exactly those two kinds of report are
    dropped; everything else passes.
    """
    if self._noise_filters is not None:
      return
    previous_hook = sys.unraisablehook

    def hook(unraisable):
      exc = unraisable.exc_value
      if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
      previous_hook(unraisable)

    def abandoned_orbax_task(record: logging.LogRecord) -> bool:
      message = record.getMessage()
      if not message.startswith("Task exception was never retrieved"):
        return True
      exc = record.exc_info[1] if record.exc_info else None
      text = f"{message} {exc}"
      return not ("orbax" in text or self.directory in text)

    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addFilter(abandoned_orbax_task)
    sys.unraisablehook = hook
    self._noise_filters = (previous_hook, abandoned_orbax_task)

  def _unmute(self) -> None:
    if self._noise_filters is None:
      return
    gc.collect()  # abandoned tasks report when collected: do it while muted
    previous_hook, task_filter = self._noise_filters
    sys.unraisablehook = previous_hook
    logging.getLogger("asyncio").removeFilter(task_filter)
    self._noise_filters = None

  def _skip(self, step: int, error: Exception) -> None:
    reason = f"{type(error).__name__}: {error}".splitlines()[0]
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    moved = self._quarantine(step)
    logger.warning(
      "Checkpoint %s is unreadable (%s); it was moved, not deleted, to %s. "
      "Trying the previous checkpoint.",
      self.step_dir(step),
      reason,
      moved,
    )

  def restore_latest(
    self, abstract_tree: PyTree, check_meta: Callable[[int, dict], None] | None = None
  ) -> tuple[int, PyTree, dict] | None:
    """Restores the newest readable checkpoint, or returns ``None``.

    Args:
      abstract_tree: the target structure with shapes, dtypes and shardings.
      check_meta: ``(step, meta) -> None``, called on each readable ``meta``
        before the state is read; an exception it raises (e.g.
        :class:`CheckpointMismatchError` for a checkpoint of another run)
        propagates and nothing is moved.

    Returns:
      ``(step, tree, meta)`` or ``None`` when no checkpoint can be read.
    """
    # Muted from the first read on: the reads abandoned by a failing one report
    # from TensorStore's threads while the failure is still being raised. Kept
    # muted until close() after a failure (abandoned tasks report when
    # collected), lifted at once otherwise.
    was_muted = self._noise_filters is not None
    self._mute_failed_restore_noise()
    skipped = False
    try:
      for step in reversed(self.all_steps()):
        try:
          meta = self.restore_meta(step)
        except Exception as e:  # pylint: disable=broad-except
          skipped = True
          self._skip(step, e)
          continue
        if check_meta is not None:
          check_meta(step, meta)
        try:
          return step, self.restore(step, abstract_tree), meta
        except Exception as e:  # pylint: disable=broad-except
          skipped = True
          self._skip(step, e)
      return None
    finally:
      if not (skipped or was_muted):
        self._unmute()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
    self._unmute()


class StopSignal:
  """Context manager that records SIGTERM (preemption) instead of dying, so that
  a training loop can save a checkpoint at the next step boundary and exit.
  Only in the main thread; the previous handler is restored on exit."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
