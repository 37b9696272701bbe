"""The tested JAX range: one place holds it, the pins agree, the import warns."""

from pathlib import Path
import re
import warnings

import jax
import pytest

from sparsejax import _jax_range

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parent.parent


def _jax_pins(requirements):
  """``{name: specifier}`` of the ``jax``/``jax[extra]`` requirement strings."""
  pins = {}
  for req in requirements:
    match = re.fullmatch(r"(jax(?:\[[\w,-]+\])?)\s*(.*)", req.strip())
    if match:
      pins[match.group(1)] = match.group(2).replace(" ", "")
  return pins


def test_pyproject_and_tpu_requirements_pin_the_tested_range():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  assert _jax_pins(project["dependencies"]) == {"jax": _jax_range.SPEC}
  assert _jax_pins(extras["cuda12"]) == {"jax[cuda12]": _jax_range.SPEC}
  assert _jax_pins(extras["cuda13"]) == {"jax[cuda13]": _jax_range.SPEC}
  tpu = (ROOT / "requirements-tpu.txt").read_text().splitlines()
  assert _jax_pins(l for l in tpu if not l.startswith("#")) == {"jax[tpu]": _jax_range.SPEC}
  assert "optax>=0.2.5" in project["dependencies"]  # optax.tree


def test_the_jax_under_test_is_in_the_range_and_does_not_warn():
  assert _jax_range.is_tested(jax.__version__)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not _jax_range.warn_if_untested()


@pytest.mark.parametrize(
  "version,tested",
  [
    ("0.10.0", True),
    ("0.10.2", True),
    ("0.10.3.dev20260101", True),
    ("0.9.2", False),
    ("0.8.0", False),
    ("0.11.0rc1", False),
    ("0.11.2", False),
    ("1.0.0", False),
    ("unknown", False),
  ],
)
def test_versions_in_and_out_of_the_range(version, tested):
  assert _jax_range.is_tested(version) is tested


def test_an_untested_jax_warns_naming_its_version_and_the_range(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.11.2")
  with pytest.warns(RuntimeWarning) as record:
    assert _jax_range.warn_if_untested()
  assert len(record) == 1
  message = str(record[0].message)
  assert "JAX 0.11.2 is outside the range" in message
  assert f"jax{_jax_range.SPEC}" in message
