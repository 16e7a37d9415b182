"""From run folders to table cells: per-run best/final accuracy, seeds grouped into cells, mean ± std.

Runs are grouped by the (dataset, arch, method, bits) of their saved config (:mod:`qlight.cell`), never by
folder names. Runs of one such key whose configs differ in anything that changes the result (epochs, LR,
subset, quantizer options, ...; not paths, seeds, devices or logging) are split into *variants*, labelled
by the differing settings, so a 1-epoch smoke run is never averaged with a 200-epoch one. Only finished
runs enter the averages, one per seed (the newest when a seed was run twice); the others are listed with
their state.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlight.cell import CellKey, cell_key
from qlight.reference import ReferenceCell, lookup
from qlight.runfolder import RunFolder, RunState, grid_records, record_state

__all__ = ["Cell", "Report", "RunResult", "collect"]

#: prefixes of logged method knobs (rho, eta, AQE alpha, EDE t), one per method callback
KNOB_PREFIXES = ("bcgd/", "binaryrelax/", "aqe/", "ede/")
#: settings that do not change what a run measures: where it reads and writes, seeds, devices, speed, logs
IGNORED_SETTINGS = (
    "seed_everything",
    "ckpt_path",
    "weights_only",
    "checkpoint",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.log_every_n_steps",
    "trainer.deterministic",
    "trainer.benchmark",
    "trainer.profiler",
    "trainer.max_time",
    "trainer.plugins",
    "trainer.num_sanity_val_steps",
    "data.init_args.root",
    "data.init_args.download",
    "data.init_args.num_workers",
    "data.init_args.pin_memory",
    "data.init_args.cache_dir",
    "data.init_args.channels_last",
    "data.init_args.eval_batch_size",
    "model.init_args.init_from",
    "model.init_args.compile",
    "model.init_args.compile_mode",
    "model.init_args.channels_last",
)
_METHOD_ORDER = ("float", "ste", "bcgd", "binaryrelax", "aqe", "ede")


@dataclass
class RunResult:
    """One run's numbers (accuracies as logged: fractions) and state."""

    folder: Path | None
    run_id: str
    key: CellKey | None
    seed: int | None
    state: RunState
    epochs: int = 0
    max_epochs: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    final: float | None = None
    wall_seconds: float | None = None
    curve: dict[int, float] = field(default_factory=dict)
    knobs: dict[str, dict[int, float]] = field(default_factory=dict)
    missing_epochs: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    variant: str = ""
    excluded: str = ""  # why a finished run is not averaged (a duplicate seed)
    cell_hint: str = ""  # the cell a grid meant, for a run that never wrote a config

    @property
    def cell(self) -> str:
        """The run's cell as text (its config's, else the hint from the folder)."""
        return str(self.key) if self.key is not None else (self.cell_hint or "?")

    def value(self, mode: str) -> float | None:
        """The run's best or final accuracy (``mode``: ``best`` | ``final``)."""
        return self.best if mode == "best" else self.final

    @classmethod
    def from_folder(cls, run: RunFolder, metric: str) -> RunResult:
        """The result of a run folder, read from its ``metric`` curve."""
        curve = run.series(metric)
        epochs = run.completed_epochs
        knobs = {c: s for c in run.columns if c.startswith(KNOB_PREFIXES) and (s := run.series(c))}
        best_epoch = max(curve, key=lambda e: curve[e]) if curve else None
        return cls(
            folder=run.path,
            run_id=run.run_id,
            key=cell_key(run.config),
            seed=run.seed,
            state=run.state(),
            epochs=epochs,
            max_epochs=run.target()[0],
            best=curve[best_epoch] if best_epoch is not None else None,
            best_epoch=best_epoch,
            final=curve[max(curve)] if curve else None,
            wall_seconds=run.wall_seconds,
            curve=curve,
            knobs=knobs,
            missing_epochs=[e for e in range(epochs) if curve and e not in curve],
            config=run.config,
        )


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def fingerprint(config: dict[str, Any]) -> dict[str, str]:
    """The settings of a config that change the result, flattened to dotted keys (values as JSON)."""
    flat: dict[str, str] = {}
    _flatten(config, "", flat)
    return {
        k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in IGNORED_SETTINGS)
    }


def _short(key: str) -> str:
    return key.replace(".init_args.", ".").replace(".init_args", "")


def _show(value: str | None) -> str:
    if value is None:
        return "-"
    text = str(json.loads(value)) if value.startswith('"') else value
    return text if len(text) <= 40 else text[:37] + "..."


def assign_variants(runs: list[RunResult]) -> None:
    """Label each run of one cell key with the settings in which its config differs from the others'."""
    prints = [fingerprint(r.config) for r in runs]
    keys = sorted({k for p in prints for k in p})
    differing = [k for k in keys if len({p.get(k) for p in prints}) > 1]
    for run, p in zip(runs, prints, strict=True):
        run.variant = ", ".join(f"{_short(k)}={_show(p.get(k))}" for k in differing)


