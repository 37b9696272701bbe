"""TPU-pod concerns that one CPU process can test (issue #24): run
directories on a non-POSIX ``gs://`` path (a fake backend, tests/fake_gcs.py),
``make_mesh``'s choice of devices over several processes, and
the library's ``fit`` on ``gs://``. The runners' (``experiments.train`` on
``gs://``, ``--config.distributed`` without a cluster):
tests/test_pods_experiment.py. The placement on an interleaved
multi-process mesh and the dataset check across processes run in
tests/test_multihost.py."""

import pathlib

from fake_gcs import fake_gcs
import jax
import pytest

import sparsejax as sj


class _FakeDevice:
  def __init__(self, process_index: int, local: int):
    self.process_index, self.local = process_index, local

  def __repr__(self):
    return f"p{self.process_index}d{self.local}"


def test_choose_devices_takes_the_same_number_from_each_process():
  # An interleaved order, as jax.make_mesh may give a pod's devices.
  devices = [_FakeDevice(p, d) for d in range(4) for p in range(2)]
  chosen = sj.mesh.choose_devices(devices, 4)
  assert [repr(d) for d in chosen] == ["p0d0", "p1d0", "p0d1", "p1d1"]
  # devices[:2] would also hold one per process here; a host-major order
  # shows the difference: the first two would both be process 0's.
  host_major = [_FakeDevice(p, d) for p in range(2) for d in range(4)]
  assert [repr(d) for d in sj.mesh.choose_devices(host_major, 2)] == ["p0d0", "p1d0"]
  assert len(sj.mesh.choose_devices(host_major, 8)) == 8
  for n in (3, 5):
    with pytest.raises(
      ValueError, match=f"num_devices={n} cannot be split evenly over the 2 processes"
    ):
      sj.mesh.choose_devices(host_major, n)
  uneven = host_major[:5]  # process 1 has 1 device
  with pytest.raises(ValueError, match="at most 1 device"):
    sj.mesh.choose_devices(uneven, 4)
  assert [repr(d) for d in sj.mesh.choose_devices(uneven, 2)] == ["p0d0", "p1d0"]
  assert sj.mesh.choose_devices(uneven, 5) == uneven  # all: every process in
  one = [_FakeDevice(0, d) for d in range(4)]
  assert sj.mesh.choose_devices(one, 3) == one[:3]
  with pytest.raises(ValueError, match="num_devices=5 but 4"):
    sj.mesh.choose_devices(one, 5)


def test_same_data_check_is_a_no_op_on_one_process():
  assert jax.process_count() == 1
  sj.mesh.assert_same_across_processes({"x": jax.numpy.ones(3)})
  a = sj.mesh.fingerprint((jax.numpy.zeros(3), jax.numpy.ones(2)))
  assert a == sj.mesh.fingerprint((jax.numpy.zeros(3), jax.numpy.ones(2)))
  assert a != sj.mesh.fingerprint((jax.numpy.zeros(3), jax.numpy.ones(3)))


def _files(root: pathlib.Path) -> set[str]:
  return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_fit_writes_a_gs_workdir(tmp_path, monkeypatch):
  """A ``gs://`` workdir, which ``os.path.abspath`` would turn into
  ``<cwd>/gs:/...``: every run file reaches the (fake) bucket, nothing is
  created under the working directory, and a rerun resumes. TensorBoard is
  off: tensorboardX writes gs:// through its own client, which the fake
  backend does not route."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket = tmp_path / "bucket"
  ds = sj.data.load("digits")
  model = sj.models.get("mlp", 10)
  init = lambda: sj.state.create_train_state(
    model,
    sj.schedules.make_optimizer(0.1, momentum=0.0),
    jax.numpy.zeros((1, 8, 8, 1)),
    jax.random.key(0),
  )
  options = sj.train.FitOptions(progress_bar=False, tensorboard=False)
  with fake_gcs(bucket):
    result = sj.train.fit(
      model, ds, "gs://fake-bucket/fit", init=init, num_epochs=1, batch_size=64, options=options
    )
    again = sj.train.fit(
      model, ds, "gs://fake-bucket/fit", init=init, num_epochs=1, batch_size=64, options=options
    )
  assert len(result.history) == 1 and again.resumed_from == result.history[0]["step"]
  fit_files = _files(bucket / "fake-bucket" / "fit")
  assert "metrics.jsonl" in fit_files
  assert any(
    f.startswith("checkpoints/") and f.endswith("commit_success.txt") for f in fit_files
  ), fit_files
  assert list(cwd.iterdir()) == []
  assert not list(tmp_path.glob("**/gs:*"))
