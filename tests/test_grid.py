"""``qlight grid`` without training: protocols, names, the plan, scheduling (with a stand-in for ``qlight fit``
that writes a finished run folder in a fraction of a second), resume choices, SLURM scripts, and the one-line
errors. The real end-to-end run is in ``test_grid_report.py``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from qlight.cell import cell_key
from qlight.commands import run_subcommand
from qlight.grid.check import ResolvedRun, resolve_runs
from qlight.grid.launch import LocalGrid, exec_run, plan, resume_checkpoint
from qlight.grid.protocol import GridError, expand, load_protocol, parse_overrides
from qlight.runfolder import read_grid_record, write_grid_record

ROOT = Path(__file__).resolve().parents[1]

FAKE_FIT = textwrap.dedent(
    """
    # Stand-in for `qlight fit`: logs what it was given, then writes a finished run folder (or fails).
    import json, os, shutil, sys, time
    from pathlib import Path
    name = os.environ["QLIGHT_RUN_ID"]
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    def log(**fields):
        with open(os.environ["FAKE_FIT_LOG"], "a") as f:
            f.write(json.dumps({"name": name, "time": time.time(), **fields}) + "\\n")
    log(event="start", gpu=os.environ.get("CUDA_VISIBLE_DEVICES"), omp=os.environ.get("OMP_NUM_THREADS"), args=args)
    time.sleep(float(os.environ.get("FAKE_FIT_SECONDS", "0.2")))
    if name in os.environ.get("FAKE_FIT_FAIL", "").split(","):
        print("RuntimeError: simulated failure", flush=True)
        sys.exit(1)
    folder = Path("logs/cifar10-resnet20-float/float-resnet20") / name
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    seed = int(args["seed_everything"])
    (folder / "config.yaml").write_text(
        f"seed_everything: {seed}\\ntrainer: {{max_epochs: 1}}\\nmodel: {{init_args: {{model: resnet20}}}}\\n"
        "data: {class_path: CIFAR10DataModule}\\n")
    (folder / "metrics.csv").write_text(f"epoch,step,val/acc1\\n0,0,{0.1 + seed / 10}\\n")
    shutil.copy(os.environ["FAKE_CKPT"], folder / "checkpoints" / "last.ckpt")
    log(event="end")
    """
)
FAKE_CONFIG = {
    "trainer": {"logger": [{"class_path": "qlight.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}]},
    "model": {"class_path": "qlight.tasks.ImageClassifier", "init_args": {"model": "resnet20"}},
    "data": {"class_path": "qlight.data.CIFAR10DataModule"},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a stand-in ``qlight fit``, a tiny checkpoint and two configs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    torch.save({"state_dict": {}, "epoch": 0}, tmp_path / "tiny.ckpt")
    monkeypatch.setenv("FAKE_CKPT", str(tmp_path / "tiny.ckpt"))
    monkeypatch.setenv("FAKE_FIT_LOG", str(tmp_path / "fake_fit.jsonl"))
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("trainer: {max_epochs: 1}\n")
    return tmp_path


def _protocol(folder: Path, runs: dict[str, Any], seeds: list[int], **extra: Any) -> Path:
    path = folder / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "seeds": seeds, "runs": runs, **extra}))
    return path


def _grid(workdir: Path, protocol: Path, parallel: int = 2, **kwargs: Any) -> tuple[LocalGrid, int, list[str]]:
    runs = expand([load_protocol(protocol)])
    planned = plan(runs, {r.name: ResolvedRun(FAKE_CONFIG) for r in runs})
    lines: list[str] = []
    grid = LocalGrid(planned, parallel=parallel, echo=lines.append,
                     program=[sys.executable, str(workdir / "fake_fit.py")], **kwargs)
    return grid, grid.run(), lines


def _events(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "fake_fit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _spans(workdir: Path) -> dict[str, tuple[float, float]]:
    events = _events(workdir)
    starts = {e["name"]: e["time"] for e in events if e["event"] == "start"}
    return {e["name"]: (starts[e["name"]], e["time"]) for e in events if e["event"] == "end"}


FLOW = {"float": {"config": "a.yaml"}, "bc": {"config": "b.yaml", "init_from": "float"},
        "bcgd": {"config": "b.yaml", "init_from": "float", "set": {"trainer.max_epochs": 2}}}


# --- protocols and names ----------------------------------------------------------------------------------
def test_expansion_names_are_deterministic_and_follow_the_overrides(workdir: Path) -> None:
    protocol = load_protocol(_protocol(workdir, FLOW, seeds=[0, 1]))
    runs = expand([protocol])
    assert [(r.key, r.seed) for r in runs] == [("float", 0), ("float", 1), ("bc", 0), ("bc", 1), ("bcgd", 0), ("bcgd", 1)]
    assert [r.name for r in runs] == [r.name for r in expand([load_protocol(workdir / "p.yaml")])]
    assert len({r.name for r in runs}) == 6 and all(r.name.startswith(f"p-{r.key}-s{r.seed}-") for r in runs)
    by = {(r.key, r.seed): r for r in runs}
    assert by[("bcgd", 1)].parent == by[("float", 1)].name and by[("float", 0)].parent is None
    assert by[("bcgd", 0)].fit_args() == ["--config", "b.yaml", "--trainer.max_epochs=2", "--seed_everything=0"]
    # an override changes every name; repeating a key sweeps it
    changed = expand([protocol], overrides=parse_overrides(["trainer.max_epochs=3"]))
    assert not {r.name for r in changed} & {r.name for r in runs}
    swept = expand([protocol], seeds=[5], overrides=parse_overrides(["model.lr=0.1", "model.lr=0.2", "x.y=1"]))
    assert len(swept) == 6 and {dict(r.overrides)["model.lr"] for r in swept} == {"0.1", "0.2"}
    assert {r.parent for r in swept if r.parent} <= {r.name for r in swept if r.key == "float"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"runs": {"a": {"config": "a.yaml"}}, "sedes": [0]}, "unknown key(s) ['sedes']"),
        ({"runs": {"a": {"config": "missing.yaml"}}}, "config 'missing.yaml' not found"),
        ({"runs": {"a": {"config": "a.yaml", "init_from": "zz"}}}, "init_from: 'zz' is not a run"),
        ({"runs": {"a": {"config": "a.yaml", "init_from": "b"}, "b": {"config": "a.yaml", "init_from": "a"}}},
         "init_from forms a cycle"),
        ({"runs": {"a": {"config": "a.yaml"}}, "seeds": ["x"]}, "seeds=['x']"),
        ({"runs": {"a": {"config": "a.yaml", "set": {"seed_everything": 3}}}}, "sets it from --seeds"),
        ({"runs": {"a": {}}}, "config: is required"),
    ],
)
def test_bad_protocols_fail_with_one_line(workdir: Path, content: dict[str, Any], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "bad.yaml").write_text(yaml.safe_dump(content))
    assert run_subcommand("grid", ["bad.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlight: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope.yaml"], "'nope.yaml' does not exist"),
        (["a.yaml", "--set", "trainer.max_epochs"], "expected key=value"),
        (["a.yaml", "--set", "ckpt_path=x"], "resumes unfinished runs"),
        (["a.yaml", "--parallel", "0"], "--parallel 0"),
        (["a.yaml", "--gpus", "0,,1"], "--gpus '0,,1'"),
        (["a.yaml", "--seeds", "x"], "invalid int value"),
        (["a.yaml", "--run", "nope"], "--run 'nope' is not a run of this grid"),
    ],
)
def test_bad_arguments_fail_with_one_line(workdir: Path, argv: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_subcommand("grid", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlight: error: ") and message in err and err.count("\n") == 1


def test_a_bad_override_fails_before_any_run_starts(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(ROOT / "tests" / "conf" / "cifar10_float_tiny.yaml")
    assert run_subcommand("grid", [config, "--set", "data.subsett=5"]) == 2
    err = capsys.readouterr().err
    assert "qlight: error: run grid-cifar10_float_tiny-s0-" in err
    assert "data.subsett: CIFAR10DataModule has no option 'subsett'" in err and "did you mean 'subset'?" in err
    assert not (workdir / "logs").exists()


def test_console_dispatches_grid_and_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    from qlight.cli import console_main

    monkeypatch.chdir(tmp_path)
    for command in ("grid", "report"):
        monkeypatch.setattr(sys, "argv", ["qlight", command, "missing.yaml"])
        with pytest.raises(SystemExit) as exit_:
            console_main()
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith("qlight: error: ")


# --- shipped protocols ----------------------------------------------------------------------------------
def test_shipped_protocols_expand_and_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each protocol loads and expands; those with overrides resolve through the qlight fit parser (aqe_table1
    has none: its configs' cells are read directly, and tests/test_configs.py parses the configs)."""
    monkeypatch.chdir(ROOT)
    cells = {}
    for path in sorted((ROOT / "configs" / "protocols").glob("*.yaml")):
        runs = expand([load_protocol(path)], overrides=parse_overrides(["data.root=somewhere"]))
        if path.stem == "aqe_table1":
            cells[path.stem] = {(r.key, str(cell_key(yaml.safe_load(Path(r.configs[0]).read_text())))) for r in runs}
            continue
        resolved = resolve_runs(runs)
        cells[path.stem] = {(r.key, str(resolved[r.name].cell)) for r in runs}
        by_name = {r.name: r for r in runs}
        for run in runs:
            config = resolved[run.name].config
            assert config["data"]["init_args"]["root"] == "somewhere"
            if run.parent:
                assert by_name[run.parent].key == "float" and by_name[run.parent].seed == run.seed
            if path.stem.endswith("_budget"):
                model = config["model"]["init_args"]
                assert config["trainer"]["precision"] == "32-true" and model["compile"]
                assert model["compile_mode"] == "reduce-overhead"
    assert cells["bcgd_resnet20_w1a4"] == {
        ("float", "cifar10/resnet20/float/float"), ("binaryconnect", "cifar10/resnet20/ste/w1a4"),
        ("bcgd", "cifar10/resnet20/bcgd/w1a4")}
    assert cells["bcgd_resnet20_w1a4_budget"] == cells["bcgd_resnet20_w1a4"]
    assert {c for _, c in cells["aqe_table1"]} == {
        f"cifar10/convnet_{m}/{e}/{b}" for m in "abcd" for e in ("aqe", "ste") for b in ("w1a1", "w3a3")}
    assert {c for _, c in cells["aqe_table1_budget"]} == {
        f"cifar10/convnet_d/{e}/{b}" for e in ("aqe", "ste") for b in ("w1a1", "w3a3")}


