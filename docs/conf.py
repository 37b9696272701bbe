"""Sphinx configuration of the sparsejax documentation.

Build (what CI runs, ``.ci/docs``: warnings and broken cross-references as
errors; ``tests/test_docs.py`` runs the same build and every guide's examples)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "sparsejax"
author = "the sparsejax authors"
copyright = "2026, the sparsejax authors"  # pylint: disable=redefined-builtin

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]

# Markdown pages (MyST) and the tour notebook, rendered with its stored outputs:
# the test suite executes it, the docs build never does.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

exclude_patterns = ["_build", "**.ipynb_checkpoints", "checks.md"]

# API reference: one page per module, generated from the docstrings.
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# Every cross-reference to sparsejax must resolve; references to the libraries
# it builds on (no network in CI, so no intersphinx inventories) are not checked.
nitpicky = True
nitpick_ignore_regex = [
  (
    r"py:.*",
    r"(jax|jaxlib|jnp|np|numpy|optax|flax|nn|chex|orbax|etils|epath|ml_collections|"
    r"tqdm|collections|typing|os|dataclasses|contextlib|enum|abc)(\..*)?",
  ),
  (
    r"py:.*",
    r"(PyTree|Any|Callable|Sequence|Mapping|Iterable|Iterator|ArrayLike|"
    r"ScalarOrSchedule|LossFn|Array|Schedule|PRNGKey|OptState|Budget)",
  ),
  (
    r"py:class",
    r"(int|float|str|bool|bytes|tuple|list|dict|set|None|object|type|"
    r"callable|optional|pathlib\..*|PathLike)",
  ),
  # Private base classes (shown as the bases of public ones) are undocumented.
  (r"py:class", r"sparsejax\..*\._[A-Za-z].*"),
]

html_theme = "sphinx_book_theme"
html_title = "sparsejax"
html_theme_options = {"show_toc_level": 2}
