"""The ``>>>`` examples in the docstrings of the public modules run and pass.

Every example found by ``doctest.DocTestFinder`` in the modules below is one
test; a failing example fails it with doctest's report (expected vs got).
``sparsejax.train`` is not collected.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import sparsejax.models

MODULES = [
  "sparsejax.budgets",
  "sparsejax.masks",
  "sparsejax.nm",
  "sparsejax.optim",
  "sparsejax.scores",
  "sparsejax.diagnostics",
  "sparsejax.dst",
  "sparsejax.gradient_flow",
  "sparsejax.lottery",
  "sparsejax.data",
  "sparsejax.sparse_io",
  "sparsejax.sparse_inference",
  "sparsejax.condensed",
  "sparsejax.shrink",
  "sparsejax.suptickets",
  "sparsejax.tost",
  "sparsejax.state",
  "sparsejax.schedules",
  "sparsejax.hooks",
  "sparsejax.methods",
  "sparsejax.models",
  "sparsejax.modeling",
] + [m.name for m in pkgutil.iter_modules(sparsejax.models.__path__, "sparsejax.models.")]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples() -> list[doctest.DocTest]:
  finder = doctest.DocTestFinder(exclude_empty=True)
  found = []
  for name in MODULES:
    module = importlib.import_module(name)
    found += [t for t in finder.find(module, name) if t.examples]
  return sorted(found, key=lambda t: t.name)


EXAMPLES = _examples()


def run_example(test: doctest.DocTest) -> tuple[int, str]:
  """Runs one docstring's examples; returns (failures, doctest's report)."""
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=FLAGS)
  runner.run(test, out=out.write, clear_globs=True)
  return runner.failures, out.getvalue()


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example(test):
  failures, report = run_example(test)
  assert failures == 0, f"{test.name} ({test.filename}:{test.lineno}):\n{report}"


def test_the_main_public_functions_have_examples():
  names = {t.name for t in EXAMPLES}
  for name in [
    "masks.topk_mask",
    "masks.keep_top",
    "masks.Prunable",
    "masks.apply",
    "masks.summary",
    "optim.sparse",
    "optim.reset_moments",
    "scores.prune_at_init",
    "lottery.prune_level",
    "data",
    "budgets.parse",
    "budgets.ERK.densities",
    "masks.random_mask",
    "models.layer_order",
    "state",
    "schedules.lr_schedule",
    "schedules.make_optimizer",
    "optim.find_hyperparam",
  ]:
    assert f"sparsejax.{name}" in names


def test_a_wrong_example_fails():
  # The check above is not vacuous: an example whose output differs fails.
  test = doctest.DocTestParser().get_doctest(
    ">>> from sparsejax import masks\n>>> masks.kept_count(10, 0.5)\n4\n",
    {},
    "broken",
    "broken.py",
    0,
  )
  failures, report = run_example(test)
  assert failures == 1
  assert "Expected:\n    4\nGot:\n    5" in report
