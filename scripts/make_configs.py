"""Write every experiment YAML under ``configs/`` from one table, so recipes cannot drift apart.

Run ``python scripts/make_configs.py`` after changing a recipe; ``tests/test_configs.py`` fails when the
committed files differ from what this script writes (``--check`` does the same here).

Each experiment is ``(relative path, partial config)``; the partial config is deep-merged over the
shared blocks below (dicts merge, lists and scalars replace, except ``trainer.callbacks``, which are
appended after the shared ones). A key ``_comment`` becomes the file's header comment. Method modules
(``configs_bcgd.py``, ``configs_aqe.py`` beside this file) contribute their own experiment lists.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

Experiment = tuple[str, dict[str, Any]]

#: dataset -> its ``data:`` block
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "class_path": "CIFAR10DataModule",
        "init_args": {
            "root": "data/cifar10",
            "download": True,
            "batch_size": 128,
            "num_workers": 0,  # batches are slices of in-memory tensors; workers only add copies
        },
    },
    "cifar100": {
        "class_path": "CIFAR100DataModule",
        "init_args": {"root": "data/cifar100", "download": True, "batch_size": 128, "num_workers": 0},
    },
    "imagenet": {
        "class_path": "ImageNetDataModule",
        "init_args": {"root": "data/imagenet", "batch_size": 256, "num_workers": 8},
    },
}
CIFAR = ("cifar10", "cifar100")


def shared_blocks(dataset: str) -> dict[str, Any]:
    """Trainer, logging and data settings every experiment starts from."""
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 200,
            "accelerator": "auto",
            "devices": "auto",
            "precision": "32-true",
            "log_every_n_steps": 50,
            "logger": [
                {"class_path": "qlight.loggers.CSVLogger", "init_args": {"save_dir": "logs"}},
                {
                    "class_path": "qlight.loggers.WandbLogger",
                    "init_args": {"project": "qlight", "save_dir": "logs"},
                },
            ],
            "callbacks": [
                {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "epoch"}},
            ],
        },
        "data": copy.deepcopy(DATASETS[dataset]),
    }


#: every quantized recipe logs per-layer diagnostics (flip ratio, quantization error, ...) at a low rate:
#: every 200 optimizer steps and at each epoch end, nothing in between (``docs/diagnostics.md``)
DIAGNOSTICS: dict[str, Any] = {"class_path": "QuantDiagnostics", "init_args": {"every_n_steps": 200}}


def has_quantized_parts(config: dict[str, Any]) -> bool:
    """Whether an experiment's model has quantized weights or quantized ReLUs (QuantSpec defaults apply)."""
    quant = config.get("model", {}).get("init_args", {}).get("quant")
    if quant is None:
        return False
    weights = quant.get("weight", "binary") != "float" or "8bit" in (quant.get("first_layer"), quant.get("last_layer"))
    return weights or quant.get("act", "relu_quant") == "relu_quant"


def sgd_recipe(momentum: float = 0.95, milestones: tuple[int, ...] = (80, 140)) -> dict[str, Any]:
    """The BCGD code's SGD (lr 0.1, wd 1e-4) with its MultiStepLR actually attached (BCGD.md §7 #1)."""
    return {
        "optimizer": {
            "class_path": "torch.optim.SGD",
            "init_args": {"lr": 0.1, "momentum": momentum, "weight_decay": 1e-4},
        },
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.MultiStepLR",
            "init_args": {"milestones": list(milestones), "gamma": 0.1},
        },
    }


def float_experiments() -> list[Experiment]:
    """Float baselines: the first stage of every BCGD/BinaryConnect recipe."""
    out = []
    for dataset in CIFAR:
        for arch in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg11"):
            out.append(
                (
                    f"{dataset}/{arch}_float.yaml",
                    {
                        "_comment": f"Float {arch} on {dataset}: BCGD code recipe (SGD 0.1, momentum 0.95, "
                        "wd 1e-4, 200 epochs, lr x0.1 at 80/140). Stage 1 of the BCGD flow.",
                        "model": {
                            "class_path": "ImageClassifier",
                            "init_args": {"model": arch, **sgd_recipe()},
                        },
                    },
                )
            )
    return out


