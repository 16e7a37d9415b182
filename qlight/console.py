"""What a qlight command prints: what happened, without the libraries' boilerplate; ``--verbose`` for all.

By default (quiet) qlight drops output that tells a researcher nothing about their run:
Lightning's advertising tips, the model summary's ``Total FLOPs: 0`` (qlight models declare no
example input, so Lightning cannot count them), the deprecation warning Lightning's ``_pytree``
triggers on recent torch, the warning that an epoch is shorter than ``log_every_n_steps`` (qlight
writes ``train/loss`` at each epoch's end anyway), and W&B's banner, which qlight replaces by one
line with the run's URL or its ``wandb sync`` command. ``--verbose`` (or ``QLIGHT_VERBOSE=1``)
restores the full output.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, cast

from lightning.pytorch.callbacks import ModelSummary
from typing_extensions import override

from qlight._lightning_compat import format_summary_table

__all__ = ["QuietModelSummary", "be_quiet", "set_verbose", "verbose"]

VERBOSE_ENV = "QLIGHT_VERBOSE"

# warnings that describe the libraries, not the run (regular expressions matched at the start)
_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"The dirpath has changed from",
)
_QUIET_LOG_PREFIXES = ("💡 Tip:",)


def verbose() -> bool:
    """Whether the user asked for the full output (``--verbose`` or ``QLIGHT_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(on: bool) -> None:
    """Set the output level for this process and the processes it starts (DDP workers)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"


class _DropTips(logging.Filter):
    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_QUIET_LOG_PREFIXES)


_we_silenced_wandb = False


def be_quiet() -> None:
    """Silence the boilerplate listed in the module doc, or (verbose) undo that for this process."""
    global _we_silenced_wandb
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    if verbose():
        cast(list, warnings.filters)[:] = [f for f in warnings.filters if not (f[0] == "ignore" and f[1] is not None
                                                                  and f[1].pattern in _QUIET_WARNINGS)]
        for logger in loggers:  # the loggers rank_zero_info writes to
            for tip_filter in [f for f in logger.filters if isinstance(f, _DropTips)]:
                logger.removeFilter(tip_filter)
        if _we_silenced_wandb:
            os.environ.pop("WANDB_SILENT", None)
            _we_silenced_wandb = False
        return
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for logger in loggers:  # whichever handler (Lightning's, pytest's) prints their records
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    if "WANDB_SILENT" not in os.environ:
        os.environ["WANDB_SILENT"] = "true"
        _we_silenced_wandb = True


class QuietModelSummary(ModelSummary):
    """Lightning's model summary without the FLOPs column and total when they are unknown (zero)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        """Log the summary table, without FLOPs when they are unknown."""
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        table = format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.rstrip().endswith("Total Flops"))
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)
