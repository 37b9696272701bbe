"""Multi-host training for real: the same RigL run as 2 processes x 4 CPU
devices (``jax.distributed`` on localhost, gloo collectives) and as 1 process
x 8 devices, through sparsejax.train.fit (tests/multihost_rigl.py).

RigL's masks come from the global gradient inside the jitted step, which
every process computes identically; no mask is broadcast. The two runs must
end with identical masks after every update and the same losses and params
within float tolerance (the all-reduce sums in another order).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "multihost_rigl.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_group(num_processes: int, devices: int, workdir, out, timeout=420):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(REPO)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(SCRIPT),
        str(i),
        str(num_processes),
        str(port),
        str(devices),
        str(workdir),
        str(out),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return dict(np.load(out))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  two = _run_group(2, 4, tmp_path / "two", tmp_path / "two.npz")
  one = _run_group(1, 8, tmp_path / "one", tmp_path / "one.npz")
  assert int(two["updates"]) == int(one["updates"]) == 5
  mask_keys = sorted(k for k in one if k.startswith("mask/"))
  assert mask_keys and mask_keys == sorted(k for k in two if k.startswith("mask/"))
  for k in mask_keys:
    np.testing.assert_array_equal(two[k], one[k], err_msg=k)
  assert (one["churn"] > 0).all()
  np.testing.assert_allclose(two["churn"], one["churn"])
  np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-5)
  for k in (k for k in one if k.startswith("params/")):
    np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)


PLACEMENT = REPO / "tests" / "multihost_placement.py"


@pytest.mark.slow
def test_interleaved_mesh_two_processes(tmp_path):
  """2 processes x 2 CPU devices, mesh [p0d0, p1d0, p0d1, p1d1]
  (tests/multihost_placement.py): batches and replicated arrays land on the
  right devices, evaluate and fit work, make_mesh(n) keeps every process in,
  and a process with other data is named."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(REPO)
  out = tmp_path / "report.json"
  procs = [
    subprocess.Popen(
      [sys.executable, str(PLACEMENT), str(i), "2", str(port), str(tmp_path / "shared"), str(out)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=420)[0])
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  report = json.loads(out.read_text())
  assert report["batch_weighted_sum"] == report["expected_weighted_sum"]
  assert report["replicated_weighted_sum"] == report["expected_weighted_sum"]
  inter, cont = report["eval_interleaved"], report["eval_contiguous"]
  assert inter["count"] == cont["count"] == 360
  assert inter["accuracy"] == cont["accuracy"]
  np.testing.assert_allclose(inter["loss"], cont["loss"], rtol=1e-5)
  assert report["fit_test_accuracy"] > 0.5
  assert report["make_mesh_2_processes"] == [0, 1]
  assert "num_devices=3" in report["make_mesh_3_error"]
  assert "2 processes" in report["make_mesh_3_error"]
  error = report["mismatch_error"]
  assert error is not None and "process(es) 1 hold other dataset 'digits'" in error
  assert not report["mismatch_wrote"]
  # Both processes fail with the same message naming process 1.
  for log in logs:
    assert "process(es) 1 hold other" in log
