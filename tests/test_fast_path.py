"""The fast path: pinned op and sync budgets, the compiled path against eager, optimizer groups and kernels.

Op counts are what a GPU would launch (``qlight.opcount``), counted by ``benchmarks/step_ops.py`` on the CPU;
they are deterministic, so they are pinned here (times are not: ``benchmarks/gpu_suite.py`` measures those).
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from qlight.callbacks import Throughput
from qlight.cli import main
from qlight.quant import QuantSpec
from qlight.tasks import ImageClassifier
from qlight.tasks.optim import fast_kernels, merge_groups, relayout_checkpoint
from qlight.tasks.train_stats import LossWindow

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(__file__).parent / "conf"


@pytest.fixture(scope="module")
def step_ops() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("step_ops")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def op_counts(step_ops: Any) -> dict[str, Any]:
    from qlight.tasks import optim

    saved = optim.FUSED_DEVICES
    optim.FUSED_DEVICES = ("cuda", "cpu")  # count the fused kernels a GPU runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            path: {v: count(v) for v in step_ops.VARIANTS}
            for path, count in (("fit", step_ops.count_fit), ("plain", step_ops.count_plain))
        }
    finally:
        optim.FUSED_DEVICES = saved
        torch.set_num_threads(threads)


def test_step_budgets_hold(step_ops: Any, op_counts: dict[str, Any]) -> None:
    """Issue budgets: W1A4 fwd+bwd <= 2.5x float; blend <= 4 ops; task + Lightning <= 15; no host sync."""
    budgets = step_ops.budgets(op_counts)
    over = {k: v for k, v in budgets.items() if not v["ok"]}
    assert not over, over
    fit = op_counts["fit"]
    assert fit["w1a4_bcgd"]["ops"]["callbacks"] == 1  # one _foreach_lerp_
    assert fit["w1a4_bcgd"]["ops"]["model"] == fit["w1a4_ste"]["ops"]["model"]  # keeping G costs nothing
    for variant, r in fit.items():
        # qlight's network work equals the plain loop's but for Lightning's loss normalisation (div backward)
        assert r["ops"]["model"] - op_counts["plain"][variant]["ops"]["model"] <= 1, variant


@pytest.mark.skipif(not torch.__version__.startswith("2.14."), reason="exact counts are pinned for torch 2.14")
def test_exact_op_counts_are_pinned(op_counts: dict[str, Any]) -> None:
    """The counts themselves, so that any change to the hot path shows up here first."""
    fit = {v: r["ops"] for v, r in op_counts["fit"].items()}
    assert fit["float"] == {"model": 171, "optimizer": 1, "callbacks": 0, "task": 5, "lightning": 2, "data": 0}
    assert fit["w1a4_ste"] == {"model": 408, "optimizer": 2, "callbacks": 0, "task": 7, "lightning": 2, "data": 0}
    assert fit["w1a4_bcgd"] == {"model": 408, "optimizer": 2, "callbacks": 1, "task": 7, "lightning": 2, "data": 0}
    assert fit["convnet_d_aqe_w1a1"]["callbacks"] == 2  # the latent clip: clamp_min_ and clamp_max_ for all


# ------------------------------------------------------------------------------------------- compiled path
def _fit(tmp_path: Path, root: Path, name: str, extra: list[str]) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    args = [
        "fit", "--config", str(CONF / "cifar10_bcgd_tiny.yaml"), *extra, "--data.root", str(root),
        "--trainer.max_steps", "20", "--trainer.max_epochs", "-1", "--trainer.limit_train_batches", "5",
        "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(out),
        "--model.channels_last", "true", "--data.channels_last", "true",
    ]
    cli = main(args)
    assert cli.trainer.global_step == 20
    return {k: v.detach().clone() for k, v in cli.model.state_dict().items()}


@pytest.mark.usefixtures("one_thread")
def test_gpu_fast_fit_equals_eager_fit(tmp_path: Path, cifar10_pickle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/trainer/gpu_fast.yaml on the CPU (compiled graphs run op by op: aot_eager) vs eager: 20 BCGD steps.

    Inductor's fused kernels round differently, and a quantized network turns last-bit differences into level
    flips, so the check of the compiled *path* (capture, AOTAutograd of the quantizers' Functions, the blend
    targets kept by a compiled forward, calibration recompiles) runs the graphs with eager numerics.
    """
    monkeypatch.chdir(tmp_path)
    eager = _fit(tmp_path, cifar10_pickle, "eager", [])
    fast = _fit(
        tmp_path, cifar10_pickle, "fast",
        ["--config", str(ROOT / "configs/trainer/gpu_fast.yaml"), "--model.compile_backend", "aot_eager"],
    )
    assert eager.keys() == fast.keys()
    for key, value in eager.items():
        torch.testing.assert_close(fast[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------- optimizer
def test_groups_merge_where_hyperparameters_agree() -> None:
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(5)]
    groups = {"quantized_weights": [p[0]], "weights": [p[1]], "biases": [p[2]], "alphas": [p[3], p[4]]}
    merged = merge_groups(groups, {"alphas": {"lr_factor": 0.1}})
    assert [g["name"] for g in merged] == ["quantized_weights+weights+biases", "alphas"]
    assert merged[1]["lr_factor"] == 0.1 and merged[1]["params"] == [p[3], p[4]]
    merged = merge_groups(groups, {"biases": {"weight_decay": 0.0}, "alphas": {"weight_decay": 0.0}})
    assert [g["name"] for g in merged] == ["quantized_weights+weights", "biases+alphas"]


def test_fast_kernels_foreach_on_cpu_equals_the_default_loop() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4)
    fast = fast_kernels(make(params))
    slow = make(clones)
    assert fast.param_groups[0]["foreach"] is True and slow.param_groups[0]["foreach"] is None
    for _ in range(3):
        for a, b in zip(params, clones, strict=True):
            a.grad = torch.sin(a.detach())
            b.grad = torch.sin(b.detach())
        fast.step()
        slow.step()
    assert all(torch.equal(a, b) for a, b in zip(params, clones, strict=True))
    # an explicit choice in the config is kept
    chosen = fast_kernels(torch.optim.SGD(params, lr=0.1, foreach=False))
    assert chosen.param_groups[0]["foreach"] is False


