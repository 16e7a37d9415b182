"""A run's lifecycle through the ``qlight`` command: resume continues the run (folder, CSV, W&B),
checkpoints are checked before anything expensive and must hold the configured network, evaluation
writes into the run, and the command says what happened."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from qlight.cli import main

CONF = Path(__file__).parent / "conf"
TINY = str(CONF / "cifar10_float_tiny.yaml")
RUN = Path("logs/cifar10-resnet20-float/float-resnet20-s0")  # the tiny config's run, relative to the cwd

pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cifar10_pickle: Path) -> tuple[Path, object, str]:
    """One tiny 1-epoch float run with a logging interval longer than the epoch: (run folder, CLI, stdout)."""
    root = tmp_path_factory.mktemp("trained")
    out = io.StringIO()
    with cwd(root), contextlib.redirect_stdout(out):
        cli = main(["fit", "--config", TINY, "--data.root", str(cifar10_pickle), "--trainer.log_every_n_steps", "50"])
    return root / RUN / "version_0", cli, out.getvalue()


# ---------------------------------------------------------------------------------------------- item 1
def test_ckpt_path_last_and_an_explicit_checkpoint_continue_the_same_run(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", TINY, "--data.root", str(cifar10_pickle)]
    main(args)
    second = main([*args, "--ckpt_path", "last", "--trainer.max_epochs", "2"])
    run = tmp_path / RUN / "version_0"
    assert Path(second.trainer.log_dir).absolute() == run
    last = run / "checkpoints" / "last.ckpt"
    # last.ckpt is the last state, not a copy of the best one (Lightning >= 2.6 needs RunCheckpoint for that)
    assert torch.load(last, weights_only=False)["global_step"] == second.trainer.global_step == 10

    third = main([*args, "--ckpt_path", str(last), "--trainer.max_epochs", "3"])
    assert third.trainer.global_step == 15
    # the configured optimizer and LR schedule stay (Lightning's CLI replaced them by the defaults)
    (scheduler,) = third.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler).__name__ == "MultiStepLR"
    assert third.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.005)  # 0.05 x 0.1 after epoch 1
    assert [p.name for p in (tmp_path / RUN).iterdir()] == ["version_0"]  # no version_1, one metrics.csv
    rows = metrics(run / "metrics.csv")
    assert {r["epoch"] for r in rows if r.get("val/acc1")} == {"0", "1", "2"}
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) == list(range(15))
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


def test_ckpt_path_last_with_nothing_to_resume_starts_the_run_and_says_so(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        cli = main(["fit", "--config", TINY, "--data.root", str(cifar10_pickle), "--ckpt_path", "last",
                    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"])
    assert cli.trainer.global_step == 1
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "--ckpt_path last" in ln]
    assert len(notes) == 1 and "no checkpoint of this run" in notes[0] and "starts from the beginning" in notes[0]
    assert not [w for w in warned if "save_last=True" in str(w.message)]  # Lightning's wrong hint


def test_resume_and_evaluation_continue_the_run_folder_and_wandb_run(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run identity comes from the checkpoint: the resumed fit and the evaluation of a run folder
    that was moved meanwhile write into that folder and into the same W&B run."""
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    wb = ["--trainer.logger+=qlight.loggers.WandbLogger", "--trainer.logger.save_dir", str(tmp_path / "wb")]
    args = ["fit", "--config", TINY, "--data.root", str(cifar10_pickle), *wb]

    def wandb_id(cli: object) -> str:
        try:
            return cli.trainer.loggers[-1].experiment.id  # type: ignore[attr-defined]
        finally:
            wandb.finish()

    first = wandb_id(main(args))
    out = capsys.readouterr().out
    assert "W&B: offline run" in out and "wandb sync" in out
    run = tmp_path / RUN / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["qlight_run"]["wandb_id"] == first
    assert wandb_id(main([*args, "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2"])) == first

    moved = tmp_path / "elsewhere" / "version_0"
    shutil.move(str(run), moved)
    evaluate = ["--config", str(moved / "config.yaml"), "--ckpt_path", str(moved / "checkpoints" / "last.ckpt"), *wb]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        validated = main(["validate", "--verbose", *evaluate])
    assert not [w for w in warned if "dirpath has changed" in str(w.message)]
    assert wandb_id(validated) == first
    (row,) = metrics(moved / "validate" / "metrics.csv")
    assert row["step"] == "10" and row["epoch"] == "1"  # logged at the checkpoint's step and epoch
    assert float(row["val/acc1"]) == pytest.approx(float(validated.trainer.callback_metrics["val/acc1"]))
    wandb_id(main(["test", *evaluate]))
    assert (moved / "test" / "metrics.csv").is_file()
    assert not (tmp_path / RUN).exists() or not any((tmp_path / RUN).iterdir())  # no new version_N
    assert f"metrics: {moved / 'test' / 'metrics.csv'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- item 3
