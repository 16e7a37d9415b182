"""MINW-Net ConvNet A-D: sizes against AQE.md §3 and the quantized structure of every table cell."""

import pytest
import torch
from torch import nn

from qlight.models import build_model
from qlight.models.convnet import minw_quant
from qlight.quant import QuantConv2d, QuantHardtanh, QuantLinear, QuantSpec, TensorQuantizer, quantize_model

# conv + FC kernel sizes of the reconstruction (no biases: BN follows every layer)
WEIGHTS = {"convnet_a": 14_022_016, "convnet_b": 6_397_632, "convnet_c": 3_508_928, "convnet_d": 2_261_184}
CELLS = [(n, m) for m in (1, 2, 3, 16) for n in (1, 2, 3, 16) if (n, m) != (16, 16)]


def kernel_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


@pytest.mark.parametrize(("name", "weights"), WEIGHTS.items())
def test_weight_counts_and_forward(name: str, weights: int) -> None:
    model = build_model(name, num_classes=10)
    assert kernel_count(model) == weights
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_ratios_match_the_reconstruction() -> None:
    """The built networks: A = 14.02M; B/A, C/A, D/A = 0.456 / 0.250 / 0.161 (paper: 0.439 / 0.244 / 0.171)."""
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        counts = {x: kernel_count(build_model(f"convnet_{x}", num_classes=10)) for x in "abcd"}
    a = counts["a"]
    assert round(a / 1e6, 2) == 14.02
    ratios = [counts[x] / a for x in "bcd"]
    assert ratios == pytest.approx([0.456, 0.250, 0.161], abs=1e-3)
    assert ratios == pytest.approx([0.439, 0.244, 0.171], abs=0.02)


def test_cifar100_head_and_custom_width() -> None:
    assert build_model("convnet_d", num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    tiny = build_model("convnet", channels=[4, 8, 8], fc_width=16)
    convs = 3 * 4 * 9 + 4 * 4 * 9 + 4 * 8 * 9 + 8 * 8 * 9 * 3
    assert kernel_count(tiny) == convs + 128 * 16 + 16 * 16 + 16 * 10
    with pytest.raises(ValueError, match="three conv pairs"):
        build_model("convnet", channels=[4, 8])


def test_layer_pattern() -> None:
    """Conv -> (MaxPool) -> BN -> Hardtanh; FC -> BN -> Hardtanh; last FC -> BN (float logits)."""
    model = build_model("convnet_d")
    kinds = [type(m).__name__ for m in [*model.features, *model.classifier]]
    conv = ["Conv2d", "BatchNorm2d", "Hardtanh"]
    conv_pool = ["Conv2d", "MaxPool2d", "BatchNorm2d", "Hardtanh"]
    fc = ["Linear", "BatchNorm1d", "Hardtanh"]
    assert kinds == (conv + conv_pool) * 3 + fc * 2 + ["Linear", "BatchNorm1d"]
    assert isinstance(build_model("convnet_d", last_bn=False).classifier[-1], nn.Identity)


@pytest.mark.parametrize(("n", "m"), CELLS)
def test_every_table_cell_quantizes_as_specified(n: int, m: int) -> None:
    """All 9 kernels quantized (first and last too) unless N = 16; all 8 HardTanh unless M = 16."""
    model = quantize_model(build_model("convnet_d"), QuantSpec(**minw_quant(n, m)))
    layers = [x for x in model.modules() if isinstance(x, QuantConv2d | QuantLinear)]
    acts = [x for x in model.modules() if isinstance(x, QuantHardtanh)]
    assert len(layers) == (0 if n == 16 else 9)
    assert len(acts) == (0 if m == 16 else 8)
    h = {1: "sign", 2: "ternary_unit", 3: "pow2_unit"}
    for layer in layers:
        assert (layer.weight_quantizer.quantizer, layer.weight_quantizer.bits) == (h[n], n)
        assert layer.weight_quantizer.estimator_name == "aqe"
    for act in acts:
        assert (act.act_quantizer.quantizer, act.act_quantizer.bits) == (h[m], m)
        assert act.act_quantizer.estimator_name == "aqe"
    # the image reaches conv1 unquantized, the logits leave the last BN unquantized
    assert type(model.features[0]) in (nn.Conv2d, QuantConv2d)
    assert isinstance(model.classifier[-1], nn.BatchNorm1d)


def test_float_cell_has_no_quantization_layers() -> None:
    assert minw_quant(32, 32) is None
    model = build_model("convnet_d")
    assert not any(isinstance(x, TensorQuantizer) for x in model.modules())


@pytest.mark.parametrize(("n", "m"), [(32, 1), (4, 1), (1, 8)])
def test_bad_cells_name_the_field(n: int, m: int) -> None:
    with pytest.raises(ValueError, match="is not a MINW-Net width"):
        minw_quant(n, m)
