"""SIGTERM/SIGINT outside SLURM, with real signals sent to a ``qlight fit`` subprocess: the first one
stops between two steps with a checkpoint that resumes exactly and exit status 143/130; a second one
aborts at once."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state, checkpoint_state

from qlight.cli import main

TESTS = Path(__file__).parent
TINY = str(TESTS / "conf" / "cifar10_float_tiny.yaml")
PAUSE_STEP = 7  # 80 images, batch 16: 5 steps per epoch, so step 7 is inside the second epoch


def _interrupted_fit(root: Path, workdir: Path, signals: list[signal.Signals]) -> tuple[int, str]:
    """Start a 2-epoch fit, send ``signals`` while step PAUSE_STEP holds, return (status, output)."""
    hold = workdir / "hold"
    hold.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "-m", "qlight", "fit", "--config", TINY, "--data.root", str(root),
         "--trainer.max_epochs", "2", "--trainer.callbacks+=pause.PauseAt",
         "--trainer.callbacks.step", str(PAUSE_STEP), "--trainer.callbacks.folder", str(hold)],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (hold / "paused").exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the run never reached the pause"
            time.sleep(0.05)
        for signum in signals:
            process.send_signal(signum)
            time.sleep(0.3)  # the handler runs while the step is held
        (hold / "go").write_text("")
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out


@pytest.mark.usefixtures("one_thread")
def test_sigterm_stops_between_steps_with_a_checkpoint_that_resumes_exactly(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, out = _interrupted_fit(cifar10_pickle, tmp_path / "run", [signal.SIGTERM])
    assert status == 143, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("qlight: stopped by SIGTERM")]
    assert f"after step {PAUSE_STEP} (epoch 1)" in line
    command = line.split("resume with: ")[1].split()
    assert command[:2] == ["qlight", "fit"]
    ckpt = tmp_path / "run" / command[command.index("--ckpt_path") + 1]
    assert ckpt.name == "last.ckpt" and torch.load(ckpt, weights_only=False)["global_step"] == PAUSE_STEP

    # the printed command continues the run in its own folder ...
    monkeypatch.chdir(tmp_path / "run")
    main(command[1:])
    runs = list((tmp_path / "run").glob("logs/*/*/*/checkpoints/last.ckpt"))
    assert runs == [ckpt]
    with open(ckpt.parent.parent / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # no step logged twice, none missing at the end

    # ... and ends with the same weights and optimizer state as a run never stopped
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TINY, "--data.root", str(cifar10_pickle), "--trainer.max_epochs", "2",
          "--trainer.default_root_dir", str(tmp_path / "straight"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "straight")])
    (straight,) = (tmp_path / "straight").glob("*/*/*/checkpoints/last.ckpt")
    assert_same_state(checkpoint_state(straight), checkpoint_state(ckpt))


def test_sigint_exits_130_with_a_checkpoint(cifar10_pickle: Path, tmp_path: Path) -> None:
    status, out = _interrupted_fit(cifar10_pickle, tmp_path, [signal.SIGINT])
    assert status == 130, out
    assert "qlight: stopped by SIGINT after step 7" in out
    (ckpt,) = tmp_path.glob("logs/*/*/*/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=False)["global_step"] == PAUSE_STEP


def test_a_second_signal_aborts_at_once(cifar10_pickle: Path, tmp_path: Path) -> None:
    status, out = _interrupted_fit(cifar10_pickle, tmp_path, [signal.SIGTERM, signal.SIGTERM])
    assert status == -signal.SIGTERM, out  # killed by the signal itself, nothing more run
    assert "aborting without a checkpoint" in out and "qlight: stopped by" not in out
    (ckpt,) = tmp_path.glob("logs/*/*/*/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=False)["global_step"] == 5  # the epoch-end one, not step 7
