"""Tests of the experiment runners (`python -m experiments.<name>`) and configs."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from experiments import common  # noqa: E402
from experiments import train as exp_train  # noqa: E402
from experiments.configs import default  # noqa: E402
from experiments.configs import digits  # noqa: E402
from experiments.configs import grasp_cifar  # noqa: E402
from experiments.configs import quickstart  # noqa: E402
from experiments.configs import synflow_cifar  # noqa: E402
from sparsejax import data  # noqa: E402

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def run_module(module, *args, timeout=240):
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# ----------------------------------------------------------------------------
# experiments.train
# ----------------------------------------------------------------------------


def test_train_cli_trains_a_sparse_model_and_writes_the_run(tmp_path):
  proc = run_module(
    "experiments.train",
    "--config",
    "experiments/configs/digits.py",
    "--workdir",
    tmp_path,
    "--config.train.num_epochs=2",
    "--config.pruner=random",
    "--config.sparsity=0.8",
    "--config.budget=erk",
    "--config.train.progress_bar=false",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done: " in proc.stdout and "test_accuracy=" in proc.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["pruner"] == "random" and config["budget"] == "erk"
  assert config["optimizer"]["weight_decay"] == 5e-4 and config["train"]["num_epochs"] == 2
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["epochs"] == 2
  assert results["mask"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
  assert results["final"]["test_accuracy"] > 0.3  # chance is 0.1
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  # Orbax's per-save INFO chatter is filtered out of the log.
  assert "orbax" not in proc.stderr.lower()


def _synthetic_dataset(n_train=16, n_test=8, shape=(16, 16, 3)):
  """Random uint8 images (16x16: VGG's four max-pools leave 1x1), 10 classes."""
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  labels = lambda n: (np.arange(n) % 10).astype(np.int32)
  return data.Dataset(
    "synthetic",
    10,
    images(n_train),
    labels(n_train),
    images(n_test),
    labels(n_test),
    mean=(0.5,) * 3,
    std=(0.25,) * 3,
    augment=False,
  )


def _two_step_run(workdir, model, prunable):
  """experiments.train's run: magnitude at 90% (uniform), 2 steps of batch 8."""
  config = digits.get_config()
  config.update(
    pruner="magnitude",
    sparsity=0.9,
    budget="uniform",
    prunable=prunable,
    train=dict(
      num_epochs=1,
      batch_size=8,
      eval_batch_size=8,
      progress_bar=False,
      tensorboard=False,
      async_checkpointing=False,
    ),
    model=dict(name=model),
  )
  exp_train.run(config, str(workdir), dataset=_synthetic_dataset())
  results = json.loads((workdir / "results.json").read_text())
  pruning = json.loads((workdir / "pruning.json").read_text())
  assert pruning["prunable"] == prunable
  return {p: (l["kept"], l["total"]) for p, l in results["mask"]["layers"].items()}


@pytest.mark.parametrize("prunable", ["keep_first", "keep_first_and_classifier"])
def test_keep_first_keeps_the_resnet_stem_dense(tmp_path, prunable):
  # The jitted init sorts the params: 'BasicBlock_0' precedes the stem 'Conv_0'.
  # Uniform budget: each pruned layer keeps round(0.1 * N) of its N weights.
  layers = _two_step_run(tmp_path, "resnet20", prunable)
  assert layers["Conv_0/kernel"] == (432, 432)  # stem 3x3x3x16, dense
  assert layers["BasicBlock_0/Conv_0/kernel"] == (230, 2304)  # 3x3x16x16
  assert layers["BasicBlock_8/Conv_1/kernel"] == (3686, 36864)  # 3x3x64x64
  classifier = 640 if prunable == "keep_first_and_classifier" else 64  # 64x10
  assert layers["Dense_0/kernel"] == (classifier, 640)


def test_keep_first_and_classifier_on_vgg(tmp_path):
  layers = _two_step_run(tmp_path, "vgg11", "keep_first_and_classifier")
  assert layers["Conv_0/kernel"] == (1728, 1728)  # first conv 3x3x3x64, dense
  assert layers["Conv_1/kernel"] == (7373, 73728)  # 3x3x64x128: round(7372.8)
  assert layers["Conv_7/kernel"] == (235930, 2359296)  # 3x3x512x512
  assert layers["Dense_0/kernel"] == (5120, 5120)  # classifier 512x10, dense


def test_missing_dataset_is_a_clean_error(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  proc = run_module(
    "experiments.train",
    "--config",
    "experiments/configs/default.py",
    "--workdir",
    tmp_path / "run",
    f"--config.data.dir={empty}",
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: Dataset 'cifar10' not found. Looked in:"]
  assert str(empty) in proc.stderr  # the details say where it looked


def test_non_finite_loss_is_a_clean_error(tmp_path):
  proc = run_module(
    "experiments.train",
    "--config",
    "experiments/configs/digits.py",
    "--workdir",
    tmp_path,
    "--config.optimizer.learning_rate=1e30",
    "--config.train.num_epochs=1",
    "--config.train.progress_bar=false",
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1
  assert "Non-finite training loss at epoch 1" in errors[0]
  assert "No checkpoint had been written yet" in errors[0]
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_sigterm_exits_with_143_after_saving(tmp_path):
  # experiments.train with a host hook that sends SIGTERM after global step 30.
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "from tests.sigterm_helper import run_module; run_module('experiments.train', 30)",
      "--config",
      "experiments/configs/digits.py",
      "--workdir",
      str(tmp_path),
      "--config.train.num_epochs=2",
      "--config.train.progress_bar=false",
    ],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == exp_train.EXIT_PREEMPTED == 143
  assert "Traceback" not in proc.stderr
  assert "rerun the same command to resume" in proc.stderr
  assert (tmp_path / "checkpoints" / "30").is_dir()
  assert not (tmp_path / "results.json").exists()


def test_bad_config_values_are_refused():
  config = digits.get_config()
  for field, value, match in [
    ("pruner", "snipp", "pruner"),
    ("prunable", "all", "prunable"),
    ("model.name", "resnet99", "unknown model"),
    ("sparsity", 1.0, "sparsity"),
  ]:
    bad = config.copy_and_resolve_references()
    bad.unlock()
    bad.pruner = "magnitude"
    group, _, name = field.rpartition(".")
    (bad[group] if group else bad)[name] = value
    with pytest.raises(ValueError, match=match):
      exp_train.resolve_config(bad)


def _dst_config(**fields):
  config = digits.get_config()
  config.update({"dst": "granet", **fields})
  config.train.num_epochs = 3
  return config


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(dst_alpha=-0.3), r"config\.dst_alpha must be in \[0, 1\] .*got -0\.3"),
    (dict(dst_alpha=1.5), r"config\.dst_alpha must be in \[0, 1\] .*got 1\.5"),
    (
      dict(dst="rigl", pruner="random", dst_alpha=2.0),
      r"config\.dst_alpha must be in \[0, 1\] .*got 2\.0",
    ),
    (dict(dst_end=0.0), r"config\.dst_end must be in \(0, 1\] .*got 0\.0"),
    (dict(dst_end=1.5), r"config\.dst_end must be in \(0, 1\] .*got 1\.5"),
    (dict(dst_update_every=0), r"config\.dst_update_every must be an integer >= 1 .*got 0"),
    (
      dict(dst_prune_epochs=(1, 10)),
      r"config\.dst_prune_epochs=\(1, 10\) ends at epoch 10, after training "
      r"\(config\.train\.num_epochs = 3\).*0 <= start < end <= config\.train\.num_epochs = 3",
    ),
    (
      dict(dst_prune_epochs=(0.5, 0.2)),
      r"config\.dst_prune_epochs=\(0\.5, 0\.2\) starts at epoch 1\.5, not before "
      r"its end at epoch 0\.6",
    ),
    (dict(dst_prune_epochs=(2, 2)), r"starts at epoch 2, not before its end"),
    (dict(dst_prune_epochs=(-1, 2)), r"must be \(start, end\).*got \(-1, 2\)"),
    (dict(dst_prune_epochs=(0.1,)), r"must be \(start, end\).*got \(0\.1,\)"),
  ],
)
def test_out_of_range_dst_values_are_refused_with_their_range(fields, match):
  with pytest.raises(ValueError, match=match):
    exp_train.resolve_config(_dst_config(**fields))


