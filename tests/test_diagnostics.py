"""QuantDiagnostics: flip ratio against hand-made weight sequences, quantization error against closed forms,
activation level fractions on hand-made inputs, zero cost on non-logging steps (op counts), checkpointed
flip-ratio reference, CSV columns from the CLI and W&B histograms."""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import CONF, crash_and_resume, loader, make_task, make_trainer, tiny_fit
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from qlight.callbacks import BCGD, QuantDiagnostics
from qlight.callbacks.diagnostics import _is_compiled, activation_level_counts, changed_levels, level_pattern
from qlight.cli import main
from qlight.models import list_models, register_model
from qlight.opcount import OpCounter
from qlight.quant import QuantAct, QuantSpec, quant_layers
from qlight.tasks import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(QuantDiagnostics):
    """QuantDiagnostics that keeps every logged dict with its optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[tuple[int, dict[str, float]]] = []

    def _write(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        super()._write(trainer, metrics)
        self.history.append((trainer.global_step, metrics))


class LinearNet(nn.Module):
    """flatten -> Linear(192, 4) (quantized first layer) -> ReLU (a QuantAct) -> Linear(4, 10) (float)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(192, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(torch.flatten(x, 1))))


if "diag_linear" not in list_models():
    register_model("diag_linear")(LinearNet)


class SetWeights(Callback):
    """Put ``sequence[0]`` into the first quantized layer at train start and ``sequence[k]`` after step k."""

    def __init__(self, sequence: list[Tensor]) -> None:
        self.sequence = sequence

    def _set(self, pl_module: LightningModule, index: int) -> None:
        if index < len(self.sequence):
            with torch.no_grad():
                quant_layers(pl_module)[0][1].weight.copy_(self.sequence[index])

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set(pl_module, 0)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._set(pl_module, trainer.global_step)


def linear_task(quant: QuantSpec) -> LightningModule:
    """ImageClassifier on :class:`LinearNet` with SGD at lr = 0: the latent weights never move by themselves."""
    torch.manual_seed(0)
    return ImageClassifier(model="diag_linear", quant=quant, optimizer=functools.partial(torch.optim.SGD, lr=0.0))


def frozen_run(quant: QuantSpec, sequence: list[Tensor], every_n_steps: int = 1) -> Recorder:
    """The first quantized layer holds exactly ``sequence[k]`` after step k; log every ``every_n_steps`` steps."""
    diag = Recorder(every_n_steps=every_n_steps)
    make_trainer([SetWeights(sequence), diag], max_steps=len(sequence) - 1).fit(
        linear_task(quant), loader(len(sequence) - 1)
    )
    return diag


# ----------------------------------------------------------------------------------------------------
# weights: flip ratio and quantization error


def _pairs(scale: float = 1.0) -> Tensor:
    """4 x 192 weights: |w| alternates 1 and 2 (x scale), signs from a fixed pattern."""
    g = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(4, 192, generator=g) < 0.5, -1.0, 1.0)
    magnitude = torch.tensor([1.0, 2.0]).repeat(4, 96)
    return scale * signs * magnitude


SPECS = {
    "binary": QuantSpec(weight="binary", w_bits=1),
    "ternary": QuantSpec(weight="ternary", w_bits=2),
    "uniform4": QuantSpec(weight="uniform", w_bits=4),
}


@pytest.mark.parametrize(
    ("name", "error", "clip"),
    [
        # binary: delta = mean|w| = 1.5, ||w - Q||^2 = n/2 (0.25 + 0.25), ||w||^2 = n/2 (1 + 4)
        ("binary", math.sqrt(0.5 / 5), 0.5),
        # ternary (code scale): t = 0.7 * 1.5 = 1.05 keeps the 2s, c = (n/2 * 2) / n = 1,
        # ||w - Q||^2 = n/2 (1 + 1)
        # (t = 1.05 < 1: every |w| is at or beyond the top level 1)
        ("ternary", math.sqrt(2 / 5), 1.0),
        # 4-bit: delta0 = 2/15, q(2) = 7 (max(a)/s0 = 7.5 rounds half down), q(1) = round(3.75) = 4,
        # c = (2*7 + 1*4) / (49 + 16) = 18/65, errors (2 - 126/65)^2 + (1 - 72/65)^2 = 1/65 per pair
        ("uniform4", math.sqrt((1 / 65) / 5), 0.5),
    ],
)
def test_quant_error_and_clip_fraction_in_closed_form(name: str, error: float, clip: float) -> None:
    diag = frozen_run(SPECS[name], [_pairs(), _pairs()])
    (_, logged), = diag.history
    assert logged["diag/fc1/quant_error"] == pytest.approx(error, rel=1e-6)
    assert logged["diag/quant_error"] == pytest.approx(error, rel=1e-6)  # the only quantized layer
    assert logged["diag/fc1/clip_fraction"] == clip


