"""Issue-3 flow through the CLI: float model -> STE W1A4 from it -> a checkpoint that is truly quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlight.cli import main
from qlight.quant import QuantAct, QuantConv2d, QuantLinear
from qlight.tasks import ImageClassifier

CONF = Path(__file__).parent / "conf"


def test_ste_w1a4_from_float_checkpoint(cifar10_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONF / "cifar10_float_tiny.yaml"), "--data.root", str(cifar10_folder)])
    (float_ckpt,) = tmp_path.glob("logs/cifar10-resnet20-float/*/version_0/checkpoints/last.ckpt")

    fit = main(
        ["fit", "--config", str(CONF / "cifar10_ste_w1a4_tiny.yaml"), "--data.root", str(cifar10_folder),
         "--model.init_from", str(float_ckpt)]
    )
    fit_acc = float(fit.trainer.callback_metrics["val/acc1"])
    (run,) = tmp_path.glob("logs/cifar10-resnet20-w1a4/ste-resnet20-w1a4-s0/version_0")
    ckpt = run / "checkpoints" / "last.ckpt"

    # The checkpoint rebuilds the quantized network by itself: no callback, no config.
    model = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    convs = [m for m in model.model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 19  # every conv, the first included
    for conv in convs:
        q = conv.quantized_weight()
        delta = conv.weight.abs().mean()
        assert torch.unique(q).numel() == 2
        assert torch.allclose(q.abs(), delta.expand_as(q))
    assert not any(isinstance(m, QuantLinear) for m in model.model.modules())  # last linear float

    outputs: list[torch.Tensor] = []
    acts = {m for m in model.model.modules() if isinstance(m, QuantAct)}
    hooks = [a.register_forward_hook(lambda mod, inp, out: outputs.append(out / mod.alpha.detach())) for a in acts]
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32) * 3)
    for h in hooks:
        h.remove()
    for levels in outputs:  # activation codes are integers 0..15: at most 16 levels
        codes = levels.round()
        assert torch.allclose(levels, codes, atol=1e-4) and codes.min() >= 0 and codes.max() <= 15
    assert max(torch.unique(o.round()).numel() for o in outputs) == 16

    val = main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)])
    assert float(val.trainer.callback_metrics["val/acc1"]) == pytest.approx(fit_acc, abs=1e-6)


def test_alpha_init_modes_are_acted_on() -> None:
    from qlight.quant import QuantSpec

    spec = QuantSpec(weight="binary", a_bits=4, alpha_init="calibrate")
    assert ImageClassifier("resnet20", quant=spec).calibration_steps == 1
    assert ImageClassifier("resnet20", quant=spec, alpha_calibration_steps=50).calibration_steps == 50
    assert ImageClassifier("resnet20", quant=QuantSpec(weight="binary", a_bits=4)).calibration_steps == 0
    with pytest.raises(ValueError, match="init_from"):
        ImageClassifier("resnet20", quant=QuantSpec(weight="binary", a_bits=4, alpha_init="checkpoint"))
