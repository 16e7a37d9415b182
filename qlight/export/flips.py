"""Explain an image whose runtime logits differ from PyTorch's by quantizer boundary flips.

Two correct float32 implementations of one quantized network sum each convolution in a different order
(onnxruntime also folds BatchNorm into the convolution), so a pre-activation can differ in its last bits.
Where it lies that close to a level boundary (``kα`` of the quantized ReLU, 0 of a sign), the two pick
neighbouring levels, and the image's logits then move by much more than rounding. On a trained network a
thousand images typically hold a few such flips, and one flip early in the network can move the logits by
several percent of their range: a fixed logit tolerance either fails correct exports or admits real errors.

So ``--verify`` explains each image beyond rounding instead of bounding it. It reruns the PyTorch network on
that image while forcing a few activation elements whose input lies within ``ε·(|x| + mean|x|)`` of a level
boundary to their neighbouring level (what the quantizer gives for the input moved by that much), trying
the fewest flips first and the smallest ``ε`` first. The image is *explained* when some set of at most
``max_flips`` such flips reproduces the runtime's logits to float rounding. A wrong op, constant or
attribute moves logits in a way that no handful of near-boundary flips reproduces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qlight.quant import quant_acts, tensor_quantizers

__all__ = ["DEFAULT_EPSILONS", "Flip", "FlipExplanation", "explain_flips"]

#: boundary distances tried in turn, relative to ``|x| + mean|x|`` of the layer's input
DEFAULT_EPSILONS = (1e-6, 1e-5, 1e-4)


@dataclass(frozen=True)
class Flip:
    """One activation element sent to its neighbouring level: where it is, its input and both outputs."""

    layer: str
    call: int
    index: tuple[int, ...]
    x: float
    reference: float
    flipped: float


@dataclass(frozen=True)
class FlipExplanation:
    """A set of boundary flips that reproduces the runtime's logits of one image to ``residual``."""

    flips: tuple[Flip, ...]
    epsilon: float
    residual: float
    forwards: int


# an element of one call of one quantizer in a forward pass: (call number, flat index)
_Key = tuple[int, int]


class _FlipRun:
    """Forward hooks on the activation quantizers that record near-boundary elements and force flips."""

    def __init__(self, model: nn.Module) -> None:
        acts: list[tuple[str, nn.Module]] = [*quant_acts(model), *tensor_quantizers(model, "act")]
        self.names = {id(m): n for n, m in acts}
        self.modules = [m for _, m in acts]
        self.epsilon = 0.0
        self.forced: set[_Key] = set()
        self.candidates: list[tuple[_Key, Flip]] = []
        self.valid = True
        self._calls = 0

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        call = self._calls
        self._calls += 1
        delta = self.epsilon * (x.abs() + x.abs().mean())
        lower, upper = module.forward(x - delta), module.forward(x + delta)
        alternative = torch.where(lower != output, lower, upper)
        flat = (alternative != output).flatten().nonzero().flatten()
        near = flat.tolist()
        out, alt, xs = output.clone().flatten(), alternative.flatten(), x.flatten()
        indices = torch.stack(torch.unravel_index(flat, x.shape), dim=1).tolist()
        name = self.names[id(module)]
        for i, index in zip(near, indices, strict=True):
            flip = Flip(name, call, tuple(index), float(xs[i]), float(out[i]), float(alt[i]))
            self.candidates.append(((call, i), flip))
        for c, i in self.forced:
            if c == call:
                if i not in near:  # an upstream flip moved this element away from its boundary
                    self.valid = False
                else:
                    out[i] = alt[i]
        return out.view_as(output)

    @contextmanager
    def hooked(self) -> Iterator[None]:
        handles = [m.register_forward_hook(self.hook) for m in self.modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def run(self, model: nn.Module, image: Tensor, forced: set[_Key]) -> tuple[Tensor, list]:
        self.forced, self.candidates, self.valid, self._calls = forced, [], True, 0
        with torch.no_grad():
            logits = model(image)
        return logits[0], self.candidates


def explain_flips(
    model: nn.Module,
    image: Tensor,
    target: Tensor,
    tolerance: float,
    *,
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS,
    max_flips: int = 3,
    budget: int = 300,
) -> FlipExplanation | None:
    """The fewest near-boundary flips after which ``model(image)`` equals ``target`` within ``tolerance``.

    ``image`` is one normalised input (``C×H×W``), ``target`` the runtime's logits for it, ``model`` the
    checkpoint's network in eval. Breadth first over sets of flips (canonical order: forward-pass order),
    at most ``budget`` forward passes in all; None when nothing within ``max_flips`` explains the image.
    """
    model.eval()
    runner = _FlipRun(model)
    batch = image.unsqueeze(0)
    target = target.to(torch.float32)
    forwards = 0
    with runner.hooked():
        for eps in epsilons:
            runner.epsilon = eps
            frontier: list[dict[_Key, Flip]] = [{}]
            for _depth in range(max_flips + 1):
                following: list[dict[_Key, Flip]] = []
                for chosen in frontier:
                    if forwards >= budget:
                        return None
                    logits, candidates = runner.run(model, batch, set(chosen))
                    forwards += 1
                    if not runner.valid:
                        continue
                    residual = float((logits.float() - target).abs().max())
                    if chosen and residual <= tolerance:
                        return FlipExplanation(tuple(chosen.values()), eps, residual, forwards)
                    last = max(chosen, default=(-1, -1))
                    following += [{**chosen, key: flip} for key, flip in candidates if key > last]
                frontier = following
    return None
