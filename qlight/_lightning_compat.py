"""Every Lightning internal qlight relies on, behind one door.

Lightning's public API leaves out a few things qlight needs: whether this training step's logged values get
written, how far the training loop got (for mid-epoch resume and per-batch augmentation seeds), the run
seed, the SIGTERM flag that stops a run between steps, and some private state of the loggers qlight
extends. Each is read or written here and nowhere else, so a Lightning release that moves one breaks this
module only. :func:`missing_internals` lists the internals the installed Lightning lacks;
``tests/test_lightning_compat.py`` runs it, and every accessor raises a :class:`LightningInternalsError`
naming this module instead of an ``AttributeError`` deep inside a run. ``pyproject.toml`` bounds Lightning
above for the same reason: raise the bound after this check passes on the new release.
"""

from __future__ import annotations

import os
from operator import attrgetter
from typing import Any

import lightning
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.utilities.rank_zero import rank_zero_only

__all__ = [
    "CLI_OVERRIDES",
    "LightningInternalsError",
    "batches_finished",
    "batches_started",
    "callbacks_of",
    "cluster_environment",
    "existing_experiment",
    "format_summary_table",
    "logged_step",
    "logger_filesystem",
    "missing_internals",
    "move_csv_logger",
    "process_rank",
    "run_seed",
    "set_callbacks",
    "set_evaluated_position",
    "set_experiment",
    "set_logger_name",
    "set_stop_requested",
    "set_wandb_id",
    "step_logging_due",
    "step_values_written",
    "summary_max_depth",
    "wandb_init_args",
]

#: the model summary table's text (Lightning's private formatter; qlight prints it without the FLOPs line)
format_summary_table = _format_summary_table

#: private methods of ``LightningCLI`` that ``qlight.cli.QlightCLI`` overrides or calls
CLI_OVERRIDES = ("_instantiate_trainer", "_parse_ckpt_path", "_run_subcommand", "_get")
#: private methods of Lightning's CSV writer that ``qlight.loggers.ContinuedExperimentWriter`` overrides
WRITER_OVERRIDES = ("_check_log_dir_exists",)


class LightningInternalsError(AttributeError):
    """A Lightning internal qlight reads is gone (a Lightning release qlight does not support yet)."""

    def __init__(self, owner: Any, path: str) -> None:
        name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        super().__init__(
            f"qlight/_lightning_compat.py: Lightning {lightning.__version__} has no {name}.{path}, which qlight "
            "reads; install a Lightning qlight supports (see the bound in pyproject.toml) or update that module"
        )


def _read(obj: Any, path: str) -> Any:
    try:
        return attrgetter(path)(obj)
    except AttributeError:
        error = LightningInternalsError(obj, path)
    raise error


def _write(obj: Any, path: str, value: Any) -> None:
    owner, _, name = path.rpartition(".")
    target = _read(obj, owner) if owner else obj
    if not hasattr(target, name):
        raise LightningInternalsError(obj, path)
    setattr(target, name, value)


# ------------------------------------------------------------------ the training loop
def step_values_written(trainer: Trainer) -> bool:
    """Whether Lightning writes the values logged ``on_step`` in the current training step."""
    return bool(_read(trainer, "_logger_connector.should_update_logs"))


