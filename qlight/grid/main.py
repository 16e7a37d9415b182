"""The ``qlight grid`` command line."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from qlight.commands import ArgumentParser
from qlight.grid.check import resolve_runs
from qlight.grid.launch import LocalGrid, Planned, exec_run, plan
from qlight.grid.protocol import GridError, expand, load_protocol, parse_overrides

__all__ = ["main"]


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="qlight grid",
        description="Expand protocols (configs/protocols/*.yaml) or experiment configs x seeds x --set "
        "overrides into runs with fixed names (QLIGHT_RUN_ID), and train them: finished runs are skipped, "
        "unfinished ones resumed, runs that start from another run's checkpoint (init_from) wait for it.",
        epilog="Then: qlight report logs/",
    )
    p.add_argument("protocols", nargs="+", metavar="PROTOCOL_OR_CONFIG",
                   help="protocol YAML files (with runs:) and/or experiment configs (one run each)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED",
                   help="seeds of every run (default: the protocol's seeds; 0 for a plain config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run (e.g. trainer.max_epochs=1); repeating a key sweeps it")
    p.add_argument("--config", dest="extra_configs", action="append", default=[], metavar="FILE",
                   help="a config fragment composed after every run's configs (e.g. configs/trainer/gpu_fast.yaml)")
    p.add_argument("--parallel", type=int, default=None, metavar="K",
                   help="runs at a time on this machine (default: the protocol's, else the number of --gpus, else 1)")
    p.add_argument("--gpus", default=None, metavar="0,1,...",
                   help="CUDA devices, one per run, assigned round-robin (least loaded first)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and commands; run nothing")
    p.add_argument("--slurm", nargs="?", const="logs/grid", default=None, metavar="DIR",
                   help="write SLURM array script(s) into DIR (default logs/grid) instead of running; never submits "
                   "(--parallel K becomes the arrays' %%K limit)")
    p.add_argument("--run", dest="only", action="append", default=None, metavar="NAME",
                   help="run only this run of the grid (repeatable); inside a SLURM job it replaces itself by "
                   "qlight fit (used by the --slurm scripts)")
    return p


def _gpus(text: str | None) -> list[str]:
    if text is None:
        return []
    gpus = [g.strip() for g in text.split(",")]
    if not gpus or not all(re.fullmatch(r"[A-Za-z0-9:/_-]+", g) for g in gpus):
        raise GridError(f"--gpus {text!r}: expected a comma-separated list of CUDA devices, e.g. --gpus 0,1")
    return gpus


def _grid_name(names: list[str]) -> str:
    unique = list(dict.fromkeys(names))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "+".join(unique))[:80] or "grid"


def _table(planned: list[Planned], commands: bool) -> str:
    width = max(len(p.spec.name) for p in planned)
    cells = max(len(str(p.resolved.cell)) for p in planned)
    lines = [f"  {'state':<9} {'run':<{width}}  {'cell':<{cells}}  after"]
    for p in planned:
        state = p.state + (f" ({p.detail})" if p.state == "resume" and p.detail else "")
        after = p.spec.parent or ""
        lines.append(f"  {state:<9} {p.spec.name:<{width}}  {p.resolved.cell!s:<{cells}}  {after}")
        if commands:
            init_from = f"<{p.spec.parent_checkpoint} checkpoint of {p.spec.parent}>" if p.spec.parent else None
            ckpt = "<its newest checkpoint>" if p.state == "resume" else None
            args = " ".join(shlex.quote(a) for a in p.spec.fit_args(init_from, ckpt))
            lines.append(f"      QLIGHT_RUN_ID={p.spec.name} python -m qlight fit {args}")
    return "\n".join(lines)


def _grid_args(args: argparse.Namespace) -> list[str]:
    """The arguments that expand to the same grid (for the SLURM tasks)."""
    out = [str(Path(p)) for p in args.protocols]
    if args.seeds is not None:
        out += ["--seeds", *map(str, args.seeds)]
    for item in args.overrides:
        out += ["--set", item]
    for config in args.extra_configs:
        out += ["--config", config]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qlight grid``; bad input raises :class:`GridError` (the CLI prints it and exits 2)."""
    args = parser().parse_args(argv)
    protocols = [load_protocol(p) for p in args.protocols]
    for config in args.extra_configs:
        if not Path(config).is_file():
            raise GridError(f"--config {config!r} does not exist")
    if args.parallel is not None and args.parallel < 1:
        raise GridError(f"--parallel {args.parallel}: expected a positive number of runs at a time")
    gpus = _gpus(args.gpus)
    runs = expand(protocols, args.seeds, parse_overrides(args.overrides), args.extra_configs)
    if args.only:
        names = {r.name for r in runs}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise GridError(f"--run {unknown[0]!r} is not a run of this grid; runs: {sorted(names)}")
        parents = {r.parent for r in runs if r.name in args.only and r.parent}
        runs = [r for r in runs if r.name in args.only or r.name in parents]  # check and plan only these
    resolved = resolve_runs(runs)
    planned = plan(runs, resolved)
    parallel = args.parallel or max((p.parallel or 0 for p in protocols), default=0) or len(gpus) or 1
    name = _grid_name([p.name for p in protocols])
    seeds = sorted({r.seed for r in runs})
    shown = [p for p in planned if not args.only or p.spec.name in args.only]
    states = Counter(p.state for p in shown)
    print(f"qlight grid {name}: {len(shown)} run(s), seeds {seeds}, {parallel} at a time"
          + (f" on GPUs {','.join(gpus)}" if gpus else "") + "; "
          + ", ".join(f"{n} {s}" for s, n in states.items()))
    for protocol in protocols:
        if protocol.description:
            print(f"  {protocol.name}: {protocol.description}")
    print(_table(shown, commands=args.dry_run))
    if args.dry_run:
        return 0
    if args.slurm is not None:
        from qlight.grid.slurm import write_slurm

        paths = write_slurm(shown, _grid_args(args), Path(args.slurm), name, args.parallel)
        first = paths[0]
        how = f"bash {first}" if first.suffix == ".sh" else f"sbatch {first}"
        print(f"Wrote {', '.join(map(str, paths))}; submit with: {how}")
        return 0
    by_name = {p.spec.name: p for p in planned}
    if args.only and len(args.only) == 1 and os.environ.get("SLURM_JOB_ID"):
        return exec_run(by_name[args.only[0]], by_name)
    sys.stdout.flush()
    grid = LocalGrid(planned, parallel=parallel, gpus=gpus, selected=set(args.only) if args.only else None)
    code = grid.run()
    outcome = Counter(grid.outcome.get(p.spec.name, "?") for p in shown)
    roots = sorted({p.resolved.csv_root or "logs" for p in shown})
    print(f"qlight grid {name}: " + ", ".join(f"{n} {s}" for s, n in outcome.items())
          + f"; tables and plots: qlight report {' '.join(roots)}")
    return code
