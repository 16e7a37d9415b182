"""What is on disk about one run, and whether it finished.

A qlight run folder is the CSV logger's ``<save_dir>/<group>/<name>/<version>/`` with the resolved
``config.yaml``, ``metrics.csv`` and ``checkpoints/``. For a run with a ``QLIGHT_RUN_ID`` the version is
that id, and ``logs/<id>/`` is the run's own folder (Lightning's ``default_root_dir``: SLURM requeue
checkpoints); ``qlight grid`` keeps its record of the run there (``grid-run.json``: command, attempts,
exit codes) and the run's console output (``output.log``).

A run is *finished* when its metrics reach the trainer's ``max_epochs`` (or ``max_steps``); otherwise it is
*running* (the grid's record names a live process on this host), *crashed* (the record shows a non-zero
exit, or a process that is gone), *blocked* (never started: the run it starts from did not finish) or
*unfinished* (stopped early without an error, e.g. ``max_time``, or no record to tell).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "GRID_RECORD",
    "RunFolder",
    "RunState",
    "find_run_folders",
    "grid_records",
    "read_grid_record",
    "write_grid_record",
]

GRID_RECORD = "grid-run.json"
GRID_OUTPUT = "output.log"
#: Lightning's default when neither max_epochs nor max_steps is set
_LIGHTNING_DEFAULT_EPOCHS = 1000


def _to_float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class RunState:
    """``finished``, ``running``, ``crashed``, ``blocked`` or ``unfinished``, with a human-readable detail."""

    state: str
    detail: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run finished."""
        return self.state == "finished"

    def __str__(self) -> str:
        return f"{self.state} ({self.detail})" if self.detail else self.state


