"""Loggers whose run names come from the experiment itself, so W&B groups line up across methods.

:class:`WandbLogger` picks online or offline mode by itself (online only when the user is logged in)
and :class:`CSVLogger` always writes metrics locally, so a run never depends on W&B being reachable.
Both fill in names the config leaves empty from a :class:`RunInfo` (dataset, architecture, method,
bits, seed) that ``qlight.cli`` derives before training starts.
"""

from __future__ import annotations

import csv
import netrc
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from typing_extensions import override

from qlight._lightning_compat import (
    existing_experiment,
    logger_filesystem,
    move_csv_logger,
    set_experiment,
    set_logger_name,
    set_wandb_id,
    wandb_init_args,
)


@dataclass(frozen=True)
class RunInfo:
    """What an experiment is, for naming and grouping runs."""

    dataset: str
    arch: str
    method: str
    bits: str  # "w1a4", "float", ...
    seed: int | None = None

    @property
    def group(self) -> str:
        """Runs that differ only by seed or method share a group: ``cifar10-resnet20-w1a4``."""
        return f"{self.dataset}-{self.arch}-{self.bits}"

    @property
    def name(self) -> str:
        """``bcgd-resnet20-w1a4-s0`` (``float-resnet20-s0`` for float runs)."""
        seed = f"-s{self.seed}" if self.seed is not None else ""
        bits = "" if self.bits == self.method else f"-{self.bits}"
        return f"{self.method}-{self.arch}{bits}{seed}"

    @property
    def tags(self) -> list[str]:
        """W&B tags: method, bits, dataset, architecture."""
        return [self.method, self.bits, self.dataset, self.arch]


def run_tag() -> str | None:
    """The id of a run that continues across several invocations, or None for a one-off run.

    ``$QLIGHT_RUN_ID`` when set (e.g. a run split into time-limited chunks, each resumed with
    ``--ckpt_path last``); inside a SLURM job ``slurm-<job id>`` (``slurm-<array job id>_<task id>``),
    which a requeued job keeps. The tag names what must survive: the CSV run folder, the W&B run
    and the folder Lightning writes its requeue checkpoint to.
    """
    if tag := os.environ.get("QLIGHT_RUN_ID"):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
            raise ValueError(f"QLIGHT_RUN_ID={tag!r} is invalid: use letters, digits, '_', '.' and '-' only")
        return tag
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"slurm-{array_job}_{task}"
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else None


