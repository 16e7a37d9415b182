"""qlight.quant: quantizers, coarse-gradient estimators, quantized layers and the layer policy.

Plain PyTorch (no Lightning), usable from any training loop::

    from qlight.quant import QuantSpec, quantize_model, param_groups
    model = quantize_model(model, QuantSpec(weight="binary", a_bits=4))
    opt = torch.optim.SGD(param_groups(model)["quantized_weights"] + ..., lr=0.1)

Modules: :mod:`~qlight.quant.functional` (hard quantizers, closed forms), :mod:`~qlight.quant.estimators`
(straight-through/AQE/EDE estimators and their registry, the BCGD quantized-ReLU backward),
:mod:`~qlight.quant.layers` (TensorQuantizer, QuantConv2d, QuantLinear, QuantAct, QuantHardtanh),
:mod:`~qlight.quant.policy` (QuantSpec, quantize_model, parameter groups and callback helpers),
:mod:`~qlight.quant.checks` (argument checks and :class:`QuantArgError`), :mod:`~qlight.quant.packing` (frozen
and bit-packed quantized weights).
"""

from .checks import QuantArgError
from .estimators import (
    ALPHA_RULES,
    ESTIMATORS,
    STE,
    X_RULES,
    AQEEstimator,
    ClippedSTE,
    EDEEstimator,
    Estimator,
    alpha_grad_factor,
    build_estimator,
    get_estimator,
    list_estimators,
    quant_relu,
    register_estimator,
    x_grad_mask,
)
from .functional import (
    act_quant,
    binary_weight,
    pow2_levels,
    pow2_quant,
    pow2_weight,
    sign_quant,
    ternary_quant,
    ternary_weight,
    uniform_weight,
)
from .layers import (
    BIT_ALPHA,
    QUANTIZERS,
    QuantAct,
    QuantConv2d,
    QuantHardtanh,
    QuantizerDef,
    QuantLinear,
    TensorQuantizer,
    register_quantizer,
    validate_quantizer,
)
from .policy import (
    QuantSpec,
    clamp_alphas_,
    iter_quant_modules,
    param_groups,
    quant_acts,
    quant_layers,
    quantize_model,
    quantized_weights,
    set_calibrating,
    set_mix,
    tensor_quantizers,
)

__all__ = [
    "ALPHA_RULES",
    "BIT_ALPHA",
    "ESTIMATORS",
    "QUANTIZERS",
    "STE",
    "X_RULES",
    "AQEEstimator",
    "ClippedSTE",
    "EDEEstimator",
    "Estimator",
    "QuantAct",
    "QuantArgError",
    "QuantConv2d",
    "QuantHardtanh",
    "QuantLinear",
    "QuantSpec",
    "QuantizerDef",
    "TensorQuantizer",
    "act_quant",
    "alpha_grad_factor",
    "binary_weight",
    "build_estimator",
    "clamp_alphas_",
    "get_estimator",
    "iter_quant_modules",
    "list_estimators",
    "param_groups",
    "pow2_levels",
    "pow2_quant",
    "pow2_weight",
    "quant_acts",
    "quant_layers",
    "quant_relu",
    "quantize_model",
    "quantized_weights",
    "register_estimator",
    "register_quantizer",
    "set_calibrating",
    "set_mix",
    "sign_quant",
    "tensor_quantizers",
    "ternary_quant",
    "ternary_weight",
    "uniform_weight",
    "validate_quantizer",
    "x_grad_mask",
]
