"""benchmarks/gpu_evidence.py: every section reports, the budget holds, the
JPEG archive decodes, and nothing a bare GPU image lacks is imported.

The script runs as on a GPU machine without an install: from the repository
root with ``PYTHONPATH=.``, here on the CPU (``--quick``), with the packages a
bare image may lack (ml_collections, tensorflow_datasets, tensorboardX,
sklearn, torch, setuptools) made unimportable.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
import re
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_evidence.py"
BLOCKED = (
  "ml_collections",
  "tensorflow_datasets",
  "tensorflow",
  "tensorboardX",
  "sklearn",
  "torch",
  "setuptools",
  "pkg_resources",
)
#: Every figure a run writes, in order, by section.
FIGURES = {
  "versions": ["versions"],
  "train_step": ["dense", "masked", "rigl", "bf16"],
  "pytorch": ["torch_f32", "torch_bf16"],
  "scoring": ["snip", "grasp", "synflow"],
  "tost": ["tost_plain", "tost_ghost"],
  "real_run": ["real_run"],
  "vmap": ["vmap_k1", "vmap_k4", "vmap_k8"],
}
SUMMARY = re.compile(
  r"^masked_vs_dense \S+  rigl_vs_masked \S+  "
  r"jax_vs_torch \S+  vmap8_vs_sequential \S+$"
)


def blockers(root: Path) -> Path:
  """A folder of packages that raise ImportError, to put first on the path."""
  for name in BLOCKED:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
      f"raise ImportError('{name} is not on a bare GPU image')\n"
    )
  return root


def run_quick(tmp_path: Path, *args: str, timeout: float):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join([str(blockers(tmp_path / "blocked")), "."]),
  )
  out = tmp_path / "evidence"
  t0 = time.monotonic()
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  wall = time.monotonic() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = (out / "evidence.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]  # every line is strict JSON
  return proc, records, wall


def has_numbers(record: dict) -> bool:
  """A measured figure: no skip or error, and a finite number of its own."""
  own = {k: v for k, v in record.items() if k not in ("t", "seconds")}
  return (
    "skipped" not in record
    and "error" not in record
    and any(
      isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
      for v in own.values()
    )
  )


def test_quick_run_reports_every_section(tmp_path):
  proc, records, _ = run_quick(tmp_path, "--budget", "400", timeout=600)
  by_figure = {r["figure"]: r for r in records}
  assert [r["figure"] for r in records[:2]] == ["args", "versions"]
  for section, figures in FIGURES.items():
    for name in figures:
      record = by_figure.get(name)
      assert record is not None, f"no line for {section}/{name}"
      assert record["section"] == section
      if section == "pytorch":  # torch is blocked here
        assert has_numbers(record) or record.get("skipped") or record.get("error")
      else:
        assert has_numbers(record), record
  assert by_figure["versions"]["backend"] == "cpu"
  assert by_figure["masked"]["vs_dense"] > 0
  rigl = by_figure["rigl"]
  assert rigl["ms_per_step"] == pytest.approx(
    (99 * rigl["plain_ms_per_step"] + rigl["update_ms_per_step"]) / 100, rel=1e-3
  )
  run = by_figure["real_run"]
  assert run["epochs_done"] == 2 and len(run["test_accuracy_by_epoch"]) == 2
  assert run["projected_full_run_s"] > 0 and 0 <= run["test_accuracy_now"] <= 1
  assert (Path(run["workdir"]) / "checkpoints").is_dir()
  for k in (1, 4, 8):
    assert by_figure[f"vmap_k{k}"]["vmapped_img_per_s"] > 0
  end = records[-1]
  assert end["figure"] == "end" and end["stopped"] == "done", end
  assert end["elapsed_s"] <= 400
  assert SUMMARY.match(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("budget", [5, 12])
def test_budget_stops_the_run_and_keeps_what_was_measured(tmp_path, budget):
  proc, records, wall = run_quick(tmp_path, "--budget", str(budget), timeout=budget + 60)
  assert records[0]["figure"] == "args"
  assert has_numbers(records[1]) and records[1]["figure"] == "versions"
  end = records[-1]
  assert end["figure"] == "end" and end["stopped"] == "budget", end
  assert end["elapsed_s"] <= budget
  assert all(r["t"] <= budget for r in records)
  skipped = [r for r in records if r.get("skipped") == "budget"]
  assert skipped or end["during"], records
  assert wall < budget + 10  # the interpreter's start and exit on top
  assert SUMMARY.match(proc.stdout.strip().splitlines()[-1])


def test_jpeg_archive_decodes_to_a_cifar10_dataset(tmp_path):
  image_lib = pytest.importorskip("PIL.Image")
  sys.path.insert(0, str(REPO / "benchmarks"))
  try:
    import gpu_evidence  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / "benchmarks"))
  rng = np.random.default_rng(0)
  archive = tmp_path / "cifar10-jpeg.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for split, per_class in (("train", 2), ("test", 1)):
      for label in (3, 0, 9):  # out of order: the decoder sorts by class
        name = gpu_evidence.CIFAR10_CLASSES[label]
        for i in range(per_class):
          pixels = np.full((32, 32, 3), 20 * label + 5 * i, np.uint8)
          pixels[0, 0] = rng.integers(0, 256, 3)
          blob = io.BytesIO()
          image_lib.fromarray(pixels).save(blob, format="JPEG", quality=95)
          info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
          info.size = len(blob.getvalue())
          tar.addfile(info, io.BytesIO(blob.getvalue()))
  ds = gpu_evidence.load_jpeg_cifar10(str(archive))
  assert ds.name == "cifar10" and ds.num_classes == 10 and ds.augment
  assert ds.train_images.shape == (6, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
  assert ds.train_labels.tolist() == [0, 0, 3, 3, 9, 9]
  assert ds.test_labels.tolist() == [0, 3, 9]
  # JPEG is lossy: the flat images come back within a few levels.
  centre = ds.train_images[:, 16, 16, 0].astype(int)
  assert np.abs(centre - [0, 5, 60, 65, 180, 185]).max() <= 3
  flat = ds.train_images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ds.std, flat.std(0), rtol=1e-6)
