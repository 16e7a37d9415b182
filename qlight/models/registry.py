"""Name -> constructor registry so YAML configs can pick an architecture by string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``fn`` under ``name`` (lower case) so ``build_model(name)`` finds it."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        key = name.lower()
        if key in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[key] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`build_model` (plus ``torchvision.<name>``)."""
    return sorted(_MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a float model by registry name.

    ``torchvision.<name>`` builds a torchvision classification model without pretrained weights
    (nothing is downloaded), so plain torchvision CNNs can be quantized too.
    """
    key = name.lower()
    if key.startswith("torchvision."):
        import torchvision

        tv_name = name.split(".", 1)[1]
        try:
            return torchvision.models.get_model(tv_name, weights=None, **kwargs)
        except ValueError as err:
            raise ValueError(f"model={name!r}: unknown torchvision model ({err})") from None
    if key not in _MODELS:
        raise ValueError(
            f"model={name!r} is not a registered model; valid: {list_models()} or 'torchvision.<name>'"
        )
    return _MODELS[key](**kwargs)
