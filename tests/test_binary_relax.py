"""BinaryRelax callback: the eta schedule, relaxed training forward, hard-quantized validation, the
'br' blend (BinaryRelax + BCGD) by hand, exact resume and the CLI path."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    CONF,
    StepRecorder,
    assert_same_state,
    batches,
    crash_and_resume,
    loader,
    make_task,
    make_trainer,
    tiny_fit,
)
from lightning.pytorch import Callback, LightningModule, Trainer

from qlight.callbacks import BCGD, BinaryRelax
from qlight.callbacks.binary_relax import relaxation_at
from qlight.cli import main
from qlight.quant import quant_layers


def test_relaxation_schedule_closed_form() -> None:
    assert relaxation_at(0, 0, 1.0, 1.02, 196, 150) == (1.0, 0.5)
    assert relaxation_at(195, 0, 1.0, 1.02, 196, 150)[0] == 1.0
    assert relaxation_at(196, 0, 1.0, 1.02, 196, 150)[0] == pytest.approx(1.02, rel=1e-15)
    # the authors' run (391 steps per epoch): eta = 1.02^299 ~ 374 in the last relaxed step
    eta, mix = relaxation_at(149 * 391 + 390, 149, 1.0, 1.02, 196, 150)
    assert eta == pytest.approx(1.02**299, rel=1e-12) and mix == pytest.approx(eta / (1 + eta), rel=1e-15)
    assert relaxation_at(150 * 391, 150, 1.0, 1.02, 196, 150) == (math.inf, 1.0)
    assert relaxation_at(10**9, 0, 1.0, 1.02, 1, 150) == (math.inf, 1.0)  # no OverflowError
    assert relaxation_at(0, 0, 1.0, 1.02, 196, 0) == (math.inf, 1.0)  # switch_epoch=0: plain STE


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eta0": 0.0}, "eta0=0.0"),
        ({"eta_growth": -1.0}, "eta_growth=-1.0"),
        ({"eta_every": 0}, "eta_every=0"),
        ({"switch_epoch": -1}, "switch_epoch=-1"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BinaryRelax(**kwargs)


def test_needs_quantized_layers() -> None:
    with pytest.raises(ValueError, match="BinaryRelax needs weight-quantized layers"):
        make_trainer([BinaryRelax()], max_steps=1).fit(make_task(quant=None), loader(1))


class MixRecorder(Callback):
    """Per optimizer step: (global_step, epoch, mix of every weight quantizer, relaxed-forward check)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, list[float]]] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        mixes = []
        for _, layer in quant_layers(pl_module):
            mix = float(layer.weight_quantizer.mix)
            w = layer.weight.detach()
            # the training forward's kernel is the relaxed weight (eta Q(w) + w) / (1 + eta)
            eta = mix / (1 - mix) if mix < 1 else math.inf
            q = layer.quantized_weight()
            expected = q if math.isinf(eta) else (eta * q + w) / (1 + eta)
            forward = layer.weight_quantizer(layer.weight).detach()
            torch.testing.assert_close(forward, expected, rtol=1e-6, atol=1e-7)
            mixes.append(mix)
        self.steps.append((trainer.global_step, trainer.current_epoch, mixes))


