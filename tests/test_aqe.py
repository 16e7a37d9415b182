"""AQE end to end: estimator wiring, the AQE/EDE callbacks, latent weight clipping, resume and the CLI."""

import csv
import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import ResumableLoader, assert_same_state, checkpointing, crash_and_resume
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import qlight.callbacks.clip as clip_module
from qlight.callbacks import AQE, EDE, LatentWeightClip
from qlight.callbacks.schedules import Schedule
from qlight.cli import main
from qlight.models.convnet import minw_quant
from qlight.quant import (
    QuantConv2d,
    QuantHardtanh,
    QuantLinear,
    QuantSpec,
    TensorQuantizer,
    quant_layers,
    set_mix,
    tensor_quantizers,
)
from qlight.tasks import ImageClassifier

TINY = {"channels": [4, 8, 8], "fc_width": 16}
CONF = Path(__file__).parent / "conf" / "cifar10_convnet_aqe_tiny.yaml"


# ---------------------------------------------------------------- hard quantizers, written out by hand
pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def h_sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def h_ternary(x: Tensor) -> Tensor:  # Δ = 0.5
    return torch.where(x.abs() > 0.5, torch.sign(x), 0.0)


def h_pow2(x: Tensor) -> Tensor:  # thresholds 0.125 / 0.375 / 0.75 -> {0, ±1/4, ±1/2, ±1}
    a = x.abs()
    mag = torch.where(a <= 0.125, 0.0, torch.where(a <= 0.375, 0.25, torch.where(a <= 0.75, 0.5, 1.0)))
    return torch.sign(x) * mag


H = {1: ("sign", h_sign), 2: ("ternary_unit", h_ternary), 3: ("pow2_unit", h_pow2)}


def tiny_module(n: int = 1, m: int = 1, estimator: str = "aqe", lr: float = 0.01) -> ImageClassifier:
    quant = minw_quant(n, m, estimator)
    return ImageClassifier(
        "convnet", model_kwargs=TINY, quant=QuantSpec(**quant) if quant else None,
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
    )


def loader(n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        "deterministic": True, "num_sanity_val_steps": 0, "limit_val_batches": 0, "max_epochs": 2,
        "enable_checkpointing": False, "default_root_dir": tmp_path,
    }
    return Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def f32(value: float) -> float:
    """``value`` as the float32 buffers hold it."""
    return float(torch.tensor(value, dtype=torch.float32))


def mix_values(module: nn.Module) -> set[float]:
    return {float(q.mix) for _, q in tensor_quantizers(module)}


class Probe(Callback):
    """Record (epoch, global_step, knob values) at train start and at every batch start (after AQE/EDE)."""

    def __init__(self, read: Any = mix_values) -> None:
        self.read = read
        self.start: tuple[int, int, Any] | None = None
        self.seen: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = (trainer.current_epoch, trainer.global_step, self.read(pl_module))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        self.seen[trainer.global_step] = (trainer.current_epoch, self.read(pl_module))


# ---------------------------------------------------------------- the estimator, as MINW-Net uses it
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_training_forward_is_the_mixture_and_h_at_alpha_one(bits: int) -> None:
    name, h = H[bits]
    x = torch.linspace(-1.5, 1.5, 301)
    q = TensorQuantizer(name, bits, estimator="aqe").train()
    for alpha in (0.5, 0.8, 1.0):
        q.set_mix(alpha)
        expected = alpha * h(x) + (1 - alpha) * x
        torch.testing.assert_close(q(x), expected)
    assert torch.equal(q(x), h(x))  # alpha = 1: exactly h, not just close
    q.set_mix(0.5)
    assert torch.equal(q.eval()(x), h(x))  # evaluation ignores alpha