def wandb_logged_in() -> bool:
    """Whether wandb has credentials (``WANDB_API_KEY`` or a netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


#: ``auto``: offline unless logged in to W&B (``WANDB_MODE`` wins), else the named mode
WandbMode = Literal["auto", "online", "offline", "disabled"]
WANDB_MODES: tuple[WandbMode, ...] = get_args(WandbMode)


class WandbLogger(_WandbLogger):
    """Lightning's W&B logger with automatic online/offline choice and derived names.

    Args:
        project: W&B project.
        mode: ``auto`` logs online when the user is logged in and offline (``wandb sync`` later)
            otherwise; ``online``, ``offline`` and ``disabled`` force a mode. The ``WANDB_MODE``
            environment variable, when set, wins over ``auto``.
        name: run name; ``None`` derives ``<method>-<arch>-<bits>-s<seed>``. For a run with a
            :func:`run_tag` (a SLURM job, ``$QLIGHT_RUN_ID``) and no explicit ``id``, the W&B id is
            ``<name>-<tag>`` with ``resume="allow"``, so a requeued or resumed job continues that W&B run.
        group: run group; ``None`` derives ``<dataset>-<arch>-<bits>``.
        tags: run tags; ``None`` derives ``[method, bits, dataset, arch]``.
        save_dir: where the local ``wandb/`` folder goes.
        **kwargs: passed to ``lightning.pytorch.loggers.WandbLogger`` and ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "qlight",
        mode: WandbMode = "auto",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = "logs",
        **kwargs: Any,
    ) -> None:
        if mode not in WANDB_MODES:
            raise ValueError(f"WandbLogger.mode={mode!r}; valid: {list(WANDB_MODES)}")
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE")
            mode = "offline" if env_mode in ("offline", "dryrun") or not wandb_logged_in() else "online"
            if env_mode == "disabled":
                mode = "disabled"
        self.mode = mode
        os.makedirs(save_dir, exist_ok=True)
        extra: dict[str, Any] = {"mode": "disabled"} if mode == "disabled" else {}
        super().__init__(
            project=project,
            name=name,
            group=group,
            tags=tags,
            save_dir=save_dir,
            offline=mode == "offline",
            **extra,
            **kwargs,
        )
        init = wandb_init_args(self)
        if init.get("anonymous") is None:  # wandb warns that the setting has no effect
            init.pop("anonymous", None)

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The W&B run, created on first use.

        When W&B itself is silenced (``WANDB_SILENT``, qlight's default), one line says where the run lives.
        """
        created = existing_experiment(self) is None
        run = super().experiment
        if created and self.mode != "disabled" and os.environ.get("WANDB_SILENT", "").lower() == "true":
            print(f"qlight: W&B {self.where()}", file=sys.stderr, flush=True)
        return run

    def where(self) -> str:
        """The run's URL, or for an offline run its folder and the command that uploads it."""
        run = existing_experiment(self)
        if run is None or self.mode == "disabled":
            return "disabled"
        if self.mode == "offline":
            folder = os.path.relpath(Path(run.dir).parent)
            return f"offline run {folder}; upload it with: wandb sync {folder}"
        return f"run {run.url}"

    def continue_run(self, run_id: str) -> None:
        """Log into the existing W&B run ``run_id`` (a resumed run, or evaluating a run's checkpoint)."""
        if existing_experiment(self) is None:
            init = wandb_init_args(self)
            init["id"] = run_id
            init["resume"] = "allow"
            set_wandb_id(self, run_id)

    def describe_run(self, info: RunInfo) -> None:
        """Fill name, group and tags the config left empty (before the run is created)."""
        if existing_experiment(self) is not None:
            return
        init = wandb_init_args(self)
        if not init.get("name"):
            init["name"] = info.name
            set_logger_name(self, info.name)
        if not init.get("group"):
            init["group"] = info.group
        if not init.get("tags"):
            init["tags"] = info.tags
        init.setdefault("job_type", "train")
        tag = run_tag()
        if tag and not init.get("id"):
            init["id"] = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{init['name']}-{tag}")[:128]
            set_wandb_id(self, init["id"])
            init.setdefault("resume", "allow")


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger writing to ``<save_dir>/<group>/<name>/version_N`` by default.

    For a run with a :func:`run_tag` (a SLURM job, ``$QLIGHT_RUN_ID``) the default version is the tag,
    so a requeued or resumed job appends to the same ``metrics.csv`` and keeps its checkpoints there.
    """

    def __init__(
        self, save_dir: str = "logs", name: str | None = None, version: int | str | None = None, **kwargs: Any
    ) -> None:
        self._continued = version is None and run_tag() is not None
        if version is None:
            version = run_tag()
        super().__init__(save_dir=save_dir, name=name or "qlight", version=version, **kwargs)
        self._auto_name = name is None

    def describe_run(self, info: RunInfo) -> None:
        """Name the run folder after the experiment when the config gave no name."""
        if self._auto_name and existing_experiment(self) is None:
            set_logger_name(self, f"{info.group}/{info.name}")

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Write the buffered rows with every checkpoint (Lightning flushes only every 100 steps).

        A run killed later and resumed from that checkpoint then keeps every metric logged before it.
        """
        self.save()

    def continue_in(self, log_dir: str | os.PathLike[str], replace: Literal["later", "same"] = "later") -> None:
        """Write into the existing folder ``log_dir``, keeping its ``metrics.csv`` rows.

        ``replace="later"`` (a resumed run) drops the rows at or after the first step logged now, which
        the interrupted run wrote after its checkpoint; ``replace="same"`` (evaluations of a run's
        checkpoints, one row per evaluated step) drops only rows of the steps logged again.
        """
        if existing_experiment(self) is not None:
            raise RuntimeError("CSVLogger.continue_in must be called before the logger writes")
        path = Path(log_dir)
        move_csv_logger(self, str(path.parent.parent), path.parent.name, path.name)
        self._continued = True
        self._replace = replace

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """Lightning's writer; for a continued run (a :func:`run_tag`) one that keeps the earlier rows."""
        writer = existing_experiment(self)
        if writer is None:
            logger_filesystem(self).makedirs(self.root_dir, exist_ok=True)
            if self._continued:
                writer = ContinuedExperimentWriter(self.log_dir, getattr(self, "_replace", "later"))
            else:
                writer = ExperimentWriter(log_dir=self.log_dir)
            set_experiment(self, writer)
        return writer


class ContinuedExperimentWriter(ExperimentWriter):
    """A CSV writer that continues an existing ``metrics.csv`` instead of deleting it (Lightning's default).

    The rows the interrupted run wrote after its last checkpoint are replaced by the resumed run's: on
    the first save, rows with ``step`` at or after the first step logged now are dropped
    (``replace="later"``); with ``replace="same"`` only rows of the steps logged now are.
    """

    def __init__(self, log_dir: str, replace: Literal["later", "same"] = "later") -> None:
        self._resume_pending = False
        self._replace = replace
        super().__init__(log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        if logger_filesystem(self).isfile(self.metrics_file_path):
            with logger_filesystem(self).open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])
            self._resume_pending = True

    @override
    def save(self) -> None:
        if self._resume_pending and self.metrics:
            steps = {int(m["step"]) for m in self.metrics}
            first_step = min(steps)

            def keep(row: dict[str, str]) -> bool:
                if not row.get("step"):
                    return False
                step = int(row["step"])
                return step not in steps if self._replace == "same" else step < first_step

            with logger_filesystem(self).open(self.metrics_file_path, "r", newline="") as file:
                kept = [row for row in csv.DictReader(file) if keep(row)]
            with logger_filesystem(self).open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._resume_pending = False
        super().save()
