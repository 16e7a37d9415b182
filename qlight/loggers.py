"""Loggers whose run names come from the experiment itself, so W&B groups line up across methods.

:class:`WandbLogger` picks online or offline mode by itself (online only when the user is logged in)
and :class:`CSVLogger` always writes metrics locally, so a run never depends on W&B being reachable.
Both fill in names the config leaves empty from a :class:`RunInfo` (dataset, architecture, method,
bits, seed) that ``qlight.cli`` derives before training starts.
"""

from __future__ import annotations

import netrc
import os
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger


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
        return [self.method, self.bits, self.dataset, self.arch]


def slurm_job_tag() -> str | None:
    """``slurm-<job id>`` (``slurm-<array job id>_<task id>`` for an array task) inside a SLURM job, else None.

    A requeued job keeps its id, so this tag names what must survive a requeue: the CSV run folder,
    the W&B run and the folder Lightning writes its requeue checkpoint to.
    """
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


class WandbLogger(_WandbLogger):
    """Lightning's W&B logger with automatic online/offline choice and derived names.

    Args:
        project: W&B project.
        mode: ``auto`` logs online when the user is logged in and offline (``wandb sync`` later)
            otherwise; ``online``, ``offline`` and ``disabled`` force a mode. The ``WANDB_MODE``
            environment variable, when set, wins over ``auto``.
        name: run name; ``None`` derives ``<method>-<arch>-<bits>-s<seed>``. Inside a SLURM job
            without an explicit ``id``, the run id is ``<name>-slurm-<job id>`` with ``resume="allow"``,
            so a requeued job continues the same W&B run.
        group: run group; ``None`` derives ``<dataset>-<arch>-<bits>``.
        tags: run tags; ``None`` derives ``[method, bits, dataset, arch]``.
        save_dir: where the local ``wandb/`` folder goes.
        **kwargs: passed to ``lightning.pytorch.loggers.WandbLogger`` and ``wandb.init``.
    """

    def __init__(
        self,
        project: str = "qlight",
        mode: Literal["auto", "online", "offline", "disabled"] = "auto",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        save_dir: str = "logs",
        **kwargs: Any,
    ) -> None:
        if mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"WandbLogger.mode={mode!r}; valid: ['auto', 'online', 'offline', 'disabled']")
        if mode == "auto":
            env_mode = os.environ.get("WANDB_MODE")
            mode = "offline" if env_mode in ("offline", "dryrun") or not wandb_logged_in() else "online"
            if env_mode == "disabled":
                mode = "disabled"
        self.mode = mode
        os.makedirs(save_dir, exist_ok=True)
        extra = {"mode": "disabled"} if mode == "disabled" else {}
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

    def describe_run(self, info: RunInfo) -> None:
        """Fill name, group and tags the config left empty (before the run is created)."""
        if self._experiment is not None:
            return
        init = self._wandb_init
        if not init.get("name"):
            init["name"] = self._name = info.name
        if not init.get("group"):
            init["group"] = info.group
        if not init.get("tags"):
            init["tags"] = info.tags
        init.setdefault("job_type", "train")
        tag = slurm_job_tag()
        if tag and not init.get("id"):
            init["id"] = self._id = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{init['name']}-{tag}")[:128]
            init.setdefault("resume", "allow")


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger writing to ``<save_dir>/<group>/<name>/version_N`` by default.

    Inside a SLURM job the default version is the job tag (``slurm-<job id>``), so a requeued job
    appends to the same ``metrics.csv`` and keeps its checkpoints in the same folder.
    """

    def __init__(
        self, save_dir: str = "logs", name: str | None = None, version: int | str | None = None, **kwargs: Any
    ):
        if version is None:
            version = slurm_job_tag()
        super().__init__(save_dir=save_dir, name=name or "qlight", version=version, **kwargs)
        self._auto_name = name is None

    def describe_run(self, info: RunInfo) -> None:
        """Name the run folder after the experiment when the config gave no name."""
        if self._auto_name and self._experiment is None:
            self._name = f"{info.group}/{info.name}"