def test_clip_fraction_of_unscaled_weights_counts_the_clip_bound() -> None:
    """sign weights (AQE/BNN): the top level is the clip bound 1; |w| >= 1 counts, whatever the scale."""
    w = torch.full((4, 192), 0.5)
    w[0, :48] = 1.0  # at the bound
    w[1, :24] = -1.0
    diag = frozen_run(QuantSpec(weight="sign", w_bits=1, act="float"), [w, w])
    assert diag.history[0][1]["diag/fc1/clip_fraction"] == (48 + 24) / 768
    assert diag.history[0][1]["diag/fc1/quant_error"] == pytest.approx(
        math.sqrt(696 * 0.25 / (72 + 696 * 0.25)), rel=1e-6
    )


def _negate(w: Tensor, index: Tensor) -> Tensor:
    out = w.clone().reshape(-1)
    out[index] = -out[index]
    return out.reshape(w.shape)


@pytest.mark.parametrize("name", ["binary", "ternary", "uniform4"])
def test_flip_ratio_follows_a_hand_made_sequence_of_updates(name: str) -> None:
    """Negating entries with a non-zero level flips them; rescaling everything flips nothing.

    Every entry of these weights has a non-zero level (the 2s at least; for binary and 4-bit the 1s too),
    so negating k of the 2s changes exactly k levels of 768.
    """
    w0 = _pairs()
    twos = torch.nonzero(w0.reshape(-1).abs() == 2).flatten()
    w1 = _negate(w0, twos[:10])  # 10 flips
    w2 = 3.0 * w1  # a new scale, the same levels
    w3 = _negate(w2, twos[5:20])  # 15 more flips (5 of them undo earlier ones, still changes since w2)
    diag = frozen_run(SPECS[name], [w0, w1, w2, w3])
    flips = [logged["diag/fc1/flip_ratio"] for _, logged in diag.history]
    assert flips == [10 / 768, 0.0, 15 / 768]


def test_flip_ratio_counts_net_changes_since_the_last_log() -> None:
    """Logging every 2 steps: a sign flipped and flipped back in between is no change."""
    w0 = _pairs()
    w1 = _negate(w0, torch.arange(0, 10))
    w2 = _negate(w1, torch.arange(0, 4))  # 4 of the 10 flip back: 6 net changes since w0
    w3 = _negate(w2, torch.arange(100, 103))
    w4 = w3.clone()
    diag = frozen_run(SPECS["binary"], [w0, w1, w2, w3, w4], every_n_steps=2)
    assert [s for s, _ in diag.history] == [2, 4]
    assert [logged["diag/flip_ratio"] for _, logged in diag.history] == [6 / 768, 3 / 768]


def test_level_pattern_is_scale_free_and_flips_are_relative() -> None:
    q = torch.tensor([0.0, 1.0, -2.0, 7.0]) * (18 / 65)
    top = q.abs().amax()
    assert torch.equal(changed_levels(level_pattern(q, top), level_pattern(q * 3.3, top * 3.3)),
                       torch.zeros(4, dtype=torch.bool))
    other = torch.tensor([0.0, 2.0, -2.0, 6.0]) * 0.5  # the same 4-bit grid (top level 7) at another scale
    assert changed_levels(level_pattern(q, top), level_pattern(other, torch.tensor(7 * 0.5))).tolist() == [
        False, True, False, True
    ]
    # the smallest power-of-two levels are told apart as well (2^-125 vs 2^-126 of the top)
    tiny = torch.tensor([2.0**-125, 2.0**-126, 0.0])
    assert changed_levels(tiny, torch.tensor([2.0**-126, 2.0**-126, 2.0**-126])).tolist() == [True, False, True]


# ----------------------------------------------------------------------------------------------------
# activations


@pytest.mark.parametrize(
    ("mode", "expected", "clamped"), [("ceil", [2, 3], [1, 1]), ("round", [3, 2], [2, 1])]
)
def test_activation_level_counts_on_a_hand_made_input(mode: str, expected: list[int], clamped: list[int]) -> None:
    """2 bits, alpha 0.5: levels {0, 0.5, 1, 1.5}. ceil: 0 for x <= 0, top for x > (L-1) alpha = 1;
    round: round(x / alpha) clamped to [0, 3]."""
    act = QuantAct(bits=2, alpha_init=0.5, mode=mode)
    x = torch.tensor([-1.0, 0.0, 0.1, 0.6, 1.0, 1.01, 2.0, 5.0])
    assert activation_level_counts(act, x).tolist() == expected
    # alpha is clamped to its range as in the forward: alpha 100 -> 5 (x / alpha = 0, 0.2, 0.8, 3.2)
    act.alpha.data.fill_(100.0)
    assert activation_level_counts(act, torch.tensor([0.0, 1.0, 4.0, 16.0])).tolist() == clamped


