"""The report as tables.

A markdown table (printed and ``report.md``), ``report.csv`` (one row per cell) and ``report.json`` (cells
with their runs, and the runs left out).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from qlight.report.aggregate import Report, RunResult

__all__ = ["cell_rows", "markdown", "write_tables"]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def cell_rows(report: Report, mode: str) -> list[dict[str, Any]]:
    """One flat record per cell (the CSV rows and the W&B table)."""
    rows = []
    for cell in report.cells:
        mean, std, n = cell.stats(mode)
        ref = cell.reference
        rows.append(
            {
                "dataset": cell.key.dataset,
                "arch": cell.key.arch,
                "method": cell.key.method,
                "bits": cell.key.bits,
                "w_bits": cell.key.w_bits,
                "a_bits": cell.key.a_bits,
                "variant": cell.variant,
                "metric": report.metric,
                "mode": mode,
                "paper": ref.top1 if ref else None,
                "paper_source": ref.source if ref else "",
                "paper_config": (ref.config or "") if ref else "",
                "mean": mean,
                "std": std,
                "delta": cell.delta(mode),
                "n": n,
                "seeds": " ".join(str(r.seed) for r in cell.used),
                "mean_epochs": cell.mean_epochs,
                "mean_wall_seconds": cell.mean_wall_seconds,
                "left_out": cell.notes,
            }
        )
    return rows


def _run_record(run: RunResult, mode: str) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "folder": str(run.folder) if run.folder else None,
        "cell": run.cell,
        "variant": run.variant,
        "seed": run.seed,
        "state": run.state.state,
        "detail": run.state.detail,
        "excluded": run.excluded,
        "epochs": run.epochs,
        "max_epochs": run.max_epochs,
        "best": run.best,
        "best_epoch": run.best_epoch,
        "final": run.final,
        "value": run.value(mode),
        "wall_seconds": run.wall_seconds,
        "missing_epochs": run.missing_epochs,
    }


def markdown(report: Report, mode: str) -> str:
    """The table of cells (paper, ours mean ± std, delta, n, epochs, wall time) and the runs left out."""
    show_variant = any(c.variant for c in report.cells)
    sources: list[str] = []
    head = ["dataset", "arch", "method", "bits"] + (["variant"] if show_variant else [])
    head += ["paper", f"ours ({mode} {report.metric}, mean ± std)", "Δ", "n", "epochs", "wall/run", "left out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in report.cells:
        mean, std, n = cell.stats(mode)
        paper = ""
        if cell.reference is not None:
            ref = cell.reference
            label = f"{ref.source}" + (f" ({ref.note})" if ref.note else "")
            if label not in sources:
                sources.append(label)
            paper = f"{ref.top1:.2f} [{sources.index(label) + 1}]"
        row = [cell.key.dataset, cell.key.arch, cell.key.method, cell.key.bits]
        row += [cell.variant or "—"] if show_variant else []
        epochs = "" if cell.mean_epochs is None else f"{cell.mean_epochs:g}"
        row += [paper, _mean_std(mean, std), _signed(cell.delta(mode)), str(n), epochs,
                _duration(cell.mean_wall_seconds), cell.notes]
        lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines) + "\n"
    if sources:
        out += "\n" + "\n".join(f"[{i}] {s}" for i, s in enumerate(sources, 1)) + "\n"
    left_out = report.left_out
    if left_out:
        out += "\nRuns not in the averages:\n\n| run | cell | seed | state | best so far | detail |\n|---|---|---|---|---|---|\n"
        for run in left_out:
            cell_name = run.cell
            best = "" if run.best is None else f"{100 * run.best:.2f} (epoch {run.best_epoch})"
            state = "duplicate seed" if run.excluded else run.state.state
            detail = run.excluded or run.state.detail
            seed = "" if run.seed is None else str(run.seed)
            where = f"{run.folder}" if run.folder else run.run_id
            out += f"| {where} | {cell_name} | {seed} | {state} | {best} | {detail.replace('|', '/')} |\n"
    return out


def write_tables(report: Report, mode: str, out: Path, plots: list[Path] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.json`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    text = f"# qlight report: {mode} {report.metric} per run, mean ± std over seeds (percent)\n\n"
    text += markdown(report, mode)
    for plot in plots or []:
        text += f"\n![{plot.stem}]({plot.name})\n"
    paths["md"].write_text(text)
    rows = cell_rows(report, mode)
    with open(paths["csv"], "w", newline="") as file:
        fields = list(rows[0]) if rows else ["dataset", "arch", "method", "bits"]
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    cells: list[dict[str, Any]] = []
    for row, cell in zip(rows, report.cells, strict=True):
        cells.append({**row, "runs": [_run_record(r, mode) for r in cell.runs]})
    payload = {
        "metric": report.metric,
        "mode": mode,
        "cells": cells,
        "left_out": [_run_record(r, mode) for r in report.left_out],
    }
    paths["json"].write_text(json.dumps(payload, indent=1) + "\n")
    return paths

