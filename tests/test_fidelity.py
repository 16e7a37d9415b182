"""Faithful to the BCGD authors' code (penhunt/full-quantization-DNN), down to the last float.

- ResNet option-A shortcuts append the zero channels after the input's (their ``DownsampleA``); checkpoints
  saved before the setting keep the symmetric placement they were trained with.
- In a float64 run the knobs are float64 values (rho = 1e-5, rate_factor = 0.01, not their float32 roundings),
  so the two-step BCGD hand computation agrees to 1e-15.
- The AQE/MINW-Net input clip passes the gradient at exactly |x| = 1 (``AQE.md``: ``1{|x| ≤ 1}``).
- BinaryRelax's eta counter as the authors count it: ``eta = 1.02^(2e + 1 + [i ≥ 196])``.

The quantized-ReLU boundary levels are tested against the authors' function in ``test_quant_exact.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import StepRecorder, loader, make_task, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from qlight.callbacks import BCGD, BinaryRelax
from qlight.callbacks.binary_relax import relaxation_at_authors
from qlight.models import build_model
from qlight.models.resnet_cifar import ShortcutA
from qlight.quant import QuantAct, QuantHardtanh, QuantSpec, TensorQuantizer, quant_acts
from qlight.tasks import ImageClassifier


# ------------------------------------------------------------------------------------------- shortcut
def authors_downsample_a(x: torch.Tensor) -> torch.Tensor:
    """``DownsampleA.forward`` of nets/resnet_type_cifar.py: AvgPool2d(1, stride 2), then cat((x, 0·x), 1)."""
    x = F.avg_pool2d(x, kernel_size=1, stride=2)
    return torch.cat((x, x.mul(0)), 1)


def test_shortcut_appends_zero_channels_as_the_authors() -> None:
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(ShortcutA(16, 32, 2)(x), authors_downsample_a(x))
    symmetric = ShortcutA(16, 32, 2, pad="symmetric")(x)
    assert torch.equal(symmetric, F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    assert not torch.equal(symmetric, authors_downsample_a(x))
    with pytest.raises(ValueError, match=r"shortcut_pad='middle' is not supported; valid: \['after', 'symmetric'\]"):
        ShortcutA(16, 32, 2, pad="middle")
    model = build_model("resnet20")
    assert {m.pad for m in model.modules() if isinstance(m, ShortcutA)} == {"after"}


def _checkpoint(tmp_path: Path, **kwargs: Any) -> tuple[Path, ImageClassifier]:
    torch.manual_seed(0)
    task = ImageClassifier(model="resnet8", **kwargs)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      max_steps=1, enable_checkpointing=False, default_root_dir=tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, task.eval()


def test_old_checkpoint_keeps_the_symmetric_placement(tmp_path: Path) -> None:
    """A checkpoint saved before the setting existed evaluates exactly as before (symmetric zeros)."""
    path, task = _checkpoint(tmp_path, model_kwargs={"shortcut_pad": "symmetric"})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = task(x)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["model_kwargs"] = None  # what qlight wrote before shortcut_pad existed
    torch.save(ckpt, path)
    old = ImageClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    assert {m.pad for m in old.model.modules() if isinstance(m, ShortcutA)} == {"symmetric"}
    assert old.hparams["model_kwargs"] == {"shortcut_pad": "symmetric"}
    with torch.no_grad():
        assert torch.equal(old(x), before)
    # a new checkpoint records its placement and keeps it
    path, task = _checkpoint(tmp_path)
    new = ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    assert new.hparams["model_kwargs"] == {"shortcut_pad": "after"}


def test_init_from_adopts_the_float_checkpoint_placement(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path, model_kwargs={"shortcut_pad": "symmetric"})
    task = ImageClassifier(model="resnet8", quant=QuantSpec(), init_from=str(path))
    task.setup("fit")
    assert {m.pad for m in task.model.modules() if isinstance(m, ShortcutA)} == {"symmetric"}
    explicit = ImageClassifier(model="resnet8", quant=QuantSpec(), init_from=str(path), model_kwargs={"shortcut_pad": "after"})
    with pytest.raises(ValueError, match="was trained with shortcut_pad='symmetric', but model.model_kwargs.shortcut_pad='after'"):
        explicit.setup("fit")


# ------------------------------------------------------------------------------------------- float64 knobs
def test_float64_two_step_bcgd_agrees_to_1e15() -> None:
    """The hand computation of ``test_bcgd.test_two_steps_match_hand_computation`` in float64 with the recipe's
    rho = 1e-5 and rate_factor = 0.01: the knobs must be those values, not their float32 roundings."""
    rho, lr, momentum, weight_decay = 1e-5, 0.05, 0.95, 0.01
    recorder = StepRecorder()
    task = make_task(lr=lr, momentum=momentum, weight_decay=weight_decay)
    bcgd = BCGD(rho=rho, rho_max=rho)
    make_trainer([recorder, bcgd], max_steps=2, precision="64-true").fit(task, loader(2))
    (_, act), = quant_acts(task)
    assert act.rate_factor.dtype == torch.float64 and act.rate_factor.item() == 0.01
    assert bcgd._rho is not None and bcgd._rho.dtype == torch.float64 and bcgd._rho.item() == 1e-5
    s0, s1 = recorder.steps

    def sgd(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        d = g + weight_decay * w
        buf = d if buf is None else momentum * buf + d
        return w - lr * buf, buf

    for i in range(len(s0["w"])):
        assert s0["w"][i].dtype == torch.float64
        b0 = (1 - rho) * s0["w"][i] + rho * s0["G"][i]
        w1, buf = sgd(b0, s0["g"][i], None)
        torch.testing.assert_close(s1["w"][i], w1, rtol=0, atol=1e-15)
        b1 = (1 - rho) * s1["w"][i] + rho * s1["G"][i]
        w2, _ = sgd(b1, s1["g"][i], buf)
        torch.testing.assert_close(recorder.final["w"][i], w2, rtol=0, atol=1e-15)


def test_float64_alpha_gradient_uses_rate_factor_exactly() -> None:
    act = QuantAct(2, alpha_init=0.5, rate_factor=0.01).double()
    with torch.no_grad():
        act.alpha.fill_(0.5)
    x = torch.tensor([-1.0, 0.2, 0.7, 1.2, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64) * 1e-3
    act(x).backward(g)
    d = torch.tensor([0.0, 2.0, 2.0, 2.0, 3.0], dtype=torch.float64)  # 'mean': 2^(b-1) inside, L above 1.5
    assert act.alpha.grad.item() == pytest.approx(0.01 * float((g * d).sum()), rel=1e-15, abs=0)


# ------------------------------------------------------------------------------------------- hardtanh at ±1
def test_quant_hardtanh_gradient_includes_the_bounds() -> None:
    ht = QuantHardtanh(act_quantizer=TensorQuantizer("sign", estimator="aqe"))
    ht.act_quantizer.set_mix(0.5)
    one = torch.tensor(1.0)
    x = torch.stack([-torch.nextafter(one, torch.tensor(2.0)), -one, torch.tensor(0.3), one, torch.nextafter(one, torch.tensor(2.0))])
    x.requires_grad_(True)
    ht(x).backward(torch.ones(5))
    # 2·α·g·1{|x| ≤ 1} with α = 0.5: 1 on [-1, 1] including the bounds, 0 just outside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------- eta counter
@pytest.mark.parametrize(("epoch", "batch", "power"), [(0, 0, 1), (0, 195, 1), (0, 196, 2), (0, 390, 2), (1, 0, 3), (7, 200, 16), (149, 390, 300)])
def test_authors_eta_closed_form(epoch: int, batch: int, power: int) -> None:
    eta, mix = relaxation_at_authors(epoch, batch, 391, 1.0, 1.02, 196, 150)
    assert eta == pytest.approx(1.02**power, rel=1e-13)
    assert mix == pytest.approx(eta / (1 + eta), rel=1e-15)
    assert relaxation_at_authors(150, 0, 391, 1.0, 1.02, 196, 150) == (math.inf, 1.0)


class EtaRecorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        br = next(c for c in trainer.callbacks if isinstance(c, BinaryRelax))
        self.seen.append((trainer.current_epoch, batch_idx, br.eta))


def test_binary_relax_counts_eta_as_the_authors_in_training() -> None:
    """5 batches per epoch: eta_every = 3; multiplications before batches 0 and 3 of every epoch."""
    recorder = EtaRecorder()
    br = BinaryRelax(eta0=1.0, eta_growth=2.0, eta_counter="authors")
    make_trainer([br, recorder], max_epochs=2).fit(make_task(), loader(5))
    expected = [2.0 ** (2 * e + 1 + (i >= 3)) for e in range(2) for i in range(5)]
    assert [eta for _, _, eta in recorder.seen] == expected
    assert br.state_dict()["eta_counter"] == "authors" and br.state_dict()["steps_per_epoch"] == 5
    with pytest.raises(ValueError, match=r"eta_counter='epochs' is not supported; valid: \['steps', 'authors'\]"):
        BinaryRelax(eta_counter="epochs")
