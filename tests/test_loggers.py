"""W&B and CSV logger wiring: mode choice, derived names, offline files. Never touches the network."""

from pathlib import Path

import pytest

from qlight.loggers import CSVLogger, RunInfo, WandbLogger, run_tag, wandb_logged_in

INFO = RunInfo(dataset="cifar10", arch="resnet20", method="bcgd", bits="w1a4", seed=3)


@pytest.fixture
def no_wandb_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))


def test_run_info_names() -> None:
    assert INFO.group == "cifar10-resnet20-w1a4"
    assert INFO.name == "bcgd-resnet20-w1a4-s3"
    assert INFO.tags == ["bcgd", "w1a4", "cifar10", "resnet20"]


def test_auto_mode_is_offline_without_credentials(no_wandb_credentials: None, tmp_path: Path) -> None:
    assert not wandb_logged_in()
    assert WandbLogger(save_dir=str(tmp_path)).mode == "offline"


def test_auto_mode_is_online_with_api_key(no_wandb_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path)).mode == "online"  # the run itself is never created here


def test_auto_mode_follows_wandb_mode_env(no_wandb_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger(save_dir=str(tmp_path)).mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger(save_dir=str(tmp_path)).mode == "disabled"


def test_bad_mode_names_valid_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"mode='cloud'.*'offline'"):
        WandbLogger(mode="cloud", save_dir=str(tmp_path))  # type: ignore[arg-type]


def test_offline_run_gets_derived_group_tags_and_name(no_wandb_credentials: None, tmp_path: Path) -> None:
    import wandb

    logger = WandbLogger(mode="offline", save_dir=str(tmp_path))
    logger.describe_run(INFO)
    try:
        run = logger.experiment
        assert run.group == "cifar10-resnet20-w1a4"
        assert set(run.tags) == {"bcgd", "w1a4", "cifar10", "resnet20"}
        assert run.name == "bcgd-resnet20-w1a4-s3"
        logger.log_metrics({"val/acc1": 0.5}, step=0)
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # syncable later with `wandb sync`


def test_explicit_names_win(no_wandb_credentials: None, tmp_path: Path) -> None:
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), name="mine", group="g", tags=["t"])
    logger.describe_run(INFO)
    assert (logger._wandb_init["name"], logger._wandb_init["group"], logger._wandb_init["tags"]) == ("mine", "g", ["t"])


def test_csv_logger_folder_follows_run(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path))
    logger.describe_run(INFO)
    assert Path(logger.log_dir) == tmp_path / "cifar10-resnet20-w1a4" / "bcgd-resnet20-w1a4-s3" / "version_0"
    named = CSVLogger(save_dir=str(tmp_path), name="fixed")
    named.describe_run(INFO)
    assert Path(named.log_dir) == tmp_path / "fixed" / "version_0"


def test_run_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_tag() is None
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    assert run_tag() == "slurm-812"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "800")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_tag() == "slurm-800_3"
    monkeypatch.setenv("QLIGHT_RUN_ID", "bcgd-full.1")
    assert run_tag() == "bcgd-full.1"
    monkeypatch.setenv("QLIGHT_RUN_ID", "a/b")
    with pytest.raises(ValueError, match="QLIGHT_RUN_ID='a/b' is invalid"):
        run_tag()


def test_a_requeued_slurm_job_keeps_its_csv_folder_and_wandb_run(
    no_wandb_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    csv = CSVLogger(save_dir=str(tmp_path))
    csv.describe_run(INFO)
    assert Path(csv.log_dir) == tmp_path / "cifar10-resnet20-w1a4" / "bcgd-resnet20-w1a4-s3" / "slurm-812"
    wb = WandbLogger(mode="offline", save_dir=str(tmp_path))
    wb.describe_run(INFO)
    assert wb._wandb_init["id"] == "bcgd-resnet20-w1a4-s3-slurm-812" and wb._wandb_init["resume"] == "allow"
    assert wb.version == "bcgd-resnet20-w1a4-s3-slurm-812"
    explicit = WandbLogger(mode="offline", save_dir=str(tmp_path), id="mine")
    explicit.describe_run(INFO)
    assert explicit._wandb_init["id"] == "mine"


def test_cli_gives_each_slurm_job_its_own_root_dir(
    cifar10_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning writes the requeue checkpoint to default_root_dir and resumes from the newest one
    there: jobs started from one folder must not share it."""
    from qlight.cli import main

    monkeypatch.chdir(tmp_path)
    conf = Path(__file__).parent / "conf" / "cifar10_float_tiny.yaml"
    args = ["--config", str(conf), "--data.root", str(cifar10_pickle)]
    assert Path(main(args, run=False).trainer.default_root_dir).absolute() == tmp_path
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    assert Path(main(args, run=False).trainer.default_root_dir).absolute() == tmp_path / "logs" / "slurm-812"
    chosen = main([*args, "--trainer.default_root_dir", str(tmp_path / "mine")], run=False)
    assert Path(chosen.trainer.default_root_dir).absolute() == tmp_path / "mine"


def test_a_continued_run_keeps_earlier_rows_and_replaces_the_replayed_ones(tmp_path: Path) -> None:
    """A resumed run appends to metrics.csv (Lightning's writer would delete it); rows the interrupted
    run wrote after its checkpoint (here steps 3-5) are replaced by the resumed run's."""
    import csv

    from qlight.loggers import ContinuedExperimentWriter

    (tmp_path / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},{9 - s}\n" for s in range(6)))
    writer = ContinuedExperimentWriter(str(tmp_path))
    writer.log_metrics({"train/loss": 0.5, "val/acc1": 0.25}, step=3)
    writer.save()
    writer.log_metrics({"train/loss": 0.4}, step=4)
    writer.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/acc1"]) for r in rows] == [
        ("0", "9", ""), ("1", "8", ""), ("2", "7", ""), ("3", "0.5", "0.25"), ("4", "0.4", ""),
    ]