def test_old_four_group_checkpoint_resumes_into_merged_groups(tmp_path: Path) -> None:
    """A checkpoint written with one optimizer group per kind of parameter continues with merged groups."""
    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.1)
    task = ImageClassifier(model="resnet20", quant=QuantSpec(), optimizer=sgd, lr_scheduler=sched, alpha_lr_factor=0.1)
    from qlight.quant import param_groups

    groups = param_groups(task.model)
    old = torch.optim.SGD([{"name": n, "params": groups[n]} for n in groups if groups[n]], lr=0.1, momentum=0.9)
    old.param_groups[-1]["lr"] = 0.01
    for p in task.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    old_sched = torch.optim.lr_scheduler.MultiStepLR(old, milestones=[1], gamma=0.1)
    checkpoint = {"optimizer_states": [old.state_dict()], "lr_schedulers": [old_sched.state_dict()]}
    task.on_load_checkpoint(checkpoint)
    new = task.configure_optimizers()
    new["optimizer"].load_state_dict(checkpoint["optimizer_states"][0])
    new["lr_scheduler"]["scheduler"].load_state_dict(checkpoint["lr_schedulers"][0])
    names = [g["name"] for g in new["optimizer"].param_groups]
    assert names == ["quantized_weights+weights+biases", "alphas"]
    assert [g["lr"] for g in new["optimizer"].param_groups] == [0.1, 0.01]
    assert new["lr_scheduler"]["scheduler"].base_lrs == [0.1, 0.01]
    buffers = [new["optimizer"].state[p]["momentum_buffer"] for g in new["optimizer"].param_groups for p in g["params"]]
    assert len(buffers) == sum(len(v) for v in groups.values())
    assert all(torch.equal(b, torch.ones_like(b)) for b in buffers)
    # a layout that fits neither way (another model) is left for the optimizer to reject
    other = {"optimizer_states": [{"param_groups": [{"name": "weights", "params": [0]}], "state": {}}]}
    relayout_checkpoint(other, [("quantized_weights", "weights")], {"quantized_weights": 1, "weights": 1})
    assert other["optimizer_states"][0]["param_groups"][0]["name"] == "weights"


# ------------------------------------------------------------------------------------------- bookkeeping
def test_loss_window_mean_nonfinite_step_and_growth() -> None:
    window = LossWindow(capacity=2)
    window.reset(first_step=10)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):  # grows past its capacity
        window.record(torch.tensor(v))
    assert window.count == 5 and window.mean().item() == 3.0 and window.first_nonfinite() is None
    window.reset(first_step=20)
    for v in (1.0, 2.0, math.nan, 4.0, math.inf, 6.0):
        window.record(torch.tensor(v))
    assert window.first_nonfinite(micro_batches_per_step=1) == 22
    assert window.first_nonfinite(micro_batches_per_step=2) == 21  # micro-batch 2 is in the second step


def test_nonfinite_loss_stops_naming_the_step() -> None:
    from qlight.tasks.classification import NonFiniteLossError

    class Exploding(ImageClassifier):
        def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, loss = super().forward_loss(x, y)
            return logits, loss * (torch.inf if self.global_step == 3 else 1.0)

    torch.manual_seed(0)
    task = Exploding(model="resnet20", optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=2, limit_val_batches=0,
    )
    with pytest.raises(NonFiniteLossError, match="non-finite at global step 3 "):
        trainer.fit(task, DataLoader(data, batch_size=2))


def test_throughput_times_warmup_apart_from_steady_epochs() -> None:
    torch.manual_seed(0)
    task = ImageClassifier(model="resnet20", optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    timer = Throughput(warmup_steps=3)
    data = TensorDataset(torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,)))
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, callbacks=[timer],
    )
    trainer.fit(task, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    assert timer.warmup_s is not None and timer.warmup_s > 0
    assert [r["steady_steps"] for r in timer.records] == [2.0, 5.0]  # 5 batches per epoch, 3 of warm-up
    assert all(r["images_per_s"] > 0 for r in timer.records)
    assert {"time/warmup_s", "time/epoch_s", "time/images_per_s"} <= set(trainer.callback_metrics)


def test_quantized_resnet_forward_is_one_graph_with_kept_blend_targets() -> None:
    """torch._dynamo.explain: the W1A4 ResNet-20 training forward, with BCGD's kept targets, has no break."""
    from qlight.models import build_model
    from qlight.quant import quant_layers, quantize_model

    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20"), QuantSpec(weight="binary", a_bits=4))
    for _, layer in quant_layers(model):
        layer.weight_quantizer.keep_training_value = True
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()