class InputProbe(Callback):
    """After QuantDiagnostics: recompute the expected fractions from the batch by hand (fc1 in training mode
    is F.linear with Q(w), the weights never change at lr = 0)."""

    def __init__(self) -> None:
        self.expected: list[tuple[float, float]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fc1, act = pl_module.model.fc1, pl_module.model.act
        pre = F.linear(torch.flatten(batch[0], 1), fc1.quantized_weight(), fc1.bias)
        alpha = act.alpha.detach().clamp(act.alpha_min, act.alpha_max)
        levels = torch.round(act_levels(pre, alpha, act.bits))
        self.expected.append(
            (float((levels == 0).double().mean()), float((levels == act.levels).double().mean()))
        )


def act_levels(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """The ceil quantized ReLU's level index by its definition: 0 for x <= 0, ceil(x/alpha) capped at L."""
    return torch.where(x <= 0, torch.zeros_like(x), torch.ceil(x / alpha).clamp(max=2**bits - 1))


def test_activation_fractions_are_measured_on_the_training_batch() -> None:
    diag, probe = Recorder(every_n_steps=1), InputProbe()
    make_trainer([diag, probe], max_steps=3).fit(
        linear_task(QuantSpec(weight="binary", a_bits=2, alpha_init=0.3)), loader(3)
    )
    assert len(diag.history) == len(probe.expected) == 3
    for (_, logged), (zero, top) in zip(diag.history, probe.expected, strict=True):
        assert logged["diag/act/zero_fraction"] == pytest.approx(zero, abs=1e-12)
        assert logged["diag/act/top_fraction"] == pytest.approx(top, abs=1e-12)
        assert logged["diag/act/alpha"] == pytest.approx(0.3)
        assert 0 < zero < 1 and 0 < top < 1, "a hand-made case where both fractions are informative"


# ----------------------------------------------------------------------------------------------------
# cost: nothing on non-logging steps


class BatchPhase(Callback):
    """Attribute the ops of each training batch (its hooks up to the next batch's) to ``"epoch/batch"``."""

    def __init__(self, counter: OpCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.counter.stack[0] = f"{trainer.current_epoch}/{batch_idx}"

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.counter.stack[0] = "other"


def _count_ops(callbacks: list[Callback]) -> OpCounter:
    counter = OpCounter()
    task = make_task(momentum=0.9, weight_decay=1e-4)
    trainer = make_trainer([BatchPhase(counter), BCGD(rho=0.01), *callbacks], max_epochs=1)
    with counter:
        trainer.fit(task, loader(10))
    return counter


def test_no_op_and_no_host_sync_on_non_logging_steps() -> None:
    """Per batch, with and without the callback: identical ATen op counts on non-logging steps (so zero
    extra ops and zero extra host syncs), more ops on the logging steps (the counter sees the callback)."""
    diag = Recorder(every_n_steps=4)
    plain, with_diag = _count_ops([]), _count_ops([diag])
    logged = {"0/3", "0/7", "0/9"}  # every 4 optimizer steps, and the epoch's last batch
    assert [s for s, _ in diag.history] == [4, 8, 10]
    batches = {k for k in plain.ops if k != "other"}
    assert batches == {f"0/{i}" for i in range(10)}
    for batch in sorted(batches - logged):
        extra = with_diag.ops[batch] - plain.ops[batch]
        assert not extra and with_diag.views[batch] == plain.views[batch], (batch, extra)
        assert with_diag.syncs[batch] == plain.syncs[batch], batch
    for batch in logged:
        extra = with_diag.total(batch) - plain.total(batch)
        assert extra > 20, (batch, extra)


# ----------------------------------------------------------------------------------------------------
# resume


class ForgetfulRecorder(Recorder):
    """A QuantDiagnostics that ignores the checkpoint: the flip ratio restarts at the resume."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def test_resume_continues_the_flip_ratio_reference(tmp_path: Path) -> None:
    """Log every 2 steps, crash after step 3 (checkpoint at step 3, last log at step 2) and resume: every
    later log equals the uninterrupted run's, the first one counting changes since step 2."""
    data = list(loader(6))

    def callbacks(kind: type[Recorder] = Recorder) -> Callable[[], list[Callback]]:
        return lambda: [BCGD(rho=0.01), kind(every_n_steps=2)]

    fit = tiny_fit(data, epochs=2, momentum=0.9)
    runs = crash_and_resume(fit, tmp_path / "a", 3, callbacks())
    straight, resumed = runs.straight_callbacks[1], runs.resumed_callbacks[1]
    after = {step: logged for step, logged in straight.history if step > 3}
    assert [s for s, _ in resumed.history] == sorted(after) == [4, 6, 8, 10, 12]
    for step, logged in resumed.history:
        assert logged == after[step], step
    # without the checkpointed reference the first log after the resume counts changes since step 3 only
    forgetful = crash_and_resume(fit, tmp_path / "b", 3, callbacks(ForgetfulRecorder)).resumed_callbacks[1]
    assert forgetful.history[0][1]["diag/flip_ratio"] != after[4]["diag/flip_ratio"]


# ----------------------------------------------------------------------------------------------------
# loggers, CLI, errors


def test_csv_columns_from_the_cli(cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(
        ["fit", "--config", str(CONF / "cifar10_bcgd_tiny.yaml"), "--data.root", str(cifar10_folder),
         "--trainer.callbacks+=QuantDiagnostics", "--trainer.logger", "qlight.loggers.CSVLogger"]
    )
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in ("diag/flip_ratio", "diag/quant_error", "diag/conv1/quant_error", "diag/layer1.0.conv1/flip_ratio", "diag/alpha",
                 "diag/zero_fraction", "diag/top_fraction", "diag/grad_norm", "diag/clip_fraction"):
        assert name in columns, name
    logged = [r for r in rows if r["diag/quant_error"]]
    assert [int(r["step"]) for r in logged] == [0, 1]  # log_every_n_steps 1, two batches
    assert {r["epoch"] for r in logged} == {"0"}  # an integer epoch, like Lightning's own rows
    assert all(0 < float(r["diag/quant_error"]) < 1 for r in logged)
    losses = {r["step"] for r in rows if r.get("train/loss")}
    assert {r["step"] for r in logged} <= losses, "diagnostics share their step with train/loss"


class FakeExperiment:
    """Stands in for a W&B run: keeps what is logged."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.config = SimpleNamespace(update=lambda *args, **kwargs: None)

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)


def test_histograms_go_to_wandb_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    experiment = FakeExperiment()
    monkeypatch.setattr(WandbLogger, "experiment", property(lambda self: experiment))
    diag = QuantDiagnostics(every_n_steps=1, histograms=True)
    task = make_task()
    make_trainer([diag], max_epochs=2, logger=logger).fit(task, loader(2))
    hists = [d for d in experiment.logged if "diag/alpha_hist" in d]
    assert len(hists) == 2  # one per epoch
    assert isinstance(hists[0]["diag/conv1/latent_weight"], wandb.Histogram)
    assert sum(hists[0]["diag/conv1/latent_weight"].histogram) == task.model.conv1.weight.numel()
    assert sum(hists[0]["diag/alpha_hist"].histogram) == 1
    scalars = [d for d in experiment.logged if "diag/flip_ratio" in d]
    assert len(scalars) == 4 and all("trainer/global_step" in d for d in scalars)
    # CSV only: no histogram anywhere, the scalars as usual
    csv_logger = CSVLogger(tmp_path / "csv")
    make_trainer([QuantDiagnostics(histograms=True)], max_epochs=1, logger=csv_logger).fit(make_task(), loader(2))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "diag/flip_ratio" in columns and not any("hist" in c or "latent_weight" in c for c in columns)


def test_needs_something_to_diagnose() -> None:
    with pytest.raises(ValueError, match="QuantDiagnostics found no quantized layer"):
        make_trainer([QuantDiagnostics()], max_steps=1).fit(make_task(quant=None), loader(1))


@pytest.mark.parametrize("value", [0, -3, True])
def test_every_n_steps_must_be_positive(value: int) -> None:
    with pytest.raises(ValueError, match=f"every_n_steps={value!r}"):
        QuantDiagnostics(every_n_steps=value)


def test_bad_every_n_steps_is_one_cli_line(
    cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONF / "cifar10_bcgd_tiny.yaml"), "--data.root", str(cifar10_folder),
              "--trainer.callbacks+=QuantDiagnostics", "--trainer.callbacks.every_n_steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("every_n_steps=0" in line for line in err), err


def test_compiled_networks_are_recognised() -> None:
    net = nn.Sequential(nn.Linear(2, 2))
    assert not _is_compiled(net)
    net[0].compile()
    assert _is_compiled(net)