@dataclass
class Cell:
    """Runs of one (dataset, arch, method, bits, variant) and their aggregate."""

    key: CellKey
    variant: str
    runs: list[RunResult]
    reference: ReferenceCell | None = None

    @property
    def used(self) -> list[RunResult]:
        """Finished runs, one per seed: those in the averages."""
        return [r for r in self.runs if r.state.finished and not r.excluded]

    @property
    def left_out(self) -> list[RunResult]:
        """Runs not counted: unfinished or excluded."""
        return [r for r in self.runs if not r.state.finished or r.excluded]

    def values(self, mode: str) -> list[float]:
        """The counted runs' best or final accuracies."""
        return [v for r in self.used if (v := r.value(mode)) is not None]

    def stats(self, mode: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std (n-1; None for one run), n) of the runs' best or final accuracy, in percent."""
        values = [100.0 * v for v in self.values(mode)]
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)

    def delta(self, mode: str) -> float | None:
        """Mean accuracy minus the paper's, in percentage points (None without both)."""
        mean, _, _ = self.stats(mode)
        if mean is None or self.reference is None:
            return None
        return mean - self.reference.top1

    @property
    def mean_epochs(self) -> float | None:
        """Mean number of epochs of the counted runs."""
        used = self.used
        return statistics.fmean(r.epochs for r in used) if used else None

    @property
    def mean_wall_seconds(self) -> float | None:
        """Mean wall-clock time of the counted runs that recorded it."""
        walls = [r.wall_seconds for r in self.used if r.wall_seconds is not None]
        return statistics.fmean(walls) if walls else None

    @property
    def notes(self) -> str:
        """Runs left out of the averages, by state, and epochs missing from the metrics."""
        counts: dict[str, int] = defaultdict(int)
        for run in self.left_out:
            counts["duplicate seed" if run.excluded else run.state.state] += 1
        notes = [f"{n} {state}" for state, n in counts.items()]
        gaps = sum(1 for r in self.used if r.missing_epochs)
        if gaps:
            notes.append(f"{gaps} run(s) miss epochs in metrics.csv")
        return ", ".join(notes)

    @property
    def sort_key(self) -> tuple[Any, ...]:
        """Table order: dataset, architecture, bits (wide first), method."""
        method = _METHOD_ORDER.index(self.key.method) if self.key.method in _METHOD_ORDER else len(_METHOD_ORDER)
        return (self.key.dataset, self.key.arch, -self.key.w_bits, -self.key.a_bits, method,
                self.key.method, self.variant)


@dataclass
class Report:
    """Every cell found, plus the runs that could not be read into a cell."""

    metric: str
    cells: list[Cell]
    orphans: list[RunResult]  # grid runs that never produced a run folder, and unreadable folders

    @property
    def left_out(self) -> list[RunResult]:
        """Runs not counted: unfinished or excluded."""
        return [r for c in self.cells for r in c.left_out] + self.orphans


def _dedupe_seeds(cell: Cell) -> None:
    by_seed: dict[int, list[RunResult]] = defaultdict(list)
    for run in cell.runs:
        if run.state.finished and run.seed is not None:
            by_seed[run.seed].append(run)
    for seed, runs in by_seed.items():
        runs.sort(key=lambda r: (r.folder / "metrics.csv").stat().st_mtime if r.folder else 0.0)
        for older in runs[:-1]:
            older.excluded = f"seed {seed} also in {runs[-1].folder}; the newest run is used"


def collect(folders: list[Path], metric: str = "val/acc1", grid_paths: list[Path] | None = None) -> Report:
    """Read run folders (and grid records under ``grid_paths``) into cells.

    Args:
        folders: CSV run folders (``find_run_folders``).
        metric: the per-epoch metric aggregated (best and final over epochs).
        grid_paths: where to look for ``grid-run.json`` of grid runs that crashed before creating a folder.
    """
    runs: list[RunResult] = []
    orphans: list[RunResult] = []
    for folder in folders:
        try:
            runs.append(RunResult.from_folder(RunFolder.load(folder), metric))
        except ValueError as err:  # unreadable config or quantization spec: shown, never averaged
            orphans.append(RunResult(folder, folder.name, None, None, RunState("unreadable", str(err))))
    seen_ids = {r.run_id for r in runs}
    for own_folder, record in grid_records(grid_paths or []):
        run_id = record.get("run_id", own_folder.name)
        if run_id in seen_ids:
            continue
        state = record_state(record, "no metrics")
        orphans.append(RunResult(None, run_id, None, record.get("seed"), state, cell_hint=record.get("cell", "")))

    by_key: dict[CellKey, list[RunResult]] = defaultdict(list)
    for run in runs:
        assert run.key is not None
        by_key[run.key].append(run)
    cells: list[Cell] = []
    for key, key_runs in by_key.items():
        assign_variants(key_runs)
        by_variant: dict[str, list[RunResult]] = defaultdict(list)
        for run in key_runs:
            by_variant[run.variant].append(run)
        for variant, variant_runs in by_variant.items():
            cell = Cell(key, variant, sorted(variant_runs, key=lambda r: (r.seed is None, r.seed or 0, r.run_id)))
            cell.reference = lookup(key, variant_runs[0].config)
            _dedupe_seeds(cell)
            cells.append(cell)
    cells.sort(key=lambda c: c.sort_key)
    return Report(metric, cells, orphans)
