"""Log a report to one W&B summary run: the cells as a ``wandb.Table`` and the plots as images.

The run goes to the project the training runs logged to (their ``WandbLogger`` ``project``), online when
the user is logged in and offline (``wandb sync`` later) otherwise, like qlight's training runs.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from qlight.report.aggregate import Report
from qlight.report.tables import cell_rows

__all__ = ["log_to_wandb", "runs_project"]


def runs_project(report: Report, default: str = "qlight") -> str:
    """The W&B project most runs of the report logged to (``default`` when none used W&B)."""
    projects: Counter[str] = Counter()
    for cell in report.cells:
        for run in cell.runs:
            loggers = (run.config.get("trainer") or {}).get("logger") or []
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                if isinstance(logger, dict) and "Wandb" in str(logger.get("class_path", "")):
                    project = (logger.get("init_args") or {}).get("project")
                    if project:
                        projects[str(project)] += 1
    return projects.most_common(1)[0][0] if projects else default


def _mode() -> Literal["online", "offline", "disabled"]:
    from qlight.loggers import wandb_logged_in

    env = os.environ.get("WANDB_MODE")
    if env in ("offline", "dryrun"):
        return "offline"
    if env == "disabled":
        return "disabled"
    if env == "online":
        return "online"
    return "online" if wandb_logged_in() else "offline"


def log_to_wandb(report: Report, mode: str, plots: list[Path], out: Path, project: str | None = None) -> str:
    """Create the summary run and log the table and plots; return a line saying where it went."""
    import wandb

    project = project or runs_project(report)
    run_mode = _mode()
    rows = cell_rows(report, mode)
    columns = list(rows[0]) if rows else ["dataset", "arch", "method", "bits"]
    table = wandb.Table(columns=columns, data=[[_plain(row[c]) for c in columns] for row in rows])
    run = wandb.init(
        project=project,
        name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
        job_type="report",
        mode=run_mode,
        dir=str(out),
        config={"metric": report.metric, "mode": mode, "cells": len(report.cells)},
    )
    try:
        payload: dict[str, Any] = {"report": table}
        for plot in plots:
            payload[f"plots/{plot.stem}"] = wandb.Image(str(plot))
        run.log(payload)
        where = f"W&B run {run.name} in project {project} ({run_mode})"
        if run_mode == "offline":
            where += f": {run.dir}; upload with `wandb sync {Path(run.dir).parent}`"
    finally:
        run.finish()
    return where


def _plain(value: Any) -> Any:
    """W&B tables take numbers and strings; None stays missing."""
    return value if value is None or isinstance(value, int | float | str) else str(value)
