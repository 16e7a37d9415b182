"""MINW-Net / AQE experiments: the cells of Tables I (CIFAR-10) and II (CIFAR-100) of Chen et al. 2020.

Read by ``scripts/make_configs.py`` (``experiments()``), which merges each partial config over the shared
trainer/logger/data blocks. Recipe (``AQE.md`` §3, ``docs/aqe.md``): Adam lr 0.01 with per-epoch exponential
decay to 1e-4 after 200 epochs, batch 256, 200 epochs, from scratch, 5k training images held out for
validation; AQE with the R1 alpha ramp and latent weights clipped to [-1, 1]. The STE rows (BNN) train the
same network with the clipped straight-through estimator, hard forward, and the same weight clipping.
"""

from __future__ import annotations

from typing import Any

from qlight.models.convnet import minw_quant

Experiment = tuple[str, dict[str, Any]]

ARCHS = ("convnet_a", "convnet_b", "convnet_c", "convnet_d")
#: (M-bit inputs, N-bit weights) rows of Tables I and II; 16 = float, 32/32 = no quantization layers
CELLS = tuple((m, n) for m in (1, 2, 3, 16) for n in (1, 2, 3, 16) if (m, n) != (16, 16))
FLOAT_CELL = (32, 32)
#: rows trained with STE as well: Table II's shaded "1/1 STE" row and the Fig. 5 curves, and 3/3 (the
#: best low-bit cell of Table I) as the STE baseline of configs/protocols/aqe_table1.yaml
STE_CELLS = ((1, 1), (3, 3))
EPOCHS = 200
LR, LR_END = 0.01, 1e-4
#: per-epoch factor of ExponentialLR: LR -> LR_END over EPOCHS epochs (the paper gives no rate)
LR_GAMMA = round((LR_END / LR) ** (1.0 / EPOCHS), 6)
#: R1, the figure-faithful alpha schedule: min(1, 0.5 + 0.5 e / 100)
ALPHA_R1 = {"law": "linear", "start": 0.5, "end": 1.0, "ramp": 100, "unit": "epoch"}


def adam_recipe() -> dict[str, Any]:
    """Adam(lr 0.01) with ExponentialLR stepping once per epoch (0.01 -> 1e-4 after 200 epochs)."""
    return {
        "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": LR}},
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.ExponentialLR",
            "init_args": {"gamma": LR_GAMMA},
        },
        "scheduler_interval": "epoch",
    }


def method_callbacks(method: str, quant: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Trainer callbacks of a method: AQE (alpha ramp + weight clip), or the BNN clip for STE."""
    if method == "aqe":
        return [{"class_path": "AQE", "init_args": {"alpha": dict(ALPHA_R1), "clip_weights": True}}]
    if method == "ste" and quant is not None and quant["weight"] != "float":
        return [{"class_path": "LatentWeightClip", "init_args": {"bound": 1.0}}]
    return []


def experiment(dataset: str, arch: str, m: int, n: int, method: str) -> Experiment:
    """One table cell: ``<dataset>/<arch>_<method>_w<N>a<M>.yaml`` (``<arch>_float.yaml`` for 32/32)."""
    if (m, n) == FLOAT_CELL:
        quant, name, what = None, f"{arch}_float", "32/32 float (no quantization layers)"
    else:
        quant = minw_quant(n, m, "aqe" if method == "aqe" else "clipped_ste")
        name = f"{arch}_{method}_w{n}a{m}"
        parts = "16-bit float" if 16 in (m, n) else "quantized"
        what = f"MINW-Net M/N = {m}/{n} ({parts} parts as in the table), "
        what += "AQE, alpha R1 ramp 0.5 -> 1 over 100 epochs" if method == "aqe" else "STE (BNN, clipped STE)"
    table = "I" if dataset == "cifar10" else "II"
    init: dict[str, Any] = {"model": arch, **adam_recipe()}
    if quant is not None:
        init["quant"] = quant
    config: dict[str, Any] = {
        "_comment": f"{arch} on {dataset}, {what}; Table {table} of Chen et al. 2020 (AQE/MINW-Net).\n"
        f"Adam lr {LR} x {LR_GAMMA}/epoch (-> {LR_END:g} at epoch {EPOCHS}), batch 256, {EPOCHS} epochs, "
        "from scratch, 5k train images held out for validation; report test accuracy of the best checkpoint.",
        "trainer": {"max_epochs": EPOCHS},
        "data": {"init_args": {"batch_size": 256, "val_split": 0.1}},
        "model": {"class_path": "ImageClassifier", "init_args": init},
    }
    callbacks = method_callbacks(method, quant)
    if callbacks:
        config["trainer"]["callbacks"] = callbacks
    return f"{dataset}/{name}.yaml", config


def experiments() -> list[Experiment]:
    """Every cell of Tables I and II for Models A-D (AQE), the 1/1 STE rows and the 32/32 float rows."""
    out = []
    for dataset in ("cifar10", "cifar100"):
        for arch in ARCHS:
            out += [experiment(dataset, arch, m, n, "aqe") for m, n in CELLS]
            out += [experiment(dataset, arch, m, n, "ste") for m, n in STE_CELLS]
            out.append(experiment(dataset, arch, *FLOAT_CELL, "float"))
    return out
