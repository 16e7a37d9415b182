"""BCGD callback: the blended step by hand, rho = 0 is BinaryConnect, once per optimizer step under
gradient accumulation, exact crash/resume (epoch boundary and mid-epoch), activation-resolution
staging, the in-place alpha clamp, the recipes and the CLI path.

The tiny task, the trainer and the crash/resume harness come from ``helpers.py``.
"""

from __future__ import annotations

import functools
import importlib.util
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
    training_state,
)
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from qlight.callbacks import BCGD, BinaryRelax
from qlight.callbacks.bcgd import rho_at
from qlight.cli import describe_run, main
from qlight.quant import QuantAct, QuantSpec, quant_acts, quant_layers

# ----------------------------------------------------------------------------------------------------
# schedule


def test_rho_schedule_follows_the_authors_convention() -> None:
    """The authors grow rho at the START of every epoch: epoch 0 already uses rho0 * growth."""
    assert rho_at(0, 1e-5) == 1e-5
    assert rho_at(199, 1e-5) == 1e-5
    assert rho_at(0, 1e-3, 2.0) == pytest.approx(2e-3, rel=1e-15)
    assert rho_at(2, 1e-3, 2.0) == pytest.approx(8e-3, rel=1e-15)
    assert rho_at(3, 1e-3, 2.0) == 0.01  # capped at rho_max
    assert rho_at(10**6, 1e-3, 2.0, rho_max=0.05) == 0.05  # no OverflowError
    assert rho_at(5, 0.0, 1.01) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -0.1}, "rho=-0.1"),
        ({"rho_growth": 0.0}, "rho_growth=0.0"),
        ({"rho_max": 2.0}, "rho_max=2.0"),
        ({"rho": 0.1}, "rho=0.1 exceeds rho_max=0.01"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BCGD(**kwargs)


def test_runs_are_named_after_the_first_method_callback() -> None:
    """The CLI names runs after the first training-method callback ('br' runs, BinaryRelax then BCGD, as
    binaryrelax); without one, after the spec (ste) or its absence (float)."""
    task, float_task = make_task(), make_task(quant=None)
    for model, callbacks, method in (
        (task, [BinaryRelax(), BCGD()], "binaryrelax"),
        (task, [BCGD(), BinaryRelax()], "bcgd"),
        (task, [StepRecorder()], "ste"),
        (float_task, [], "float"),
    ):
        assert describe_run(model, None, make_trainer(callbacks), seed=0).method == method


def test_needs_quantized_layers() -> None:
    with pytest.raises(ValueError, match="BCGD needs weight-quantized layers"):
        make_trainer([BCGD()], max_steps=1).fit(make_task(quant=None), loader(1))


# ----------------------------------------------------------------------------------------------------
# the step itself


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.95, 0.01)], ids=["sgd", "momentum_wd"])
def test_two_steps_match_hand_computation(momentum: float, weight_decay: float) -> None:
    """BCGD.md §3: B = (1-rho) w + rho Q(w); m = mu m + g + wd B; w' = B - lr m (two steps: momentum).

    Float parameters (head, BN) follow plain SGD with the same momentum and weight decay, unblended.
    """
    rho, lr = 0.1, 0.05
    recorder = StepRecorder()
    task = make_task(lr=lr, momentum=momentum, weight_decay=weight_decay)
    make_trainer([recorder, BCGD(rho=rho, rho_max=rho)], max_steps=2).fit(task, loader(2))
    s0, s1 = recorder.steps

    def sgd(w: Tensor, g: Tensor, buf: Tensor | None) -> tuple[Tensor, Tensor]:
        d = g.double() + weight_decay * w
        buf = d if buf is None else momentum * buf + d
        return w - lr * buf, buf

    for i in range(len(s0["w"])):
        b0 = (1 - rho) * s0["w"][i].double() + rho * s0["G"][i].double()
        w1, buf = sgd(b0, s0["g"][i], None)
        torch.testing.assert_close(s1["w"][i].double(), w1, rtol=1e-5, atol=1e-6)
        b1 = (1 - rho) * s1["w"][i].double() + rho * s1["G"][i].double()
        w2, _ = sgd(b1, s1["g"][i], buf)
        torch.testing.assert_close(recorder.final["w"][i].double(), w2, rtol=1e-5, atol=1e-6)
        # the blend is far above the tolerance: without it the result would differ
        unblended, _ = sgd(s1["w"][i].double(), s1["g"][i], buf)
        assert (unblended - w2).abs().max() > 1e-3
    for i in range(len(s0["fw"])):
        w1, buf = sgd(s0["fw"][i].double(), s0["fg"][i], None)
        torch.testing.assert_close(s1["fw"][i].double(), w1, rtol=1e-5, atol=1e-6)
        w2, _ = sgd(s1["fw"][i].double(), s1["fg"][i], buf)
        torch.testing.assert_close(recorder.final["fw"][i].double(), w2, rtol=1e-5, atol=1e-6)


