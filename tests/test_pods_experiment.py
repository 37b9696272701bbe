"""TPU-pod concerns of the runners (issue #24): experiments.train on a
non-POSIX ``gs://`` run directory (a fake backend, tests/fake_gcs.py) and
``--config.train.distributed`` without a cluster."""

import json
import os
import pathlib
import subprocess
import sys

from fake_gcs import fake_gcs
import pytest

from experiments import train as exp_train
from experiments.configs import digits
import sparsejax as sj

REPO = pathlib.Path(__file__).resolve().parents[1]


def _files(root: pathlib.Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_train_runner_writes_a_gs_workdir(tmp_path, monkeypatch):
  """A ``gs://`` workdir of experiments.train (the library's fit:
  tests/test_pods.py): every run file reaches the (fake) bucket, nothing is
  created under the working directory, and a rerun is finished.
  TensorBoard is off: tensorboardX writes gs:// through its own client, which
  the fake backend does not route."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket = tmp_path / "bucket"
  ds = sj.data.load("digits")
  with fake_gcs(bucket):
    cfg = digits.get_config()
    cfg.update(
      pruner="magnitude",
      sparsity=0.5,
      model=dict(name="mlp"),
      train=dict(num_epochs=1, progress_bar=False, tensorboard=False),
    )
    exp_train.run(cfg, "gs://fake-bucket/train", dataset=ds)
    rerun = exp_train.run(cfg, "gs://fake-bucket/train", dataset=ds)
  run_dir = bucket / "fake-bucket" / "train"
  for name in (
    "run.json",
    "config.json",
    "results.json",
    "metrics.jsonl",
    "pruning.json",
    "pruning.txt",
    "checkpoints",
  ):
    assert (run_dir / name).exists(), name
  results = json.loads((run_dir / "results.json").read_text())
  assert results["epochs"] == 1
  assert rerun.state is None and len(rerun.history) == 1
  assert list(cwd.iterdir()) == []
  assert not list(tmp_path.glob("**/gs:*"))


def test_distributed_without_a_cluster_is_one_error_line(tmp_path):
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_", "MEGASCALE"))
  }
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.train",
      "--config=experiments/configs/digits.py",
      "--config.train.distributed=true",
      f"--workdir={tmp_path / 'run'}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "--config.train.distributed" in errors[0]
  assert "cluster" in errors[0]
  assert not (tmp_path / "run").exists()