def test_budget_protocols_shorten_the_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    bcgd = expand([load_protocol("configs/protocols/bcgd_resnet20_w1a4_budget.yaml")], seeds=[0])
    aqe = expand([load_protocol("configs/protocols/aqe_table1_budget.yaml")], seeds=[0])
    resolved = resolve_runs(bcgd + aqe)
    for run in bcgd:
        config = resolved[run.name].config
        scheduler = config["model"]["init_args"]["lr_scheduler"]
        assert config["trainer"]["max_epochs"] == 10
        assert scheduler["class_path"].endswith("CosineAnnealingLR") and scheduler["init_args"]["T_max"] == 10
    for run in aqe:
        config = resolved[run.name].config
        assert config["trainer"]["max_epochs"] == 15
        assert config["model"]["init_args"]["lr_scheduler"]["init_args"]["gamma"] == pytest.approx(0.735642)
        callbacks = {c["class_path"].rpartition(".")[2]: c for c in config["trainer"]["callbacks"]}
        if "_aqe_" in run.key:
            assert callbacks["AQE"]["init_args"]["alpha"]["ramp"] == 10
        else:
            assert "LatentWeightClip" in callbacks


# --- scheduling -------------------------------------------------------------------------------------------
def test_parents_run_first_children_start_from_their_checkpoint(workdir: Path) -> None:
    """Two seeds, parallel 2; the poll interval is longer than a run, so both parents end in one poll."""
    grid, code, lines = _grid(workdir, _protocol(workdir, FLOW, seeds=[0, 1]), parallel=2, poll_seconds=1.0)
    assert code == 0, lines
    spans = _spans(workdir)
    names = {p.spec.name: p.spec for p in grid.planned}
    assert len(spans) == 6
    for name, spec in names.items():
        if spec.parent:
            assert spans[name][0] >= spans[spec.parent][1]
    starts = sorted(t for span in spans.values() for t in span)
    active = max(sum(s <= t < e for s, e in spans.values()) for t in starts)
    assert active == 2  # never more than --parallel at once, and it did run two at a time
    started = {e["name"]: e["args"] for e in _events(workdir) if e["event"] == "start"}
    for name, spec in names.items():
        if spec.parent:
            assert started[name]["model.init_from"].endswith(f"{spec.parent}/checkpoints/last.ckpt")
    for name in names:
        record = read_grid_record(workdir / "logs" / name)
        assert record["status"] == "finished" and record["attempts"][0]["returncode"] == 0