def test_forward_weight_is_hard_quantization_without_relaxation() -> None:
    """Without BinaryRelax the blend target G is exactly Q(w) (mix = 1)."""
    task = make_task()
    for _, layer in quant_layers(task):
        assert torch.equal(layer.training_weight(), layer.quantized_weight())


def test_rho_zero_is_binaryconnect_exactly() -> None:
    """Every parameter, buffer and momentum buffer equals the plain STE run bit for bit."""
    states = []
    for callbacks in ([BCGD(rho=0.0)], []):
        task = make_task(momentum=0.9, weight_decay=1e-4)
        trainer = make_trainer(callbacks, max_epochs=2)
        trainer.fit(task, loader(2))
        states.append(training_state(task, trainer))
    assert_same_state(*states)
    # and a positive rho does change the run
    task = make_task(momentum=0.9, weight_decay=1e-4)
    trainer = make_trainer([BCGD(rho=0.01)], max_epochs=2)
    trainer.fit(task, loader(2))
    key = "model.model.conv1.weight"
    assert not torch.equal(training_state(task, trainer)[key], states[1][key])


class CountingBCGD(BCGD):
    """BCGD that records the (epoch, batch_idx, rho) of every blend."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blends: list[tuple[int, int, float]] = []
        self._batch_idx = -1

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch_idx = batch_idx

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        assert self._rho is not None
        self.blends.append((trainer.current_epoch, self._batch_idx, float(self._rho)))
        super().on_before_optimizer_step(trainer, pl_module, optimizer)


def test_blends_once_per_optimizer_step_with_accumulation() -> None:
    """accumulate_grad_batches=2 over 5 batches: steps after batches 1, 3 and 4 of each epoch."""
    bcgd = CountingBCGD(rho=1e-3, rho_growth=2.0)
    trainer = make_trainer([bcgd], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(make_task(), loader(5))
    assert trainer.global_step == 6
    assert [(e, b) for e, b, _ in bcgd.blends] == [(e, b) for e in (0, 1) for b in (1, 3, 4)]
    # the rho used is the schedule's value of that epoch
    for epoch, _, rho in bcgd.blends:
        assert rho == pytest.approx(rho_at(epoch, 1e-3, 2.0), rel=1e-6)
    assert float(trainer.callback_metrics["bcgd/rho"]) == pytest.approx(rho_at(1, 1e-3, 2.0), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# resume


def _bcgd_callbacks() -> list[Callback]:
    return [BCGD(rho=0.01, rho_growth=2.0, rho_max=0.05)]


@pytest.mark.parametrize("crash_step", [4, 6], ids=["epoch_boundary", "mid_epoch"])
def test_crash_then_resume_equals_uninterrupted_run(tmp_path: Path, crash_step: int) -> None:
    """3 epochs of 4 steps with growing rho, momentum, wd, an LR milestone and alpha staging; crash
    after step 4 (end of epoch 0) or step 6 (middle of epoch 1), resume from that step's checkpoint."""
    fit = tiny_fit(batches(4), epochs=3, momentum=0.9, weight_decay=1e-3, milestones=[2], alpha_stage_epochs=1)
    runs = crash_and_resume(fit, tmp_path, crash_step, _bcgd_callbacks)
    assert_same_state(runs.straight, runs.resumed)
    assert runs.resumed_callbacks[0].value == runs.straight_callbacks[0].value == rho_at(2, 0.01, 2.0, 0.05)


