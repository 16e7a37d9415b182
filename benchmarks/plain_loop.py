"""The reference a researcher compares qlight with: a hand-written PyTorch training loop.

No Lightning, no DataModule: the variant's model (``benchmarks/variants.py``: float, W1A4 STE, W1A4 BCGD,
ConvNet-D AQE W1A1) with device-resident random data, forward, loss, backward, the method's weight edits
(BCGD's blend, AQE's clip, the alpha projection: the same qlight functions the callbacks call) and the
optimizer step (fused on CUDA), timed per step after a warm-up. Modes:

* ``eager``: plain PyTorch;
* ``compile``: ``model.compile()`` (forward and backward compiled), default mode;
* ``cudagraphs``: ``model.compile(mode="reduce-overhead")``, which replays CUDA graphs (GPU only): the same
  compilation ``configs/trainer/gpu_fast.yaml`` asks of qlight, so both share the compiled graphs.

For each mode it prints ms/step, images/s, seconds per 50,000-image epoch and the QAT/float ratio (the brief's
reference on an H100: ~1.3 s per float and ~1.6 s per W1A4 CIFAR-10 epoch with CUDA graphs). Examples::

    python benchmarks/plain_loop.py --device cpu --steps 5 --modes eager
    python benchmarks/plain_loop.py --device cuda --modes eager cudagraphs --batch-size 128 512
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from variants import VARIANTS, PlainStep, make_task

MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(
    name: str, mode: str, device: torch.device, batch: int, steps: int, warmup: int, channels_last: bool = False,
    backend: str = "inductor", tiny: bool = False,
) -> dict[str, Any]:
    """Warm-up seconds (compilation, capture) and steady ms/step of one variant in the plain loop."""
    task, _ = make_task(name, tiny=tiny)
    model = task.model.to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if MODES[mode] is not None:
        model.compile(mode=MODES[mode] if backend == "inductor" else None, backend=backend)
    step = PlainStep(name, model, device, keep_grads=mode == "cudagraphs")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        step.forward_backward(x, y)
        step.update()
    _sync(device)
    seconds = time.perf_counter() - start
    if warmup == 0:
        warm = 0.0
    ms = seconds / steps * 1e3
    return {"warmup_s": warm, "ms_per_step": ms, "images_per_s": batch / (ms / 1e3), "epoch_s": 50_000 / (batch / (ms / 1e3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=list(MODES))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if "cudagraphs" in args.modes and device.type != "cuda":
        parser.error("--modes cudagraphs needs --device cuda")

    results: dict[str, Any] = {}
    for mode in args.modes:
        for batch in args.batch_size:
            row = {}
            for name in ["float", *[v for v in args.variants if v != "float"]]:
                row[name] = time_variant(name, mode, device, batch, args.steps, args.warmup, args.channels_last)
                torch._dynamo.reset()
            results[f"{mode}/b{batch}"] = row
            for name, r in row.items():
                print(
                    f"{mode:>10} b{batch:<4} {name:>20}: {r['ms_per_step']:7.2f} ms/step  {r['images_per_s']:9.0f} img/s"
                    f"  {r['epoch_s']:6.2f} s/epoch  x{r['ms_per_step'] / row['float']['ms_per_step']:.2f} of float"
                    f"  (warm-up {r['warmup_s']:.1f} s)"
                )
    print(json.dumps({"device": str(device), "ms_per_step": results}))


if __name__ == "__main__":
    main()