def test_in_range_dst_values_pass():
  for fields in (
    dict(dst_alpha=0.0),
    dict(dst_alpha=1.0),
    dict(dst_end=1.0),
    dict(dst_prune_epochs=(1, 3)),
    dict(dst_prune_epochs=(0.0, 0.5)),
  ):
    exp_train.resolve_config(_dst_config(**fields))


def test_ticket_sparsity_must_be_the_tickets(tmp_path):
  from sparsejax import lottery  # pylint: disable=g-import-not-at-top

  mask = {"Dense_0": {"kernel": np.arange(20).reshape(4, 5) % 5 != 0}}  # 20% pruned
  params = {"Dense_0": {"kernel": np.ones((4, 5), np.float32)}}
  ticket = lottery.save_ticket(tmp_path / "ticket", mask, params)
  config = digits.get_config()
  config.update(pruner="ticket", mask_path=ticket, model=dict(name="mlp"))
  # The default 0.9 used to be recorded in config.json while 0.2 trained.
  with pytest.raises(
    ValueError,
    match=r"config\.sparsity=0\.9 differs from the "
    r"sparsity 0\.2000 of the ticket in .*ticket: with "
    r"config\.pruner='ticket' set config\.sparsity=None",
  ):
    exp_train.resolve_config(config)
  config.sparsity = None
  assert exp_train.resolve_config(config).sparsity == pytest.approx(0.2)
  config.sparsity = 0.2004
  assert exp_train.resolve_config(config).sparsity == pytest.approx(0.2)
  # experiments.lottery's meta.json records the density over its prunable set.
  lottery.save_ticket(tmp_path / "ticket", mask, params, {"density": 0.25})
  config.sparsity = None
  assert exp_train.resolve_config(config).sparsity == pytest.approx(0.75)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------


