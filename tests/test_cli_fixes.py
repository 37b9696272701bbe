"""Tests of the runners' command-line surface: ``--help`` and config overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from experiments import common

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")

#: Every runner with a ``__main__`` block.
RUNNERS = (
  "train",
  "prune_at_init",
  "sweep",
  "dst",
  "lottery",
  "tost",
  "gradient_flow",
  "suptickets",
  "quickstart",
)

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
  proc = subprocess.run(
    [sys.executable, "-c", _HELP_SCRIPT, *RUNNERS],
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  shown = json.loads(proc.stdout)
  assert sorted(shown) == sorted(RUNNERS)
  for name, (doc, text) in shown.items():
    assert doc and text.startswith(doc), (name, text[:500])
  assert "ResNet-20 at 95% sparsity" in shown["suptickets"][1]


def _parse(overrides, config="experiments/configs/digits.py"):
  """The config of ``--config=<config> <overrides>`` parsed on fresh flags."""
  argv = ["prog", f"--config={REPO / config}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "c", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_none_resets_placeholders_from_the_command_line():
  common.allow_none_overrides()
  config = _parse(
    [
      "--config.data.train_subset=None",
      "--config.sup_ema=None",
      "--config.data.dir=None",
      "--config.data.augment=None",
    ]
  )
  assert config.data.train_subset is None and config.sup_ema is None
  assert config.data.dir is None and config.data.augment is None
  # A preset's int (a placeholder of default.py, set to 4000) resets too.
  config = _parse(["--config.data.train_subset=None"], "experiments/configs/dst_cpu.py")
  assert config.data.train_subset is None
  # Other values still parse with the field's type.
  config = _parse(
    [
      "--config.data.train_subset=100",
      "--config.sup_ema=0.5",
      "--config.data.dir=/d",
      "--config.data.augment=false",
    ]
  )
  assert (config.data.train_subset, config.sup_ema) == (100, 0.5)
  assert config.data.dir == "/d" and config.data.augment is False
  common.allow_none_overrides()  # twice: parsers are wrapped once
  assert _parse(["--config.data.train_subset=None"]).data.train_subset is None
