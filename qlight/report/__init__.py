"""``qlight report``: runs read from their folders, grouped into table cells, beside the papers' numbers.

:func:`~qlight.report.aggregate.collect` reads run folders into cells, :mod:`~qlight.report.tables` writes
the markdown/CSV/JSON tables, :mod:`~qlight.report.plots` the PNGs and :mod:`~qlight.report.wandb_summary`
logs both to one W&B run; :func:`~qlight.report.main.main` is the command.
"""

from qlight.report.aggregate import Cell, Report, RunResult, collect

__all__ = ["Cell", "Report", "RunResult", "collect"]
