"""Results of the experiment runners: tables, CSV, mean ± std, plots.

One place for what ``experiments.sweep``, ``experiments.lottery`` and
``experiments.dst`` (and the runners built on them) write: CSV files of rows,
markdown tables, ``mean ± std`` over seeds, and matplotlib figures drawn on
the Agg canvas (no pyplot state, safe in any thread or process).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import csv
import io
import json

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
  values = np.asarray(list(values), float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 1) -> str:
  """``"40.8 ± 0.4"`` over several values, ``"40.8"`` for one, ``"–"`` for none."""
  if not len(values):
    return "–"
  mean, std = mean_std(values)
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_sparsity(s: float) -> str:
  """``0.99`` -> ``"99%"``."""
  return f"{100 * s:g}%"


def fmt_compression(s: float) -> str:
  """``0.99`` -> ``"100×"`` (the compression ratio ``1 / (1 - s)``)."""
  return f"{1 / (1 - s):.4g}×"


def epochs_text(n: int) -> str:
  """``"1 epoch"``, ``"3 epochs"``."""
  return f"{n} epoch" + ("s" if n != 1 else "")


def markdown_table(
  header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "right"
) -> str:
  """A GitHub markdown table; every column right-aligned (or ``"left"``)."""
  rule = "---:" if align == "right" else ":---"
  lines = ["| " + " | ".join(header) + " |", "|" + f"{rule}|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file (e.g. a run's ``metrics.jsonl``)."""
  with epath.Path(path).open() as f:
    return [json.loads(line) for line in f if line.strip()]


def write_csv(path: str, rows: Sequence[Mapping], fields: Sequence[str]) -> None:
  """Writes ``rows`` with the columns ``fields`` (extra keys ignored); ``path``
  may be any ``etils.epath`` location."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(fields), extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  epath.Path(path).write_text(text.getvalue())


def save_figure(fig: Figure, path: str) -> None:
  """Saves ``fig`` as a PNG (120 dpi) to ``path``, any ``etils.epath``
  location (matplotlib itself writes local files only)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  epath.Path(path).write_bytes(buffer.getvalue())


def figure(width: float, height: float) -> Figure:
  """A matplotlib figure on the Agg canvas, constrained layout."""
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def curve(
  runs: Sequence[Sequence[tuple[float, float]]], *, logy: bool = False
) -> tuple[list[float], np.ndarray, np.ndarray | None] | None:
  """The mean ± std curve that :func:`plot_series` draws for one label.

  Args:
    runs: ``[(x, y), ...]`` per run; averaged at the x values they all share.
    logy: for a log axis: a mean <= 0 (e.g. no mask churn in an interval
      without mask updates) cannot be drawn and becomes NaN, a gap in the
      line (drawn, it ran to the axis edge as a spike); so does a band edge
      <= 0.

  Returns:
    ``(xs, mean, band)``, ``band = (mean - std, mean + std)`` as a ``[2, n]``
    array with several runs and ``None`` with one; ``None`` without runs.
  """
  runs = [dict(r) for r in runs if r]
  if not runs:
    return None
  xs = sorted(set.intersection(*(set(r) for r in runs)))
  ys = np.array([[r[x] for x in xs] for r in runs], float).reshape(len(runs), -1)
  mean = ys.mean(axis=0)
  band = None
  if len(runs) > 1:
    std = ys.std(axis=0, ddof=1)
    band = np.stack([mean - std, mean + std])
  if logy:
    mean = np.where(mean > 0, mean, np.nan)
    if band is not None:
      band = np.where((band > 0) & ~np.isnan(mean), band, np.nan)
  return xs, mean, band


def plot_series(
  path: str,
  series: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
  *,
  xlabel: str,
  ylabel: str,
  title: str = "",
  logy: bool = False,
) -> Figure:
  """Mean ± std curves: ``series = {label: [run, ...]}``, a run ``[(x, y), ...]``.

  The runs of one label are averaged at the x values they share (e.g. the
  seeds of a method logged at the same steps); a band shows ± one standard
  deviation when there are several. On a log axis (``logy``) values <= 0 are
  left out as gaps (:func:`curve`).

  Returns:
    The figure, saved to ``path``.
  """
  fig = figure(7, 4.2)
  ax = fig.subplots()
  for label, runs in series.items():
    drawn = curve(runs, logy=logy)
    if drawn is None:
      continue
    xs, mean, band = drawn
    (line,) = ax.plot(xs, mean, label=label)
    if band is not None:
      ax.fill_between(xs, band[0], band[1], color=line.get_color(), alpha=0.2)
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  save_figure(fig, path)
  return fig