def test_config_dtype_is_the_models_computation_dtype():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from experiments import common  # pylint: disable=g-import-not-at-top
  from sparsejax import models  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  assert config.model.dtype == "float32"
  assert common.model_kwargs(config)["dtype"] == jnp.float32
  config.model.dtype = "bfloat16"
  model = models.get(config.model.name, 10, **common.model_kwargs(config))
  assert model.dtype == jnp.bfloat16
  assert exp_train.resolve_config(config).model.dtype == "bfloat16"
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="config.model.dtype"):
    exp_train.resolve_config(config)
  config.model.dtype = "float32"
  config.model.kwargs.dtype = "bfloat16"
  with pytest.raises(ValueError, match="config.model.dtype"):
    exp_train.resolve_config(config)


def test_default_weight_decay_follows_the_model_family():
  config = default.get_config()
  assert config.optimizer.weight_decay is None
  assert exp_train.resolve_config(config).optimizer.weight_decay == 1e-4
  config.model.name = "vgg19"
  assert exp_train.resolve_config(config).optimizer.weight_decay == 5e-4


def test_synflow_protocol_preset():
  config = synflow_cifar.get_config("vgg16,cifar100")
  assert (config.model.name, config.data.name) == ("vgg16", "cifar100")
  assert (
    config.optimizer.nesterov
    and config.optimizer.momentum == 0.9
    and config.train.batch_size == 128
  )
  assert config.optimizer.weight_decay == 5e-4 and config.train.num_epochs == 160
  assert synflow_cifar.get_config().optimizer.weight_decay == 1e-4  # resnet18
  sched = common.lr_schedule(config, steps_per_epoch=391)
  np.testing.assert_allclose(
    [sched(60 * 391 - 1), sched(60 * 391), sched(120 * 391)], [0.1, 0.01, 0.001], rtol=1e-6
  )


def test_grasp_protocol_preset():
  config = grasp_cifar.get_config("resnet32,cifar10")
  assert config.model.kwargs.width == 2 and not config.optimizer.nesterov
  assert config.optimizer.weight_decay == 1e-4
  sched = common.lr_schedule(config, steps_per_epoch=391)
  np.testing.assert_allclose(
    [sched(80 * 391 - 1), sched(80 * 391), sched(120 * 391)], [0.1, 0.01, 0.001], rtol=1e-6
  )
  assert grasp_cifar.get_config().optimizer.weight_decay == 5e-4  # vgg19


