"""Quantized vs float training step in a plain PyTorch loop: what ``qlight.quant`` itself costs.

No Lightning, no DataModule: a CIFAR ResNet (or any registered model) with GPU-resident random
data, the optimizer step included, timed per step after a warm-up. Modes:

* ``eager``: plain PyTorch;
* ``compile``: ``torch.compile`` (default mode);
* ``cudagraphs``: ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs (GPU only).

For each mode it prints ms/step of the float model, of each quantized spec, and the QAT/float
ratio: the number to compare with the brief's (a plain loop with CUDA graphs: ~1.3 s per float
and ~1.6 s per W1A4 CIFAR-10 epoch on an H100). Examples::

    python benchmarks/plain_loop.py --device cpu --steps 5 --modes eager
    python benchmarks/plain_loop.py --device cuda --modes eager compile cudagraphs --precision bf16
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from qlight.models import build_model
from qlight.quant import QuantSpec, quantize_model

SPECS: dict[str, dict[str, Any] | None] = {
    "float": None,
    "w1a4": {"weight": "binary", "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
    "w2a4": {"weight": "ternary", "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
    "w4a4": {"weight": "uniform", "w_bits": 4, "act": "relu_quant", "a_bits": 4, "last_layer": "float"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: nn.Module,
    mode: str,
    device: torch.device,
    batch: int,
    steps: int,
    warmup: int,
    dtype: torch.dtype | None,
) -> float:
    """Milliseconds per SGD step (forward, loss, backward, step) after ``warmup`` steps."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss.detach()

    forward_backward = step
    if mode == "compile":
        forward_backward = torch.compile(step)
    elif mode == "cudagraphs":
        forward_backward = torch.compile(step, mode="reduce-overhead")
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        forward_backward(x, y)
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers: CUDA graphs replay into them
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--quant", nargs="+", default=["w1a4"], choices=[k for k in SPECS if k != "float"])
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compile", "cudagraphs"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if "cudagraphs" in args.modes and device.type != "cuda":
        parser.error("--modes cudagraphs needs --device cuda")
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    results: dict[str, dict[str, float]] = {}
    for mode in args.modes:
        results[mode] = {}
        for name in ["float", *args.quant]:
            torch.manual_seed(0)
            model = build_model(args.model)
            spec = SPECS[name]
            if spec is not None:
                quantize_model(model, QuantSpec(**spec))
            results[mode][name] = time_steps(
                model, mode, device, args.batch_size, args.steps, args.warmup, dtype
            )
            torch._dynamo.reset()
        float_ms = results[mode]["float"]
        epoch = 50_000 // args.batch_size
        for name, ms in results[mode].items():
            print(
                f"{mode:>10} {name:>6}: {ms:7.2f} ms/step  ({ms * epoch / 1e3:5.1f} s per 50k-image epoch, "
                f"x{ms / float_ms:.2f} of float)"
            )
    print(
        json.dumps(
            {"device": str(device), "model": args.model, "precision": args.precision, "ms_per_step": results}
        )
    )


if __name__ == "__main__":
    main()