@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
def test_backward_is_two_alpha_inside_and_zero_outside(alpha: float) -> None:
    x = torch.linspace(-2.0, 2.0, 400).requires_grad_()  # even count: never exactly ±1
    g = torch.rand(400) + 0.5
    q = TensorQuantizer("sign", estimator="aqe", mix=alpha).train()
    q(x).backward(g)
    inside = x.detach().abs() <= 1
    torch.testing.assert_close(x.grad, torch.where(inside, 2 * alpha * g, 0.0))
    # the input quantizer: the HardTanh supplies the 1{|x| <= 1}
    x.grad = None
    act = QuantHardtanh(act_quantizer=TensorQuantizer("sign", estimator="aqe", mix=alpha)).train()
    act(x).backward(g)
    torch.testing.assert_close(x.grad, torch.where(inside, 2 * alpha * g, 0.0))


@pytest.mark.parametrize(("rule", "factor"), [("alg1", lambda a: 1.0), ("autograd", lambda a: 1.0 - a)])
def test_other_backward_rules(rule: str, factor: Any) -> None:
    """AQE.md §6 #2: Alg. 1 passes g·1{|x| <= 1}; plain autograd through the mixture gives (1 - α)·g."""
    x = torch.tensor([-1.5, -0.5, 0.25, 0.9, 1.5], requires_grad=True)
    q = TensorQuantizer("sign", estimator="aqe", estimator_kwargs={"backward_rule": rule}, mix=0.7).train()
    q(x).backward(torch.ones(5))
    inside = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0])
    expected = inside * factor(0.7) if rule == "alg1" else torch.full((5,), factor(0.7))
    torch.testing.assert_close(x.grad, expected)


def test_conv_weight_gradient_is_two_alpha_times_the_mixed_weight_gradient() -> None:
    """Through QuantConv2d: dL/dW = 2α · dL/dŴ · 1{|W| <= 1}, Ŵ = α·sign(W) + (1 - α)·W."""
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, bias=False,
                       weight_quantizer=TensorQuantizer("sign", estimator="aqe", mix=0.6))
    with torch.no_grad():
        conv.weight.mul_(8.0)  # some latent weights outside [-1, 1]
    x, g = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    conv(x).backward(g)
    w = conv.weight.detach()
    w_hat = (0.6 * h_sign(w) + 0.4 * w).requires_grad_()
    F.conv2d(x, w_hat, padding=1).backward(g)
    assert (w.abs() > 1).any() and (w.abs() <= 1).any()
    torch.testing.assert_close(conv.weight.grad, 1.2 * w_hat.grad * (w.abs() <= 1))


# ---------------------------------------------------------------- the network: hard evaluation = h-network
def manual_forward(model: nn.Module, x: Tensor, hw: Any, ha: Any, mix: float = 1.0) -> Tensor:
    """ConvNet forward written out with F.*; quantized kernels/inputs use mix·h + (1 - mix)·identity."""

    def relax(h: Any, t: Tensor) -> Tensor:
        return mix * h(t) + (1 - mix) * t if mix != 1.0 else h(t)

    for mod in [*model.features, *model.classifier]:
        if isinstance(mod, nn.Linear) and x.dim() == 4:
            x = torch.flatten(x, 1)
        if isinstance(mod, QuantConv2d):
            x = F.conv2d(x, relax(hw, mod.weight), padding=1)
        elif isinstance(mod, nn.Conv2d):
            x = F.conv2d(x, mod.weight, padding=1)
        elif isinstance(mod, QuantLinear):
            x = F.linear(x, relax(hw, mod.weight))
        elif isinstance(mod, nn.Linear):
            x = F.linear(x, mod.weight)
        elif isinstance(mod, nn.MaxPool2d):
            x = F.max_pool2d(x, 2)
        elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            x = F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)
        elif isinstance(mod, QuantHardtanh):
            x = relax(ha, F.hardtanh(x))
        elif isinstance(mod, nn.Hardtanh):
            x = F.hardtanh(x)
    return x


def with_random_bn_stats(module: ImageClassifier) -> nn.Module:
    model = module.model
    torch.manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 2), (3, 3), (1, 16), (16, 2)])
