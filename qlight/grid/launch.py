"""Run a grid on this machine: K ``qlight fit`` processes at a time, parents before the runs they start from.

Every run gets ``QLIGHT_RUN_ID=<its name>``, so its CSV folder (``logs/<group>/<name>/<id>/``), W&B id and
``logs/<id>/`` stay the same across invocations. Before launching, each run is looked up: a finished one is
skipped, an unfinished one resumes from its newest readable checkpoint (``last.ckpt`` or a SLURM requeue
``hpc_ckpt_N.ckpt``), a run that a live process is training (per its record) is left alone. The grid keeps
``logs/<id>/grid-run.json`` (command, attempts with exit codes and seconds) and appends the run's console
output to ``logs/<id>/output.log``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qlight.checkpoints import CheckpointError, read_checkpoint
from qlight.grid.check import ResolvedRun
from qlight.grid.protocol import RunSpec
from qlight.runfolder import (
    GRID_OUTPUT,
    RunFolder,
    exit_reason,
    find_run_folder,
    now_iso,
    read_grid_record,
    record_state,
    write_grid_record,
)

__all__ = ["LocalGrid", "Planned", "exec_run", "plan"]

LOGS = Path("logs")  # qlight puts a run's own folder (default_root_dir) at logs/<QLIGHT_RUN_ID>
_ERROR_LINE = re.compile(r"^(qlight: error: .*|[A-Za-z_.]*(Error|Exception|Interrupt)\b.*)$")


@dataclass
class Planned:
    """A run with its resolved config and its state before this invocation."""

    spec: RunSpec
    resolved: ResolvedRun
    state: str  # new | resume | finished | running
    detail: str = ""
    folder: Path | None = None

    @property
    def own_folder(self) -> Path:
        """The folder of the run's grid record and output."""
        return LOGS / self.spec.name

    def csv_folder(self) -> Path | None:
        """The run's CSV folder, once it has one."""
        root = self.resolved.csv_root or "logs"
        return find_run_folder(self.spec.name, root)


def _state(spec: RunSpec, resolved: ResolvedRun) -> Planned:
    folder = find_run_folder(spec.name, resolved.csv_root or "logs")
    run = RunFolder.load(folder) if folder is not None else None
    if run is not None and run.complete:
        return Planned(spec, resolved, "finished", str(run.state()), folder)
    record = read_grid_record(LOGS / spec.name)
    if record is not None and record.get("status") == "running":
        state = record_state(record, "", run.last_activity if run is not None else None)
        if state.state == "running":  # another qlight grid (or a SLURM task) trains it now
            return Planned(spec, resolved, "running", state.detail.removeprefix("; "), folder)
    if run is not None:
        return Planned(spec, resolved, "resume", f"{run.completed_epochs}/{run.target()[0]} epochs", folder)
    return Planned(spec, resolved, "new", "", None)


def plan(runs: list[RunSpec], resolved: dict[str, ResolvedRun]) -> list[Planned]:
    """The state of every run now (finished / running / resume / new)."""
    return [_state(spec, resolved[spec.name]) for spec in runs]


def resume_checkpoint(planned: Planned, note: Callable[[str], None]) -> str | None:
    """The newest readable checkpoint of an unfinished run (``last.ckpt`` or a requeue checkpoint), or None."""
    candidates = list(planned.own_folder.glob("hpc_ckpt_*.ckpt"))
    folder = planned.csv_folder()
    if folder is not None and (folder / "checkpoints" / "last.ckpt").is_file():
        candidates.append(folder / "checkpoints" / "last.ckpt")
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            read_checkpoint(path, "ckpt_path")
        except CheckpointError as err:
            note(f"skipping an unreadable checkpoint: {err}")
            continue
        return str(path)
    return None


def parent_checkpoint(planned: Planned, by_name: dict[str, Planned]) -> str:
    """The checkpoint of the run ``planned`` starts from; raises ValueError naming what is missing."""
    parent = by_name[planned.spec.parent or ""]
    folder = parent.csv_folder()
    run = RunFolder.load(folder) if folder is not None else None
    if run is None or not run.complete:
        raise ValueError(f"init_from run {parent.spec.name} has not finished")
    path = run.checkpoint(planned.spec.parent_checkpoint)
    if path is None:
        raise ValueError(f"init_from run {parent.spec.name} has no {planned.spec.parent_checkpoint} checkpoint in {folder}")
    read_checkpoint(path, "model.init_from")
    return str(path)


