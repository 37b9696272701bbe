"""The documentation: every user guide's examples run, and the site builds.

Each page of ``docs/guides/`` is a complete example: its fenced ```python
blocks continue each other, so they run in order in one namespace, a fresh
namespace per page, in a fresh working directory (as ``tests/test_readme.py``
runs the README). Code shown but not run (multi-host set-up, ``gs://`` paths)
is written in a ``{code-block} python`` directive instead, which this test
does not collect.

The last test builds the site as CI does (``.ci/docs``): ``sphinx-build -W
--keep-going``, every warning and broken cross-reference an error; it is
skipped where Sphinx (the ``docs`` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
import subprocess
import sys

import pytest

from tests.test_readme import python_blocks

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs" / "guides").glob("*.md"))
#: Every user guide (docs/index.md's "User guides" toctree).
EXPECTED = (
  "accelerators",
  "dst",
  "gradient_flow",
  "lottery",
  "pruning_at_init",
  "savings",
  "suptickets",
  "tost",
)


def test_every_guide_is_found_and_listed():
  assert tuple(p.stem for p in GUIDES) == EXPECTED
  index = (REPO / "docs" / "index.md").read_text()
  for name in EXPECTED:
    assert f"guides/{name}\n" in index, name
  for page in GUIDES:
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python example"
    assert not [l for _, code in blocks for l in code.splitlines() if l.strip() == "..."]


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_guide_examples_run_in_order(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": f"__docs_{page.stem}__"}
  for line, code in python_blocks(page):
    exec(compile(code, f"docs/guides/{page.name}:{line}", "exec"), namespace)  # pylint: disable=exec-used
  check = CHECKS.get(page.stem)
  if check is not None:
    check(namespace, tmp_path)


def _check_savings(ns, tmp_path):
  # The file round trip is bitwise and the sparse file is smaller than dense.
  assert (tmp_path / "model.sparse").exists()
  assert ns["info"].nbytes < ns["info"].dense_nbytes


def _check_tost(ns, tmp_path):
  del tmp_path
  assert ns["plain"]["params"].keys() == ns["plain_params"].keys()


CHECKS = {"savings": _check_savings, "tost": _check_tost}


@pytest.mark.skipif(
  importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_nb") is None,
  reason="the docs extra (sphinx, myst-nb) is not installed",
)
def test_site_builds_without_warnings(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-q",
      "-b",
      "html",
      str(REPO / "docs"),
      str(tmp_path / "html"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-6000:]
  for page in ("index", "api/index", *(f"guides/{n}" for n in EXPECTED)):
    assert (tmp_path / "html" / f"{page}.html").exists(), page
