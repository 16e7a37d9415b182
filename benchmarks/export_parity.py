"""How far ONNX runtimes drift from PyTorch on quantized networks with ordinary float numbers.

For each network of issue 14 (random initialisation, BatchNorm statistics from a training-mode pass,
random BN affine and α, so nothing is trivial), export it with :func:`qlight.export.deploy.deployable`
to ONNX and QONNX, run random N(0, 1) inputs through onnxruntime and qonnx's executor, and print per run:
top-1 agreement, the largest and median per-image max |Δlogit| relative to max(1, max |logit|), and how many
images differ beyond float rounding (1e-4 relative), how many of those quantizer boundary flips explain
(:mod:`qlight.export.flips`), the largest relative |Δlogit| of an unexplained image, and the ``--verify``
verdict. ``docs/export.md`` explains the numbers.

Example::

    python benchmarks/export_parity.py --samples 256 --seeds 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qlight.export.deploy import deployable
from qlight.export.onnx_file import write_onnx
from qlight.export.onnx_ops import UnsupportedQuantizerError
from qlight.export.verify import compare, explain_differences, onnxruntime_logits, qonnx_logits
from qlight.models.convnet import minw_quant
from qlight.quant import QuantAct, QuantSpec
from qlight.tasks import ImageClassifier

NETWORKS = {
    "resnet20_w1a4": ("resnet20", {"weight": "binary", "act": "relu_quant", "a_bits": 4}),
    "vgg11_w2a4": ("vgg11", {"weight": "ternary", "w_bits": 2, "act": "relu_quant", "a_bits": 4}),
    "convnet_d_w1a1": ("convnet_d", minw_quant(1, 1)),
    "convnet_d_w3a3": ("convnet_d", minw_quant(3, 3)),
    "resnet20_float": ("resnet20", None),
}


@torch.no_grad()
def random_network(name: str, seed: int) -> nn.Module:
    """The network with BN statistics from one training-mode pass, random BN affine and α."""
    torch.manual_seed(seed)
    arch, spec = NETWORKS[name]
    model = ImageClassifier(model=arch, quant=QuantSpec(**spec) if spec else None).model
    model.train()(torch.randn(16, 3, 32, 32))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
        if isinstance(m, QuantAct):
            m.alpha.mul_(torch.empty(()).uniform_(0.6, 1.6))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="random inputs per run")
    parser.add_argument("--seeds", type=int, default=3, help="networks per architecture")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first network")
    parser.add_argument("--networks", nargs="+", default=sorted(NETWORKS), choices=sorted(NETWORKS))
    parser.add_argument("--explain", type=int, default=25, help="images searched for boundary flips per run")
    args = parser.parse_args()
    run = {"onnx": onnxruntime_logits, "qonnx": qonnx_logits}
    print("network seed format top1_agreement max_rel median_rel beyond_rounding explained unexplained_max_rel verify")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.networks:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                model = random_network(name, seed)
                x = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(1000 + seed))
                with torch.no_grad():
                    ref = model(x).numpy()
                scale = max(1.0, float(np.abs(ref).max()))
                for fmt, logits_of in run.items():
                    try:
                        network = deployable(model, fmt)  # type: ignore[arg-type]
                    except UnsupportedQuantizerError:
                        print(f"{name} {seed} {fmt} not expressible")
                        continue
                    path = Path(tmp) / f"{fmt}.onnx"
                    write_onnx(network, path, fmt, (3, 32, 32), {})  # type: ignore[arg-type]
                    out = logits_of(path, x.numpy())
                    reference = torch.from_numpy(ref)
                    parity = compare(reference, out, None, runtime_name=fmt, source="random inputs")
                    parity = explain_differences(parity, model, x, reference, out, max_images=args.explain)
                    print(
                        f"{name} {seed} {fmt} {parity.agreeing / parity.images:.4f} {parity.max_abs_diff / scale:.3g} "
                        f"{parity.median_abs_diff / scale:.3g} {parity.beyond_rounding}/{args.samples} "
                        f"{len(parity.explanations)} {parity.unexplained_diff / scale:.3g} "
                        f"{'PASS' if parity.passed else 'FAIL'}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
