"""Quantized layers: TensorQuantizer, QuantConv2d/QuantLinear, QuantAct (BCGD), QuantHardtanh (AQE inputs).

:class:`TensorQuantizer` quantizes a tensor with a named quantizer and estimator; the conv and linear layers
quantize their weight with it; :class:`QuantAct` is the BCGD quantized ReLU and :class:`QuantHardtanh` the
AQE/MINW-Net input quantizer.

Style follows timm's ``std_conv.py``: the layers subclass ``nn.Conv2d`` / ``nn.Linear``, keep the float latent
``weight`` as the Parameter, transform it in ``forward`` and call the functional conv/linear. Every scheduled knob
(the relaxation ``mix``, estimator temperatures, the α-gradient ``rate_factor``) is a registered 0-dim float
buffer, so it is checkpointed and can be changed in place (``.fill_()``) without ``torch.compile`` recompiles.
The only Python-level switches are ``module.training`` and :attr:`QuantAct.calibrating` (each a one-off
recompile when toggled under ``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from . import functional as QF
from .checks import Arg, ChoiceError, QuantArgError, check_choice, check_that
from .estimators import Estimator, build_estimator, straight_through
from .functional import ACT_BITS, ACT_MODES, _fp
from .quant_relu import ALPHA_RULES, X_RULES, QuantReLUFunction, quant_relu_table

__all__ = [
    "BIT_ALPHA",
    "QUANTIZERS",
    "QuantAct",
    "QuantConv2d",
    "QuantHardtanh",
    "QuantLinear",
    "QuantizerDef",
    "TensorQuantizer",
    "register_quantizer",
    "validate_quantizer",
]


@dataclass(frozen=True)
class QuantizerDef:
    """A named hard quantizer: ``fn(x, bits, per_channel, **kwargs) -> Q(x)`` and what it accepts.

    Use a module-level function for ``fn`` (not a lambda) so quantized models stay picklable.

    Args:
        fn: the hard quantizer.
        bits: the bit-widths it supports.
        default_bits: the bit-width used when none is given.
        kwargs: the keyword arguments of ``fn`` a user may set (``quantizer_kwargs``).
        scaled: whether ``Q(x)`` multiplies levels by a scale computed from ``x`` (so a scale per output
            channel makes sense); unscaled quantizers map onto fixed levels such as {−1, +1}.
    """

    fn: Callable[..., Tensor]
    bits: tuple[int, ...]
    default_bits: int
    kwargs: tuple[str, ...]
    scaled: bool


# Named module-level adapters (not lambdas) so modules holding a quantizer stay picklable (ddp_spawn,
# torch.save of whole modules): the instance stores only the quantizer NAME and looks it up at call time.
def _q_binary(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.binary_weight(x, per_channel=pc, **kw)


def _q_ternary(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.ternary_weight(x, per_channel=pc, **kw)


def _q_uniform(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.uniform_weight(x, bits, per_channel=pc)


def _q_pow2(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.pow2_weight(x, bits, per_channel=pc, **kw)


def _q_sign(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.sign_quant(x)


def _q_ternary_unit(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.ternary_quant(x, **kw)


def _q_pow2_unit(x: Tensor, bits: int, pc: bool, **kw: Any) -> Tensor:
    return QF.pow2_quant(x, bits, **kw)


#: name -> hard quantizer definition. Extend with :func:`register_quantizer`.
QUANTIZERS: dict[str, QuantizerDef] = {
    # δ·sign(w), δ = mean|w| (or median)
    "binary": QuantizerDef(fn=_q_binary, bits=(1,), default_bits=1, kwargs=("scale",), scaled=True),
    # c·sign(w)·1{|w| ≥ 0.7·mean|w|}
    "ternary": QuantizerDef(fn=_q_ternary, bits=(2,), default_bits=2, kwargs=("threshold", "scale"), scaled=True),
    # c·{0, ±1, …, ±(2^(b−1)−1)}, least-squares scale
    "uniform": QuantizerDef(fn=_q_uniform, bits=QF.UNIFORM_BITS, default_bits=4, kwargs=(), scaled=True),
    # c·{0, ±2^−k, …, ±1}
    "pow2": QuantizerDef(fn=_q_pow2, bits=QF.POW2_BITS, default_bits=3, kwargs=("scale", "thresholds"), scaled=True),
    # {−1, +1}
    "sign": QuantizerDef(fn=_q_sign, bits=(1,), default_bits=1, kwargs=(), scaled=False),
    # {−1, 0, 1}
    "ternary_unit": QuantizerDef(fn=_q_ternary_unit, bits=(2,), default_bits=2, kwargs=("delta",), scaled=False),
    # {0, ±2^−k, …, ±1}
    "pow2_unit": QuantizerDef(fn=_q_pow2_unit, bits=QF.POW2_BITS, default_bits=3, kwargs=("thresholds",), scaled=False),
}


def register_quantizer(name: str, definition: QuantizerDef) -> None:
    """Register a hard quantizer usable as ``TensorQuantizer(name, ...)`` and in :class:`QuantSpec`."""
    if name in QUANTIZERS:
        raise ValueError(f"quantizer {name!r} is already registered")
    QUANTIZERS[name] = definition


def validate_quantizer(
    quantizer: str, bits: int | None, per_channel: bool = False, kwargs: Mapping[str, Any] | None = None
) -> int:
    """Check a (quantizer, bits, per_channel, kwargs) combination; return the resolved bits.

    Raises a :class:`~qlight.quant.checks.QuantArgError` naming the argument, the value and the valid choices,
    e.g. ``bits=3 is not supported by quantizer='binary'; valid: [1]``.
    """
    check_choice("quantizer", quantizer, sorted(QUANTIZERS))
    d = QUANTIZERS[quantizer]
    b = d.default_bits if bits is None else bits
    check_choice("bits", b, d.bits, by=("quantizer", quantizer))
    if per_channel and not d.scaled:
        scaled = sorted(k for k, v in QUANTIZERS.items() if v.scaled)
        raise QuantArgError(
            Arg("per_channel"), "=True is not supported by ", Arg("quantizer"),
            f"={quantizer!r} (it has no scale); valid: False, or a quantizer with a scale: {scaled}",
        )
    for k in kwargs or {}:
        if k not in d.kwargs:
            raise QuantArgError(
                Arg("quantizer_kwargs"), f" key {k!r} is not accepted by ", Arg("quantizer"),
                f"={quantizer!r}; valid: {list(d.kwargs)}",
            )
    return int(b)


class TensorQuantizer(nn.Module):
    """Quantize a tensor with a named hard quantizer and a named coarse-gradient estimator.

    - training: ``y = estimator(x, Q(x), mix)``: value ``mix·Q(x) + (1−mix)·x`` with the estimator's
      backward (``mix = 1``, the default, is exact quantization);
    - eval: ``y = Q(x)`` exactly (gradient, if grad mode is on, straight-through);
    - :meth:`quantize`: ``Q(x)`` without gradient.

    Math runs in float32 (float64 stays float64) and the output has ``x``'s dtype.

    Two things keep the eager training forward lean (a binary weight costs ``abs, mean, sign, mul``):

    - at ``mix = 1`` the ``lerp`` is skipped when the quantizer *knows* mix is 1 without reading the device:
      mix was set through :meth:`set_mix` (or construction, or ``load_state_dict``) and the buffer has not been
      written since (its version counter and storage are unchanged). Any other write falls back to the
      ``lerp``, which is exact at every mix. Under ``torch.compile`` the ``lerp`` always runs (it is fused).
    - built-in estimators attach their backward through one small autograd Function, not arithmetic.

    With :attr:`keep_training_value` on (BCGD and BinaryRelax switch it on), the forward value of the last
    training forward is kept, so the blend can use the exact tensor the loss saw (:meth:`training_value`).

    Args:
        quantizer: ``binary`` (1 bit), ``ternary`` (2), ``uniform`` (2..8), ``pow2`` (2..8), ``sign`` (1),
            ``ternary_unit`` (2), ``pow2_unit`` (2..8); see :data:`QUANTIZERS`.
        bits: bit-width; None picks the quantizer's default (1, 2, 4, 3, 1, 2, 3).
        per_channel: per-output-channel statistics (scaled quantizers only).
        quantizer_kwargs: e.g. ``{"scale": "median"}`` (binary), ``{"threshold": 0.7, "scale": "twn"}``
            (ternary), ``{"scale": "max"}`` (pow2), ``{"delta": 0.5}`` (ternary_unit),
            ``{"thresholds": [...]}`` (pow2/pow2_unit).
        estimator: registered estimator name (``ste``, ``clipped_ste``, ``aqe``, ``ede``, ...).
        estimator_kwargs: keyword arguments of the estimator (e.g. ``{"backward_rule": "alg1"}``).
        mix: initial value of the ``mix`` buffer in [0, 1].
    """

    mix: Tensor

    def __init__(
        self,
        quantizer: str = "binary",
        bits: int | None = None,
        *,
        per_channel: bool = False,
        quantizer_kwargs: Mapping[str, Any] | None = None,
        estimator: str = "ste",
        estimator_kwargs: Mapping[str, Any] | None = None,
        mix: float = 1.0,
    ) -> None:
        super().__init__()
        self.bits = validate_quantizer(quantizer, bits, per_channel, quantizer_kwargs)
        self.quantizer = quantizer
        self.per_channel = bool(per_channel)
        self.quantizer_kwargs: dict[str, Any] = dict(quantizer_kwargs or {})
        check_that(0.0 <= float(mix) <= 1.0, "mix", mix, "must be in [0, 1]")
        self.register_buffer("mix", torch.tensor(float(mix)))
        self.estimator_name = estimator
        self.estimator: Estimator = build_estimator(estimator, **dict(estimator_kwargs or {}))
        #: keep the value of the last training forward for :meth:`training_value` (off by default: memory)
        self.keep_training_value = False
        self._training_value: Tensor | None = None
        self._training_key: tuple[int, int] | None = None
        self._mix_one_key: tuple[int, int] | None = None
        self._note_mix(float(mix))
        # dry run: bad quantizer_kwargs values fail here, at construction, not at the first forward
        try:
            self._q(torch.linspace(-1.0, 1.0, 8).reshape(2, 4))
        except ChoiceError as err:  # e.g. scale='max' for binary: its choices are the quantizer's
            error = err.within("quantizer", quantizer)
        else:
            return
        raise error

    # ------------------------------------------------------------------ mix bookkeeping (host side)
    def _note_mix(self, value: float) -> None:
        """Remember (without reading the device) whether the buffer now holds exactly 1."""
        self._mix_one_key = (self.mix._version, self.mix.data_ptr()) if value == 1.0 else None

    def _mix_is_one(self) -> bool:
        if torch.compiler.is_compiling():
            return False
        return self._mix_one_key is not None and self._mix_one_key == (self.mix._version, self.mix.data_ptr())

    @torch.no_grad()
    def set_mix(self, value: float) -> None:
        """In place: ``mix ← value`` (0 ≤ value ≤ 1). Prefer it to ``mix.fill_`` in hot loops (see the class doc)."""
        self.mix.fill_(float(value))
        self._note_mix(float(value))

    @override
    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "mix")
        if isinstance(loaded, Tensor) and loaded.numel() == 1 and loaded.device.type != "meta":
            self._note_mix(float(loaded))

    @override
    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TensorQuantizer:
        was_one = self._mix_is_one()
        super()._apply(fn, *args, **kwargs)
        if was_one:  # a device move or dtype cast keeps the value 1
            self._note_mix(1.0)
        self._training_value = None
        return self

    # ------------------------------------------------------------------ quantization
    def _q(self, x: Tensor) -> Tensor:
        return QUANTIZERS[self.quantizer].fn(x, self.bits, self.per_channel, **self.quantizer_kwargs)

    def quantize(self, x: Tensor) -> Tensor:
        """Hard ``Q(x)`` (no gradient), in ``x``'s dtype."""
        with torch.no_grad():
            return self._q(_fp(x.detach())).to(x.dtype)

    def training_value(self, x: Tensor, fresh: bool = False) -> Tensor | None:
        """The forward value of the last training forward of ``x``, if kept and ``x`` is unchanged since.

        "Unchanged" means the same storage and version counter: any in-place write to ``x`` (an optimizer step,
        a clip, ``load_state_dict``) makes the kept value stale, and this returns None. A value kept by a
        compiled forward carries no version; it is returned only with ``fresh=True``, when the caller knows that
        a training forward ran since ``x`` was last written (BCGD checks this per step itself).
        """
        if self._training_value is None:
            return None
        if self._training_key is None:
            return self._training_value if fresh else None
        if self._training_key != (x._version, x.data_ptr()):
            return None
        return self._training_value

    def forget_training_value(self) -> None:
        """Drop the kept value (e.g. at the start of a step, so that only this step's forward can set it)."""
        self._training_value = None
        self._training_key = None

    def _relaxed(self, xd: Tensor, x_q: Tensor) -> Tensor:
        """``lerp(x, Q(x), mix)``, the training value of built-in estimators (``Q(x)`` itself when mix is known 1)."""
        return x_q if self._mix_is_one() else torch.lerp(xd, x_q, self.mix.to(xd.dtype))

    def _has_own_forward(self) -> bool:
        return type(self.estimator).forward is not Estimator.forward

    def forward_value(self, x: Tensor, fresh: bool = False) -> Tensor:
        """The value the training forward gives for ``x``, without gradient, in ``x``'s dtype.

        The tensor kept from the last training forward when it is still valid (:meth:`training_value`), else
        recomputed from ``x`` the way :meth:`forward` computes it, so both give the same bits, for every estimator
        (an estimator with its own ``forward`` is called on the detached tensors).
        """
        kept = self.training_value(x, fresh)
        if kept is not None:
            return kept
        with torch.no_grad():
            xd = _fp(x.detach())
            x_q = self._q(xd)
            value = self.estimator(xd, x_q, self.mix) if self._has_own_forward() else self._relaxed(xd, x_q)
        return value.to(x.dtype)

    @override
    def forward(self, x: Tensor) -> Tensor:
        xf = _fp(x)
        xd = xf.detach()
        x_q = self._q(xd)
        if self.training:
            estimator = self.estimator
            if not self._has_own_forward():
                value = self._relaxed(xd, x_q)
                y = straight_through(xf, value, estimator, self.mix)
            else:  # an estimator with its own forward (e.g. the detach trick)
                y = estimator(xf, x_q, self.mix)
                value = y.detach()
            if self.keep_training_value:
                self._training_value = value
                # the key ties the value to this exact weight; a compiled forward cannot read it (that
                # would guard on the version and recompile every step), so its value carries no key and
                # only a caller that checked freshness itself may use it (see training_value)
                self._training_key = None if torch.compiler.is_compiling() else (x._version, x.data_ptr())
        elif torch.is_grad_enabled() and xf.requires_grad:
            y = x_q + (xf - xd)
        else:
            y = x_q
        return y.to(x.dtype)

    def summary(self) -> str:
        """Short tag such as ``binary/1b/ste`` (``+pc`` when per channel)."""
        return f"{self.quantizer}/{self.bits}b{'+pc' if self.per_channel else ''}/{self.estimator_name}"

    @override
    def extra_repr(self) -> str:
        s = f"quantizer={self.quantizer!r}, bits={self.bits}"
        if self.per_channel:
            s += ", per_channel=True"
        if self.quantizer_kwargs:
            s += f", quantizer_kwargs={self.quantizer_kwargs}"
        return s + f", estimator={self.estimator_name!r}"


