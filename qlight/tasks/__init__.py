"""LightningModules."""

from qlight.tasks.classification import ImageClassifier, NonFiniteLossError

__all__ = ["ImageClassifier", "NonFiniteLossError"]
