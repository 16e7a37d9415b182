"""``qlight report`` on hand-written run folders: grouping by config, variants, seeds, states, modes, errors."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlight.cell import CellKey, cell_key
from qlight.commands import run_subcommand
from qlight.report import collect
from qlight.runfolder import RunFolder, find_run_folders, write_grid_record

ROOT = Path(__file__).resolve().parents[1]


def _config(method: str = "bcgd", epochs: int = 3, seed: int = 0, **model: Any) -> dict[str, Any]:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {}}]
    if method == "bcgd":
        callbacks.append({"class_path": "qlight.callbacks.BCGD", "init_args": {"rho": 1e-5}})
    quant = None if method == "float" else {"weight": "binary", "w_bits": 1, "act": "relu_quant", "a_bits": 4}
    return {
        "seed_everything": seed,
        "trainer": {"max_epochs": epochs, "callbacks": callbacks, "devices": 1},
        "model": {"class_path": "qlight.tasks.ImageClassifier",
                  "init_args": {"model": "resnet20", "quant": quant, "init_from": f"ckpt-{seed}", **model}},
        "data": {"class_path": "qlight.data.CIFAR10DataModule", "init_args": {"root": f"/data/{seed}"}},
    }


def _run(root: Path, name: str, config: dict[str, Any], accs: list[float], rho: bool = True) -> Path:
    """A run folder whose metrics.csv logs ``accs`` as val/acc1 of epochs 0, 1, ..."""
    folder = root / "cifar10-resnet20-w1a4" / "x" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = ["epoch,step,train/loss,val/acc1,train/acc1,bcgd/rho"]
    for epoch, acc in enumerate(accs):
        lines += [f"{epoch},{epoch},2.0,,,", f"{epoch},{epoch},,{acc},,", f"{epoch},{epoch},,,0.5,{1e-5 if rho else ''}"]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def _report(root: Path, *args: str) -> dict[str, Any]:
    assert run_subcommand("report", [str(root), "--out", str(root / "out"), *args]) == 0
    return json.loads((root / "out" / "report.json").read_text())


def test_cell_key_comes_from_the_config_not_the_folder(tmp_path: Path) -> None:
    folder = _run(tmp_path, "misleading-float-name", _config("bcgd"), [0.1, 0.2, 0.3])
    key = cell_key(RunFolder.load(folder).config)
    assert key == CellKey("cifar10", "resnet20", "bcgd", 1, 4) and key.bits == "w1a4"
    assert cell_key(_config("float")).bits == "float"
    assert cell_key(_config("ste")).method == "ste"
    shipped = yaml.safe_load((ROOT / "configs/cifar100/convnet_d_aqe_w16a1.yaml").read_text())
    assert cell_key(shipped) == CellKey("cifar100", "convnet_d", "aqe", 32, 1)


def test_best_final_mean_std_and_paper_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curves = {0: [0.5, 0.7, 0.6], 1: [0.4, 0.5, 0.65], 2: [0.3, 0.6, 0.55]}
    for seed, accs in curves.items():
        _run(tmp_path, f"s{seed}", _config("float", seed=seed), accs)
    best = [100 * max(c) for c in curves.values()]
    final = [100 * c[-1] for c in curves.values()]
    (cell,) = _report(tmp_path)["cells"]
    assert cell["mean"] == pytest.approx(statistics.fmean(best))
    assert cell["std"] == pytest.approx(statistics.stdev(best))
    assert cell["n"] == 3 and cell["mean_epochs"] == 3 and cell["seeds"] == "0 1 2"
    assert cell["paper"] == 91.25 and cell["delta"] == pytest.approx(statistics.fmean(best) - 91.25)
    out = capsys.readouterr().out
    assert f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in out and "| 3 |" in out
    (cell,) = _report(tmp_path, "--final")["cells"]
    assert cell["mean"] == pytest.approx(statistics.fmean(final)) and cell["mode"] == "final"
    with open(tmp_path / "out" / "report.csv") as file:
        assert "mean" in file.readline()


def test_runs_differing_in_settings_are_separate_variants(tmp_path: Path) -> None:
    for seed in (0, 1):
        _run(tmp_path, f"long{seed}", _config(epochs=3, seed=seed), [0.1, 0.2, 0.3])
        _run(tmp_path, f"short{seed}", _config(epochs=1, seed=seed), [0.15])
    cells = _report(tmp_path)["cells"]
    assert sorted(c["variant"] for c in cells) == ["trainer.max_epochs=1", "trainer.max_epochs=3"]
    assert all(c["n"] == 2 for c in cells)
    # paths, seeds, init_from, devices and loggers do not split a cell
    assert {c["variant"] for c in _report(tmp_path / "cifar10-resnet20-w1a4" / "x" / "long0")["cells"]} == {""}


def test_unfinished_crashed_and_running_runs_are_never_averaged(tmp_path: Path) -> None:
    _run(tmp_path, "done", _config(seed=0), [0.1, 0.2, 0.3])
    _run(tmp_path, "unfinished", _config(seed=1), [0.9])  # no record: state unknown
    crashed = _run(tmp_path, "crashed", _config(seed=2), [0.9, 0.95])
    write_grid_record(tmp_path / "crashed", {"run_id": "crashed", "status": "failed", "returncode": 1,
                                             "error": "RuntimeError: loss is nan at step 7",
                                             "attempts": [{"seconds": 5.0}]})
    running = _run(tmp_path, "running", _config(seed=3), [0.8])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qlight"])
    try:
        write_grid_record(tmp_path / "running", {"run_id": "running", "status": "running", "pid": sleeper.pid,
                                                 "host": socket.gethostname()})
        report = _report(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert crashed.parents[2] == running.parents[2] == tmp_path
    (cell,) = report["cells"]
    assert cell["n"] == 1 and cell["mean"] == pytest.approx(30.0)
    assert cell["left_out"] == "1 unfinished, 1 crashed, 1 running"
    states = {r["run_id"]: (r["state"], r["detail"]) for r in report["left_out"]}
    assert states["crashed"][0] == "crashed" and "exit 1: RuntimeError: loss is nan" in states["crashed"][1]
    assert states["unfinished"] == ("unfinished", "1/3 epochs; no grid record")
    assert states["running"][0] == "running"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Runs not in the averages" in md and "90.00 (epoch 0)" in md


def test_a_grid_run_that_never_logged_is_listed(tmp_path: Path) -> None:
    _run(tmp_path, "done", _config(seed=0), [0.1, 0.2, 0.3])
    write_grid_record(tmp_path / "child", {"run_id": "child", "status": "blocked", "seed": 0,
                                           "cell": "cifar10/resnet20/bcgd/w1a4",
                                           "error": "init_from run parent is failed"})
    report = _report(tmp_path)
    (orphan,) = report["left_out"]
    assert orphan["run_id"] == "child" and orphan["state"] == "blocked"
    assert "init_from run parent is failed" in orphan["detail"]


def test_a_seed_run_twice_counts_once(tmp_path: Path) -> None:
    old = _run(tmp_path, "version_0", _config(seed=0), [0.1, 0.2, 0.3])
    new = _run(tmp_path, "version_1", _config(seed=0), [0.4, 0.5, 0.6])
    os.utime(old / "metrics.csv", (1, 1))
    report = _report(tmp_path)
    (cell,) = report["cells"]
    assert cell["n"] == 1 and cell["mean"] == pytest.approx(60.0)
    (dup,) = report["left_out"]
    assert dup["folder"] == str(old) and "newest run is used" in dup["excluded"] and str(new) in dup["excluded"]


def test_missing_epochs_are_flagged(tmp_path: Path) -> None:
    folder = _run(tmp_path, "gappy", _config(epochs=3), [0.1, 0.2, 0.3])
    rows = (folder / "metrics.csv").read_text().splitlines()
    (folder / "metrics.csv").write_text("\n".join(r for r in rows if not r.startswith("1,1,,0.2")) + "\n")
    (cell,) = _report(tmp_path)["cells"]
    assert cell["runs"][0]["missing_epochs"] == [1] and "miss epochs" in cell["left_out"]


def test_plots_are_drawn_for_accuracy_and_knobs(tmp_path: Path) -> None:
    for seed in (0, 1):
        _run(tmp_path, f"s{seed}", _config(seed=seed), [0.1 * seed + 0.1, 0.3, 0.35])
    _report(tmp_path)
    for name in ("val_acc1_cifar10_resnet20.png", "knobs_cifar10_resnet20.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")


def test_find_run_folders_needs_config_and_metrics(tmp_path: Path) -> None:
    _run(tmp_path, "a", _config(), [0.1])
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "metrics.csv").write_text("epoch\n")
    assert [p.name for p in find_run_folders([tmp_path])] == ["a"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nowhere"], "report path 'nowhere' does not exist"),
        (["empty"], "no run folders under empty"),
        (["runs", "--metric", "val/acc9"], "--metric 'val/acc9' is logged by none of the 1 runs"),
        (["runs", "--best", "--final"], "not allowed with argument"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "runs", "a", _config(), [0.1])
    assert run_subcommand("report", argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlight: error: ") and message in err and err.count("\n") == 1


def test_collect_reads_a_shipped_aqe_config_with_its_paper_number(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "configs/cifar10/convnet_d_aqe_w1a1.yaml").read_text())
    folder = _run(tmp_path, "aqe", config, [0.5], rho=False)
    config["trainer"]["max_epochs"] = 1
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (cell,) = collect([folder]).cells
    assert cell.reference is not None and cell.reference.source == "AQE Table I, row 1/1"
    assert cell.reference.top1 == pytest.approx(84.4) and cell.delta("best") == pytest.approx(50.0 - 84.4)


def test_a_run_on_another_host_counts_as_running_while_it_writes(tmp_path: Path) -> None:
    folder = _run(tmp_path, "remote", _config(seed=0), [0.5])
    write_grid_record(tmp_path / "remote", {"run_id": "remote", "status": "running", "pid": 1, "host": "node-17",
                                            "slurm_job": "42"})
    assert RunFolder.load(folder).state().state == "running"
    os.utime(folder / "metrics.csv", (1, 1))
    state = RunFolder.load(folder).state()
    assert state.state == "unfinished" and "last started on node-17 (SLURM job 42)" in state.detail
