"""Resolve every run's config before anything starts.

A typo in an override then fails in a second, not after the first runs have trained: the ``qlight fit``
parser reads the configs and overrides exactly as the runs will (``--print_config``, no model or data built).
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import yaml

from qlight.cell import CellKey, cell_key
from qlight.grid.protocol import GridError, RunSpec

__all__ = ["ResolvedRun", "resolve_runs"]


def _one_line(stderr: str) -> str:
    """The informative part of a jsonargparse error (its usage text and union listings dropped)."""
    text = stderr.split("error:", 1)[-1] if "error:" in stderr else stderr
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "the configuration does not parse"
    keep = [lines[0]]
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>",
             "Given value type:")
    for line in lines[1:]:
        if not line.startswith(noise):
            keep.append(line.lstrip("- "))
    return re.sub(r"\s+", " ", " ".join(keep))[:400]


class ResolvedRun:
    """A run's resolved config and what follows from it: its cell and where its CSV metrics go."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.cell: CellKey = cell_key(config)
        self.csv_root: str | None = None
        loggers = (config.get("trainer") or {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("CSVLogger"):
                self.csv_root = str((logger.get("init_args") or {}).get("save_dir") or "logs")
                break


def _print_config(args: list[str]) -> dict[str, Any]:
    from qlight.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([*args, "--print_config"], run=False)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise GridError(_one_line(err.getvalue())) from None
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict):
        raise GridError("the configuration did not resolve to a mapping")
    return config


def resolve_runs(runs: list[RunSpec]) -> dict[str, ResolvedRun]:
    """Each run's :class:`ResolvedRun`, by run name (configs shared by several seeds are parsed once).

    Raises:
        GridError: a config or override does not parse, or a run writes no ``metrics.csv``.
    """
    cache: dict[Any, ResolvedRun] = {}
    out: dict[str, ResolvedRun] = {}
    for run in runs:
        if run.parse_key not in cache:
            try:
                resolved = ResolvedRun(_print_config(run.fit_args()))
            except GridError as err:
                raise GridError(f"run {run.name}: {err}") from None
            except ValueError as err:  # an invalid quantization spec, no model.init_args.model
                raise GridError(f"run {run.name}: {err}") from None
            if resolved.csv_root is None:
                raise GridError(
                    f"run {run.name}: trainer.logger has no qlight.loggers.CSVLogger, so the run writes no "
                    "metrics.csv for the grid and qlight report to read; add --config configs/logger/csv_only.yaml"
                )
            cache[run.parse_key] = resolved
        out[run.name] = cache[run.parse_key]
    return out
