"""Per-step framework overhead: what a training step costs beyond the network's own arithmetic.

Small CIFAR networks on a fast GPU are bound by Python and kernel launches, not FLOPs, so every
millisecond the training loop adds per step shows up in the epoch time. This script times the same
tiny network (one conv, BN, ReLU, linear head on 4x4 images) four ways:

* ``plain``: a hand-written PyTorch loop (forward, loss, backward, SGD step);
* ``lightning``: a minimal LightningModule under ``Trainer.fit`` (Lightning's own loop overhead);
* ``qlight_float`` / ``qlight_w1a4``: :class:`qlight.tasks.ImageClassifier` as the CLI runs it
  (logging, training accuracy, non-finite check; quantized layers and alpha clamping for W1A4),
  plus ``qlight_bcgd`` with the BCGD callback.

It prints milliseconds per step and the overhead over the plain loop. Examples::

    python benchmarks/step_overhead.py                # CPU, one thread
    python benchmarks/step_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from qlight.callbacks import BCGD
from qlight.models import list_models, register_model
from qlight.quant import QuantSpec
from qlight.tasks import ImageClassifier


class TinyNet(nn.Module):
    """Arithmetic small enough that the loop, not the network, dominates the step."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


if "overhead_tiny" not in list_models():
    register_model("overhead_tiny")(TinyNet)


class Minimal(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Seconds for the steps after ``warmup`` (device-synchronised at both ends only)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.seconds = 0.0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def plain_loop(loader: DataLoader, device: torch.device, warmup: int) -> float:
    net = TinyNet().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start


def lightning_fit(
    module: LightningModule, loader: DataLoader, device: torch.device, warmup: int, callbacks: list[Callback]
) -> float:
    timer = StepTimer(warmup)
    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(module, loader)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    n = (args.steps + args.warmup) * args.batch_size
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch_size, pin_memory=device.type == "cuda")
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    w1a4 = QuantSpec(weight="binary", act="relu_quant", a_bits=4, first_layer="quantized", last_layer="float")

    variants: dict[str, Callable[[], float]] = {
        "plain": lambda: plain_loop(loader, device, args.warmup),
        "lightning": lambda: lightning_fit(Minimal(), loader, device, args.warmup, []),
        "qlight_float": lambda: lightning_fit(
            ImageClassifier(model="overhead_tiny", optimizer=sgd), loader, device, args.warmup, []
        ),
        "qlight_w1a4": lambda: lightning_fit(
            ImageClassifier(model="overhead_tiny", optimizer=sgd, quant=w1a4), loader, device, args.warmup, []
        ),
        "qlight_bcgd": lambda: lightning_fit(
            ImageClassifier(model="overhead_tiny", optimizer=sgd, quant=w1a4),
            loader,
            device,
            args.warmup,
            [BCGD(rho=1e-5)],
        ),
    }
    results = {
        name: min(run() for _ in range(args.repeats)) / args.steps * 1e3 for name, run in variants.items()
    }
    for name, ms in results.items():
        print(f"{name:>13}: {ms:6.3f} ms/step  (+{ms - results['plain']:.3f} over plain)")
    print(json.dumps({"device": str(device), "batch_size": args.batch_size, "ms_per_step": results}))


if __name__ == "__main__":
    main()
