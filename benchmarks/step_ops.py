"""ATen ops and host syncs per steady-state training step: what a GPU would launch, counted on the CPU.

Small CIFAR networks on a GPU are bound by kernel launches and host synchronisations, not arithmetic. Both
are exact and deterministic on any device (:mod:`qlight.opcount`): every ATen op that reaches the
dispatcher is a kernel launch on a GPU (views and allocations are counted apart: they launch nothing), and
every ``aten._local_scalar_dense`` is a device-to-host synchronisation.

Each variant runs a few CIFAR-shaped batches through ``Trainer.fit`` (the way ``qlight fit`` trains) and
through a plain PyTorch loop with the same model, optimizer and method, and reports the ops of the steady
non-logging steps, split by who launched them:

* ``model``: network forward, loss and backward (the part ``torch.compile`` and CUDA graphs take over);
* ``optimizer``: the optimizer step (and ``zero_grad``);
* ``callbacks``: the method callbacks (BCGD's blend, AQE's schedule and latent clip);
* ``task``: ``ImageClassifier``'s own bookkeeping (loss window, training hits, alpha projection);
* ``lightning``: Lightning's loop; ``data``: the DataModule's device-side augmentation (none here).

Variants: float and W1A4 (STE, BCGD) ResNet-20 with SGD, and ConvNet-D W1A1 with AQE and Adam. Budgets
(pinned by ``tests/test_step_ops.py``): W1A4 forward+backward at most 2.5x float, the blend at most 4 ops,
task + Lightning at most 15 ops, and no host sync on a non-logging step. Examples::

    python benchmarks/step_ops.py
    python benchmarks/step_ops.py --json ops.json --detail model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loops.optimization.automatic import Closure
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, Dataset
from variants import VARIANTS, PlainStep, make_task

import qlight.tasks.optim
from qlight.opcount import OpCounter

PHASES = ("model", "optimizer", "callbacks", "task", "lightning", "data")

class PreBatched(Dataset):
    """Ready-made CIFAR-shaped batches: the loader itself launches no op."""

    def __init__(self, batches: int, batch_size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [
            (torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(batches)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.items[i]


@contextlib.contextmanager
def _optimizer_phase(counter: OpCounter) -> Iterator[None]:
    """Attribute every optimizer step to ``optimizer`` (its closure pushes its own phases)."""
    pre = register_optimizer_step_pre_hook(lambda *a: counter.stack.append("optimizer"))
    post = register_optimizer_step_post_hook(lambda *a: counter.stack.pop())
    original = Closure.closure

    def closure(self: Closure, *args: Any, **kwargs: Any) -> Any:
        with counter.phase("lightning"):
            return original(self, *args, **kwargs)

    Closure.closure = closure  # type: ignore[method-assign]
    try:
        yield
    finally:
        Closure.closure = original  # type: ignore[method-assign]
        pre.remove()
        post.remove()


def _overridden_hooks(obj: Any, base: type) -> list[str]:
    names = [n for n in dir(base) if n.startswith(("on_", "training_step", "setup", "backward", "optimizer_"))]
    return [n for n in names if callable(getattr(obj, n, None)) and getattr(type(obj), n, None) is not getattr(base, n, None)]


class StepMarker(Callback):
    """Snapshots the counter at the start of every training batch (runs before the other callbacks)."""

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter
        self.marks: list[tuple[dict[str, Counter[str]], Counter[str], Counter[str]]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.marks.append((self.counter.snapshot(), Counter(self.counter.views), Counter(self.counter.syncs)))


def _diff(a: dict[str, Counter[str]], b: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    return {p: b.get(p, Counter()) - a.get(p, Counter()) for p in set(a) | set(b)}


def _step_record(marks: list[Any], i: int) -> dict[str, Any]:
    (ops0, views0, syncs0), (ops1, views1, syncs1) = marks[i], marks[i + 1]
    ops = _diff(ops0, ops1)
    return {
        "ops": {p: sum(ops.get(p, Counter()).values()) for p in PHASES},
        "views": {p: views1[p] - views0[p] for p in PHASES},
        "syncs": {p: syncs1[p] - syncs0[p] for p in PHASES},
        "detail": {p: dict(sorted(ops.get(p, Counter()).items())) for p in PHASES if ops.get(p)},
    }


def count_fit(variant: str, batch_size: int = 4, steps: int = 7, measured: tuple[int, int] = (3, 5)) -> dict[str, Any]:
    """Ops per phase of the training steps ``measured`` (batch indices, inclusive) under ``Trainer.fit``."""
    task, callbacks = make_task(variant)
    counter = OpCounter(default_phase="lightning")
    marker = StepMarker(counter)
    for cb in callbacks:
        for hook in _overridden_hooks(cb, Callback):
            counter.wrap(cb, hook, "callbacks")
    for hook in _overridden_hooks(task, LightningModule):
        counter.wrap(task, hook, "task")
    counter.wrap(task, "forward_loss", "model")
    counter.wrap(task, "backward", "model")
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=50,
        num_sanity_val_steps=0, callbacks=[marker, *callbacks],
    )
    loader = DataLoader(PreBatched(steps, batch_size), batch_size=None)
    with counter, _optimizer_phase(counter):
        trainer.fit(task, loader)
    records = [_step_record(marker.marks, i) for i in range(measured[0], measured[1] + 1)]
    _check_identical(variant, "fit", records)
    return records[0]


def count_plain(variant: str, batch_size: int = 4, steps: int = 7, measured: tuple[int, int] = (3, 5)) -> dict[str, Any]:
    """The same step in a hand-written loop (:class:`variants.PlainStep`)."""
    task, _ = make_task(variant)
    step = PlainStep(variant, task.model, torch.device("cpu"))
    counter = OpCounter(default_phase="lightning")
    marks = []
    data = PreBatched(steps, batch_size)
    with counter:
        for x, y in data.items:
            marks.append((counter.snapshot(), Counter(counter.views), Counter(counter.syncs)))
            with counter.phase("model"):
                step.forward_backward(x, y)
            with counter.phase("callbacks"):
                step.before_step()
            with counter.phase("optimizer"):
                step.step()
            with counter.phase("callbacks"):
                step.after_step()
        marks.append((counter.snapshot(), Counter(counter.views), Counter(counter.syncs)))
    records = [_step_record(marks, i) for i in range(measured[0], measured[1] + 1)]
    _check_identical(variant, "plain", records)
    return records[0]


def _check_identical(variant: str, path: str, records: list[dict[str, Any]]) -> None:
    first = [(r["ops"], r["syncs"]) for r in records]
    if any(f != first[0] for f in first):
        raise RuntimeError(f"{variant}/{path}: steady-state steps differ: {first}")


def budgets(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The pinned budgets, each with its measured value and whether it holds."""
    fit = results["fit"]
    ratio = fit["w1a4_ste"]["ops"]["model"] / fit["float"]["ops"]["model"]
    out: dict[str, dict[str, Any]] = {
        "w1a4_fwd_bwd_over_float": {"value": round(ratio, 3), "limit": 2.5, "ok": ratio <= 2.5},
        "bcgd_blend_ops": {
            "value": fit["w1a4_bcgd"]["ops"]["callbacks"], "limit": 4, "ok": fit["w1a4_bcgd"]["ops"]["callbacks"] <= 4,
        },
    }
    for variant, r in fit.items():
        overhead = r["ops"]["task"] + r["ops"]["lightning"]
        out[f"{variant}_task_plus_lightning_ops"] = {"value": overhead, "limit": 15, "ok": overhead <= 15}
    for path, per in results.items():
        for variant, r in per.items():
            syncs = sum(r["syncs"].values())
            out[f"{variant}_{path}_host_syncs"] = {"value": syncs, "limit": 0, "ok": syncs == 0}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=4, help="op counts do not depend on it")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    parser.add_argument("--detail", choices=PHASES, help="print the op names of this phase per variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # count the kernels a GPU runs: qlight picks fused optimizers there (on the CPU it picks foreach)
    qlight.tasks.optim.FUSED_DEVICES = ("cuda", "cpu")

    results: dict[str, dict[str, dict[str, Any]]] = {"fit": {}, "plain": {}}
    for variant in args.variants:
        results["fit"][variant] = count_fit(variant, args.batch_size)
        results["plain"][variant] = count_plain(variant, args.batch_size)

    header = f"{'variant':<20} {'path':<6} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>6} {'syncs':>6}"
    print("ATen ops per steady-state training step (views and allocations excluded)")
    print(header)
    for variant in args.variants:
        for path in ("fit", "plain"):
            r = results[path][variant]
            total = sum(r["ops"].values())
            cells = " ".join(f"{r['ops'][p]:>9}" for p in PHASES)
            print(f"{variant:<20} {path:<6} {cells} {total:>6} {sum(r['syncs'].values()):>6}")
            if args.detail:
                print(f"    {args.detail}: {r['detail'].get(args.detail, {})}")
    summary: dict[str, Any] = {"results": results}
    if set(VARIANTS) <= set(args.variants):
        summary["budgets"] = budgets(results)
        print("\nbudgets:")
        for name, b in summary["budgets"].items():
            print(f"  {'ok ' if b['ok'] else 'OVER'} {name}: {b['value']} (limit {b['limit']})")
    if args.json:
        text = json.dumps(summary, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
