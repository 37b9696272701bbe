"""Every Python snippet of the README runs as written, in order.

The snippets of a Markdown file continue each other (the page says so), so
they are executed one after the other in one namespace, in a fresh working
directory: a snippet that uses a name no earlier snippet defines, or an API
that changed, fails here. The user guides (``docs/guides/*.md``) are run the
same way by ``tests/test_docs.py``, page by page; the README's sparse-file and
sparse-inference snippets moved to ``docs/guides/savings.md``, whose test
checks the ``model.sparse`` round trip.
"""

from __future__ import annotations

from pathlib import Path
import re
import textwrap

import pytest

pytest_approx = lambda v: pytest.approx(v, abs=2e-3)

REPO = Path(__file__).resolve().parents[1]
#: The Markdown files whose ```python blocks must run.
PAGES = ("README.md",)


def python_blocks(path: Path) -> list[tuple[int, str]]:
  """``[(line, code)]`` of every fenced ```python block (dedented: blocks
  inside list items are indented)."""
  text = path.read_text()
  blocks = []
  for m in re.finditer(r"^([ \t]*)```python\n(.*?)^\1```", text, re.M | re.S):
    line = text.count("\n", 0, m.start()) + 2
    blocks.append((line, textwrap.dedent(m.group(2))))
  return blocks


def test_blocks_are_found():
  blocks = python_blocks(REPO / "README.md")
  # The front page's loop, DST and fit snippets; the longer examples are the
  # user guides' (docs/guides/, run by tests/test_docs.py).
  assert len(blocks) >= 3
  # No placeholder line ("...") stands for code the reader must write.
  assert not [l for _, code in blocks for l in code.splitlines() if l.strip() == "..."]


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run_in_order(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict = {"__name__": "__readme__"}
  for line, code in python_blocks(REPO / page):
    exec(compile(code, f"{page}:{line}", "exec"), namespace)  # pylint: disable=exec-used
  # What the snippets claim, checked: the masked loop stays 90% sparse, RigL
  # made its update, fit trained the method's mask and logged its churn (the
  # file round trip and the ToST export are checked in tests/test_docs.py).
  sj = namespace["sj"]
  assert sj.masks.summary(sj.masks.from_params(namespace["params"])).sparsity >= 0.9 - 1e-3
  assert int(namespace["opt_state"].mask_updates) == 1
  record = namespace["result"].history[-1]
  assert record["sparsity"] == pytest_approx(0.9) and "mask_churn" in record
