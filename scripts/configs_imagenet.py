"""ImageNet ResNet-18 recipes for ``scripts/make_configs.py``: float, and BCGD against BinaryConnect at W1A4.

The BCGD paper's ImageNet recipe is not published (``BCGD.md`` §4, "recipe UNVERIFIED"); what is seen: ResNet-18,
binary weights and 4-bit learned-resolution activations, 80 epochs with LR drops near epochs 50 and 70, 64.36%
top-1 with every layer quantized and 65.46% with the first and last layer float. These configs reconstruct it
with documented defaults: start from the float ResNet-18 (``--model.init_from``), SGD momentum 0.9, lr 0.01
(a tenth of the float run's, since the network starts trained), weight decay 1e-4, x0.1 at epochs 50 and 70,
batch 256 (per device: use 64 with ``configs/trainer/ddp.yaml`` on 4 GPUs), ρ = 1e-5 as on CIFAR.
The float run is torchvision's reference recipe (90 epochs, lr 0.1, x0.1 every 30 epochs).
"""

from __future__ import annotations

from typing import Any

Experiment = tuple[str, dict[str, Any]]

ARCH = "torchvision.resnet18"
RHO = 1e-5


def sgd(lr: float, milestones: list[int]) -> dict[str, Any]:
    return {
        "optimizer": {
            "class_path": "torch.optim.SGD",
            "init_args": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-4},
        },
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.MultiStepLR",
            "init_args": {"milestones": milestones, "gamma": 0.1},
        },
    }


def quant_spec(first_last: str) -> dict[str, Any]:
    """Binary weights (mean|w| scale), 4-bit quantized ReLU with learned alpha; first conv and last
    linear ``quantized`` (the paper's headline) or ``float``."""
    return {
        "weight": "binary",
        "w_bits": 1,
        "act": "relu_quant",
        "a_bits": 4,
        "a_mode": "ceil",
        "x_rule": "clipped",
        "alpha_rule": "mean",
        "rate_factor": 0.01,
        "first_layer": first_last,
        "last_layer": first_last,
    }


def experiments() -> list[Experiment]:
    out: list[Experiment] = [
        (
            "imagenet/resnet18_float.yaml",
            {
                "_comment": "Float ResNet-18 on ImageNet, torchvision's reference recipe (SGD 0.1, momentum 0.9, "
                "wd 1e-4, 90 epochs, x0.1 every 30). Stage 1 of the BCGD flow.",
                "trainer": {"max_epochs": 90},
                "model": {
                    "class_path": "ImageClassifier",
                    "init_args": {"model": ARCH, **sgd(0.1, [30, 60])},
                },
            },
        )
    ]
    start = "Start from the float model: --model.init_from <float ckpt>. Recipe reconstructed (docs/bcgd.md)."
    for suffix, first_last, what in (
        ("", "quantized", "every layer quantized"),
        ("_fl", "float", "first/last float"),
    ):
        for method in ("bcgd", "ste"):
            name = "BCGD" if method == "bcgd" else "BinaryConnect/STE"
            partial: dict[str, Any] = {
                "_comment": f"{name} ResNet-18 W1A4 on ImageNet, {what}. {start}",
                "trainer": {"max_epochs": 80},
                "model": {
                    "class_path": "ImageClassifier",
                    "init_args": {
                        "model": ARCH,
                        "quant": quant_spec(first_last),
                        "alpha_calibration_steps": 1,
                        "alpha_lr_factor": 0.1,
                        **sgd(0.01, [50, 70]),
                    },
                },
            }
            if method == "bcgd":
                partial["trainer"]["callbacks"] = [
                    {"class_path": "BCGD", "init_args": {"rho": RHO, "rho_growth": 1.0, "rho_max": 0.01}}
                ]
            out.append((f"imagenet/resnet18_{method}_w1a4{suffix}.yaml", partial))
    return out
