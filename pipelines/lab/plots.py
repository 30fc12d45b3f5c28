"""Figures for lab results: line plots, grouped bar plots and heat maps, drawn with matplotlib's Agg canvas.

Each helper returns a `matplotlib.figure.Figure` with a title and labelled axes. Figures are made without
pyplot, so no global figure state is shared between threads (the studio runs experiments in a worker thread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

FIGSIZE = (6.4, 4.0)
DPI = 100


def _figure(title: str, xlabel: str, ylabel: str, figsize: tuple[float, float] = FIGSIZE):
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def line_plot(series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]], *, title: str,
              xlabel: str, ylabel: str, x: Sequence[float] | None = None, logx: bool = False, logy: bool = False,
              hlines: Mapping[str, float] | None = None, markers: bool = True,
              ylim: tuple[float, float] | None = None) -> Figure:
    """One line per entry of `series`: either its y values (over the shared `x`, default 1, 2, ...) or an
    (xs, ys) pair. `hlines` adds labelled dashed horizontal lines (baselines). With `logx` the x axis is
    logarithmic base 2 and shows the x values themselves as ticks."""
    figure, axes = _figure(title, xlabel, ylabel)
    ticks: set[float] = set()
    for label, values in series.items():
        if isinstance(values, tuple) and len(values) == 2 and not isinstance(values[0], (int, float)):
            xs, ys = list(values[0]), list(values[1])
        else:
            ys = list(values)
            xs = list(x) if x is not None else list(range(1, len(ys) + 1))
        if len(xs) != len(ys):
            raise ValueError(f"series {label!r} has {len(xs)} x values and {len(ys)} y values")
        ticks.update(xs)
        axes.plot(xs, ys, marker="o" if markers and len(xs) <= 40 else None, label=label)
    for i, (label, value) in enumerate((hlines or {}).items()):
        axes.axhline(value, linestyle="--", color=f"C{len(series) + i}", label=label)
    if logx:
        axes.set_xscale("log", base=2)
        shown = sorted(t for t in ticks if t > 0)
        if 0 < len(shown) <= 12:
            axes.set_xticks(shown, [f"{t:g}" for t in shown])
    if logy:
        axes.set_yscale("log")
    if ylim is not None:
        axes.set_ylim(*ylim)
    if len(series) + len(hlines or {}) > 1:
        axes.legend(fontsize="small")
    return figure


def bar_plot(labels: Sequence[str], values: Sequence[float] | Mapping[str, Sequence[float]], *, title: str,
             xlabel: str, ylabel: str, logy: bool = False, annotate: bool = True) -> Figure:
    """Bars at `labels`: one bar each for a list of values, or groups of bars for a mapping of series names to
    value lists. With `annotate` each bar shows its value."""
    figure, axes = _figure(title, xlabel, ylabel)
    groups = dict(values) if isinstance(values, Mapping) else {"": list(values)}
    width = 0.8 / len(groups)
    for i, (name, numbers) in enumerate(groups.items()):
        numbers = list(numbers)
        if len(numbers) != len(labels):
            raise ValueError(f"series {name!r} has {len(numbers)} values for {len(labels)} labels")
        offsets = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(labels))]
        bars = axes.bar(offsets, numbers, width=width, label=name or None)
        if annotate:
            axes.bar_label(bars, labels=[_short(v) for v in numbers], fontsize="small", padding=2)
    axes.set_xticks(range(len(labels)), [str(label) for label in labels])
    if logy:
        axes.set_yscale("log")
    if len(groups) > 1:
        axes.legend(fontsize="small")
    return figure


def heatmap(matrix: Sequence[Sequence[float]], *, title: str, xlabel: str, ylabel: str,
            row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            colorbar_label: str = "", annotate: bool = True, cmap: str = "viridis") -> Figure:
    """A matrix as coloured cells (rows top to bottom), labelled rows and columns, a colour bar, and each
    cell's value written in it when `annotate` (and the matrix is at most 20 x 20)."""
    rows = [list(map(float, row)) for row in matrix]
    if not rows or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("a heat map needs a non-empty matrix with rows of equal length")
    figure, axes = _figure(title, xlabel, ylabel)
    axes.grid(False)
    image = axes.imshow(rows, cmap=cmap, aspect="auto")
    colorbar = figure.colorbar(image, ax=axes)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    axes.set_xticks(range(len(rows[0])), [str(c) for c in (col_labels or range(len(rows[0])))])
    axes.set_yticks(range(len(rows)), [str(r) for r in (row_labels or range(len(rows)))])
    if annotate and len(rows) <= 20 and len(rows[0]) <= 20:
        finite = [v for row in rows for v in row if math.isfinite(v)]
        middle = (min(finite) + max(finite)) / 2 if finite else 0.0
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                axes.text(j, i, _short(value), ha="center", va="center", fontsize="small",
                          color="black" if value > middle else "white")
    return figure


def _short(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.2g}"
    return f"{value:.3g}"