# ----------------------------------------------------------------------------
# experiments.quickstart
# ----------------------------------------------------------------------------


def test_quickstart_prints_the_table(tmp_path):
  proc = run_module(
    "experiments.quickstart",
    "--config",
    "experiments/configs/quickstart.py",
    "--workdir",
    tmp_path,
    "--config.train.num_epochs=4",
    "--config.sparsities=(0.0, 0.9)",
    "--config.methods=('magnitude', 'snip')",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  header = lines.index("| sparsity | magnitude | snip |")
  rows = [l.strip("|").split("|") for l in lines[header + 2 : header + 4]]
  assert [float(r[0]) for r in rows] == [0.0, 0.9]
  accuracy = np.array([[float(c.strip(" *")) for c in r[1:]] for r in rows])
  assert accuracy[0, 0] == accuracy[0, 1] > 80.0  # one dense run, shared
  assert np.all(accuracy[1] > 30.0)  # chance is 10%
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results["runs"]) == 3
  assert (tmp_path / "results.md").read_text().startswith("\n".join(lines[header : header + 4]))
  assert quickstart.get_config().sparsities == (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
  assert quickstart.get_config().methods == ("random", "magnitude", "snip", "grasp", "synflow")


# ----------------------------------------------------------------------------
# From the library tests (which do not import experiments)
# ----------------------------------------------------------------------------


def test_experiment_writes_the_sparse_file_of_an_nm_run(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  from sparsejax import budgets  # pylint: disable=g-import-not-at-top
  from sparsejax import nm  # pylint: disable=g-import-not-at-top
  from sparsejax import sparse_io  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  labels = lambda n: (np.arange(n) % 10).astype(np.int32)
  dataset = data.Dataset(
    "synthetic",
    10,
    images(16),
    labels(16),
    images(8),
    labels(8),
    mean=(0.5,),
    std=(0.25,),
    augment=False,
  )
  config = digits.get_config()
  config.update(
    pruner="magnitude",
    sparsity=0.5,
    budget="2:4",
    train=dict(
      num_epochs=1,
      batch_size=8,
      eval_batch_size=8,
      progress_bar=False,
      tensorboard=False,
      async_checkpointing=False,
      save_sparse=True,
    ),
  )
  result = exp_train.run(config, str(tmp_path), dataset=dataset)
  results = json.loads((tmp_path / "results.json").read_text())
  info = results["sparse_file"]
  assert info["nbytes"] == os.path.getsize(tmp_path / "model.sparse")
  assert info["ratio"] < 0.7 and info["checkpoint_nbytes"] > info["nbytes"]
  tree, mask = sparse_io.load(tmp_path / "model.sparse")
  for x, y in zip(
    jax.tree.leaves(jax.device_get(result.state.params)), jax.tree.leaves(tree["params"])
  ):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  nm.check_nm(mask["params"], budgets.NM(2, 4))


def test_experiments_refuse_gmp_with_nm():
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.dst, config.budget, config.sparsity = "gmp", "2:4", 0.5
  with pytest.raises(ValueError, match="cannot keep an N:M budget"):
    common.resolve_config(ml_collections.ConfigDict(config.to_dict()))


def test_runner_anneals_the_activation_blend(tmp_path):
  """experiments.common feeds the act_coef scalar to fit (from test_fit_hooks)."""
  cfg = digits.get_config()
  cfg.update(
    act_coef_schedule=(1.0, 0.0, 1, 1),
    train=dict(num_epochs=2, batch_size=32, progress_bar=False, tensorboard=False),
  )
  result = common.run(cfg, str(tmp_path))
  # Swish for epoch 1 (44 steps), then linear to ReLU over epoch 2.
  assert [r["act_coef"] for r in result.history] == pytest.approx([1.0, 1 - 43 / 44])
  bad = cfg.copy_and_resolve_references()
  bad.update(dict(act_coef_schedule=(1.0, 0.0)))
  with pytest.raises(ValueError, match="act_coef_schedule"):
    common.resolve_config(bad)
