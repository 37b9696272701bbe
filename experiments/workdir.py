"""Whose is this run directory? The signature of a run, checked before writing.

Every runner claims its directory first (:func:`claim`), before it writes
anything there: the directory's signature file ``run.json`` records the
runner's name and the run's config, without the fields of
:data:`RESULT_INDEPENDENT`. A directory that holds another run -- another
runner, or a config that differs in any field that can change the result --
is refused with one line naming each differing field with both values, and
stays as it was; a fresh directory is created and receives ``run.json``; a
finished run (its result files present) is left alone: :func:`claim` says
so and the runner does nothing.

A directory written before ``run.json`` existed is checked against its
``config.json`` (the runner's name is then unknown and not compared).
Fields that one side lacks (a directory written before a field existed)
count as their ``experiments/configs/default.py`` value.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections

from experiments.configs import default as default_config
from sparsejax import _paths
from sparsejax import checkpoints

#: The signature file of a run directory: ``{"runner", "config"}``.
SIGNATURE_FILE = "run.json"
#: The file whose presence means a training run finished.
RESULTS_FILE = "results.json"
#: The config file of a run directory (also the signature of directories
#: written before :data:`SIGNATURE_FILE` existed).
CONFIG_FILE = "config.json"

#: Config fields that cannot change a run's result, so they may differ
#: between the call that started a run directory and a later one:
#:
#: * ``data.dir``: where the dataset is read from, not which dataset
#:   (``data.name``, ``data.train_subset`` are compared);
#: * ``train.progress_bar``, ``train.tensorboard``: terminal output and TensorBoard
#:   events only;
#: * ``train.log_every_steps``: how often the bar's running loss is shown and the
#:   loss checked for being finite (a finished run had finite losses);
#: * ``train.async_checkpointing``, ``train.max_to_keep``,
#:   ``train.checkpoint_every_epochs``:
#:   when and how checkpoints are written and kept; a run resumed from any of
#:   them computes bitwise what an uninterrupted run computes;
#: * ``train.num_devices``, ``train.distributed``: the data-parallel mesh; the global
#:   batch, data order and updates are the same, up to the summation order of
#:   the gradient's all-reduce;
#: * ``train.eval_batch_size``: the evaluation is batched per example (batch norm in
#:   its inference mode), so accuracies are the same and losses the same up
#:   to summation order;
#: * ``debug_sigterm_at_step``: a testing aid of earlier versions, found in
#:   older ``config.json`` files.
RESULT_INDEPENDENT = (
  "data.dir",
  "train.progress_bar",
  "train.tensorboard",
  "train.log_every_steps",
  "train.async_checkpointing",
  "train.max_to_keep",
  "train.checkpoint_every_epochs",
  "train.num_devices",
  "train.distributed",
  "train.eval_batch_size",
  "debug_sigterm_at_step",
)
#: The sub-configs whose fields are compared one by one (``"train.seed"``).
GROUPS = ("data", "model", "optimizer", "train")


def _read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def _as_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def flat(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  """``config``'s fields with those of the sub-configs of :data:`GROUPS` as
  dotted names (``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``)."""
  out = {}
  for k, v in _as_dict(config).items():
    if k in GROUPS and isinstance(v, Mapping):
      out.update({f"{k}.{f}": x for f, x in v.items()})
    else:
      out[k] = v
  return out


def signature(runner: str, config: ml_collections.ConfigDict) -> dict:
  """The signature of a run: ``{"runner": runner, "config": ...}``.

  Args:
    runner: the runner's module name, e.g. ``"experiments.train"``.
    config: the run's config as the runner uses it: resolved
      (:func:`experiments.common.resolve_config`) for a training run, as
      given for a grid (whose cells resolve their own).

  Returns:
    The runner and the config without the fields of
    :data:`RESULT_INDEPENDENT`.
  """
  fields = {}
  for k, v in _as_dict(config).items():
    if k in GROUPS and isinstance(v, Mapping):
      v = {f: x for f, x in v.items() if f"{k}.{f}" not in RESULT_INDEPENDENT}
    if k not in RESULT_INDEPENDENT:
      fields[k] = v
  return {"runner": runner, "config": fields}


def recorded(workdir: str) -> dict | None:
  """The signature ``workdir`` holds: its ``run.json``, else its ``config.json``
  as ``{"runner": None, "config": ...}``; ``None`` for a fresh directory."""
  path = os.path.join(workdir, SIGNATURE_FILE)
  if epath.Path(path).exists():
    return _read_json(path)
  legacy = os.path.join(workdir, CONFIG_FILE)
  if epath.Path(legacy).exists():
    return {"runner": None, "config": _read_json(legacy)}
  return None


def check(workdir: str, runner: str, config: ml_collections.ConfigDict) -> None:
  """Refuses ``workdir`` when it holds another run; writes nothing.

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: (a ``ValueError``, one
      line) naming each differing field (``runner`` among them) with both
      values and the remedy: another workdir, or the config that wrote it.
  """
  workdir = str(_paths.resolve(workdir))
  found = recorded(workdir)
  if found is None:
    return
  expected = signature(runner, config)
  defaults = flat(default_config.get_config())
  fill = lambda fields: {
    k: v for k, v in {**defaults, **flat(fields)}.items() if k not in RESULT_INDEPENDENT
  }
  there, here = fill(found["config"]), fill(expected["config"])
  # A directory without run.json does not name its runner: not compared.
  there_runner = runner if found["runner"] is None else found["runner"]
  checkpoints.check_same_run(
    {"runner": there_runner, **there}, {"runner": runner, **here}, where=workdir
  )


def is_finished(workdir: str, done: Iterable[str]) -> bool:
  """Whether every file of ``done`` (paths relative to ``workdir``) exists."""
  return all(epath.Path(workdir, p).exists() for p in done)


def claim(
  workdir: str,
  runner: str,
  config: ml_collections.ConfigDict,
  *,
  done: Iterable[str] = (RESULTS_FILE,),
  done_text: str | None = None,
) -> bool:
  """Checks ``workdir`` (:func:`check`), then records this run's signature.

  The first thing a runner does, before it writes anything in ``workdir``.

  Args:
    workdir: the run directory (created unless the run is finished): a
      local directory or any ``etils.epath`` location such as ``gs://...``.
    runner: the runner's module name.
    config: the run's config (see :func:`signature`).
    done: the files (relative to ``workdir``) whose presence means the run
      is finished.
    done_text: how the message of a finished run names them; default the
      files of ``done`` joined by commas.

  Returns:
    Whether the run is finished: then nothing was written and one line,
    ``already finished: <workdir> (<done_text>); nothing to do``, printed.

  Raises:
    sparsejax.checkpoints.CheckpointMismatchError: ``workdir`` holds another
      run (see :func:`check`).
  """
  workdir = str(_paths.resolve(workdir))
  done = tuple(done)
  check(workdir, runner, config)
  if done and is_finished(workdir, done):
    text = ", ".join(done) if done_text is None else done_text
    print(f"already finished: {workdir} ({text}); nothing to do", flush=True)
    return True
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    path = epath.Path(workdir, SIGNATURE_FILE)
    if not path.exists():
      _paths.write_text(
        path, json.dumps(signature(runner, config), indent=2, sort_keys=True) + "\n"
      )
  return False