def _share_params(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` use ``src``'s weight/bias Parameters (no copy; like ``torch.ao`` QAT ``from_float``)."""
    dst.weight = src.weight
    dst.bias = src.bias
    dst.train(src.training)


class _WeightQuantized:
    """What QuantConv2d and QuantLinear share: the latent ``weight`` and its quantized forms."""

    weight: Tensor
    weight_quantizer: TensorQuantizer

    def quantized_weight(self) -> Tensor:
        """Hard ``Q(weight)`` (no gradient), e.g. for diagnostics and export."""
        return self.weight_quantizer.quantize(self.weight)

    def training_weight(self, fresh: bool = False) -> Tensor:
        """The kernel the training forward uses (no gradient): ``lerp(w, Q(w), mix)``, i.e. ``Q(w)`` at mix = 1.

        When the quantizer keeps its training value (``weight_quantizer.keep_training_value``, switched on by
        BCGD and BinaryRelax) and the weight is unchanged since the last training forward, this is that exact
        tensor, at no cost. Otherwise it is recomputed from the current weight the way the forward computes it
        (:meth:`TensorQuantizer.forward_value`), so both ways give the same bits. ``fresh`` is passed on to
        :meth:`TensorQuantizer.training_value` (for values kept by a compiled forward).
        """
        return self.weight_quantizer.forward_value(self.weight, fresh)


class QuantConv2d(_WeightQuantized, nn.Conv2d):
    """``nn.Conv2d`` whose latent float ``weight`` is quantized in every forward by ``weight_quantizer``.

    ``forward(x) = conv2d(x, weight_quantizer(weight), bias, stride, padding, dilation, groups)`` (padding modes
    other than ``zeros`` as in ``nn.Conv2d``). In eval mode the kernel is exactly ``Q(weight)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: TensorQuantizer | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        wq = weight_quantizer if weight_quantizer is not None else TensorQuantizer()
        self.weight_quantizer = wq.to(device=self.weight.device) if self.weight.device.type != "meta" else wq

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_q={self.weight_quantizer.summary()}"

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_quantizer: TensorQuantizer | None = None) -> QuantConv2d:
        """Quantized twin of ``module`` that shares its ``weight``/``bias`` Parameters (same device and dtype)."""
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,  # type: ignore[arg-type]
            module.dilation, module.groups, module.bias is not None, module.padding_mode,  # type: ignore[arg-type]
            device="meta", weight_quantizer=weight_quantizer,
        )
        _share_params(q, module)
        q.weight_quantizer.to(device=module.weight.device)
        return q


class QuantLinear(_WeightQuantized, nn.Linear):
    """``nn.Linear`` whose latent float ``weight`` is quantized in every forward by ``weight_quantizer``.

    ``forward(x) = linear(x, weight_quantizer(weight), bias)``; in eval mode the weight is exactly ``Q(weight)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: TensorQuantizer | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        wq = weight_quantizer if weight_quantizer is not None else TensorQuantizer()
        self.weight_quantizer = wq.to(device=self.weight.device) if self.weight.device.type != "meta" else wq

    @override
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_q={self.weight_quantizer.summary()}"

    @classmethod
    def from_float(cls, module: nn.Linear, weight_quantizer: TensorQuantizer | None = None) -> QuantLinear:
        """Quantized twin of ``module`` that shares its ``weight``/``bias`` Parameters (same device and dtype)."""
        q = cls(
            module.in_features, module.out_features, module.bias is not None, device="meta",
            weight_quantizer=weight_quantizer,
        )
        _share_params(q, module)
        q.weight_quantizer.to(device=module.weight.device)
        return q


#: Initial α by bit-width: MSE-optimal step of the uniform ROUNDING quantizer α·clamp(round(x/α), 0, 2^b − 1)
#: for X ~ |N(0, 1)| (a BN-normalised pre-activation through ReLU). 1, 2 and 4 bits are the authors'
#: ``bit_alpha`` constants (1.2221, 0.6511, 0.1946); 3 and 5..8 were computed for qlight by numerical
#: integration of E[(X − Q(X))²] (scipy.integrate.quad per cell) and bounded scalar minimisation over α,
#: which reproduces 1.224 / 0.651 / 0.193 for 1 / 2 / 4 bits.
BIT_ALPHA: dict[int, float] = {
    1: 1.2221, 2: 0.6511, 3: 0.3534, 4: 0.1946, 5: 0.1055, 6: 0.0573, 7: 0.0309, 8: 0.0165,
}


#: statistic of a batch that max-calibration sets α from (:attr:`QuantAct.calibrating`)
CalibStat = Literal["absmax", "max"]
CALIB_STATS: tuple[CalibStat, ...] = get_args(CalibStat)


class QuantAct(nn.Module):
    """BCGD quantized ReLU ``σ(x; α)`` with a learnable scalar resolution ``alpha`` (``BCGD.md`` §2).

    Forward: :func:`~qlight.quant.functional.act_quant` with ``α_c = clamp(alpha, alpha_min, alpha_max)``,
    levels ``{0, α_c, …, (2^b − 1)α_c}``. The clamp is straight-through (exact clamped value forward, identity
    gradient to ``alpha``) instead of the authors' in-place ``alpha.data.clamp_``: this keeps the forward free of
    parameter mutation (compile-friendly, safe for an α used twice in one forward); the gradient is evaluated at
    the clamped value as in the authors' code. Call :meth:`clamp_alpha_` after an optimizer step to project the
    stored α too (the task does, once per step for all layers).

    Backward: ``x_rule`` (``identity`` | ``relu`` | ``clipped``) for x and
    ``dα = clamp(rate_factor · Σ ∂L/∂σ · D(x), −1, 1)`` per call with ``alpha_rule`` (``ae`` | ``mean`` | ``min`` |
    ``pact``) for α (:class:`~qlight.quant.quant_relu.QuantReLUFunction`: ten ATen ops per call).

    The clamped resolution and the region boundaries ``α_c·[0, L−1, L]`` depend on α only, so they are computed
    once per α value (keyed by α's version counter and storage, no device read) and shared by both calls of an α
    used twice; after :meth:`clamp_alpha_` the clamp is known to be the identity and is skipped.

    Calibration: while the plain attribute ``calibrating`` is True, each forward sets
    ``alpha ← max|x| / (2^b − 1)`` of the current batch (``calib_stat="absmax"``, the authors' code;
    ``"max"`` uses ``max(x)``) in place under ``no_grad``, all-reduced with MAX when ``torch.distributed`` is
    initialised (so DDP ranks stay identical), and uses it for this forward; α then gets an exactly-zero gradient
    (a zero tensor rather than None, so DDP without ``find_unused_parameters`` is happy). The authors did
    this in the backward, so their forward used the previous batch's value. A module called twice in one forward
    (α shared across a ResNet block) ends up with the value from its last call.

    ``rate_factor`` is a buffer that follows the module's dtype exactly: a ``.double()`` model holds 0.01, not the
    float32 rounding of 0.01.

    Args:
        bits: activation bits 1..8.
        alpha_init: initial α; None takes :data:`BIT_ALPHA` ``[bits]``.
        mode: ``ceil`` (authors) or ``round``.
        x_rule, alpha_rule, rate_factor: coarse-gradient rules (defaults: ``clipped``, ``mean``, 0.01).
        alpha_min, alpha_max: clamp range of α (authors: 1e-3, 5).
        calib_stat: ``absmax`` or ``max``.
    """

    rate_factor: Tensor
    _bounds_mult: Tensor
    _table: Tensor

    def __init__(
        self,
        bits: int = 4,
        alpha_init: float | None = None,
        mode: str = "ceil",
        x_rule: str = "clipped",
        alpha_rule: str = "mean",
        rate_factor: float = 0.01,
        alpha_min: float = 1e-3,
        alpha_max: float = 5.0,
        calib_stat: str = "absmax",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_choice("bits", bits, ACT_BITS)
        check_choice("mode", mode, ACT_MODES)
        check_choice("x_rule", x_rule, X_RULES)
        check_choice("alpha_rule", alpha_rule, ALPHA_RULES)
        check_choice("calib_stat", calib_stat, CALIB_STATS)
        if not 0 < alpha_min < alpha_max:
            raise ValueError(f"need 0 < alpha_min < alpha_max, got alpha_min={alpha_min!r}, alpha_max={alpha_max!r}")
        check_that(rate_factor >= 0, "rate_factor", rate_factor, "must be >= 0")
        a0 = BIT_ALPHA[bits] if alpha_init is None else float(alpha_init)
        check_that(a0 > 0, "alpha_init", alpha_init, "must be > 0")
        self.bits = int(bits)
        self.mode = mode
        self.x_rule = x_rule
        self.alpha_rule = alpha_rule
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.calib_stat = calib_stat
        self.calibrating = False
        self.alpha = nn.Parameter(torch.tensor(a0, device=device))
        self._rate_factor_value = float(rate_factor)
        self.register_buffer("rate_factor", torch.tensor(float(rate_factor), device=device))
        level = float(self.levels)
        self.register_buffer(
            "_bounds_mult", torch.tensor([0.0, level - 1.0, level], device=device), persistent=False
        )
        table = quant_relu_table(self.bits, mode, x_rule, alpha_rule)
        self.register_buffer("_table", torch.tensor(table, dtype=torch.uint8, device=device), persistent=False)
        self._resolution_key: tuple[int, int, torch.dtype] | None = None
        self._resolution: tuple[Tensor, Tensor] | None = None
        self._projected_key: tuple[int, int] | None = None

    @property
    def levels(self) -> int:
        """L = 2^b − 1 (the top level is L·α)."""
        return 2**self.bits - 1

    def _alpha_key(self) -> tuple[int, int]:
        return (self.alpha._version, self.alpha.data_ptr())

    @torch.no_grad()
    def calibrate_(self, x: Tensor) -> Tensor:
        """``alpha ← stat(x) / L`` in place (MAX all-reduced under torch.distributed); returns the new value."""
        xd = _fp(x.detach())
        v = (xd.abs() if self.calib_stat == "absmax" else xd).amax().to(self.alpha.dtype) / float(self.levels)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
        self.alpha.copy_(v)
        return v

    @torch.no_grad()
    def clamp_alpha_(self) -> None:
        """Project the stored α onto ``[alpha_min, alpha_max]`` in place (the authors' in-place clamp)."""
        self.alpha.clamp_(self.alpha_min, self.alpha_max)
        self.note_projected()

    def note_projected(self) -> None:
        """Record that the stored α was just projected onto its range, so the forward can skip its clamp."""
        self._projected_key = self._alpha_key()

    def resolution(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(α_c, α_c·[0, L−1, L])`` in ``dtype``, without gradient: cached while α is unchanged."""
        if torch.compiler.is_compiling():  # fused into the graph; no host-side bookkeeping
            a = self.alpha.detach().clamp(self.alpha_min, self.alpha_max).to(dtype)
            return a, a.reshape(1) * self._bounds_mult.to(dtype)
        key = (*self._alpha_key(), dtype)
        if self._resolution is None or key != self._resolution_key:
            with torch.no_grad():
                a = self.alpha.detach()
                if self._projected_key != key[:2]:
                    a = a.clamp(self.alpha_min, self.alpha_max)
                a = a.to(dtype)
                self._resolution = (a, a.reshape(1) * self._bounds_mult.to(dtype))
            self._resolution_key = key
        return self._resolution

    @override
    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> QuantAct:
        old_dtype = self.rate_factor.dtype
        super()._apply(fn, *args, **kwargs)
        self._resolution = None
        self._projected_key = None
        rf = self.rate_factor
        if rf.dtype != old_dtype and rf.is_floating_point() and rf.device.type != "meta":
            # a cast keeps the value's old rounding (0.01 in float32 is 0.0099999998); restore it exactly
            # when the buffer still holds the configured value
            with torch.no_grad():
                if float(rf) == float(torch.tensor(self._rate_factor_value, dtype=old_dtype)):
                    rf.fill_(self._rate_factor_value)
        return self

    @override
    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._resolution = None

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating and self.training:
            # alpha <- stat(x)/L in place, then used with an exactly-zero gradient (not None: DDP sees alpha used)
            self.calibrate_(x)
        a, bounds = self.resolution(_fp(x).dtype)
        return QuantReLUFunction.apply(
            x, self.alpha, a, bounds, self._table, self.rate_factor, self.mode, self.alpha_rule == "ae",
            not self.calibrating,
        )

    @override
    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, mode={self.mode!r}, x_rule={self.x_rule!r}, alpha_rule={self.alpha_rule!r}, "
            f"alpha_range=[{self.alpha_min:g}, {self.alpha_max:g}]"
        )


class _InclusiveHardtanh(torch.autograd.Function):
    """``hardtanh(x, lo, hi)`` whose gradient passes on the closed interval ``[lo, hi]``.

    PyTorch's hardtanh backward is strict (zero at exactly ±1); AQE's backward ``2α·g·1{|x| ≤ 1}`` includes the
    bounds, and AQE's latent clip puts values exactly there.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        return F.hardtanh(x, lo, hi)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        outside = x.abs() > hi if lo == -hi else (x < lo) | (x > hi)
        return g.masked_fill(outside, 0.0), None, None


class QuantHardtanh(nn.Hardtanh):
    """HardTanh followed by a :class:`TensorQuantizer`: the AQE/MINW-Net input quantizer.

    ``y = act_quantizer(hardtanh(x, min_val, max_val))``; in MINW-Net the pattern is QuantConv → (Pool) → BN →
    QuantHardtanh, whose output is the next layer's quantized input. With ``act_quantizer =
    TensorQuantizer("sign", estimator="aqe")`` the backward is ``2·mix·g·1{|x| ≤ 1}`` (the HardTanh supplies the
    clip, inclusive of the bounds as ``AQE.md`` §1 writes it), the training forward ``mix·h(x̃) + (1 − mix)·x̃``
    with ``x̃`` the clipped input, and eval ``h(x̃)``. ``inplace`` is accepted for compatibility with
    ``nn.Hardtanh`` and ignored (the clip is never in place).
    """

    def __init__(
        self,
        min_val: float = -1.0,
        max_val: float = 1.0,
        inplace: bool = False,
        *,
        act_quantizer: TensorQuantizer | None = None,
    ) -> None:
        super().__init__(min_val, max_val, inplace)
        self.act_quantizer = act_quantizer if act_quantizer is not None else TensorQuantizer("sign")

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.act_quantizer(_InclusiveHardtanh.apply(x, float(self.min_val), float(self.max_val)))

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_q={self.act_quantizer.summary()}"

    @classmethod
    def from_float(cls, module: nn.Hardtanh, act_quantizer: TensorQuantizer | None = None) -> QuantHardtanh:
        """Quantized twin of an ``nn.Hardtanh`` (same range and inplace flag)."""
        q = cls(module.min_val, module.max_val, module.inplace, act_quantizer=act_quantizer)
        q.train(module.training)
        return q
