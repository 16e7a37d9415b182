"""BCGD recipes (Yin et al., arXiv 1808.05240) for ``scripts/make_configs.py``: the ``model:`` section and the
method callbacks of every CIFAR-10 experiment of the paper's table, BCGD against BinaryConnect.

The authors' code recipe (``BCGD.md`` §4): SGD lr 0.1, momentum 0.95, weight decay 1e-4 on every group
(alpha included), 200 epochs, batch 128, every conv quantized (the first included), the last linear float,
4-bit activations (ceil quantized ReLU, clipped-ReLU STE, 'mean' alpha-rule, rate_factor 0.01), rho = 1e-5
constant, training from the float model of the same architecture (``--model.init_from``). One deliberate
difference: the LR is decayed x0.1 at epochs 80/140, which the released code intends but never applies to
its quantized runs (``BCGD.md`` §7 #1; see ``docs/bcgd.md``).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

Experiment = tuple[str, dict[str, Any]]

ARCHS = ("resnet20", "resnet32", "resnet44", "vgg11")
#: weight bits -> quantizer (BCGD.md §1: binary = mean|w|·sign, ternary = the code's scale, 4-bit uniform)
WEIGHTS: dict[int, dict[str, Any]] = {
    1: {"weight": "binary", "w_bits": 1},
    2: {"weight": "ternary", "w_bits": 2},
    4: {"weight": "uniform", "w_bits": 4},
}
RHO = 1e-5


@functools.cache
def _make_configs() -> Any:
    """``scripts/make_configs.py`` as a module (for its shared SGD recipe), whoever imports this file."""
    spec = importlib.util.spec_from_file_location("make_configs", Path(__file__).with_name("make_configs.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quant_spec(w_bits: int, a_bits: int = 4) -> dict[str, Any]:
    """The authors' quantization: every conv (first included) at ``w_bits``, last linear float,
    quantized ReLU."""
    return {
        **WEIGHTS[w_bits],
        "act": "relu_quant",
        "a_bits": a_bits,
        "a_mode": "ceil",
        "x_rule": "clipped",
        "alpha_rule": "mean",
        "rate_factor": 0.01,
        "first_layer": "quantized",
        "last_layer": "float",
    }


def model_section(arch: str, w_bits: int) -> dict[str, Any]:
    """``model:`` of a quantized run. alpha starts as max|x|/L of the first batch (the float checkpoint of
    the authors' flow carries exactly that calibration) and is learned from then on (their ``stage=0``).

    alpha learns at a tenth of the weights' rate: with the authors' full rate (lr 0.1, momentum 0.95) alpha
    of the last blocks hit its 1e-3 floor within ~20 steps in our CIFAR-10 runs and silenced those layers
    (docs/bcgd.md, "alpha stability"); ``--model.alpha_lr_factor 1`` restores the authors' setting."""
    return {
        "class_path": "ImageClassifier",
        "init_args": {
            "model": arch,
            "quant": quant_spec(w_bits),
            "alpha_calibration_steps": 1,
            "alpha_lr_factor": 0.1,
            **_make_configs().sgd_recipe(momentum=0.95),
        },
    }


def bcgd_callback(rho: float = RHO) -> dict[str, Any]:
    """The BCGD entry of ``trainer.callbacks`` (constant rho, as the authors' README)."""
    return {"class_path": "BCGD", "init_args": {"rho": rho, "rho_growth": 1.0, "rho_max": 0.01}}


def experiments() -> list[Experiment]:
    """(relative path, partial config) of every BCGD/BinaryConnect experiment, plus the 'br' variant."""
    out: list[Experiment] = []
    start = "Start from the float model: --model.init_from <float ckpt> (docs/bcgd.md)."
    for arch in ARCHS:
        for w_bits in WEIGHTS:
            tag = f"W{w_bits}A4"
            out.append(
                (
                    f"cifar10/{arch}_bcgd_w{w_bits}a4.yaml",
                    {
                        "_comment": f"BCGD {arch} {tag} on CIFAR-10 (rho={RHO:g}): the authors' code "
                        f"recipe with the LR decayed x0.1 at 80/140. {start}",
                        "model": model_section(arch, w_bits),
                        "trainer": {"callbacks": [bcgd_callback()]},
                    },
                )
            )
            out.append(
                (
                    f"cifar10/{arch}_ste_w{w_bits}a4.yaml",
                    {
                        "_comment": f"BinaryConnect/STE {arch} {tag} on CIFAR-10 (BCGD with rho = 0): the "
                        f"BCGD recipe without blending. {start}",
                        "model": model_section(arch, w_bits),
                    },
                )
            )
    out.append(
        (
            "cifar10/resnet20_br_w1a4.yaml",
            {
                "_comment": "BinaryRelax + BCGD (the authors' 'br'): relaxed weights "
                "(eta Q(w) + w)/(1 + eta), eta x1.02 twice per epoch counted as the authors' code does "
                "(eta = 1.02^(2e + 1 + [batch >= 196])) until epoch 150, then exact "
                f"quantization; blending toward them. {start}",
                "model": model_section("resnet20", 1),
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "BinaryRelax",
                            "init_args": {
                                "eta0": 1.0, "eta_growth": 1.02, "eta_every": None, "switch_epoch": 150,
                                "eta_counter": "authors",
                            },
                        },
                        bcgd_callback(),
                    ]
                },
            },
        )
    )
    return out
