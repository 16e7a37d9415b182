"""The ``qlight`` command end to end on tiny generated data in every supported layout."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlight
from qlight.cli import main

CONF = Path(__file__).parent / "conf"
FLOAT_TINY = str(CONF / "cifar10_float_tiny.yaml")


def run_dir(root: Path) -> Path:
    """The single CSV run folder under ``root/logs``."""
    (config,) = root.glob("logs/**/config.yaml")
    return config.parent


def last_val_acc(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        values = [row["val/acc1"] for row in csv.DictReader(f) if row.get("val/acc1")]
    return float(values[-1])


def test_version_subprocess() -> None:
    out = subprocess.run([sys.executable, "-m", "qlight", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"qlight {qlight.__version__}"  # not "__main__.py qlight 0.1.0"


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


@pytest.mark.parametrize("layout", ["cifar10_folder", "cifar10_zip", "cifar10_pickle"])
def test_fit_then_validate_reproduces_accuracy(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = request.getfixturevalue(layout)
    monkeypatch.chdir(tmp_path)
    fit = main(["fit", "--config", FLOAT_TINY, "--data.root", str(root)])
    fit_acc = float(fit.trainer.callback_metrics["val/acc1"])
    run = run_dir(tmp_path)
    assert run.parent.name == "float-resnet20-s0" and run.parent.parent.name == "cifar10-resnet20-float"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and list(run.glob("checkpoints/best-epoch000.ckpt"))
    assert last_val_acc(run) == pytest.approx(fit_acc)
    saved = (run / "config.yaml").read_text()
    assert "seed_everything: 0" in saved and str(root) in saved

    val = main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/acc1"]) == pytest.approx(fit_acc, abs=1e-6)

    if layout == "cifar10_folder":  # test and predict once; val_split=0 makes test == validation here
        test = main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
        assert float(test.trainer.callback_metrics["test/acc1"]) == pytest.approx(fit_acc, abs=1e-6)
        predict = main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
        labels = torch.cat(predict.trainer.predict_loop.predictions)  # predicted class per test image
        assert labels.shape == (40,) and 0 <= int(labels.min()) and int(labels.max()) < 10


def test_wrong_root_is_one_message_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-cifar"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FLOAT_TINY, "--data.root", str(missing)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlight: error:") and str(missing) in err[0]


def test_wrong_root_with_download_is_one_message_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such.zip"  # a .zip is never downloaded: the check runs when the run starts
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FLOAT_TINY, "--data.root", str(missing), "--data.download", "true"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlight: error:")]
    assert len(err) == 1 and str(missing) in err[0]


def test_unknown_model_names_valid_choices(
    cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", FLOAT_TINY, "--data.root", str(cifar10_folder), "--model.model", "resnet21"])
    err = capsys.readouterr().err
    assert "resnet21" in err and "resnet20" in err


def test_cifar100_pickle_links_num_classes(cifar100_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", FLOAT_TINY, "--data", "CIFAR100DataModule", "--data.root", str(cifar100_pickle),
         "--data.batch_size", "50", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    )
    assert cli.model.model.fc.out_features == 100
    assert "val/acc5" in cli.trainer.callback_metrics


def test_wandb_offline_run_from_cli(
    cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        cli = main(
            ["fit", "--config", FLOAT_TINY, "--data.root", str(cifar10_folder), "--trainer.max_epochs", "2",
             "--trainer.logger+=qlight.loggers.WandbLogger", "--trainer.logger.save_dir", str(tmp_path / "wb")]
        )
        run = cli.trainer.loggers[-1].experiment
        # the papers report the best accuracy during training: the W&B summary is the maximum
        best = max(float(cli.trainer.checkpoint_callback.best_model_score), 0.0)
        assert run.summary["val/acc1"]["max"] == pytest.approx(best)
        assert run.group == "cifar10-resnet20-float" and run.name == "float-resnet20-s0"
        assert "float" in run.tags
        assert run.config["qlight"]["model"]["init_args"]["model"] == "resnet20"  # the resolved config
    finally:
        wandb.finish()
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    assert list(tmp_path.glob("logs/**/metrics.csv"))  # CSV written as well


def test_nonfinite_loss_stops_with_step(tmp_path: Path) -> None:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from qlight.tasks import ImageClassifier, NonFiniteLossError

    x = torch.randn(32, 3, 32, 32)
    x[24:] = float("nan")  # the fourth batch of 8
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=8)
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        log_every_n_steps=1, default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match="global step 3"):
        trainer.fit(ImageClassifier(model="resnet20"), loader)


@pytest.mark.usefixtures("one_thread")
def test_a_run_split_into_chunks_continues_in_one_folder(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QLIGHT_RUN_ID + ``--ckpt_path last``: the same command starts the run, then continues it (e.g. on a
    machine with a time limit per command), with one metrics.csv and one checkpoint folder."""
    import csv

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QLIGHT_RUN_ID", "chunked")
    args = ["fit", "--config", str(CONF / "cifar10_float_tiny.yaml"), "--data.root", str(cifar10_pickle),
            "--ckpt_path", "last"]
    first = main([*args, "--trainer.max_epochs", "1"])
    steps = first.trainer.global_step
    second = main([*args, "--trainer.max_epochs", "2"])
    assert second.trainer.global_step == 2 * steps and second.trainer.current_epoch == 2
    (run,) = tmp_path.glob("logs/cifar10-resnet20-float/float-resnet20-s0/*")
    assert run.name == "chunked" and (run / "checkpoints" / "last.ckpt").is_file()
    with open(run / "metrics.csv") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/acc1")}
    assert epochs == {"0", "1"}
    assert Path(second.trainer.default_root_dir).absolute() == tmp_path / "logs" / "chunked"