@pytest.mark.parametrize(
    ("command", "option"),
    [("fit", "--ckpt_path"), ("validate", "--ckpt_path"), ("test", "--ckpt_path"), ("predict", "--ckpt_path"),
     ("fit", "--model.init_from")],
)
@pytest.mark.parametrize("damage", ["missing", "truncated", "text"])
def test_a_bad_checkpoint_is_one_line_before_data_or_loggers(
    command: str, option: str, damage: str, cifar10_pickle: Path, qlight_cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        torch.save({"state_dict": {"model.w": torch.ones(1000)}, "epoch": 3}, bad)
        bad.write_bytes(bad.read_bytes()[:2000])
    elif damage == "text":
        bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", TINY, "--data.root", str(cifar10_pickle), option, str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qlight: error: {option.removeprefix('--')}={str(bad)!r}")
    assert "weights_only" not in err[0]
    assert not (tmp_path / "logs").exists()  # no logger created
    assert not any(qlight_cache.iterdir())  # no data decoded


# ---------------------------------------------------------------------------------------------- item 4
def test_a_checkpoint_of_another_model_is_refused_naming_each_difference(
    trained: tuple[Path, object, str], cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "other-run"
    shutil.copytree(trained[0], run)
    ckpt = run / "checkpoints" / "last.ckpt"
    data = torch.load(ckpt, weights_only=False)
    data["hyper_parameters"].update(model="convnet_d", quant={"weight": "binary", "w_bits": 1, "a_bits": 1,
                                                              "act": "hardtanh_quant"})
    torch.save(data, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", TINY, "--data.root", str(cifar10_pickle), "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model: 'resnet20' vs 'convnet_d'" in line
    assert "quant: None (float) vs {weight: 'binary', w_bits: 1, act: 'hardtanh_quant', a_bits: 1}" in line
    assert line.endswith(f"--config {run / 'config.yaml'}")
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------- item 6
def test_fit_says_what_happened(trained: tuple[Path, object, str]) -> None:
    run, cli, out = trained
    assert {"train/loss", "val/acc1"} <= set(cli.trainer.progress_bar_metrics)  # type: ignore[attr-defined]
    lines = out.strip().splitlines()[-4:]
    assert lines[0] == "qlight: fit done: 1 epoch(s), 5 step(s)"
    assert lines[1].startswith("  best val/acc1 ") and " at epoch 0: " in lines[1]
    assert lines[1].endswith(str(RUN / "version_0" / "checkpoints" / "best-epoch000.ckpt"))
    assert lines[2] == f"  last checkpoint: {RUN / 'version_0' / 'checkpoints' / 'last.ckpt'}"
    assert lines[3] == f"  metrics: {RUN / 'version_0' / 'metrics.csv'}"
    # 5 steps, log_every_n_steps=50: the loss is still written, at the epoch's end
    losses = [r for r in metrics(run / "metrics.csv") if r.get("train/loss")]
    assert [r["step"] for r in losses] == ["4"]


# ---------------------------------------------------------------------------------------------- item 9
def test_no_logger_trains_without_the_lr_monitor(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", TINY, "--data.root", str(cifar10_pickle), "--trainer.logger", "false",
                "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"])
    assert cli.trainer.global_step == 2
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "LearningRateMonitor" in ln]
    assert len(notes) == 1 and notes[0].startswith("qlight: note:")