def test_eta_grows_every_half_epoch_and_switches_to_exact_quantization() -> None:
    """5 batches with accumulate 2 = 3 steps per epoch, so eta_every = ceil(3/2) = 2 steps."""
    recorder = MixRecorder()
    relax = BinaryRelax(eta0=0.5, eta_growth=2.0, switch_epoch=2)
    trainer = make_trainer([recorder, relax], max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(make_task(), loader(5))
    assert relax.resolved_every == 2
    assert [s for s, _, _ in recorder.steps] == list(range(9))
    for step, epoch, mixes in recorder.steps:
        eta = 0.5 * 2.0 ** (step // 2) if epoch < 2 else math.inf
        expected = 1.0 if math.isinf(eta) else eta / (1 + eta)
        assert mixes == pytest.approx([expected] * len(mixes), rel=1e-6)
    assert float(trainer.callback_metrics["binaryrelax/eta"]) == math.inf
    assert float(trainer.callback_metrics["binaryrelax/mix"]) == 1.0


class HardValidationCheck(Callback):
    """At every validation batch: the model's outputs equal those of a copy with mix = 1 (hard Q(w))."""

    def __init__(self) -> None:
        self.checked_mixes: list[float] = []

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert not pl_module.training
        hard = copy.deepcopy(pl_module.model)
        for _, layer in quant_layers(hard):
            layer.weight_quantizer.mix.fill_(1.0)
        x, _ = batch
        with torch.no_grad():
            assert torch.equal(pl_module(x), hard(x))
        self.checked_mixes.append(float(quant_layers(pl_module)[0][1].weight_quantizer.mix))


def test_validation_reports_hard_quantized_accuracy() -> None:
    check = HardValidationCheck()
    trainer = make_trainer([BinaryRelax(eta0=1.0, eta_every=1, switch_epoch=5), check], max_epochs=2)
    trainer.fit(make_task(), loader(2), loader(1, seed=1))
    assert len(check.checked_mixes) == 2
    assert all(m < 1 for m in check.checked_mixes), "the relaxation must be active, or the check is vacuous"


def test_br_blends_toward_the_relaxed_weight() -> None:
    """'br': w' = (1 - rho) w + rho (eta Q(w) + w)/(1 + eta) - lr g (plain SGD), eta = 3."""
    rho, lr, eta = 0.1, 0.05, 3.0
    recorder = StepRecorder()
    task = make_task(lr=lr)
    callbacks = [recorder, BinaryRelax(eta0=eta, eta_growth=1.0), BCGD(rho=rho, rho_max=rho)]
    make_trainer(callbacks, max_steps=2).fit(task, loader(2))
    s0, s1 = recorder.steps
    for i, (_, layer) in enumerate(quant_layers(task)):
        w0 = s0["w"][i].double()
        q0 = layer.weight_quantizer.quantize(s0["w"][i]).double()
        relaxed = (eta * q0 + w0) / (1 + eta)
        expected = (1 - rho) * w0 + rho * relaxed - lr * s0["g"][i].double()
        torch.testing.assert_close(s1["w"][i].double(), expected, rtol=1e-5, atol=1e-6)


def _br_callbacks() -> list[Callback]:
    return [
        BinaryRelax(eta0=1.0, eta_growth=1.5, switch_epoch=2),
        BCGD(rho=0.01, rho_growth=2.0, rho_max=0.05),
    ]


def test_crash_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """'br' over 3 epochs of 4 steps (eta grows every 2 steps, exact from epoch 2), momentum, wd,
    alpha staging; crash after step 5 (mid-epoch, mid eta period) and resume from its checkpoint."""
    fit = tiny_fit(batches(4), epochs=3, momentum=0.9, weight_decay=1e-3, alpha_stage_epochs=1)
    runs = crash_and_resume(fit, tmp_path, 5, _br_callbacks)
    assert_same_state(runs.straight, runs.resumed)
    assert runs.resumed_callbacks[0].state_dict() == runs.straight_callbacks[0].state_dict()
    assert runs.resumed_callbacks[0].resolved_every == 2


def test_eta_is_in_the_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer([BinaryRelax(eta0=1.0, eta_growth=2.0, eta_every=1)], tmp_path, max_steps=3)
    task = make_task()
    trainer.fit(task, loader(4))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert ckpt["callbacks"]["BinaryRelax"] == {
        "eta0": 1.0, "eta_growth": 2.0, "switch_epoch": 150, "eta_every": 1, "eta": 4.0, "mix": 0.8,
    }
    # the mix the forward uses is a module buffer, so it is in the weights themselves
    mixes = [v for k, v in ckpt["state_dict"].items() if k.endswith("weight_quantizer.mix")]
    assert mixes and all(float(m) == pytest.approx(0.8) for m in mixes)


def test_cli_fit_br(cifar10_pickle: Path, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config", str(CONF / "cifar10_binaryrelax_tiny.yaml"),
            "--data.root", str(cifar10_pickle),
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )
    methods = [type(c) for c in cli.trainer.callbacks if isinstance(c, BCGD | BinaryRelax)]
    assert methods == [BinaryRelax, BCGD]
    assert cli.trainer.global_step == 2
    # switch_epoch=1: the second epoch trains with exact quantization
    assert float(cli.trainer.callback_metrics["binaryrelax/mix"]) == 1.0
    assert "bcgd/rho" in cli.trainer.callback_metrics
