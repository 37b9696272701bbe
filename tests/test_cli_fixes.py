"""Tests of the runners' command-line surface: ``--help`` and config overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")

#: Every runner with a ``__main__`` block.
RUNNERS = ("train", "prune_at_init", "sweep", "dst", "lottery", "tost",
           "gradient_flow", "suptickets", "quickstart")

# Runs each runner's __main__ block with --help in one process (runpy), removing
# the flags it defined before the next one, and prints {runner: [doc, help]}.
_HELP_SCRIPT = r"""
import ast, contextlib, io, json, runpy, sys
from absl import app, flags
app.define_help_flags()
out = {}
for name in sys.argv[1:]:
  module = "experiments." + name
  with open(f"experiments/{name}.py") as f:
    doc = ast.get_docstring(ast.parse(f.read()), clean=False)
  before = set(flags.FLAGS)
  sys.argv = [module, "--help"]
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
      pass
  for flag in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag)
  flags.FLAGS.unparse_flags()
  out[name] = [doc, text.getvalue()]
sys.stdout.write(json.dumps(out))
"""


def test_every_runner_help_shows_its_docstring_intact():
  # absl %-formats the docstring: "95% sparsity" used to print as
  # "95/path/to/suptickets.pyparsity".
  proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, *RUNNERS], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shown = json.loads(proc.stdout)
  assert sorted(shown) == sorted(RUNNERS)
  for name, (doc, text) in shown.items():
    assert doc and text.startswith(doc), (name, text[:500])
  assert "ResNet-20 at 95% sparsity" in shown["suptickets"][1]
