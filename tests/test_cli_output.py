"""What the ``qlight`` command prints: quiet by default (``--verbose`` for everything), one line per
config mistake with the valid choices and the closest match, and small truths (version, advice)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qlight
from qlight.cli import main

CONF = Path(__file__).parent / "conf"
TINY = str(CONF / "cifar10_float_tiny.yaml")


# ---------------------------------------------------------------------------------------------- item 7
def test_quiet_by_default_and_verbose_on_request(cifar10_pickle: Path, tmp_path: Path) -> None:
    """The real output of a run with W&B (offline), a model summary and epochs shorter than the
    logging interval, as a batch log gets it (stdout not a terminal); then ``--verbose`` on the
    validation of that run restores the libraries' output, still without ANSI colours."""
    env = {**os.environ, "WANDB_MODE": "offline", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(qlight.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    for name in ("WANDB_SILENT", "WANDB_API_KEY", "QLIGHT_VERBOSE"):
        env.pop(name, None)
    wandb = ["--trainer.logger+=qlight.loggers.WandbLogger", "--trainer.logger.save_dir", str(tmp_path / "wb")]

    def qlight_command(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "qlight", *args], check=False, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    out = qlight_command("fit", "--config", TINY, "--data.root", str(cifar10_pickle), "--trainer.enable_model_summary",
                         "true", "--trainer.log_every_n_steps", "50", *wandb)
    for noise in ("litlogger", "Total FLOPs", "Total Flops", "anonymous setting", "LeafSpec",
                  "smaller than the logging interval", "\x1b[", "wandb: "):
        assert noise not in out, noise
    assert "Total params" in out  # the model summary itself stays
    (wandb_line,) = [ln for ln in out.splitlines() if ln.startswith("qlight: W&B offline run")]
    assert "wandb sync" in wandb_line
    assert "  W&B: offline run" in out  # and again in the closing summary

    (run,) = tmp_path.glob("logs/*/*/version_0")
    out = qlight_command("validate", "--verbose", "--config", str(run / "config.yaml"), "--ckpt_path",
                         str(run / "checkpoints" / "last.ckpt"), *wandb)
    assert "litlogger" in out and "wandb: " in out and "wandb sync" in out
    assert "\x1b[" not in out and "anonymous setting" not in out and "dirpath has changed" not in out


# ---------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model.lrr", "0.1"], ["model.lrr", "ImageClassifier has no option 'lrr'", "valid: model, ", "label_smoothing"]),
        (["--data.bach_size", "3"], ["data.bach_size", "did you mean 'batch_size'?"]),
        (["--model.quant", "{weigth: binary}"], ["model.quant.weigth", "QuantSpec", "did you mean 'weight'?"]),
        (["--trainer.max_epochs", "abc"], ["trainer.max_epochs='abc'", "expected int or null"]),
        (["--data", "CIFAR10DataModul"], ["data='CIFAR10DataModul'", "did you mean 'CIFAR10DataModule'?"]),
        (["--trainer.callbacks+=BCDG"], ["trainer.callbacks='BCDG'", "did you mean 'BCGD'?"]),
    ],
    ids=["unknown-model-key", "unknown-data-key", "unknown-spec-key", "bad-type", "unknown-class", "unknown-callback"],
)
def test_config_typos_are_one_line_with_a_suggestion(
    extra: list[str], expected: list[str], cifar10_pickle: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", TINY, "--data.root", str(cifar10_pickle), *extra])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlight: error: "), captured.err
    for text in expected:
        assert text in err[0]
    for noise in ("usage:", "NestedArg", "Union", "Subtypes"):
        assert noise not in captured.err


def test_a_wrong_literal_in_yaml_names_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "cubic.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n  - class_path: AQE\n    init_args:\n"
        "      alpha: {law: cubic, start: 0.5, end: 1.0, ramp: 3, unit: epoch}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs/cifar10/convnet_d_aqe_w1a1.yaml"),
              "--config", str(bad)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("qlight: error: trainer.callbacks[AQE].alpha.law='cubic' is not valid; "
                    "choose from 'constant', 'linear', 'geometric', 'exponential', 'step'")


def test_help_still_works_and_says_how_to_list_class_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--data.help CIFAR10DataModule" in out and "--trainer.callbacks.help BCGD" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.help", "CIFAR10DataModule"])
    assert exit_info.value.code == 0
    assert "--data.batch_size" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize(("precision", "advice"), [("32-true", False), ("64-true", False), ("16-mixed", True),
                                                   ("bf16-mixed", True)])
def test_nonfinite_advice_suggests_full_precision_only_when_not_already(precision: str, advice: bool) -> None:
    from qlight.tasks import ImageClassifier, NonFiniteLossError

    task = ImageClassifier(model="resnet20")
    task._trainer = SimpleNamespace(precision=precision, current_epoch=2, accumulate_grad_batches=1)  # type: ignore[assignment]
    task.train_stats.losses.reset(first_step=7)
    task.train_stats.losses.record(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="global step 7 \\(epoch 2\\)") as info:
        task._log_train_loss()
    assert ("32-true" in str(info.value)) is advice
    assert ("precision" in str(info.value)) is advice


def test_a_failed_download_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    from qlight.data import sources
    from qlight.data.sources import DatasetError

    def offline(url: str, root: str, **kwargs: object) -> None:
        (Path(root) / str(kwargs["filename"])).write_bytes(b"partial")  # a download cut short
        raise URLError("no network")

    monkeypatch.setattr(sources.tv_utils, "download_and_extract_archive", offline)
    root = tmp_path / "data" / "cifar10"
    with pytest.raises(DatasetError, match="could not download"):
        sources.resolve_source(sources.CIFAR10, root, download=True)
    assert not (tmp_path / "data").exists()
