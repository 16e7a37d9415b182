"""Boundary flips: an image whose runtime logits differ because one pre-activation sat on a level boundary.

The "runtime" here is the same PyTorch network with one input nudged by one float32 ulp, which is what a
different summation order does to a pre-activation: the flip is real, its size is known, and nothing else
differs. A difference that no flip can produce (a logit moved by hand) must stay unexplained.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from qlight.export.flips import explain_flips
from qlight.export.verify import ROUNDING_TOLERANCE, compare, explain_differences
from qlight.quant.layers import QuantAct, QuantHardtanh, TensorQuantizer


def _relu_net() -> nn.Module:
    """Identity 1x1 conv -> 2-bit quantized ReLU (α = 0.5) -> a linear layer that weighs pixel (0, 0) heavily."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(1.0)
    head = nn.Linear(16, 3)
    head.weight.data = torch.randn(3, 16) * 0.1
    head.weight.data[:, 0] = torch.tensor([4.0, -4.0, 0.0])  # one level of pixel (0, 0) moves logits by ±2
    head.bias.data = torch.tensor([5.0, 0.0, 0.0])  # top-1 stays class 0 either way
    return nn.Sequential(conv, QuantAct(bits=2, alpha_init=0.5), nn.Flatten(), head).eval()


def _images() -> Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=g) * 1.4  # levels 0..3 of α = 0.5; 2 of 8 images on a boundary
    x[1, 0, 0, 0] = 1.0  # exactly on the boundary 2α: ⌈1.0/0.5⌉ = 2, one ulp above gives 3
    x[3, 0, 0, 0] = 0.0  # the boundary 0 (level 0 vs 1 of the ceil-mode ReLU)
    return x


def _nudged(x: Tensor) -> Tensor:
    """The input a different float32 summation order might see: pixel (0, 0) of images 1 and 3 one ulp up."""
    y = x.clone()
    for i in (1, 3):
        y[i, 0, 0, 0] = torch.nextafter(y[i, 0, 0, 0], torch.tensor(9.0))
    return y


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def test_a_one_ulp_flip_is_found_and_reproduces_the_runtime() -> None:
    model, x = _relu_net(), _images()
    reference, runtime = _logits(model, x), _logits(model, _nudged(x))
    per_image = (runtime - reference).abs().amax(dim=1)
    assert per_image[[0, 2, 4, 5, 6, 7]].eq(0).all()
    torch.testing.assert_close(per_image[[1, 3]], torch.tensor([2.0, 2.0]))  # one level of α = 0.5 times weight 4
    for i in (1, 3):
        found = explain_flips(model, x[i], runtime[i], 1e-6)
        assert found is not None and len(found.flips) == 1 and found.epsilon == 1e-6
        (flip,) = found.flips
        assert flip.layer == "1" and flip.index == (0, 0, 0, 0)
        assert (flip.reference, flip.flipped) == ((1.0, 1.5) if i == 1 else (0.0, 0.5))
        assert found.residual <= 1e-6


def test_a_difference_no_flip_produces_stays_unexplained() -> None:
    model, x = _relu_net(), _images()
    runtime = _logits(model, x).clone()
    runtime[2, 1] += 0.5  # a wrong constant in one place: no activation flip moves only logit 1 by 0.5
    assert explain_flips(model, x[2], runtime[2], 1e-4) is None


def test_verify_passes_explained_flips_beyond_the_tolerance_and_fails_the_unexplained() -> None:
    model, x = _relu_net(), _images()
    reference = _logits(model, x)
    runtime = _logits(model, _nudged(x)).numpy()
    parity = compare(reference, runtime, None, runtime_name="nudged", source="test", tolerance=0.05)
    assert parity.agreeing == 8 and parity.beyond_rounding == 2
    assert parity.max_abs_diff > parity.tolerance * parity.scale and not parity.passed  # logits alone: FAIL
    explained = explain_differences(parity, model, x, reference, runtime)
    assert sorted(explained.explanations) == [1, 3] and explained.unexplained_max_diff == 0.0
    assert explained.passed
    report = "\n".join(explained.lines())
    assert "2 explained by quantizer boundary flips, 0 unexplained" in report and "PASS" in report

    tampered = runtime.copy()
    tampered[0, 1] += 1.0  # image 0 moved by hand: top-1 still agrees, nothing explains it
    parity = explain_differences(
        compare(reference, tampered, None, runtime_name="tampered", source="test", tolerance=0.05),
        model, x, reference, tampered,
    )
    assert sorted(parity.explanations) == [1, 3] and parity.unexplained_max_diff == 1.0
    assert not parity.passed and "1 unexplained (max |Δlogit| 1" in "\n".join(parity.lines())


def test_a_systematic_difference_is_not_searched() -> None:
    """When the median image is off, the file is wrong whatever the flips: no search, FAIL."""
    model, x = _relu_net(), _images()
    reference = _logits(model, x)
    runtime = reference.numpy() + np.float32(0.01)
    parity = compare(reference, runtime, None, runtime_name="off", source="test")
    assert parity.median_abs_diff > ROUNDING_TOLERANCE * parity.scale
    searched = explain_differences(parity, model, x, reference, runtime)
    assert searched.explanations == {} and searched.unexplained_max_diff is None and not searched.passed
    assert "not searched for boundary flips" in "\n".join(searched.lines())


def test_sign_activations_flip_at_zero() -> None:
    """AQE's sign input quantizer (QuantHardtanh): a pre-activation at exactly 0 flips between +1 and -1."""
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    model = nn.Sequential(QuantHardtanh(act_quantizer=TensorQuantizer("sign")), nn.Flatten(), head).eval()
    x = torch.tensor([[[[0.0, 0.3], [-0.7, 0.9]]]])
    runtime = _logits(model, torch.tensor([[[[-1e-30, 0.3], [-0.7, 0.9]]]]))
    assert not torch.equal(runtime, _logits(model, x))
    found = explain_flips(model, x[0], runtime[0], 1e-6)
    assert found is not None and [(f.layer, f.reference, f.flipped) for f in found.flips] == [("0.act_quantizer", 1.0, -1.0)]