def test_hard_evaluation_equals_the_h_quantized_network(n: int, m: int) -> None:
    torch.manual_seed(0)
    model = with_random_bn_stats(tiny_module(n, m))
    set_mix(model, 0.5)  # evaluation must not depend on the training alpha
    hw = H[n][1] if n != 16 else None
    ha = H[m][1] if m != 16 else None
    x = torch.randn(4, 3, 32, 32)
    seen: list[Tensor] = []
    hooks = [mod.register_forward_pre_hook(lambda _, inp: seen.append(inp[0]))
             for mod in model.modules() if isinstance(mod, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        out = model.eval()(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out, manual_forward(model, x, hw, ha), rtol=1e-5, atol=1e-5)
    # inputs of every layer but the first are on h's grid; conv1 gets the float image
    assert torch.equal(seen[0], x)
    if ha is not None:
        for t in seen[1:]:
            assert torch.equal(t, ha(t))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_training_forward_of_the_network_is_the_alpha_mixture(alpha: float) -> None:
    """With BN frozen, the training forward is the manual network with x̂ = α·h + (1 - α)·x."""
    torch.manual_seed(0)
    model = with_random_bn_stats(tiny_module(1, 1)).train()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            mod.eval()
    set_mix(model, alpha)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = manual_forward(model, x, h_sign, h_sign, alpha)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the AQE callback
def test_alpha_follows_the_epoch_schedule_and_is_logged(tmp_path: Path) -> None:
    seed_everything(0)
    probe = Probe()
    cb = AQE(alpha=Schedule(law="linear", start=0.5, end=1.0, ramp=2))
    tr = trainer(tmp_path, [cb, probe], max_epochs=3, limit_val_batches=1)
    tr.fit(tiny_module(), loader(), loader(8))
    assert probe.seen == {s: (s // 4, {0.5 + 0.25 * min(s // 4, 2)}) for s in range(12)}
    assert float(tr.callback_metrics["aqe/alpha"]) == 1.0
    assert cb.current == {"alpha": 1.0}


def test_separate_input_schedule(tmp_path: Path) -> None:
    def read(module: nn.Module) -> tuple[set[float], set[float]]:
        w = {float(q.mix) for _, q in tensor_quantizers(module, "weight")}
        a = {float(q.mix) for _, q in tensor_quantizers(module, "act")}
        return w, a

    probe = Probe(read)
    per_step = Schedule(law="linear", start=0.5, ramp=4, unit="step")
    cb = AQE(alpha=Schedule(law="constant", start=0.5), input_alpha=per_step)
    tr = trainer(tmp_path, [cb, probe], max_epochs=1, limit_train_batches=3)
    tr.fit(tiny_module(), loader())
    assert probe.seen == {0: (0, ({0.5}, {0.5})), 1: (0, ({0.5}, {0.625})), 2: (0, ({0.5}, {0.75}))}
    assert set(tr.callback_metrics) >= {"aqe/alpha", "aqe/alpha_input"}


def test_latent_weights_stay_in_the_box(tmp_path: Path) -> None:
    """Adam with a large lr pushes latent weights far out; AQE's clip keeps them in [-1, 1]."""
    for clip in (True, False):
        seed_everything(0)
        module = tiny_module(lr=0.5)
        trainer(tmp_path, [AQE(clip_weights=clip)], max_epochs=1).fit(module, loader())
        top = max(float(layer.weight.detach().abs().max()) for _, layer in quant_layers(module))
        if clip:
            assert top == 1.0  # some weights sit on the boundary: the clip acted
        else:
            assert top > 1.0


def test_clips_once_per_optimizer_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = clip_module.clip_weights_

    def counting(weights: Any, bound: float = 1.0) -> None:
        calls.append(len(weights))
        original(weights, bound)

    monkeypatch.setattr(clip_module, "clip_weights_", counting)
    tr = trainer(tmp_path, [AQE()], max_epochs=2, limit_train_batches=4, accumulate_grad_batches=2)
    tr.fit(tiny_module(), loader())
    assert tr.global_step == 4
    assert calls == [9] * (1 + tr.global_step)  # once at train start, then once per optimizer step


def test_standalone_clip_for_ste_baselines(tmp_path: Path) -> None:
    seed_everything(0)
    module = tiny_module(estimator="clipped_ste", lr=0.5)
    trainer(tmp_path, [LatentWeightClip()], max_epochs=1).fit(module, loader())
    assert max(float(layer.weight.detach().abs().max()) for _, layer in quant_layers(module)) == 1.0
    with pytest.raises(ValueError, match="'aqe' estimator"):
        trainer(tmp_path, [AQE()]).fit(tiny_module(estimator="clipped_ste"), loader())
    with pytest.raises(ValueError, match="no weight-quantized layer"):
        trainer(tmp_path, [LatentWeightClip()]).fit(tiny_module(16, 1), loader())


def _aqe_fit(callbacks: list[Callback], root: Path, ckpt_path: str | None) -> tuple[LightningModule, Trainer]:
    """3 epochs of 4 batches of the tiny W1A1 ConvNet with AQE, resumable mid-epoch."""
    seed_everything(0)
    module, data = tiny_module(), ResumableLoader(list(loader()))
    tr = trainer(root, callbacks, max_epochs=3, enable_checkpointing=checkpointing(callbacks))
    data.trainer = tr
    tr.fit(module, data, ckpt_path=ckpt_path)
    return module, tr


@pytest.mark.parametrize(
    ("schedule", "crash_step", "resumed_alpha"),
    [
        (Schedule(law="linear", start=0.5, end=1.0, ramp=10, unit="step"), 6, 0.8),  # inside epoch 1
        (Schedule(law="linear", start=0.5, end=1.0, ramp=2), 4, 0.75),  # at the end of epoch 0
    ],
    ids=["per_step_mid_epoch", "per_epoch_epoch_end"],
)
def test_crash_then_resume_equals_the_uninterrupted_run(
    tmp_path: Path, schedule: Schedule, crash_step: int, resumed_alpha: float
) -> None:
    """A resumed run restores alpha where it was and ends with every parameter, buffer and optimizer tensor
    equal to the uninterrupted run's."""
    runs = crash_and_resume(_aqe_fit, tmp_path, crash_step, lambda: [AQE(alpha=schedule), Probe()])
    assert_same_state(runs.straight, runs.resumed)
    ckpt = torch.load(runs.checkpoint, weights_only=False)
    epoch = crash_step // 4
    assert ckpt["global_step"] == crash_step
    mixes = {v.item() for k, v in ckpt["state_dict"].items() if k.endswith(".mix")}
    last = schedule.value(epoch if schedule.unit == "step" else epoch - 1, crash_step - 1)
    assert mixes == {f32(last)}  # the value the last step before the checkpoint trained with
    full, resumed = runs.straight_callbacks[1], runs.resumed_callbacks[1]
    assert isinstance(full, Probe) and isinstance(resumed, Probe)
    assert resumed.start == (epoch, crash_step, {f32(resumed_alpha)})
    assert resumed.seen and all(full.seen[s] == v for s, v in resumed.seen.items())


def test_aqe_rejects_alpha_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"alpha must stay in \[0, 1\]"):
        AQE(alpha=Schedule(law="linear", start=0.5, end=2.0))


# ---------------------------------------------------------------- EDE on the same machinery
def test_ede_gradient_matches_hand_computed_values() -> None:
    """k·t·sech²(t·x) at t = 2, k = 1: x = 0 -> 2, x = 0.5 -> 2 sech²(1), x = -1 -> 2 sech²(2)."""
    q = TensorQuantizer("sign", estimator="ede").train()
    q.estimator.t.fill_(2.0)
    q.estimator.k.fill_(1.0)
    x = torch.tensor([0.0, 0.5, -1.0], requires_grad=True)
    y = q(x)
    assert torch.equal(y.detach(), torch.tensor([1.0, 1.0, -1.0]))  # hard forward
    y.backward(torch.ones(3))
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 0.8399486832280523, 0.14130164970632886]))


