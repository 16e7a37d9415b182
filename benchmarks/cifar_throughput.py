"""CIFAR throughput of qlight as users run it: loader-only and Lightning training images/s.

Prints, for one model and batch size on CPU or GPU:
  * loader: uint8 batches from the DataModule, copied to the device, augmented and normalized there;
  * train: full ``Trainer.fit`` optimizer steps (forward, backward, step, callbacks, logging) of the
    float model and of each requested quantized spec, and the QAT/float step-time ratio.

Examples::

    python benchmarks/cifar_throughput.py --device cpu --steps 20
    python benchmarks/cifar_throughput.py --device cuda --data-root ../shared/data/cifar10-jpeg.zip \
        --precision bf16-mixed --channels-last --compile --quant w1a4 --method bcgd

Without ``--data-root`` the data are random uint8 images held in memory (the same code path after
decoding). Timing starts after ``--warmup`` steps (compilation, cudnn autotuning) and brackets
``--steps`` optimizer steps with device synchronisation at both ends only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from qlight.data import CIFAR10DataModule, normalize, random_crop_flip
from qlight.data.cifar import TensorBatchDataset
from qlight.quant import QuantSpec
from qlight.tasks import ImageClassifier

SPECS = {
    "w1a4": {"weight": "binary", "w_bits": 1, "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
    "w2a4": {"weight": "ternary", "w_bits": 2, "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
    "w4a4": {"weight": "uniform", "w_bits": 4, "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time of optimizer steps ``warmup .. warmup+steps`` (synchronised only at both ends)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.seconds = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps:
            _sync(pl_module.device)
            self.seconds = time.perf_counter() - self.start


class RandomCIFAR10(CIFAR10DataModule):
    """The CIFAR-10 DataModule's loader and augmentation code over random in-memory images: no files and
    no download (``prepare_data``/``setup`` keep the datasets set at construction)."""

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str) -> None:
        pass


def make_datamodule(args: argparse.Namespace, n_images: int) -> CIFAR10DataModule:
    if args.data_root:
        dm = CIFAR10DataModule(
            args.data_root, batch_size=args.batch_size, channels_last=args.channels_last, num_workers=args.num_workers
        )
        dm.setup("fit")
        return dm
    # random images through the same loader code (download=True only skips the root check; nothing is fetched)
    dm = RandomCIFAR10(".", download=True, batch_size=args.batch_size, channels_last=args.channels_last,
                       num_workers=args.num_workers)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    dm.train_dataset = dm.val_dataset = dm.test_dataset = TensorBatchDataset(images, labels)
    return dm


def loader_throughput(dm: CIFAR10DataModule, device: torch.device, batches: int) -> float:
    """Images/s of DataLoader -> device copy -> crop/flip -> normalize."""
    mean, std = torch.tensor(dm.mean, device=device), torch.tensor(dm.std, device=device)
    seen, start = 0, 0.0
    loader = dm.train_dataloader()
    for i, (x, y) in enumerate(loader):
        if i == 5:
            _sync(device)
            start, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        x = normalize(random_crop_flip(x), mean, std, channels_last=dm.channels_last)
        seen += x.shape[0]
        if i == 5 + batches:
            break
    _sync(device)
    return seen / (time.perf_counter() - start)


def train_throughput(args: argparse.Namespace, dm: CIFAR10DataModule, spec: dict | None, method: str) -> float:
    """Images/s of ``Trainer.fit`` steps for one spec (``None``: float)."""
    torch.manual_seed(0)
    model = ImageClassifier(
        model=args.model,
        quant=QuantSpec(**spec) if spec else None,
        channels_last=args.channels_last,
        compile=args.compile,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    )
    timer = StepTimer(args.warmup, args.steps)
    callbacks: list[Callback] = [timer]
    if method == "bcgd" and spec:
        from qlight.callbacks import BCGD

        callbacks.append(BCGD(rho=1e-5))
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm)
    return args.steps * args.batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root/zip; random images when omitted")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--precision", default="32-true", help="32-true | bf16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quant", nargs="*", default=["w1a4"], choices=sorted(SPECS), help="QAT specs to time")
    parser.add_argument("--method", default="ste", choices=["ste", "bcgd"], help="QAT update rule")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    n_images = args.batch_size * (args.warmup + args.steps + 8)
    dm = make_datamodule(args, n_images)
    results: dict[str, Any] = {"args": vars(args), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    results["loader_images_per_s"] = loader_throughput(dm, device, min(args.steps, len(dm.train_dataset) // args.batch_size - 7))
    print(f"loader: {results['loader_images_per_s']:,.0f} images/s")
    float_ips = train_throughput(args, dm, None, "float")
    results["float_images_per_s"] = float_ips
    print(f"train float {args.model}: {float_ips:,.0f} images/s  ({50000 / float_ips:.2f} s per 50k-image epoch)")
    for name in args.quant:
        ips = train_throughput(args, dm, SPECS[name], args.method)
        results[f"{name}_images_per_s"] = ips
        results[f"{name}_ratio"] = float_ips / ips
        print(
            f"train {args.method} {name} {args.model}: {ips:,.0f} images/s  ({50000 / ips:.2f} s/epoch)  "
            f"QAT/float step-time ratio {float_ips / ips:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
