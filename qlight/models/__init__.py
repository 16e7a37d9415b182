"""Architectures, chosen by name from YAML through :func:`build_model`."""

from qlight.models import convnet, resnet_cifar, vgg_cifar  # noqa: F401  (register the zoo)
from qlight.models.registry import build_model, list_models, register_model
from qlight.models.resnet_cifar import CifarResNet
from qlight.models.vgg_cifar import CifarVGG

__all__ = ["CifarResNet", "CifarVGG", "build_model", "list_models", "register_model"]