def test_ede_schedule_writes_t_and_k(tmp_path: Path) -> None:
    """t_e = 10^(-1 + 2e/E) for E = 4 epochs, k = max(1/t, 1), in every ede estimator (weights and inputs)."""

    def read(module: nn.Module) -> tuple[set[float], set[float]]:
        est = [q.estimator for _, q in tensor_quantizers(module)]
        return {round(float(e.t), 6) for e in est}, {round(float(e.k), 6) for e in est}

    probe = Probe(read)
    tr = trainer(tmp_path, [EDE(), probe], max_epochs=4, limit_train_batches=1)
    tr.fit(tiny_module(estimator="ede"), loader())
    t = [0.1, 0.316228, 1.0, 3.162278]
    k = [10.0, 3.162278, 1.0, 1.0]
    assert probe.seen == {e: (e, ({t[e]}, {k[e]})) for e in range(4)}
    assert float(tr.callback_metrics["ede/t"]) == pytest.approx(10**0.5)
    assert float(tr.callback_metrics["ede/k"]) == 1.0


def test_ede_hand_formula() -> None:
    for e in range(4):
        t = 10 ** (math.log10(0.1) + (math.log10(10) - math.log10(0.1)) * e / 4)
        assert EDE().t.value(e, 0, total=4) == pytest.approx(t)


