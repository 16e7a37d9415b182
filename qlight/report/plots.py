"""PNG plots of a report, one figure per (dataset, architecture).

Accuracy vs epoch per method (mean of the seeds, min–max band) and the method knobs (ρ, η, AQE α, EDE t)
vs epoch. Only runs in the averages are drawn.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from qlight.report.aggregate import Cell, Report

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.ticker import MaxNLocator
    from matplotlib.typing import ColorType

__all__ = ["write_plots"]


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed (clusters, CI)
    import matplotlib.pyplot as plt

    return plt


def _integer_locator() -> MaxNLocator:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _label(cell: Cell) -> str:
    label = cell.key.method if cell.key.bits == cell.key.method else f"{cell.key.method} {cell.key.bits}"
    variant = cell.variant if len(cell.variant) <= 50 else cell.variant[:47] + "..."
    return f"{label} [{variant}]" if variant else label


def _band(series: list[dict[int, float]], scale: float = 1.0) -> tuple[list[int], list[float], list[float], list[float]]:
    """Epochs, mean, min and max over the runs that logged each epoch."""
    epochs = sorted({e for s in series for e in s})
    mean, low, high = [], [], []
    for e in epochs:
        values = [scale * s[e] for s in series if e in s]
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
    return epochs, mean, low, high


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _by_model(report: Report) -> dict[tuple[str, str], list[Cell]]:
    groups: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in report.cells:
        if cell.used:
            groups[(cell.key.dataset, cell.key.arch)].append(cell)
    return groups


def _draw(
    ax: Axes, series: list[dict[int, float]], label: str, scale: float = 1.0
) -> tuple[ColorType | None, list[float]]:
    """Mean line and min–max band of ``series`` (error bars for a single epoch); returns (colour, values)."""
    epochs, mean, low, high = _band(series, scale)
    if not epochs:
        return None, []
    (line,) = ax.plot(epochs, mean, marker="o" if len(epochs) <= 20 else None, label=label)
    if len(epochs) == 1:
        ax.errorbar(epochs, mean, yerr=[[mean[0] - low[0]], [high[0] - mean[0]]], color=line.get_color(), capsize=4)
    else:
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    return line.get_color(), low + high


def _epoch_axis(ax: Axes, cells: list[Cell]) -> None:
    """Whole epochs on the x axis, with room around a single one."""
    epochs = [e for c in cells for r in c.used for e in (*r.curve, *(e for k in r.knobs.values() for e in k))]
    ax.xaxis.set_major_locator(_integer_locator())
    if epochs and max(epochs) - min(epochs) < 2:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xticks(range(min(epochs), max(epochs) + 1))


def _accuracy_plot(plt: ModuleType, cells: list[Cell], metric: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in cells:
        color, _ = _draw(ax, [r.curve for r in cell.used], f"{_label(cell)} (n={len(cell.used)})", scale=100.0)
        if color is not None and cell.reference is not None:
            ax.axhline(cell.reference.top1, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("epoch")
    _epoch_axis(ax, cells)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{title}: mean of seeds, min–max band; dashed: paper")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _knob_plot(plt: ModuleType, cells: list[Cell], knobs: list[str], title: str, path: Path) -> None:
    fig, axes = plt.subplots(len(knobs), 1, figsize=(7, 2.6 * len(knobs)), squeeze=False)
    for ax, knob in zip(axes[:, 0], knobs, strict=True):
        values: list[float] = []
        for cell in cells:
            values += _draw(ax, [r.knobs[knob] for r in cell.used if knob in r.knobs], _label(cell))[1]
        positive = [v for v in values if v > 0]
        if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
            ax.set_yscale("log")  # geometric schedules (BinaryRelax eta) span orders of magnitude
        ax.set_ylabel(knob)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("epoch")
    for ax in axes[:, 0]:
        _epoch_axis(ax, cells)
    axes[0, 0].set_title(f"{title}: method knobs (mean of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: Report, out: Path) -> list[Path]:
    """Draw the accuracy and knob figures into ``out``; return the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = []
    for (dataset, arch), cells in sorted(_by_model(report).items()):
        title = f"{dataset} {arch}"
        path = out / f"{_slug(report.metric)}_{dataset}_{arch}.png"
        _accuracy_plot(plt, cells, report.metric, title, path)
        paths.append(path)
        knobs = sorted({k for c in cells for r in c.used for k in r.knobs})
        if knobs:
            path = out / f"knobs_{dataset}_{arch}.png"
            _knob_plot(plt, cells, knobs, title, path)
            paths.append(path)
    return paths
