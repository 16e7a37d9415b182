"""Quantization policy: a flat, YAML-friendly spec and the function that converts a float model in place.

``QuantSpec`` is what LightningCLI users write under ``model.init_args.quant:``::

    quant:
      weight: binary          # binary | ternary | uniform | pow2 | sign | ternary_unit | pow2_unit | float
      w_bits: 1
      act: relu_quant         # relu_quant (BCGD QuantAct) | hardtanh_quant (AQE input quantizer) | float
      a_bits: 4
      first_layer: quantized  # quantized | float | 8bit
      last_layer: float

:func:`quantize_model` swaps ``nn.Conv2d``/``nn.Linear``/``nn.ReLU``/``nn.Hardtanh`` for their quantized twins
(before optimizers are built); the helpers below list quantized layers, group parameters for the optimizer and
set the scheduled knobs that callbacks drive (``mix``, α calibration).
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from .checks import Arg, ChoiceError, QuantArgError, check_choice
from .functional import ActMode
from .layers import (
    QUANTIZERS,
    QuantAct,
    QuantConv2d,
    QuantHardtanh,
    QuantLinear,
    TensorQuantizer,
)
from .quant_relu import AlphaRule, XRule

__all__ = [
    "ACT_KINDS",
    "ALPHA_INIT_CHOICES",
    "LAYER_ROLES",
    "QUANTIZER_ROLES",
    "ActKind",
    "LayerRole",
    "QuantSpec",
    "QuantizerRole",
    "clamp_alphas_",
    "iter_quant_modules",
    "param_groups",
    "quant_acts",
    "quant_layers",
    "quantize_model",
    "quantized_weights",
    "set_calibrating",
    "set_mix",
    "tensor_quantizers",
]

#: what replaces the activations: ``relu_quant`` (BCGD's QuantAct), ``hardtanh_quant`` (AQE's input
#: quantizer) or nothing (``float``)
ActKind = Literal["relu_quant", "hardtanh_quant", "float"]
ACT_KINDS: tuple[ActKind, ...] = get_args(ActKind)
#: how the first and the last conv/linear layer are treated
LayerRole = Literal["quantized", "float", "8bit"]
LAYER_ROLES: tuple[LayerRole, ...] = get_args(LayerRole)
#: the named ways of setting the initial α (besides a float)
AlphaInit = Literal["table", "calibrate", "checkpoint"]
ALPHA_INIT_CHOICES: tuple[AlphaInit, ...] = get_args(AlphaInit)
#: which tensor quantizers :func:`tensor_quantizers` lists
QuantizerRole = Literal["all", "weight", "act"]
QUANTIZER_ROLES: tuple[QuantizerRole, ...] = get_args(QuantizerRole)

#: the QuantSpec field each layer argument comes from, so the layers' errors name the field
_WEIGHT_FIELDS = {
    "quantizer": "weight", "bits": "w_bits", "scale": "w_scale", "threshold": "w_threshold",
    "delta": "w_threshold", "estimator": "w_estimator", "estimator_kwargs": "w_estimator_kwargs",
}
_RELU_FIELDS = {"bits": "a_bits", "mode": "a_mode"}
_HARDTANH_FIELDS = {
    "quantizer": "a_quantizer", "bits": "a_bits", "estimator": "a_estimator", "estimator_kwargs": "a_estimator_kwargs",
}
#: the quantizer keyword argument ``w_threshold`` sets, by the name the quantizer takes it under
_THRESHOLD_KWARGS = ("threshold", "delta")

T = TypeVar("T")


def _threshold_kwarg(quantizer: str) -> str | None:
    return next((k for k in _THRESHOLD_KWARGS if k in QUANTIZERS[quantizer].kwargs), None)


def _as_fields(
    build: Callable[[], T], fields: Mapping[str, str], context: Mapping[str, tuple[str, Any]] | None = None
) -> T:
    """``build()``, with the errors of the layers' own checks named after the QuantSpec fields they came from.

    ``context`` adds ``by <field>=<value>`` to a rejected choice of the given argument, where the choices depend
    on a field the layer does not know (the activation bits depend on ``act``).
    """
    try:
        return build()
    except QuantArgError as err:
        if isinstance(err, ChoiceError) and context and err.arg in context:
            err = err.within(*context[err.arg])
        error = err.renamed(fields, prefix="QuantSpec.")
    raise error  # outside the except clause, so the QuantSpec error is the whole story


@dataclass
class QuantSpec:
    """Which layers are quantized, how, and with which coarse gradients. All fields have defaults.

    Weights (conv and linear kernels):
        weight: hard quantizer of the kernels: ``binary`` (δ·sign, 1 bit), ``ternary`` (2), ``uniform``
            (2..8), ``pow2`` (scaled power of two, 2..8), ``sign`` / ``ternary_unit`` / ``pow2_unit`` (unscaled,
            AQE/MINW-Net), or ``float`` (no weight quantization; all ``w_*`` fields are then ignored).
        w_bits: bit-width; None = the quantizer's natural width (1, 2, 4, 3, 1, 2, 3), see :attr:`weight_bits`.
            Fields are never rewritten after validation, so configs compose (a base ``w_bits: null`` stays valid
            when an override switches ``weight``).
        w_scale: ``mean``/``median`` (binary), ``code``/``twn`` (ternary), ``ls``/``max`` (pow2); None = default
            (``mean``, ``code``, ``ls``).
        w_threshold: ternary threshold factor t = w_threshold·mean|w| (default 0.7) or the ternary_unit Δ
            (default 0.5); None = default.
        per_channel: per-output-channel scales (scaled quantizers only).
        w_estimator: registered estimator (``ste`` = BinaryConnect/BCGD coarse gradient, ``clipped_ste``,
            ``aqe``, ``ede``, ...); ``w_estimator_kwargs`` its keyword arguments.
    Activations:
        act: ``relu_quant`` (every ``nn.ReLU`` → :class:`QuantAct`, BCGD), ``hardtanh_quant`` (every
            ``nn.Hardtanh`` → :class:`QuantHardtanh`, AQE/MINW-Net) or ``float``.
        a_bits: activation bits (relu_quant: 1..8; hardtanh_quant: by ``a_quantizer``).
        a_quantizer: hardtanh_quant only: ``sign`` | ``ternary_unit`` | ``pow2_unit``; None picks by a_bits
            (1 → sign, 2 → ternary_unit, ≥ 3 → pow2_unit), see :attr:`act_quantizer_name`.
        a_estimator, a_estimator_kwargs: hardtanh_quant estimator (``ste``, ``aqe``, ...).
        a_mode: relu_quant rounding, ``ceil`` (authors) or ``round``.
        x_rule: relu_quant coarse derivative in x: ``identity`` | ``relu`` | ``clipped`` (default).
        alpha_rule: relu_quant α-derivative: ``ae`` | ``mean`` (default) | ``min`` | ``pact``.
        rate_factor: α-gradient factor r in clamp(r·Σ g·D, −1, 1) (default 0.01).
        alpha_init: ``table`` (:data:`~qlight.quant.layers.BIT_ALPHA`), a positive float, ``calibrate``
            (max-calibration, done by the task) or ``checkpoint`` (α from a float checkpoint, done by the task).
            The layers are built with the table value unless a float is given.
    Layer exceptions (weights only; activations are unaffected):
        first_layer: the first ``nn.Conv2d``/``nn.Linear`` in registration order: ``quantized`` (default, as
            the BCGD CIFAR code), ``float`` or ``8bit`` (uniform 8-bit weights with the ``ste`` estimator).
        last_layer: the last ``nn.Linear`` (the last conv/linear if there is none): default ``float`` (BCGD
            CIFAR code). If first and last are the same module, ``last_layer`` wins.
    """

    weight: str = "binary"
    w_bits: int | None = None
    w_scale: str | None = None
    w_threshold: float | None = None
    per_channel: bool = False
    w_estimator: str = "ste"
    w_estimator_kwargs: dict[str, Any] = field(default_factory=dict)
    act: ActKind = "relu_quant"
    a_bits: int = 4
    a_quantizer: str | None = None
    a_estimator: str = "ste"
    a_estimator_kwargs: dict[str, Any] = field(default_factory=dict)
    a_mode: ActMode = "ceil"
    x_rule: XRule = "clipped"
    alpha_rule: AlphaRule = "mean"
    rate_factor: float = 0.01
    alpha_init: float | str = "table"
    first_layer: LayerRole = "quantized"
    last_layer: LayerRole = "float"

    def __post_init__(self) -> None:
        """Check the fields by building the layers they describe (one validation path: the layers' own)."""
        self._validate_weights()
        self._validate_acts()
        for name in ("first_layer", "last_layer"):
            check_choice(f"QuantSpec.{name}", getattr(self, name), LAYER_ROLES)

    # ---------------------------------------------------------------------------------------------------
    def _validate_weights(self) -> None:
        check_choice("QuantSpec.weight", self.weight, [*sorted(QUANTIZERS), "float"])
        if self.weight == "float":
            return
        takes = QUANTIZERS[self.weight].kwargs
        if self.w_scale is not None and "scale" not in takes:
            self._not_used("w_scale", self.w_scale, "a scale", lambda q: "scale" in QUANTIZERS[q].kwargs)
        if self.w_threshold is not None and _threshold_kwarg(self.weight) is None:
            self._not_used("w_threshold", self.w_threshold, "a threshold", lambda q: _threshold_kwarg(q) is not None)
        _as_fields(self.weight_quantizer, _WEIGHT_FIELDS)

    def _not_used(self, name: str, value: Any, what: str, takes: Callable[[str], bool]) -> None:
        takers = sorted(q for q in QUANTIZERS if takes(q))
        raise QuantArgError(
            Arg(f"QuantSpec.{name}"), f"={value!r} is not used by ", Arg("weight"),
            f"={self.weight!r}; valid: None (only {takers} take {what})",
        )

    def _validate_acts(self) -> None:
        check_choice("QuantSpec.act", self.act, ACT_KINDS)
        if self.act == "relu_quant":
            if self.a_quantizer is not None:
                raise QuantArgError(
                    Arg("QuantSpec.a_quantizer"), f"={self.a_quantizer!r} is only used by ", Arg("act"),
                    "='hardtanh_quant'; valid: None",
                )
            self._validate_alpha_init()
            _as_fields(self.quant_act, _RELU_FIELDS, {"bits": ("act", "relu_quant")})
        elif self.act == "hardtanh_quant":
            if self.a_quantizer is not None:  # the input quantizers map onto fixed levels: no scale
                unscaled = [q for q, d in QUANTIZERS.items() if not d.scaled]
                check_choice("QuantSpec.a_quantizer", self.a_quantizer, unscaled, by=("act", "hardtanh_quant"))
            _as_fields(self.act_quantizer, _HARDTANH_FIELDS)

    def _validate_alpha_init(self) -> None:
        v: float | str | None = self.alpha_init
        if isinstance(v, str) and v in ALPHA_INIT_CHOICES:
            return
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                v = None  # reported below, outside the except clause
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise QuantArgError(
                Arg("QuantSpec.alpha_init"),
                f"={self.alpha_init!r} is not supported; valid: {list(ALPHA_INIT_CHOICES)} or a float > 0",
            )
        self.alpha_init = float(v)

    # ---------------------------------------------------------------------------------------------------
    @property
    def weight_bits(self) -> int | None:
        """``w_bits``, or the weight quantizer's natural width when it is None (None for ``weight='float'``)."""
        if self.weight == "float":
            return None
        return self.w_bits if self.w_bits is not None else QUANTIZERS[self.weight].default_bits

    @property
    def act_quantizer_name(self) -> str:
        """hardtanh_quant quantizer: ``a_quantizer``, or by ``a_bits``: 1 → sign, 2 → ternary_unit, else pow2_unit."""
        if self.a_quantizer is not None:
            return self.a_quantizer
        return "sign" if self.a_bits == 1 else "ternary_unit" if self.a_bits == 2 else "pow2_unit"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, e.g. for ``save_hyperparameters`` or logging."""
        return dataclasses.asdict(self)

    def weight_quantizer(self, role: str = "quantized") -> TensorQuantizer | None:
        """A fresh weight :class:`TensorQuantizer` for a layer with the given role (None for ``float``)."""
        if role == "float" or (role == "quantized" and self.weight == "float"):
            return None
        if role == "8bit":
            return TensorQuantizer("uniform", 8, per_channel=self.per_channel, estimator="ste")
        kwargs: dict[str, Any] = {}
        if self.w_scale is not None:
            kwargs["scale"] = self.w_scale
        threshold = _threshold_kwarg(self.weight)
        if self.w_threshold is not None and threshold is not None:
            kwargs[threshold] = self.w_threshold
        return TensorQuantizer(
            self.weight, self.weight_bits, per_channel=self.per_channel, quantizer_kwargs=kwargs,
            estimator=self.w_estimator, estimator_kwargs=self.w_estimator_kwargs,
        )

    def quant_act(self, device: torch.device | None = None) -> QuantAct:
        """A fresh :class:`QuantAct` (act = relu_quant)."""
        a0 = self.alpha_init if isinstance(self.alpha_init, float) else None
        return QuantAct(
            self.a_bits, a0, self.a_mode, self.x_rule, self.alpha_rule, self.rate_factor, device=device,
        )

    def act_quantizer(self) -> TensorQuantizer:
        """A fresh activation :class:`TensorQuantizer` (act = hardtanh_quant)."""
        return TensorQuantizer(
            self.act_quantizer_name, self.a_bits, estimator=self.a_estimator,
            estimator_kwargs=self.a_estimator_kwargs,
        )


def _roles(model: nn.Module, spec: QuantSpec) -> dict[int, str]:
    """id(module) -> role (first_layer / last_layer / quantized) for every plain Conv2d/Linear."""
    layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    roles = {id(m): "quantized" for m in layers}
    if layers:
        roles[id(layers[0])] = spec.first_layer
        linears = [m for m in layers if type(m) is nn.Linear]
        roles[id((linears or layers)[-1])] = spec.last_layer
    return roles


def quantize_model(model: nn.Module, spec: QuantSpec | None = None) -> nn.Module:
    """Convert ``model`` in place (and return it) according to ``spec``; call before building optimizers.

    - every ``nn.Conv2d`` → :class:`QuantConv2d`, every ``nn.Linear`` → :class:`QuantLinear` (sharing the
      original Parameters), except layers whose role is ``float``; the FIRST conv/linear in module
      registration order (``model.modules()``) gets ``spec.first_layer``, the LAST ``nn.Linear`` (or last
      conv/linear if there is no Linear) gets ``spec.last_layer``;
    - ``act == "relu_quant"``: every ``nn.ReLU`` → :class:`QuantAct`; ``act == "hardtanh_quant"``: every
      ``nn.Hardtanh`` → :class:`QuantHardtanh`.

    Only these exact types are converted (subclasses such as ``nn.ReLU6`` or custom convs are left alone, and
    functional calls like ``F.relu`` are invisible). Module sharing is preserved: a module registered under
    several names (``block.act2 = block.act1``, the shared α of a ResNet block) becomes ONE quantized module.
    """
    spec = spec if spec is not None else QuantSpec()
    roles = _roles(model, spec)
    p = next(model.parameters(), None)
    device = p.device if p is not None else None
    memo: dict[int, nn.Module] = {}
    for m in model.modules():
        new: nn.Module | None = None
        if id(m) in roles:
            wq = spec.weight_quantizer(roles[id(m)])
            if wq is not None and isinstance(m, nn.Conv2d):
                new = QuantConv2d.from_float(m, wq)
            elif wq is not None and isinstance(m, nn.Linear):
                new = QuantLinear.from_float(m, wq)
        elif type(m) is nn.ReLU and spec.act == "relu_quant":
            new = spec.quant_act(device)
            new.train(m.training)
        elif type(m) is nn.Hardtanh and spec.act == "hardtanh_quant":
            aq = spec.act_quantizer()
            new = QuantHardtanh.from_float(m, aq if device is None else aq.to(device))
        if new is not None:
            memo[id(m)] = new
    if id(model) in memo:
        return memo[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in memo:
                parent._modules[name] = memo[id(child)]
    return model


# ---------------------------------------------------------------------------------------------------------
# helpers for tasks and callbacks


def quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """``(name, layer)`` for every weight-quantized layer (QuantConv2d/QuantLinear), each module once."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def quant_acts(model: nn.Module) -> list[tuple[str, QuantAct]]:
    """``(name, module)`` for every :class:`QuantAct` (a shared module appears once, under its first name)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]


def tensor_quantizers(model: nn.Module, role: QuantizerRole = "all") -> list[tuple[str, TensorQuantizer]]:
    """``(name, quantizer)`` for every :class:`TensorQuantizer`, of the given ``role``.

    ``role="weight"`` keeps those of quantized conv/linear kernels, ``role="act"`` the others (e.g.
    :class:`QuantHardtanh` input quantizers).
    """
    check_choice("role", role, QUANTIZER_ROLES)
    weight_ids = {id(m.weight_quantizer) for _, m in quant_layers(model)}
    out = []
    for n, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            is_w = id(m) in weight_ids
            if role == "all" or (role == "weight") == is_w:
                out.append((n, m))
    return out


@torch.no_grad()
def set_mix(model: nn.Module, value: float | Tensor, role: QuantizerRole = "all") -> None:
    """In place ``mix ← value`` on the selected TensorQuantizers (BinaryRelax η/(1+η), AQE α). No host sync."""
    for _, q in tensor_quantizers(model, role):
        if isinstance(value, Tensor):
            q.mix.copy_(value)
        else:
            q.set_mix(float(value))


def set_calibrating(model: nn.Module | list[QuantAct], flag: bool) -> None:
    """Switch max-calibration of every :class:`QuantAct` on or off (``QuantAct.calibrating``).

    ``model`` may also be the list of QuantActs (as the task keeps it, to skip the module walk).
    """
    acts = model if isinstance(model, list) else [m for _, m in quant_acts(model)]
    for act in acts:
        act.calibrating = bool(flag)


@torch.no_grad()
def clamp_alphas_(model: nn.Module | list[QuantAct]) -> None:
    """Project every QuantAct α onto its ``[alpha_min, alpha_max]`` in place (the authors' in-place clamp).

    ``model`` may also be a list of QuantActs. Multi-tensor kernels per distinct range, not one per α.
    """
    acts = model if isinstance(model, list) else [m for _, m in quant_acts(model)]
    ranges: dict[tuple[float, float], list[Tensor]] = {}
    for act in acts:
        ranges.setdefault((act.alpha_min, act.alpha_max), []).append(act.alpha)
    for (low, high), alphas in ranges.items():
        torch._foreach_clamp_min_(alphas, low)
        torch._foreach_clamp_max_(alphas, high)
    for act in acts:
        act.note_projected()


@torch.no_grad()
def quantized_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{layer_name: Q(weight)}`` (hard, no grad) for every weight-quantized layer."""
    return {n: m.quantized_weight() for n, m in quant_layers(model)}


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Partition ``model.parameters()`` (each Parameter once) for the optimizer.

    - ``quantized_weights``: latent kernels of QuantConv2d/QuantLinear (the tensors BCGD blends),
    - ``alphas``: QuantAct α and any learnable parameter owned by a TensorQuantizer/estimator (LSQ-style steps),
    - ``biases``: every Parameter named ``bias`` (conv/linear biases, BN β),
    - ``weights``: everything else (BN γ, float conv/linear weights, ...).
    """
    qw = {id(m.weight) for _, m in quant_layers(model)}
    alphas = {id(m.alpha) for _, m in quant_acts(model)}
    for _, tq in tensor_quantizers(model):
        alphas.update(id(p) for p in tq.parameters())
    groups: dict[str, list[nn.Parameter]] = {"quantized_weights": [], "weights": [], "biases": [], "alphas": []}
    for name, p in model.named_parameters():
        if id(p) in qw:
            groups["quantized_weights"].append(p)
        elif id(p) in alphas:
            groups["alphas"].append(p)
        elif name.rsplit(".", 1)[-1] == "bias":
            groups["biases"].append(p)
        else:
            groups["weights"].append(p)
    return groups


def iter_quant_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every quantized module (layers, activations, tensor quantizers) with its name."""
    for n, m in model.named_modules():
        if isinstance(m, (QuantConv2d, QuantLinear, QuantAct, QuantHardtanh, TensorQuantizer)):
            yield n, m