def test_a_failed_parent_blocks_its_children_until_rerun(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = _protocol(workdir, FLOW, seeds=[0, 1])
    names = {(r.key, r.seed): r.name for r in expand([load_protocol(protocol)])}
    monkeypatch.setenv("FAKE_FIT_FAIL", names[("float", 1)])
    grid, code, lines = _grid(workdir, protocol)
    assert code == 1
    assert grid.outcome[names[("float", 1)]] == "failed"
    assert grid.outcome[names[("bc", 1)]] == grid.outcome[names[("bcgd", 1)]] == "blocked"
    assert all(grid.outcome[names[(k, 0)]] == "finished" for k in ("float", "bc", "bcgd"))
    failed = read_grid_record(workdir / "logs" / names[("float", 1)])
    assert failed["error"] == "RuntimeError: simulated failure" and failed["returncode"] == 1
    assert read_grid_record(workdir / "logs" / names[("bc", 1)])["status"] == "blocked"
    assert any("FAILED" in line and "exit 1" in line for line in lines)

    monkeypatch.delenv("FAKE_FIT_FAIL")
    (workdir / "fake_fit.jsonl").unlink()
    grid, code, _ = _grid(workdir, protocol)
    assert code == 0
    assert sorted(e["name"] for e in _events(workdir) if e["event"] == "start") == sorted(
        names[(k, 1)] for k in ("float", "bc", "bcgd"))  # the finished seed-0 runs are skipped


def test_gpus_are_assigned_round_robin_and_cores_split(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runs = {k: {"config": "a.yaml"} for k in ("r1", "r2", "r3", "r4")}
    _, code, _ = _grid(workdir, _protocol(workdir, runs, seeds=[0]), parallel=2, gpus=["0", "1"])
    assert code == 0
    spans = _spans(workdir)
    starts = {e["name"]: e for e in _events(workdir) if e["event"] == "start"}
    for a in spans:
        for b in spans:
            if a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]:
                assert starts[a]["gpu"] != starts[b]["gpu"]  # runs side by side use different GPUs
    assert {e["gpu"] for e in starts.values()} == {"0", "1"}
    assert {e["omp"] for e in starts.values()} == {str(max(1, (os.cpu_count() or 1) // 2))}


def test_unfinished_run_resumes_from_its_newest_readable_checkpoint(workdir: Path) -> None:
    protocol = _protocol(workdir, {"float": {"config": "a.yaml"}}, seeds=[0])
    (run,) = expand([load_protocol(protocol)])
    folder = workdir / "logs" / "g" / "n" / run.name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**FAKE_CONFIG, "seed_everything": 0,
                                                        "trainer": {"max_epochs": 3}}))
    (folder / "metrics.csv").write_text("epoch,step,val/acc1\n0,0,0.1\n")
    torch.save({"state_dict": {}}, folder / "checkpoints" / "last.ckpt")
    own = workdir / "logs" / run.name
    own.mkdir()
    (own / "hpc_ckpt_1.ckpt").write_bytes(b"PK\x03\x04 truncated")  # newer, but damaged
    (planned,) = plan([run], {run.name: ResolvedRun(FAKE_CONFIG)})
    assert planned.state == "resume" and planned.detail == "1/3 epochs"
    notes: list[str] = []
    assert Path(resume_checkpoint(planned, notes.append)).resolve() == folder / "checkpoints" / "last.ckpt"
    assert len(notes) == 1 and "hpc_ckpt_1.ckpt" in notes[0]

    _, code, lines = _grid(workdir, protocol)
    assert code == 0
    (start,) = [e for e in _events(workdir) if e["event"] == "start"]
    assert start["args"]["ckpt_path"].endswith("checkpoints/last.ckpt")
    assert any("resume from" in line for line in lines)


def test_a_run_alive_elsewhere_is_not_started_twice(workdir: Path) -> None:
    protocol = _protocol(workdir, {"float": {"config": "a.yaml"}}, seeds=[0])
    (run,) = expand([load_protocol(protocol)])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qlight"])
    try:
        write_grid_record(workdir / "logs" / run.name,
                          {"run_id": run.name, "status": "running", "pid": sleeper.pid, "host": socket.gethostname()})
        (planned,) = plan([run], {run.name: ResolvedRun(FAKE_CONFIG)})
        assert planned.state == "running"
        _, code, _ = _grid(workdir, protocol)
        assert code == 1 and not _events(workdir)
        assert exec_run(planned, {run.name: planned}) == 1
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
    (planned,) = plan([run], {run.name: ResolvedRun(FAKE_CONFIG)})
    assert planned.state == "new"  # the process is gone: the run can start


# --- dry run and SLURM ------------------------------------------------------------------------------------
def test_dry_run_lists_commands_and_runs_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    protocol = str(ROOT / "configs" / "protocols" / "bcgd_resnet20_w1a4.yaml")
    assert run_subcommand("grid", [protocol, "--seeds", "0", "1", "--set", "data.root=x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 run(s), seeds [0, 1], 1 at a time; 6 new" in out
    assert out.count("python -m qlight fit --config") == 6
    assert "'--model.init_from=<last checkpoint of bcgd_resnet20_w1a4-float-s1-" in out
    assert not (tmp_path / "logs").exists()


def test_slurm_writes_one_array_per_stage_and_a_submit_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    protocol = str(ROOT / "configs" / "protocols" / "bcgd_resnet20_w1a4.yaml")
    argv = [protocol, "--set", "data.root=x", "--parallel", "3", "--slurm", "out"]
    assert run_subcommand("grid", argv) == 0
    assert "submit with: bash out/bcgd_resnet20_w1a4.submit.sh" in capsys.readouterr().out
    stage0, stage1 = (tmp_path / "out" / f"bcgd_resnet20_w1a4.stage{i}.sbatch" for i in (0, 1))
    submit = (tmp_path / "out" / "bcgd_resnet20_w1a4.submit.sh").read_text()
    assert "--dependency=afterok" in submit and "sbatch" in submit
    first, second = stage0.read_text(), stage1.read_text()
    assert "#SBATCH --array=0-2%3" in first and "#SBATCH --array=0-5%3" in second
    assert first.count("bcgd_resnet20_w1a4-float-s") == 3 and "-float-" not in second.split("RUNS=(")[1]
    assert "--signal=SIGUSR1@90" in first and "--requeue" in first
    assert f"grid {protocol} --set data.root=x --run \"$RUN\"" in first
    for path in (stage0, stage1, tmp_path / "out" / "bcgd_resnet20_w1a4.submit.sh"):
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert not (tmp_path / "logs").exists()


def test_run_names_one_run_and_parents_count_as_finished(workdir: Path) -> None:
    protocol = _protocol(workdir, FLOW, seeds=[0])
    runs = expand([load_protocol(protocol)])
    names = {r.key: r.name for r in runs}
    planned = plan(runs, {r.name: ResolvedRun(FAKE_CONFIG) for r in runs})
    program = [sys.executable, str(workdir / "fake_fit.py")]
    grid = LocalGrid(planned, selected={names["bc"]}, echo=lambda _: None, program=program)
    assert grid.run() == 1  # its parent has not run: blocked
    assert "not selected" in read_grid_record(workdir / "logs" / names["bc"])["error"]
    LocalGrid(planned, selected={names["float"]}, echo=lambda _: None, program=program).run()
    planned = plan(runs, {r.name: ResolvedRun(FAKE_CONFIG) for r in runs})
    assert LocalGrid(planned, selected={names["bc"]}, echo=lambda _: None, program=program).run() == 0
    assert read_grid_record(workdir / "logs" / names["bcgd"]) is None  # never touched


def test_grid_error_is_a_value_error() -> None:
    assert issubclass(GridError, ValueError)
