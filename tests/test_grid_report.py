"""End to end on tiny fake CIFAR-10: ``qlight grid`` runs 2 configs x 2 seeds, 2 at a time, one run is killed
mid-way (SIGKILL), the same command again resumes it and skips the finished ones, and ``qlight report``
aggregates the runs — means and stds equal to what the CSVs give, PNGs, a W&B table offline, and the killed
run shown as crashed before the re-run.

The grid and report are called in-process (the grid still starts real ``qlight fit`` subprocesses); all
steps run once for the module, the tests then check their results.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from gridtools import KILL_FLAG_ENV

from qlight.grid.main import main as grid_main
from qlight.grid.protocol import expand, load_protocol
from qlight.report.main import main as report_main

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@dataclass
class GridStory:
    """What happened, step by step."""

    workdir: Path
    names: dict[str, str]  # "<key>-s<seed>" -> run name
    first_code: int
    first_output: str
    crashed_report: dict[str, Any]
    crashed_md: str
    second_code: int
    second_output: str
    report_dir: Path
    report: dict[str, Any]
    report_output: str


def _call(fn: Any, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, fake_cifar10: Any) -> GridStory:
    from fakedata import write_pickled

    data = write_pickled(tmp_path_factory.mktemp("grid-data"), fake_cifar10)
    workdir = tmp_path_factory.mktemp("grid-work")
    protocol = workdir / "tiny.yaml"
    protocol.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "seeds": [0, 1],
                "set": {"data.root": str(data), "trainer.max_epochs": 2, "trainer.limit_train_batches": 3,
                        "trainer.callbacks+": "gridtools.KillOnce"},
                "runs": {
                    "float": {"config": str(TESTS / "conf" / "cifar10_float_tiny.yaml")},
                    "bcgd": {
                        "config": str(TESTS / "conf" / "cifar10_ste_w1a4_tiny.yaml"),
                        "init_from": "float",
                        "set": {"trainer.callbacks+": "BCGD"},
                    },
                },
            },
            sort_keys=False,
        )
    )
    names = {f"{r.key}-s{r.seed}": r.name for r in expand([load_protocol(protocol)])}
    flag = workdir / "kill-flag"
    flag.write_text(names["bcgd-s1"])
    env = {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        KILL_FLAG_ENV: str(flag),
        "QLIGHT_CACHE": str(tmp_path_factory.mktemp("grid-cache")),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("QLIGHT_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
            mp.delenv(key, raising=False)
        first_code, first_output = _call(grid_main, [str(protocol), "--parallel", "2"])
        _, _ = _call(report_main, ["logs", "--out", "report-crashed", "--no-plots"])
        crashed_report = json.loads((workdir / "report-crashed" / "report.json").read_text())
        crashed_md = (workdir / "report-crashed" / "report.md").read_text()
        second_code, second_output = _call(grid_main, [str(protocol), "--parallel", "2"])
        _, report_output = _call(report_main, ["logs", "--out", "report", "--wandb"])
    return GridStory(
        workdir=workdir,
        names=names,
        first_code=first_code,
        first_output=first_output,
        crashed_report=crashed_report,
        crashed_md=crashed_md,
        second_code=second_code,
        second_output=second_output,
        report_dir=workdir / "report",
        report=json.loads((workdir / "report" / "report.json").read_text()),
        report_output=report_output,
    )


def _record(story: GridStory, key: str) -> dict[str, Any]:
    return json.loads((story.workdir / "logs" / story.names[key] / "grid-run.json").read_text())


def _metrics(story: GridStory, key: str) -> list[dict[str, str]]:
    (path,) = (story.workdir / "logs").glob(f"*/*/{story.names[key]}/metrics.csv")
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_grid_runs_two_configs_times_two_seeds_two_at_a_time(story: GridStory) -> None:
    assert "4 run(s), seeds [0, 1], 2 at a time; 4 new" in story.first_output
    assert story.first_code == 1  # one run was killed
    floats = [_record(story, f"float-s{s}")["attempts"][0] for s in (0, 1)]
    # both float runs were under way at the same time
    assert floats[0]["start"] <= floats[1]["end"] and floats[1]["start"] <= floats[0]["end"]
    # each BCGD run started from its own seed's float checkpoint, after that run had finished
    for seed in (0, 1):
        attempt = _record(story, f"bcgd-s{seed}")["attempts"][0]
        assert story.names[f"float-s{seed}"] in attempt["init_from"]
        assert attempt["start"] >= floats[seed]["end"]
    assert {r["key"] for r in (_record(story, k) for k in story.names)} == {"float", "bcgd"}


def test_killed_run_resumes_and_finished_runs_are_skipped(story: GridStory) -> None:
    killed = _record(story, "bcgd-s1")
    assert [a["returncode"] for a in killed["attempts"]] == [-9, 0], story.first_output + story.second_output
    assert killed["attempts"][1]["resumed_from"].endswith("checkpoints/last.ckpt")
    assert killed["status"] == "finished"
    for key in ("float-s0", "float-s1", "bcgd-s0"):
        assert len(_record(story, key)["attempts"]) == 1, key  # not run again
    assert "3 finished, 1 resume" in story.second_output
    assert story.second_code == 0
    # the resumed run's metrics hold both epochs' validation once, the first from before the kill
    val = [r for r in _metrics(story, "bcgd-s1") if r["val/acc1"]]
    assert [int(r["epoch"]) for r in val] == [0, 1]
    # the resumed process kept the config's optimizer and LR schedule (lr 0.05, x0.1 at epoch 1)
    (config,) = (story.workdir / "logs").glob(f"*/*/{story.names['bcgd-s1']}/config.yaml")
    model = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert model["optimizer"]["init_args"]["lr"] == 0.05
    assert model["lr_scheduler"]["class_path"].endswith("MultiStepLR")
    lr = "lr-SGD/quantized_weights+weights+biases+alphas"  # one merged group: the config overrides no group's lr
    lrs = {int(r["step"]): float(r[lr]) for r in _metrics(story, "bcgd-s1") if r[lr]}
    assert list(lrs.values()) == pytest.approx([0.05, 0.005])


def test_report_means_and_stds_equal_the_csvs(story: GridStory) -> None:
    cells = {(c["method"], c["bits"]): c for c in story.report["cells"]}
    assert set(cells) == {("float", "float"), ("bcgd", "w1a4")}
    for (method, _), cell in cells.items():
        best = [100 * max(float(r["val/acc1"]) for r in _metrics(story, f"{method}-s{s}") if r["val/acc1"])
                for s in (0, 1)]
        final = [100 * float([r for r in _metrics(story, f"{method}-s{s}") if r["val/acc1"]][-1]["val/acc1"])
                 for s in (0, 1)]
        assert cell["n"] == 2 and cell["seeds"] == "0 1"
        assert cell["mean"] == pytest.approx(statistics.fmean(best))
        assert cell["std"] == pytest.approx(statistics.stdev(best))
        assert [r["final"] for r in cell["runs"]] == pytest.approx([f / 100 for f in final])
        assert cell["mean_epochs"] == 2
    assert cells[("float", "float")]["paper"] == pytest.approx(91.25)  # He et al. anchor for ResNet-20
    assert cells[("float", "float")]["delta"] == pytest.approx(cells[("float", "float")]["mean"] - 91.25)
    assert "| cifar10 | resnet20 | bcgd | w1a4 |" in story.report_output
    for name in ("report.md", "report.csv", "report.json"):
        assert (story.report_dir / name).stat().st_size > 0


def test_report_plots_are_nonempty_pngs(story: GridStory) -> None:
    pngs = sorted(p.name for p in story.report_dir.glob("*.png"))
    assert pngs == ["knobs_cifar10_resnet20.png", "val_acc1_cifar10_resnet20.png"]
    for name in pngs:
        data = (story.report_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_report_logs_a_wandb_table_offline(story: GridStory) -> None:
    assert "(offline)" in story.report_output
    (run_dir,) = (story.report_dir / "wandb").glob("offline-run-*")
    tables = list(run_dir.rglob("report_*.table.json"))
    assert tables, sorted(p.name for p in run_dir.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 2 and "mean" in table["columns"]
    assert list(run_dir.rglob("*.png"))


def test_crashed_run_is_reported_as_crashed(story: GridStory) -> None:
    (crashed,) = [r for r in story.crashed_report["left_out"] if r["run_id"] == story.names["bcgd-s1"]]
    assert crashed["state"] == "crashed" and "SIGKILL" in crashed["detail"]
    assert crashed["epochs"] == 1 and crashed["max_epochs"] == 2
    bcgd = next(c for c in story.crashed_report["cells"] if c["method"] == "bcgd")
    assert bcgd["n"] == 1 and bcgd["left_out"] == "1 crashed"  # never averaged in
    assert "| crashed |" in story.crashed_md


@pytest.mark.slow  # two more process start-ups (~20 s); the local path is covered above
def test_a_slurm_task_replaces_itself_by_qlight_fit(cifar10_pickle: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What each array task of ``--slurm`` runs: ``qlight grid ... --run NAME`` inside a SLURM job execs
    ``qlight fit`` for that run (so SIGUSR1 reaches Lightning), and does nothing once the run has finished."""
    from qlight.grid.protocol import parse_overrides
    from qlight.runfolder import RunFolder, find_run_folder, read_grid_record

    monkeypatch.chdir(tmp_path)
    config = str(TESTS / "conf" / "cifar10_float_tiny.yaml")
    sets = [f"data.root={cifar10_pickle}", "trainer.limit_train_batches=2"]
    (run,) = expand([load_protocol(config)], overrides=parse_overrides(sets))
    argv = [config, *(a for s in sets for a in ("--set", s)), "--run", run.name]
    env = {**os.environ, "SLURM_JOB_ID": "777", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-m", "qlight", "grid", *argv], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"qlight grid: exec QLIGHT_RUN_ID={run.name}" in out.stdout
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in out.stderr  # printed by the exec'd qlight fit
    record = read_grid_record(tmp_path / "logs" / run.name)
    assert record["slurm_job"] == "777" and record["status"] == "running"
    assert RunFolder.load(find_run_folder(run.name)).complete

    monkeypatch.setenv("SLURM_JOB_ID", "778")  # the same task again (e.g. requeued after it ended)
    code, printed = _call(grid_main, argv)
    assert code == 0 and f"{run.name} has finished" in printed