def _error_line(log: Path, offset: int, returncode: int | None) -> str:
    """The last error-looking line the attempt printed (else its last line; nothing for a killed process)."""
    try:
        with open(log, "rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    if errors:
        line = errors[-1]
    else:
        line = lines[-1] if lines and (returncode or 0) > 0 else ""
    return line[:300]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


@dataclass
class _Active:
    """A launched run: its process, its open output log (and where this attempt's output starts)."""

    planned: Planned
    proc: subprocess.Popen
    log: IO[bytes]
    offset: int
    gpu: str | None
    started: float


class LocalGrid:
    """Runs planned runs as subprocesses, ``parallel`` at a time, on ``gpus`` round-robin (least loaded first)."""

    def __init__(self, planned: list[Planned], parallel: int = 1, gpus: list[str] | None = None,
                 echo: Callable[[str], None] = print, poll_seconds: float = 0.5,
                 selected: set[str] | None = None, program: list[str] | None = None) -> None:
        """Plan the runs.

        ``selected``: names to run (default all; the others only count as parents); ``program``: the
        command the run's arguments follow (default ``python -m qlight fit``).
        """
        self.program = program or [sys.executable, "-m", "qlight", "fit"]
        self.by_name = {p.spec.name: p for p in planned}
        self.planned = [p for p in planned if selected is None or p.spec.name in selected]
        self.parallel = max(1, parallel)
        self.gpus = gpus or []
        self.echo = echo
        self.poll_seconds = poll_seconds
        chosen = {p.spec.name for p in self.planned}
        self.outcome: dict[str, str] = {}  # name -> finished | running | failed | stopped | blocked | ...
        for p in planned:
            if p.state in ("finished", "running"):
                self.outcome[p.spec.name] = p.state
            elif p.spec.name not in chosen:
                self.outcome[p.spec.name] = f"{p.state}, not selected with --run"
        self._next_gpu = 0

    # --- records ----------------------------------------------------------------------------------------
    def _record(self, planned: Planned, **fields: Any) -> dict[str, Any]:
        record = read_grid_record(planned.own_folder) or {}
        spec = planned.spec
        record.update(run_id=spec.name, protocol=spec.protocol, key=spec.key, seed=spec.seed,
                      cell=str(planned.resolved.cell), parent=spec.parent, **fields)
        record.setdefault("attempts", [])
        return record

    def _say(self, text: str) -> None:
        self.echo(f"[{time.strftime('%H:%M:%S')}] {text}")

    # --- launching --------------------------------------------------------------------------------------
    def _pick_gpu(self, active: list[_Active]) -> str | None:
        if not self.gpus:
            return None
        load = {g: sum(a.gpu == g for a in active) for g in self.gpus}
        n = len(self.gpus)
        order = sorted(range(n), key=lambda i: (load[self.gpus[i]], (i - self._next_gpu) % n))
        self._next_gpu = (order[0] + 1) % n
        return self.gpus[order[0]]

    def _env(self, planned: Planned, gpu: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["QLIGHT_RUN_ID"] = planned.spec.name
        env["PYTHONUNBUFFERED"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if self.parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
            # K runs on one machine: split the cores instead of K x all of them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))
        return env

    def _launch(self, planned: Planned, active: list[_Active]) -> _Active | None:
        name = planned.spec.name
        planned.own_folder.mkdir(parents=True, exist_ok=True)
        log_path = planned.own_folder / GRID_OUTPUT
        log = open(log_path, "ab")  # noqa: SIM115 - open while the run lives; closed when it ends
        offset = log.tell()

        def note(text: str) -> None:
            log.write(f"qlight grid: {text}\n".encode())
            self._say(f"{name}: {text}")

        init_from = None
        if planned.spec.parent is not None:
            try:
                init_from = parent_checkpoint(planned, self.by_name)
            except (ValueError, KeyError) as err:
                self._block(planned, str(err))
                log.close()
                return None
        ckpt = resume_checkpoint(planned, note) if planned.state == "resume" else None
        if planned.state == "resume" and ckpt is None:
            note("no readable checkpoint to resume from: starting over")
        args = [*self.program, *planned.spec.fit_args(init_from, ckpt)]
        gpu = self._pick_gpu(active)
        log.write(f"\n=== qlight grid {now_iso()}: QLIGHT_RUN_ID={name} {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self._env(planned, gpu))
        record = self._record(planned, status="running", pid=proc.pid, host=socket.gethostname(),
                              command=args, returncode=None, error="")
        record["attempts"].append({"start": now_iso(), "resumed_from": ckpt, "init_from": init_from, "gpu": gpu})
        write_grid_record(planned.own_folder, record)
        how = f"resume from {ckpt}" if ckpt else "start"
        self._say(f"{how:>6} {name}" + (f" on GPU {gpu}" if gpu is not None else "") + f"  [{planned.resolved.cell}]")
        return _Active(planned, proc, log, offset, gpu, time.monotonic())

    def _block(self, planned: Planned, why: str) -> None:
        self.outcome[planned.spec.name] = "blocked"
        write_grid_record(planned.own_folder, self._record(planned, status="blocked", error=why, pid=None))
        self._say(f"blocked {planned.spec.name}: {why}")

    def _finish(self, item: _Active) -> None:
        planned, rc = item.planned, item.proc.returncode
        item.log.close()
        seconds = time.monotonic() - item.started
        folder = planned.csv_folder()
        run = RunFolder.load(folder) if folder is not None else None
        if run is not None and run.complete:
            status, error = "finished", ""
        else:
            status = "failed" if rc != 0 else "stopped"
            error = _error_line(planned.own_folder / GRID_OUTPUT, item.offset, rc)
        record = self._record(planned, status=status, returncode=rc, error=error)
        if record["attempts"]:
            record["attempts"][-1].update(end=now_iso(), seconds=round(seconds, 1), returncode=rc)
        write_grid_record(planned.own_folder, record)
        self.outcome[planned.spec.name] = status
        if status == "finished":
            curve = run.series("val/acc1") if run is not None else {}
            best = f"; best val/acc1 {100 * max(curve.values()):.2f}%" if curve else ""
            self._say(f"  done {planned.spec.name} in {_duration(seconds)}{best}")
        elif status == "stopped":
            self._say(f"stopped {planned.spec.name} after {_duration(seconds)} without finishing (e.g. max_time); "
                      "run the command again to continue it")
        else:
            self._say(f"FAILED {planned.spec.name} ({exit_reason(rc)}){': ' + error if error else ''}  "
                      f"[{planned.own_folder / GRID_OUTPUT}]")

    # --- the loop ---------------------------------------------------------------------------------------
    def _ready(self, planned: Planned) -> str:
        """``go``, ``wait`` or ``blocked: <why>`` for a pending run."""
        parent = planned.spec.parent
        if parent is None:
            return "go"
        outcome = self.outcome.get(parent)
        if outcome == "finished":
            return "go"
        if outcome is None:
            return "wait"
        return f"blocked: init_from run {parent} is {outcome}"

    def _start_ready(self, pending: list[Planned], active: list[_Active]) -> bool:
        """Start pending runs whose parent has finished, up to ``parallel`` at a time.

        Runs whose parent failed are blocked. Returns whether anything changed.
        """
        changed = False
        for planned in list(pending):
            if len(active) >= self.parallel:
                break
            ready = self._ready(planned)
            if ready == "wait":
                continue
            pending.remove(planned)
            changed = True
            if ready.startswith("blocked"):
                self._block(planned, ready.removeprefix("blocked: "))
            elif (item := self._launch(planned, active)) is not None:
                active.append(item)
        return changed

    def run(self) -> int:
        """Run everything not finished; exit status 0 when every run is finished, 1 otherwise, 130 on interrupt."""
        pending = [p for p in self.planned if p.state in ("new", "resume")]
        active: list[_Active] = []
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while pending or active:
                launched = self._start_ready(pending, active)
                ended = [item for item in active if item.proc.poll() is not None]
                for item in ended:
                    active.remove(item)
                    self._finish(item)
                if not active and pending and not launched and not ended:
                    for planned in pending:  # nothing runs and nothing can start (not expected)
                        self._block(planned, f"init_from run {planned.spec.parent} cannot run in this grid")
                    pending.clear()
                if active and not ended:
                    time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            self._say(f"interrupted: stopping {len(active)} run(s); run the same command again to resume them")
            for item in active:
                if item.proc.poll() is None:
                    item.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            for item in active:
                try:
                    item.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    item.proc.kill()
                    item.proc.wait()
                self._finish(item)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
        return 0 if all(self.outcome.get(p.spec.name) == "finished" for p in self.planned) else 1


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def exec_run(planned: Planned, by_name: dict[str, Planned]) -> int:
    """Replace this process by the run's ``qlight fit`` (SLURM array tasks: signals reach Lightning directly).

    Returns only when there is nothing to run (0: finished already; 1: blocked or running elsewhere).
    """
    name = planned.spec.name
    if planned.state == "finished":
        print(f"qlight grid: {name} has finished ({planned.detail}); nothing to do")
        return 0
    if planned.state == "running":
        print(f"qlight grid: {name} is running elsewhere ({planned.detail}); not starting it twice")
        return 1
    init_from = None
    if planned.spec.parent is not None:
        try:
            init_from = parent_checkpoint(planned, by_name)
        except (ValueError, KeyError) as err:
            print(f"qlight grid: {name} is blocked: {err}", file=sys.stderr)
            return 1
    ckpt = resume_checkpoint(planned, lambda text: print(f"qlight grid: {name}: {text}")) if planned.state == "resume" else None
    args = [sys.executable, "-m", "qlight", "fit", *planned.spec.fit_args(init_from, ckpt)]
    record = read_grid_record(planned.own_folder) or {}
    record.update(run_id=name, protocol=planned.spec.protocol, key=planned.spec.key, seed=planned.spec.seed,
                  cell=str(planned.resolved.cell), parent=planned.spec.parent, status="running", pid=os.getpid(),
                  host=socket.gethostname(), command=args, returncode=None, error="",
                  slurm_job=os.environ.get("SLURM_JOB_ID"))
    record.setdefault("attempts", []).append({"start": now_iso(), "resumed_from": ckpt, "init_from": init_from})
    write_grid_record(planned.own_folder, record)
    env = dict(os.environ, QLIGHT_RUN_ID=name, PYTHONUNBUFFERED="1")
    print(f"qlight grid: exec QLIGHT_RUN_ID={name} {' '.join(args)}", flush=True)
    os.execve(sys.executable, args, env)
    return 1  # not reached
