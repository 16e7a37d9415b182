"""Write (never submit) SLURM array scripts for a grid: one array task per run.

Each task runs ``qlight grid <the same arguments> --run <its name>``, which skips the run when it has
finished, finds its checkpoint to resume from (including the SLURM requeue checkpoint), resolves its
``init_from`` checkpoint, and then *replaces itself* by ``qlight fit`` so that SLURM's ``SIGUSR1`` reaches
Lightning directly: 90 s before the time limit Lightning writes a requeue checkpoint into ``logs/<run>/``
and requeues the task, which resumes from it (``scripts/slurm/train.sbatch`` uses the same mechanism).

Runs that start from another run's checkpoint go into a later *stage*: one array script per stage and a
``submit.sh`` that chains them with ``--dependency=afterok``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from qlight.grid.launch import Planned

__all__ = ["write_slurm"]


def _stages(planned: list[Planned]) -> list[list[Planned]]:
    by_name = {p.spec.name: p for p in planned}
    depth: dict[str, int] = {}
    for p in planned:
        d, parent = 0, p.spec.parent
        while parent is not None and parent in by_name:
            d, parent = d + 1, by_name[parent].spec.parent
        depth[p.spec.name] = d
    stages: list[list[Planned]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for p in planned:
        stages[depth[p.spec.name]].append(p)
    return stages


def _script(runs: list[Planned], grid_args: list[str], job: str, parallel: int | None, workdir: Path) -> str:
    throttle = f"%{parallel}" if parallel else ""
    names = "\n".join(f"  {shlex.quote(p.spec.name)}  # {p.resolved.cell}" for p in runs)
    args = " ".join(shlex.quote(a) for a in grid_args)
    return f"""#!/bin/bash
# {job}: {len(runs)} qlight run(s), one array task each. Written by `qlight grid --slurm`; not submitted.
# Adjust the #SBATCH lines to your cluster. QLIGHT may name a container, e.g.
#   QLIGHT="apptainer exec --nv qlight.sif python -m qlight" sbatch {job}.sbatch
#SBATCH --job-name={job}
#SBATCH --array=0-{len(runs) - 1}{throttle}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=logs/slurm-%A_%a.out
set -euo pipefail
cd {shlex.quote(str(workdir))}
RUNS=(
{names}
)
RUN=${{RUNS[$SLURM_ARRAY_TASK_ID]}}
# skips a finished run, resumes an unfinished one, then execs `qlight fit` with QLIGHT_RUN_ID=$RUN
srun ${{QLIGHT:-python -m qlight}} grid {args} --run "$RUN"
"""


def write_slurm(
    planned: list[Planned], grid_args: list[str], out_dir: Path, name: str, parallel: int | None
) -> list[Path]:
    """Write the array script(s) (and ``<name>.submit.sh`` when runs depend on others); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path.cwd()
    stages = _stages(planned)
    paths: list[Path] = []
    if len(stages) == 1:
        path = out_dir / f"{name}.sbatch"
        path.write_text(_script(stages[0], grid_args, f"qlight-{name}", parallel, workdir))
        return [path]
    submit = [
        "#!/bin/bash",
        f"# Submit the {len(stages)} stages of grid {name}; each starts when the previous one has succeeded.",
        "# Written by `qlight grid --slurm`.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
    ]
    for i, runs in enumerate(stages):
        path = out_dir / f"{name}.stage{i}.sbatch"
        path.write_text(_script(runs, grid_args, f"qlight-{name}-stage{i}", parallel, workdir))
        paths.append(path)
        after = "" if i == 0 else ' --dependency=afterok:"$job"'
        submit.append(f"job=$(sbatch --parsable{after} {shlex.quote(str(path))}); echo \"stage {i}: job $job\"")
    script = out_dir / f"{name}.submit.sh"
    script.write_text("\n".join(submit) + "\n")
    script.chmod(0o755)
    return [script, *paths]
