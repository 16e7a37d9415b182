"""The ``qlight report`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from qlight.commands import ArgumentParser
from qlight.report.aggregate import collect
from qlight.runfolder import RunFolder, find_run_folders

__all__ = ["main"]


class ReportError(ValueError):
    """Bad input to ``qlight report`` (a path, a metric), in one line."""


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qlight report",
        description="Group qlight runs into table cells by (dataset, arch, method, bits) from their saved "
        "config, aggregate the seeds (mean ± std of each run's best or final accuracy) and print them beside "
        "the papers' numbers; write report.md/.csv/.json and PNG plots.",
    )
    p.add_argument("paths", nargs="*", default=["logs"], help="run folders or folders holding them (default: logs)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--best", dest="mode", action="store_const", const="best",
                       help="each run's best value over epochs, as the papers report (default)")
    which.add_argument("--final", dest="mode", action="store_const", const="final",
                       help="each run's value at its last epoch")
    p.set_defaults(mode="best")
    p.add_argument("--metric", default="val/acc1", help="per-epoch metric column of metrics.csv (default: val/acc1)")
    p.add_argument("--out", type=Path, default=None,
                   help="where report.md/.csv/.json and the plots go (default: <first path>/report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--wandb", action="store_true",
                   help="log the table (wandb.Table) and the plots to one W&B summary run")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: the one the runs logged to)")
    return p


def _default_out(paths: list[str]) -> Path:
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / "report"


def _columns(folder: Path) -> list[str]:
    try:
        return RunFolder.load(folder).columns
    except ValueError:
        return []


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qlight report``; bad input raises :class:`ReportError` (the CLI prints it and exits 2)."""
    args = parser().parse_args(argv)
    for path in args.paths:
        if not Path(path).exists():
            raise ReportError(f"report path {path!r} does not exist; pass run folders or a folder holding them (e.g. logs)")
    folders = find_run_folders(args.paths)
    if not folders:
        raise ReportError(
            f"no run folders under {', '.join(args.paths)}: a run folder holds config.yaml and metrics.csv "
            "(qlight's CSV logger writes logs/<group>/<name>/<version>/)"
        )
    out = args.out or _default_out(args.paths)
    report = collect(folders, args.metric, grid_paths=[Path(p) for p in args.paths])
    if not any(r.curve for c in report.cells for r in c.runs):
        logged = sorted({c for f in folders for c in _columns(f)} - {"epoch", "step"})
        if args.metric not in logged:
            raise ReportError(f"--metric {args.metric!r} is logged by none of the {len(folders)} runs; logged: {logged}")

    from qlight.report.tables import markdown, write_tables

    plots = []
    if not args.no_plots:
        from qlight.report.plots import write_plots

        plots = write_plots(report, out)
    paths = write_tables(report, args.mode, out, plots)
    print(markdown(report, args.mode))
    print(f"Wrote {paths['md']}, {paths['csv'].name}, {paths['json'].name}" + (f" and {len(plots)} plot(s)" if plots else ""))
    if args.wandb:
        from qlight.report.wandb_summary import log_to_wandb

        print(f"Logged to {log_to_wandb(report, args.mode, plots, out, args.wandb_project)}")
    return 0
