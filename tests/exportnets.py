"""Networks and checkpoints for the export tests, among them networks whose float32 arithmetic is exact.

:data:`NETWORKS` are the networks of issue 14; :func:`random_task` gives one ordinary float parameters and
non-trivial BatchNorm statistics and α, :func:`exact_task` the exact-arithmetic parameters below, and
:func:`save_checkpoint` writes it as ``qlight fit`` would. :func:`run_export` runs ``qlight export``.

Exact arithmetic, for bit-exact deployment-parity tests:

Two correct float32 implementations of a quantized network (PyTorch's and onnxruntime's convolutions
sum in different orders) may pick neighbouring quantization levels for a pre-activation that lies
within rounding of a level boundary; a test on such a network could flip with the CPU it runs on.
Here every number the network computes has few significant bits, so every sum is exact in any
order and a correct export must give *exactly* the PyTorch logits:

- inputs are multiples of 1/32 in [-4, 4] (:func:`exact_inputs`, :class:`ExactCifar10DataModule`);
- binary weights have a power-of-two scale (all latent magnitudes equal), ternary weights keep exactly
  half of the entries (scale = half a power of two), unscaled quantizers need nothing, float weights and
  biases are multiples of 1/16;
- activation resolutions α are multiples of 1/8;
- BatchNorm statistics come from a real forward pass (so activations use every level), rounded to
  3 significant bits (mean) and to ``4^k - eps`` (variance, so that ``1/sqrt(var + eps)`` is ``2^-k``);
  γ and β are random multiples of 1/8 and 1/16.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from torch import Tensor, nn

from qlight.data import CIFAR10DataModule
from qlight.export import main as export_main
from qlight.models.convnet import minw_quant
from qlight.quant import QuantAct, QuantSpec, quant_layers
from qlight.tasks import ImageClassifier

ALPHAS = (0.25, 0.375, 0.5, 0.625, 0.75)


def dyadic(shape: tuple[int, ...], lo: float, hi: float, step: float, generator: torch.Generator) -> Tensor:
    """Uniformly random multiples of ``step`` in ``[lo, hi]``."""
    n = round((hi - lo) / step)
    return torch.randint(0, n + 1, shape, generator=generator).float() * step + lo


def exact_inputs(n: int, seed: int = 0) -> Tensor:
    """``n`` CIFAR-sized inputs with values that are multiples of 1/32 in [-4, 4]."""
    return dyadic((n, 3, 32, 32), -4.0, 4.0, 1 / 32, torch.Generator().manual_seed(seed))


def _few_bits(x: Tensor, bits: int = 3) -> Tensor:
    exponent = torch.floor(torch.log2(x.abs().clamp(min=1e-30)))
    quantum = 2.0 ** (exponent - bits + 1)
    return torch.where(x == 0, x, torch.round(x / quantum) * quantum)


def _variance_for(power: float, eps: float) -> float:
    """A float32 ``v`` with ``fl(v + eps) == power`` exactly."""
    target, e = torch.tensor(power), torch.tensor(eps)
    v = target - e
    for _ in range(16):
        if v + e == target:
            return float(v)
        v = torch.nextafter(v, torch.tensor(math.inf if v + e < target else -math.inf))
    raise AssertionError(f"no float32 variance gives {power} after adding {eps}")


@torch.no_grad()
def make_exact(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set the parameters and BatchNorm statistics of a (quantized) network as the module docstring says."""
    g = torch.Generator().manual_seed(seed)
    kinds = {id(layer): layer.weight_quantizer.quantizer for _, layer in quant_layers(model)}
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = m.weight
            sign = torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
            kind = kinds.get(id(m), "float")
            if kind == "binary":
                w.copy_(sign * 2.0 ** -int(torch.randint(1, 4, (), generator=g)))
            elif kind == "ternary":
                magnitude = torch.full((w.numel(),), 1 / 32)
                magnitude[torch.randperm(w.numel(), generator=g)[: w.numel() // 2]] = 0.5
                w.copy_(sign * magnitude.view_as(w))
            elif kind == "float":
                w.copy_(dyadic(tuple(w.shape), -1.0, 1.0, 1 / 16, g))
            else:  # unscaled quantizers (sign, ternary_unit, pow2_unit): any non-zero latent values
                w.copy_((dyadic(tuple(w.shape), -1.0, 1.0, 1 / 64, g) + sign / 128).clamp(-1, 1))
            if m.bias is not None:
                m.bias.copy_(dyadic(tuple(m.bias.shape), -0.5, 0.5, 1 / 16, g))
        elif isinstance(m, QuantAct):
            m.alpha.fill_(ALPHAS[int(torch.randint(0, len(ALPHAS), (), generator=g))])
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.copy_(dyadic(tuple(m.weight.shape), 0.5, 1.5, 1 / 8, g))
            m.bias.copy_(dyadic(tuple(m.bias.shape), -0.5, 0.5, 1 / 16, g))
            m.momentum = None  # cumulative average: one pass stores that batch's statistics
            m.reset_running_stats()
    model.train()(exact_inputs(32, seed))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.momentum = 0.1
            m.running_mean.copy_(_few_bits(m.running_mean))
            powers = 4.0 ** torch.round(torch.log(m.running_var.clamp(min=1e-6)) / math.log(4))
            m.running_var.copy_(torch.tensor([_variance_for(float(p), m.eps) for p in powers]))
    return model.eval()


class ExactCifar10DataModule(CIFAR10DataModule):
    """CIFAR-10 whose batches are normalised to ``(pixel - 128) / 32``, exact in float32 (test fixture)."""

    def on_after_batch_transfer(
        self, batch: tuple[Tensor, Tensor], dataloader_idx: int
    ) -> tuple[Tensor, Tensor]:
        images, labels = batch
        return (images.float() - 128) / 32, labels


# the networks of issue 14: name -> (architecture, quantization spec or None)
NETWORKS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "resnet20_w1a4": ("resnet20", {"weight": "binary", "act": "relu_quant", "a_bits": 4}),
    "vgg11_w2a4": ("vgg11", {"weight": "ternary", "w_bits": 2, "act": "relu_quant", "a_bits": 4}),
    "convnet_d_w1a1": ("convnet_d", minw_quant(1, 1)),
    "convnet_d_w3a3": ("convnet_d", minw_quant(3, 3)),
    "resnet20_float": ("resnet20", None),
}


def _task(name: str) -> ImageClassifier:
    arch, spec = NETWORKS[name]
    return ImageClassifier(model=arch, quant=QuantSpec(**spec) if spec else None)


@torch.no_grad()
def random_task(name: str, seed: int = 0) -> ImageClassifier:
    """A network of :data:`NETWORKS` with float BN statistics from a training pass, random BN affine and α,
    and a training-time blend (``mix``) that eval must ignore; in eval mode."""
    torch.manual_seed(seed)
    task = _task(name)
    task.model.train()(torch.randn(8, 3, 32, 32))
    for m in task.model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
        if isinstance(m, QuantAct):
            m.alpha.mul_(torch.empty(()).uniform_(0.6, 1.6))
    for _, layer in quant_layers(task.model):
        layer.weight_quantizer.set_mix(0.5)
    return task.eval()


def exact_task(name: str, seed: int = 0) -> ImageClassifier:
    """A network of :data:`NETWORKS` with exact float32 arithmetic (:func:`make_exact`), in eval mode."""
    task = _task(name)
    make_exact(task.model, seed)
    return task.eval()


def save_checkpoint(task: ImageClassifier, path: Path, data_root: Path | None) -> Path:
    """A Lightning checkpoint as qlight fit writes it (no optimizer state); with ``data_root``, it names an
    :class:`ExactCifar10DataModule` on that root as the run's data."""
    checkpoint: dict[str, Any] = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 3,
        "global_step": 42,
    }
    if data_root is not None:
        checkpoint["datamodule_hyper_parameters"] = {
            "_class_path": f"{ExactCifar10DataModule.__module__}.{ExactCifar10DataModule.__qualname__}",
            "root": str(data_root),
            "batch_size": 8,
        }
    torch.save(checkpoint, path)
    return path


def run_export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``qlight export`` as the console script does; return (exit status, stdout, stderr)."""
    try:
        export_main(args)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
