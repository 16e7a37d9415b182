"""The committed configs are exactly what scripts/make_configs.py writes, and every one parses."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlight.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("cifar*/*.yaml"))


def test_configs_match_the_generator() -> None:
    out = subprocess.run([sys.executable, "scripts/make_configs.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_experiment_names_model_data_and_loggers() -> None:
    assert len(EXPERIMENTS) > 100
    for path in EXPERIMENTS:
        config = yaml.safe_load(path.read_text())
        assert {"trainer", "model", "data"} <= config.keys(), path
        assert config["data"]["class_path"].startswith("CIFAR"), path
        loggers = [lg["class_path"] for lg in config["trainer"]["logger"]]
        assert loggers == ["qlight.loggers.CSVLogger", "qlight.loggers.WandbLogger"], path


@pytest.mark.parametrize(
    "name", ["cifar10/resnet20_float.yaml", "cifar10/resnet20_ste_w2a4.yaml", "cifar100/vgg11_float.yaml"]
)
def test_configs_parse_and_build(name: str, cifar10_folder: Path, cifar100_pickle: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = cifar100_pickle if name.startswith("cifar100") else cifar10_folder
    cli = main(["--config", str(ROOT / "configs" / name), "--config", str(ROOT / "configs/logger/csv_only.yaml"),
                "--data.root", str(root)], run=False)
    assert cli.model.hparams["model"] in name


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "imagenet").glob("*.yaml")))
def test_imagenet_configs_parse_and_build(
    name: str, imagenet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ImageNet recipe builds a torchvision ResNet-18 (quantized as its file name says) on fake data."""
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["--config", str(ROOT / "configs" / "imagenet" / name), "--config", str(ROOT / "configs/logger/csv_only.yaml"),
         "--data.root", str(imagenet_folder), "--data.num_classes", "3"],
        run=False,
    )
    assert cli.model.hparams["model"] == "torchvision.resnet18" and cli.model.hparams["num_classes"] == 3
    spec = cli.model.quant_spec
    assert (spec is None) == name.endswith("_float.yaml")
    if spec is not None:
        assert spec.first_layer == spec.last_layer == ("float" if name.endswith("_fl.yaml") else "quantized")
    assert any(type(c).__name__ == "BCGD" for c in cli.trainer.callbacks) == ("_bcgd_" in name)


def test_quantized_recipes_log_diagnostics_at_a_low_rate() -> None:
    """Every recipe with quantized weights or quantized ReLUs carries QuantDiagnostics every 200 steps;
    float recipes (nothing to diagnose) do not."""
    configs = sorted((ROOT / "configs").glob("*/*.yaml"))
    with_diag = 0
    for path in configs:
        config = yaml.safe_load(path.read_text())
        if "model" not in config:
            continue  # fragments
        callbacks = [c for c in config["trainer"].get("callbacks", []) if c["class_path"] == "QuantDiagnostics"]
        quant = config["model"]["init_args"].get("quant")
        expected = quant is not None and (quant.get("weight") != "float" or quant.get("act") == "relu_quant")
        assert len(callbacks) == int(expected), path
        if callbacks:
            assert callbacks[0]["init_args"] == {"every_n_steps": 200}, path
            with_diag += 1
    assert with_diag > 100