def ste_experiments() -> list[Experiment]:
    """STE / BinaryConnect (BCGD with rho = 0) with every conv quantized and the last linear float."""
    weights = {
        1: {"weight": "binary", "w_bits": 1},
        2: {"weight": "ternary", "w_bits": 2},
        4: {"weight": "uniform", "w_bits": 4},
    }
    out = []
    for w_bits, wspec in weights.items():
        quant = {**wspec, "act": "relu_quant", "a_bits": 4, "first_layer": "quantized", "last_layer": "float"}
        out.append(
            (
                f"cifar10/resnet20_ste_w{w_bits}a4.yaml",
                {
                    "_comment": f"BinaryConnect/STE ResNet-20, W{w_bits}A4, every conv quantized, last linear float "
                    "(BCGD code). Start from the float model: --model.init_from <float ckpt>.",
                    "model": {
                        "class_path": "ImageClassifier",
                        "init_args": {"model": "resnet20", "quant": quant, **sgd_recipe()},
                    },
                },
            )
        )
    return out


def fragments() -> list[Experiment]:
    """Partial configs composed with a second ``--config``."""
    return [
        (
            "trainer/gpu_fast.yaml",
            {
                "_comment": "The fast path on one GPU, fp32 as the recipes: forward+backward compiled with CUDA graphs "
                "(torch.compile mode reduce-overhead), channels-last, fused optimizer (automatic on CUDA); "
                "the training loader already drops the last partial batch (static shapes). The first steps "
                "compile and capture; time/warmup_s reports them apart from time/epoch_s. Compose after an "
                "experiment.",
                "trainer": {"precision": "32-true"},
                "model": {"init_args": {"channels_last": True, "compile": True, "compile_mode": "reduce-overhead"}},
                "data": {"init_args": {"channels_last": True}},
            },
        ),
        (
            "trainer/bf16.yaml",
            {
                "_comment": "bf16 autocast for convolutions and linears (quantizer arithmetic stays fp32). "
                "Not bit-comparable with the fp32 recipes; compose after an experiment (and gpu_fast).",
                "trainer": {"precision": "bf16-mixed"},
            },
        ),
        (
            "trainer/ddp.yaml",
            {
                "_comment": "All GPUs of the node with DDP; batch_size is per GPU. With SLURM launch as "
                "`srun qlight fit ...` and set trainer.num_nodes to the node count.",
                "trainer": {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "sync_batchnorm": True},
            },
        ),
        (
            "logger/csv_only.yaml",
            {
                "_comment": "Log to CSV only (no W&B).",
                "trainer": {
                    "logger": [{"class_path": "qlight.loggers.CSVLogger", "init_args": {"save_dir": "logs"}}]
                },
            },
        ),
    ]


def deep_merge(base: dict[str, Any], extra: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        where = f"{path}.{key}" if path else key
        if where == "trainer.callbacks":
            out[key] = out.get(key, []) + copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _method_modules() -> list[list[Experiment]]:
    lists = []
    for name in ("configs_bcgd", "configs_aqe", "configs_imagenet"):
        file = Path(__file__).with_name(f"{name}.py")
        if file.exists():
            spec = importlib.util.spec_from_file_location(name, file)
            assert spec and spec.loader
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            lists.append(module.experiments())
    return lists


def render(rel_path: str, partial: dict[str, Any]) -> str:
    partial = dict(partial)
    comment = partial.pop("_comment", "")
    if rel_path.startswith(("trainer/", "logger/")):
        config = partial
    else:
        config = deep_merge(shared_blocks(rel_path.split("/")[0]), partial)
        if has_quantized_parts(config):
            config["trainer"]["callbacks"].append(copy.deepcopy(DIAGNOSTICS))
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    header += "# Generated by scripts/make_configs.py: edit the table there, not this file.\n"
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)


def all_configs() -> dict[str, str]:
    """Relative path -> YAML text; later lists override earlier ones with the same path."""
    table: dict[str, str] = {}
    for experiments in [float_experiments(), ste_experiments(), fragments(), *_method_modules()]:
        for rel_path, partial in experiments:
            table[rel_path] = render(rel_path, partial)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if configs/ differs from the table")
    args = parser.parse_args(argv)
    stale = []
    for rel_path, text in all_configs().items():
        target = CONFIGS / rel_path
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(rel_path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if stale:
        print("configs out of date (run python scripts/make_configs.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
