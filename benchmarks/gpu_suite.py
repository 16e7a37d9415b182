"""One command for a short GPU window: qlight's training speed beside a hand-written loop, warm-up apart.

For each variant (``benchmarks/variants.py``: float, W1A4 STE, W1A4 BCGD ResNet-20; ConvNet-D AQE W1A1) and
batch size it measures three paths on the same device:

* ``plain``: the hand-written loop of ``benchmarks/plain_loop.py`` with CUDA graphs
  (``model.compile(mode="reduce-overhead")``) and fused optimizers: the reference researchers compare with;
* ``eager``: ``Trainer.fit`` of qlight's ``ImageClassifier`` with the method callbacks, eager;
* ``gpu_fast``: the same with ``configs/trainer/gpu_fast.yaml``'s settings (compiled forward+backward with
  CUDA graphs, channels-last).

Each reports warm-up seconds (compilation, graph capture, cudnn autotuning: the first ``--warmup`` steps)
apart from the steady state: images/s, seconds per 50,000-image CIFAR epoch, and the QAT/float ratio of the
same path. Data are random CIFAR-shaped batches resident on the device (the DataModule's loader alone runs at
~200k images/s on an H100, far above any training speed here). Results go to ``--out`` as ``gpu_suite.json``
and ``gpu_suite.md``. ``--budget-s`` stops starting new measurements once spent (they are listed as skipped),
so the suite fits a short device window; the most informative measurements run first.

Examples::

    python benchmarks/gpu_suite.py --out results/gpu                   # one H100/H200, ~5-8 minutes
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/s    # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from plain_loop import time_variant
from torch.utils.data import DataLoader
from variants import VARIANTS, make_task

from qlight.callbacks.throughput import Throughput

PATHS = ("gpu_fast", "plain", "eager")


class DeviceBatches(torch.utils.data.Dataset):
    """``n`` ready batches on the device (the loader copies nothing)."""

    def __init__(self, n: int, batch: int, device: torch.device, channels_last: bool) -> None:
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.items = [(x, y)] * n

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def time_qlight(
    name: str, fast: bool, device: torch.device, batch: int, steps: int, warmup: int, backend: str,
    tiny: bool = False,
) -> dict[str, Any]:
    """``Trainer.fit`` of a variant: warm-up seconds and steady ms/step from the Throughput callback."""
    kwargs: dict[str, Any] = {}
    if fast:
        kwargs = {"compile": True, "compile_mode": "reduce-overhead", "channels_last": True, "compile_backend": backend}
    task, callbacks = make_task(name, tiny=tiny, **kwargs)
    timer = Throughput(warmup_steps=warmup)
    trainer = Trainer(
        accelerator=device.type, devices=1, max_epochs=1, precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=50, callbacks=[timer, *callbacks],
    )
    data = DeviceBatches(warmup + steps, batch, device, channels_last=fast)
    trainer.fit(task, DataLoader(data, batch_size=None))
    record = timer.records[-1]
    ms = record["epoch_s"] / record["steady_steps"] * 1e3
    return {
        "warmup_s": timer.warmup_s, "ms_per_step": ms, "images_per_s": record["images_per_s"],
        "epoch_s": 50_000 / record["images_per_s"],
    }


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node(), "cpu_count": __import__("os").cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def markdown(results: dict[str, Any]) -> str:
    """One table per batch size: rows variant × path; images/s, s/epoch, QAT/float, warm-up."""
    hw = results["hardware"]
    lines = [
        (f"Hardware: {hw.get('gpu', hw['device'])}, torch {hw['torch']}, Lightning {hw.get('lightning', '?')}, "
        f"Python {hw['python']}. Steady state after {results['settings']['warmup']} warm-up steps, "
        f"{results['settings']['steps']} timed steps; fp32; random device-resident CIFAR-shaped data."),
        "",
    ]
    for batch, rows in results["measurements"].items():
        lines += [
            f"**Batch {batch}**",
            "",
            "| variant | path | images/s | s/epoch (50k) | QAT/float | warm-up s |",
            "|---|---|---|---|---|---|",
        ]
        for name in VARIANTS:
            for path in PATHS:
                r = rows.get(path, {}).get(name)
                if r is None:
                    continue
                if "skipped" in r or "error" in r:
                    lines.append(f"| {name} | {path} | {r.get('skipped') or r.get('error')} | | | |")
                    continue
                ratio = r.get("qat_over_float")
                lines.append(
                    f"| {name} | {path} | {r['images_per_s']:,.0f} | {r['epoch_s']:.2f} | "
                    f"{'' if ratio is None else f'{ratio:.2f}'} | {r['warmup_s']:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=15, help="steps before timing (compile, capture)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no measurement after this many seconds")
    parser.add_argument(
        "--tiny", action="store_true",
        help="smoke test: small networks of the same kinds, batch 4, 2 steps, compile backend aot_eager",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = "inductor"
    if args.tiny:
        args.batch_size, args.steps, args.warmup, backend = [4], 2, 1, "aot_eager"
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type != "cuda" and not args.tiny:
        print("note: without CUDA the plain loop runs compiled without CUDA graphs", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    results: dict[str, Any] = {
        "hardware": hardware(device),
        "settings": {"steps": args.steps, "warmup": args.warmup, "compile_backend": backend},
        "measurements": {},
    }
    order = ["float", *[v for v in args.variants if v != "float"]]
    for batch in args.batch_size:
        rows: dict[str, dict[str, Any]] = {path: {} for path in args.paths}
        results["measurements"][str(batch)] = rows
        for path in args.paths:
            for name in order:
                if time.perf_counter() - start > args.budget_s:
                    rows[path][name] = {"skipped": "time budget spent"}
                    continue
                try:
                    if path == "plain":
                        mode = "cudagraphs" if device.type == "cuda" else "compile"
                        r = time_variant(name, mode, device, batch, args.steps, args.warmup, True, backend, args.tiny)
                    else:
                        r = time_qlight(
                            name, path == "gpu_fast", device, batch, args.steps, args.warmup, backend, args.tiny
                        )
                except Exception as err:  # noqa: BLE001 - one failing cell must not lose the others
                    r = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                rows[path][name] = r
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                ok = "error" not in r
                print(
                    f"b{batch} {path:>8} {name:>20}: "
                    + (f"{r['images_per_s']:9.0f} img/s {r['epoch_s']:6.2f} s/epoch warm-up {r['warmup_s']:.1f} s"
                       if ok else r["error"]),
                    flush=True,
                )
            base = rows[path].get("float", {})
            for r in rows[path].values():
                if "ms_per_step" in r and "ms_per_step" in base:
                    r["qat_over_float"] = r["ms_per_step"] / base["ms_per_step"]
    results["wall_s"] = time.perf_counter() - start
    (out / "gpu_suite.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_suite.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