@dataclass
class RunFolder:
    """A CSV run folder: its resolved config and its metrics rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, str]] = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunFolder:
        """Read ``config.yaml`` and ``metrics.csv`` of ``path``.

        Raises:
            ValueError: either file is missing or unreadable (one line, naming the file).
        """
        folder = Path(path)
        config_path, metrics_path = folder / "config.yaml", folder / "metrics.csv"
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{config_path}: cannot read the run's config ({type(err).__name__}: {err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: not a config mapping")  # noqa: TRY004 - the file's content is wrong
        rows: list[dict[str, str]] = []
        if metrics_path.is_file():
            with open(metrics_path, newline="") as file:
                rows = list(csv.DictReader(file))
        return cls(folder, config, rows)

    # --- identity ---------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        """The version folder's name: the ``QLIGHT_RUN_ID`` of a grid run, ``version_N`` otherwise."""
        return self.path.name

    @property
    def seed(self) -> int | None:
        """The run's ``seed_everything`` (None when not an integer)."""
        seed = self.config.get("seed_everything")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def own_folder(self) -> Path:
        """``logs/<run id>/`` beside the CSV tree (``<save_dir>/<group>/<name>/<id>``)."""
        return self.path.parents[2] / self.run_id if len(self.path.parents) >= 3 else self.path / "__none__"

    # --- metrics ----------------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """The columns of ``metrics.csv``."""
        return list(self.rows[0].keys()) if self.rows else []

    def series(self, metric: str) -> dict[int, float]:
        """``metric`` by epoch (the last value logged in each epoch)."""
        out: dict[int, float] = {}
        for row in self.rows:
            value, epoch = _to_float(row.get(metric)), _to_float(row.get("epoch"))
            if value is not None and epoch is not None:
                out[int(epoch)] = value
        return dict(sorted(out.items()))

    @property
    def completed_epochs(self) -> int:
        """1 + the last epoch with an epoch-level metric (validation or training accuracy) logged."""
        last = -1
        for row in self.rows:
            epoch = _to_float(row.get("epoch"))
            if epoch is None:
                continue
            if any(
                v not in (None, "") and k.startswith(("val/", "train/acc"))
                for k, v in row.items()
            ):
                last = max(last, int(epoch))
        return last + 1

    @property
    def last_step(self) -> int:
        """The last step logged (-1 when none)."""
        steps = [_to_float(r.get("step")) for r in self.rows]
        return int(max((s for s in steps if s is not None), default=-1))

    def target(self) -> tuple[int | None, int | None]:
        """(max_epochs, max_steps) the trainer stops at, as Lightning reads them (None: no limit)."""
        trainer = self.config.get("trainer") or {}
        max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
        max_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
        if isinstance(max_epochs, int) and max_epochs >= 0:
            return max_epochs, max_steps
        if max_epochs is None and max_steps is None:
            return _LIGHTNING_DEFAULT_EPOCHS, None
        return None, max_steps

    @property
    def complete(self) -> bool:
        """Whether the metrics reach the trainer's epoch or step limit."""
        max_epochs, max_steps = self.target()
        if max_epochs is not None and self.completed_epochs >= max_epochs:
            return True
        return max_steps is not None and self.last_step + 1 >= max_steps

    # --- grid record and state --------------------------------------------------------------------------
    @property
    def grid_record(self) -> dict[str, Any] | None:
        """What ``qlight grid`` recorded about the run, if it ran it."""
        return read_grid_record(self.own_folder)

    def state(self) -> RunState:
        """Finished, running, crashed or unfinished (see the module docstring)."""
        max_epochs, _ = self.target()
        progress = f"{self.completed_epochs}/{max_epochs if max_epochs is not None else '?'} epochs"
        if self.complete:
            return RunState("finished", progress)
        return record_state(self.grid_record, progress, self.last_activity)

    @property
    def last_activity(self) -> float | None:
        """When the run last wrote its metrics (seconds since the epoch)."""
        metrics = self.path / "metrics.csv"
        return metrics.stat().st_mtime if metrics.is_file() else None

    @property
    def wall_seconds(self) -> float | None:
        """Training time: the grid's attempts summed, else the span of the files (first attempt only)."""
        record = self.grid_record
        if record and record.get("attempts"):
            return float(sum(a.get("seconds") or 0.0 for a in record["attempts"]))
        config, metrics = self.path / "config.yaml", self.path / "metrics.csv"
        if config.is_file() and metrics.is_file():
            return max(0.0, metrics.stat().st_mtime - config.stat().st_mtime)
        return None

    def checkpoint(self, which: str = "last") -> Path | None:
        """``checkpoints/last.ckpt`` (``which="last"``) or the newest ``best*.ckpt`` (``"best"``), if present."""
        folder = self.path / "checkpoints"
        if which == "last":
            path = folder / "last.ckpt"
            return path if path.is_file() else None
        found = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs here and is a qlight process (pids are reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc (not Linux): the pid exists, assume it is the run
        return True
    return not cmdline or b"qlight" in cmdline  # empty while a process is being started


def exit_reason(returncode: int | None) -> str:
    """``exit 1`` or ``killed by SIGKILL`` for a process's return code."""
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


#: a run started on another host counts as running while its files changed this recently
ACTIVE_SECONDS = 600


def record_state(record: dict[str, Any] | None, progress: str, last_activity: float | None = None) -> RunState:
    """State of an incomplete run from the grid's record of it (None: no record).

    ``last_activity``: when the run last wrote a file (its metrics); it tells a run that is alive on another
    host (shared file system, SLURM) from one that stopped there.
    """
    if record is None:
        return RunState("unfinished", f"{progress}; no grid record")
    status = record.get("status")
    if status == "running":
        pid, host, job = record.get("pid"), record.get("host"), record.get("slurm_job")
        if host != socket.gethostname():
            idle = None if last_activity is None else time.time() - last_activity
            if idle is not None and idle < ACTIVE_SECONDS:
                return RunState("running", f"{progress}; on {host}, wrote metrics {idle:.0f} s ago")
            return RunState("unfinished", f"{progress}; last started on {host}" + (f" (SLURM job {job})" if job else ""))
        if isinstance(pid, int) and _process_alive(pid):
            return RunState("running", f"{progress}; pid {pid}")
        if job:  # a SLURM task replaced by qlight fit: preempted and requeued, or ended without a record
            return RunState("unfinished", f"{progress}; SLURM job {job} is not running here (see squeue)")
        return RunState("crashed", f"{progress}; the process ended without an exit record")
    if status == "blocked":
        return RunState("blocked", f"not started: {record.get('error', 'a run it depends on did not finish')}")
    returncode = record.get("returncode")
    if returncode not in (0, None):
        error = record.get("error") or ""
        return RunState("crashed", f"{progress}; {exit_reason(returncode)}" + (f": {error}" if error else ""))
    return RunState("unfinished", f"{progress}; stopped without an error (e.g. max_time)")


def read_grid_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The grid's ``grid-run.json`` in a run's own folder, or None."""
    path = Path(folder) / GRID_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_grid_record(folder: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Write ``grid-run.json`` atomically (a reader never sees half a file)."""
    path = Path(folder) / GRID_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _walk(paths: Iterable[str | os.PathLike[str]], name: str) -> Iterator[Path]:
    for root in paths:
        root = Path(root)
        if (root / name).is_file():
            yield root / name
        elif root.is_dir():
            yield from sorted(root.rglob(name))


def find_run_folders(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every folder under ``paths`` (or being one) that holds a ``config.yaml`` beside a ``metrics.csv``."""
    found = {p.parent for p in _walk(paths, "metrics.csv") if (p.parent / "config.yaml").is_file()}
    return sorted(found)


def grid_records(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, dict[str, Any]]]:
    """(own folder, record) of every grid run under ``paths``."""
    out = []
    for path in _walk(paths, GRID_RECORD):
        record = read_grid_record(path.parent)
        if record is not None:
            out.append((path.parent, record))
    return out


def find_run_folder(run_id: str, logs: str | os.PathLike[str] = "logs") -> Path | None:
    """The CSV run folder of the run with ``QLIGHT_RUN_ID=run_id`` (``<logs>/<group>/<name>/<run_id>``)."""
    hits = [p for p in Path(logs).glob(f"*/*/{run_id}") if (p / "config.yaml").is_file()]
    if not hits:
        hits = [p.parent for p in Path(logs).rglob("config.yaml") if p.parent.name == run_id]
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None