# ---------------------------------------------------------------- the CLI path
def test_cli_fit_logs_the_alpha_schedule(
    tmp_path: Path, cifar10_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONF), "--data.root", str(cifar10_zip)])
    assert [type(cb).__name__ for cb in cli.trainer.callbacks if isinstance(cb, AQE)] == ["AQE"]
    with open(next(tmp_path.glob("logs/**/metrics.csv"))) as metrics:
        rows = list(csv.DictReader(metrics))
    alpha = [float(r["aqe/alpha"]) for r in rows if r.get("aqe/alpha")]
    assert alpha == [0.5, 0.75, 1.0]
    assert any(r.get("val/acc1") for r in rows)
    layers = quant_layers(cli.model)
    assert max(float(layer.weight.detach().abs().max()) for _, layer in layers) <= 1.0


# ---------------------------------------------------------------- the experiment table
def load_script(name: str) -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_table_covers_tables_one_and_two() -> None:
    table = dict(load_script("configs_aqe").experiments())
    cells = [(m, n) for m in (1, 2, 3, 16) for n in (1, 2, 3, 16) if (m, n) != (16, 16)]
    for dataset in ("cifar10", "cifar100"):
        for arch in ("convnet_a", "convnet_b", "convnet_c", "convnet_d"):
            for m, n in cells:
                config = table.pop(f"{dataset}/{arch}_aqe_w{n}a{m}.yaml")
                init = config["model"]["init_args"]
                assert init["quant"] == minw_quant(n, m, "aqe") and init["model"] == arch
                assert [cb["class_path"] for cb in config["trainer"]["callbacks"]] == ["AQE"]
                assert config["trainer"]["max_epochs"] == 200
                assert config["data"]["init_args"]["batch_size"] == 256
                assert init["optimizer"]["class_path"] == "torch.optim.Adam"
                lr = init["optimizer"]["init_args"]["lr"] * init["lr_scheduler"]["init_args"]["gamma"] ** 200
                assert lr == pytest.approx(1e-4, rel=1e-4)
            for bits in (1, 3):  # Table II's 1/1 STE row; 3/3 for configs/protocols/aqe_table1.yaml
                ste = table.pop(f"{dataset}/{arch}_ste_w{bits}a{bits}.yaml")
                assert ste["model"]["init_args"]["quant"] == minw_quant(bits, bits, "clipped_ste")
                assert [cb["class_path"] for cb in ste["trainer"]["callbacks"]] == ["LatentWeightClip"]
            assert "quant" not in table.pop(f"{dataset}/{arch}_float.yaml")["model"]["init_args"]
    assert not table


@pytest.mark.parametrize("name", ["cifar10/convnet_d_aqe_w1a1.yaml", "cifar100/convnet_b_ste_w1a1.yaml"])
def test_generated_yaml_builds(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    partial = dict(load_script("configs_aqe").experiments())[name]
    (tmp_path / "config.yaml").write_text(load_script("make_configs").render(name, partial))
    cli = main(["--config", str(tmp_path / "config.yaml")], run=False)
    method = AQE if "_aqe_" in name else LatentWeightClip
    assert sum(isinstance(cb, method) for cb in cli.trainer.callbacks) == 1
    assert len(quant_layers(cli.model)) == 9
