"""The tour notebook: its plain-text twin is in sync, and it covers every method.

CI executes the notebook itself through nbmake (``--nbmake`` in the pytest
options, ``notebooks`` in ``testpaths``): any error in any cell fails the
suite. These tests check what execution cannot: that ``tour.py``, the
jupytext twin reviewers read, says what ``tour.ipynb`` runs.
"""

import pathlib

import jupytext

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _cells(path):
  return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


def test_ipynb_and_py_twin_have_the_same_cells():
  ipynb, twin = _cells(NOTEBOOKS / "tour.ipynb"), _cells(NOTEBOOKS / "tour.py")
  assert len(ipynb) == len(twin) > 10
  for i, (a, b) in enumerate(zip(ipynb, twin)):
    assert a == b, f"cell {i} differs: run `jupytext --sync notebooks/tour.py`"


def test_committed_notebook_has_no_outputs():
  nb = jupytext.read(NOTEBOOKS / "tour.ipynb")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.get("outputs") for c in code)


def test_first_code_cell_installs_in_colab_only():
  first = next(src for kind, src in _cells(NOTEBOOKS / "tour.ipynb") if kind == "code")
  assert '"google.colab" in sys.modules' in first
  assert "if IN_COLAB" in first and "pip" in first


def test_every_method_has_a_section():
  headings = [
    src.splitlines()[0]
    for kind, src in _cells(NOTEBOOKS / "tour.ipynb")
    if kind == "markdown" and src.startswith("## ")
  ]
  expected = [
    "optax loop",
    "Pruning at initialisation",
    "lottery ticket",
    "SET and RigL",
    "ToST",
    "Gradient flow",
    "Sup-tickets",
    "CIFAR-10",
  ]
  assert len(headings) == len(expected)
  for heading, word in zip(headings, expected):
    assert word in heading, (heading, word)