def test_rho_is_in_the_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer([BCGD(rho=0.01, rho_growth=2.0, rho_max=0.05)], tmp_path, max_epochs=2)
    trainer.fit(make_task(), loader(2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["BCGD"]
    assert state == {"rho": 0.01, "rho_growth": 2.0, "rho_max": 0.05, "value": 0.04}
    restored = BCGD(rho=0.01, rho_growth=2.0, rho_max=0.05)
    restored.load_state_dict(state)
    assert restored.value == 0.04


# ----------------------------------------------------------------------------------------------------
# activation-resolution staging (ImageClassifier.alpha_stage_epochs, BCGD.md §2)


class AlphaRecorder(Callback):
    """Per optimizer step: epoch, calibrating flags, alpha values and gradients; plus the batch stat
    max|x|/L of each QuantAct's last forward call."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.last_stat: dict[str, Tensor] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name, act in quant_acts(pl_module):
            act.register_forward_hook(functools.partial(self._hook, name))

    def _hook(self, name: str, module: QuantAct, args: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training:
            self.last_stat[name] = args[0].detach().abs().amax() / module.levels

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        acts = quant_acts(pl_module)
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "calibrating": [a.calibrating for _, a in acts],
                "alpha": [a.alpha.detach().clone() for _, a in acts],
                "grad": [a.alpha.grad.clone() for _, a in acts],
                "stat": [self.last_stat[n].clone() for n, _ in acts],
            }
        )


def test_alpha_is_calibrated_before_the_stage_epoch_and_learned_after() -> None:
    recorder = AlphaRecorder()
    task = make_task(momentum=0.9, alpha_stage_epochs=1)
    make_trainer([recorder, BCGD(rho=1e-3)], max_epochs=2, limit_train_batches=2).fit(task, loader(2))
    before = [s for s in recorder.steps if s["epoch"] == 0]
    after = [s for s in recorder.steps if s["epoch"] == 1]
    assert len(before) == len(after) == 2
    for s in before:
        assert all(s["calibrating"])
        assert all(torch.equal(g, torch.zeros_like(g)) for g in s["grad"])  # no gradient, only calibration
        for alpha, stat in zip(s["alpha"], s["stat"], strict=True):
            torch.testing.assert_close(alpha, stat)  # alpha = max|x| / L of the last forward
    for s in after:
        assert not any(s["calibrating"])
        assert all(g.abs() > 0 for g in s["grad"])  # learned by the coarse alpha-gradient
    # from the stage epoch on, alpha moves only by SGD (no more calibration between steps)
    assert not torch.equal(after[0]["alpha"][0], after[1]["alpha"][0])
    assert not torch.equal(after[1]["alpha"][0], after[1]["stat"][0])


class ValidationAlpha(Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[list[Tensor], list[Tensor]]] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = [a.alpha.detach().clone() for _, a in quant_acts(pl_module)]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.pairs.append((self._start, [a.alpha.detach().clone() for _, a in quant_acts(pl_module)]))


def test_validation_never_calibrates_alpha() -> None:
    """During the calibration stage alpha is fitted to training batches only, not to validation ones."""
    spy = ValidationAlpha()
    task = make_task(alpha_stage_epochs=2)
    make_trainer([spy], max_epochs=1).fit(task, loader(2), loader(2, seed=1))
    ((start, end),) = spy.pairs
    assert all(torch.equal(a, b) for a, b in zip(start, end, strict=True))


def test_stage_zero_learns_alpha_from_the_start() -> None:
    recorder = AlphaRecorder()
    make_trainer([recorder], max_steps=1).fit(make_task(alpha_stage_epochs=0), loader(1))
    assert not any(recorder.steps[0]["calibrating"])
    assert all(g.abs() > 0 for g in recorder.steps[0]["grad"])


class AlphaRange(Callback):
    """alpha right after each optimizer step (callbacks run before the module's hook) and at the next
    batch start."""

    def __init__(self) -> None:
        self.after_step: list[Tensor] = []
        self.at_start: list[Tensor] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.at_start.append(torch.stack([a.alpha.detach().clone() for _, a in quant_acts(pl_module)]))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after_step.append(torch.stack([a.alpha.detach().clone() for _, a in quant_acts(pl_module)]))


def test_stored_alpha_is_clamped_after_every_step() -> None:
    """The authors clamp alpha in place to [1e-3, 5] before every use.

    Without it a learned alpha ran below zero on real data: its layer then outputs ~0, its
    straight-through gradient does not bring it back, and BinaryConnect collapsed to chance.
    """
    spy = AlphaRange()
    task = make_task(lr=0.1, alpha_lr_factor=1000.0)  # alpha steps of up to 100
    make_trainer([spy], max_epochs=1).fit(task, loader(4))
    raw = torch.stack(spy.after_step)
    assert torch.any((raw < 1e-3) | (raw > 5.0)), "the step must leave the range, or the check is vacuous"
    clamped = torch.stack(spy.at_start[1:])
    assert torch.all((clamped >= 1e-3) & (clamped <= 5.0))


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_fit_logs_rho(cifar10_pickle: Path, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config", str(CONF / "cifar10_bcgd_tiny.yaml"),
            "--data.root", str(cifar10_pickle),
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, BCGD | BinaryRelax)] == [BCGD]
    assert cli.trainer.global_step == 2
    assert float(cli.trainer.callback_metrics["bcgd/rho"]) == pytest.approx(1e-3, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# recipes (scripts/configs_bcgd.py, written to configs/ by scripts/make_configs.py)


def _load_script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_cover_the_paper_table() -> None:
    """4 architectures x {W1A4, W2A4, W4A4} x {BCGD, BinaryConnect} + 'br', every spec valid."""
    experiments = dict(_load_script("configs_bcgd").experiments())
    assert len(experiments) == 25
    for arch in ("resnet20", "resnet32", "resnet44", "vgg11"):
        for w in (1, 2, 4):
            bcgd = experiments[f"cifar10/{arch}_bcgd_w{w}a4.yaml"]
            ste = experiments[f"cifar10/{arch}_ste_w{w}a4.yaml"]
            assert bcgd["model"] == ste["model"], "BCGD and BinaryConnect must differ only by the callback"
            assert bcgd["trainer"]["callbacks"] == [
                {"class_path": "BCGD", "init_args": {"rho": 1e-5, "rho_growth": 1.0, "rho_max": 0.01}}
            ]
            assert "trainer" not in ste
            args = bcgd["model"]["init_args"]
            spec = QuantSpec(**args["quant"])
            layers = (spec.first_layer, spec.last_layer)
            assert (spec.w_bits, spec.a_bits, layers) == (w, 4, ("quantized", "float"))
            assert args["optimizer"]["init_args"] == {"lr": 0.1, "momentum": 0.95, "weight_decay": 1e-4}
            assert args["lr_scheduler"]["init_args"] == {"milestones": [80, 140], "gamma": 0.1}
    br = experiments["cifar10/resnet20_br_w1a4.yaml"]["trainer"]["callbacks"]
    assert [c["class_path"] for c in br] == ["BinaryRelax", "BCGD"]


@pytest.mark.parametrize(
    "name",
    ["cifar10/resnet20_bcgd_w1a4.yaml", "cifar10/vgg11_ste_w2a4.yaml", "cifar10/resnet20_br_w1a4.yaml"],
)
def test_recipes_parse_with_the_cli(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_load_script("make_configs").all_configs()[name])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert ("class_path: qlight.callbacks.BCGD" in printed) == ("ste" not in name)