def step_logging_due(trainer: Trainer, batch_idx: int) -> bool:
    """True on the training batches whose ``on_step`` values get written, and on the epoch's last one.

    Every ``LightningModule.log`` call costs Lightning about half a millisecond of Python, a large share of a
    CIFAR step on a GPU, and values logged ``on_step`` reach the loggers only every ``log_every_n_steps``; so
    qlight logs on those steps only (as Lightning's ``LearningRateMonitor`` does) and on the epoch's last batch,
    so ``callback_metrics`` ends each epoch current. With gradient accumulation only batches that end in an
    optimizer step qualify: Lightning writes step values only there.
    """
    last = batch_idx + 1 >= trainer.num_training_batches
    if not (last or (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
        return False
    return last or step_values_written(trainer)


def logged_step(trainer: Trainer) -> int:
    """The step Lightning writes logged values at (``trainer/global_step`` in the logs; restored on resume).

    It counts the optimizer steps taken before the current batch: at a batch's end it catches up with
    ``trainer.global_step`` only after the batch's end hooks.
    """
    return int(_read(trainer, "fit_loop.epoch_loop._batches_that_stepped"))


def batches_finished(trainer: Trainer) -> int:
    """Training batches of the current epoch done so far (restored on a mid-epoch resume).

    In ``on_train_batch_end`` the current batch counts as done.
    """
    return int(_read(trainer, "fit_loop.epoch_loop.batch_progress.current.processed"))


def batches_started(trainer: Trainer) -> int:
    """Training batches of the current epoch fetched for a step so far (the current batch included)."""
    return int(_read(trainer, "fit_loop.epoch_loop.batch_progress.current.ready"))


def set_evaluated_position(trainer: Trainer, global_step: int, epoch: int) -> None:
    """Make ``validate``/``test`` log at a checkpoint's step and epoch instead of 0."""
    _write(trainer, "fit_loop.epoch_loop._batches_that_stepped", int(global_step))
    _write(trainer, "fit_loop.epoch_progress.current.completed", int(epoch))


def run_seed() -> int:
    """The seed ``seed_everything`` set for this run (Lightning keeps it in ``PL_GLOBAL_SEED``; 0 when none)."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def callbacks_of(trainer: Trainer) -> list[Callback]:
    """The trainer's callbacks (public, but set at run time, so type checkers do not see the attribute)."""
    callbacks: list[Callback] = _read(trainer, "callbacks")
    return callbacks


def set_callbacks(trainer: Trainer, callbacks: list[Callback]) -> None:
    """Replace the trainer's callbacks (before the run starts)."""
    _write(trainer, "callbacks", callbacks)


def process_rank() -> int:
    """This process's global rank as Lightning's ``rank_zero_only`` knows it (0 outside distributed runs)."""
    return int(getattr(rank_zero_only, "rank", 0))


# ------------------------------------------------------------------ signals and clusters
def cluster_environment(trainer: Trainer) -> Any:
    """The trainer's cluster environment (SLURM, torchelastic, ...)."""
    return _read(trainer, "_accelerator_connector.cluster_environment")


def set_stop_requested(trainer: Trainer, stop: bool) -> None:
    """Set Lightning's SIGTERM flag: when set, the loop raises ``SIGTERMException`` after the current step."""
    _write(trainer, "_signal_connector.received_sigterm", bool(stop))


# ------------------------------------------------------------------ loggers
def existing_experiment(logger: Logger) -> Any | None:
    """The logger's run or writer if it created one already (Lightning creates it on first use), else None."""
    return _read(logger, "_experiment")


def set_experiment(logger: Logger, experiment: Any) -> None:
    """Give a logger its run or writer (a subclass's own ``experiment`` property creates it)."""
    _write(logger, "_experiment", experiment)


def wandb_init_args(logger: WandbLogger) -> dict[str, Any]:
    """The keyword arguments the W&B logger will pass to ``wandb.init`` (editable until the run starts)."""
    args: dict[str, Any] = _read(logger, "_wandb_init")
    return args


def set_logger_name(logger: Logger, name: str) -> None:
    """Rename a logger's run before it starts (CSV folder name, W&B run name)."""
    _write(logger, "_name", name)


def set_wandb_id(logger: WandbLogger, run_id: str) -> None:
    """The W&B run id the logger reports as its version (``wandb_init_args`` holds the one W&B uses)."""
    _write(logger, "_id", run_id)


def move_csv_logger(logger: CSVLogger, root_dir: str, name: str, version: str) -> None:
    """Point a CSV logger that has not written yet at ``<root_dir>/<name>/<version>``."""
    _write(logger, "_root_dir", root_dir)
    _write(logger, "_save_dir", root_dir)
    _write(logger, "_name", name)
    _write(logger, "_version", version)


def logger_filesystem(obj: CSVLogger | ExperimentWriter) -> Any:
    """The fsspec filesystem a CSV logger or its writer writes through."""
    return _read(obj, "_fs")


def summary_max_depth(callback: ModelSummary) -> int:
    """The ``max_depth`` a ModelSummary callback was built with."""
    return int(_read(callback, "_max_depth"))


# ------------------------------------------------------------------ the check
def missing_internals() -> list[str]:
    """The internals above the installed Lightning lacks (empty when qlight supports it)."""
    import tempfile

    missing: list[str] = []

    def probe(owner: Any, paths: tuple[str, ...]) -> None:
        for path in paths:
            try:
                _read(owner, path)
            except LightningInternalsError as err:
                missing.append(str(err))

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    probe(trainer, (
        "callbacks", "_logger_connector.should_update_logs", "fit_loop.epoch_loop._batches_that_stepped",
        "fit_loop.epoch_loop.batch_progress.current.processed", "fit_loop.epoch_loop.batch_progress.current.ready",
        "fit_loop.epoch_progress.current.completed", "_accelerator_connector.cluster_environment",
        "_signal_connector.received_sigterm",
    ))
    with tempfile.TemporaryDirectory() as tmp:
        csv = CSVLogger(tmp)
        probe(csv, ("_experiment", "_name", "_root_dir", "_save_dir", "_version", "_fs"))
        probe(ExperimentWriter(tmp), ("_fs", "metrics", "metrics_keys", "metrics_file_path"))
        wandb = WandbLogger(save_dir=tmp, offline=True)
        probe(wandb, ("_experiment", "_wandb_init", "_name", "_id"))
    probe(ModelSummary(), ("_max_depth",))
    probe(LightningCLI, CLI_OVERRIDES)
    probe(ExperimentWriter, WRITER_OVERRIDES)
    return missing
