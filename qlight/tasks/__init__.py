"""LightningModules."""

from qlight.tasks.classification import ImageClassifier, NonFiniteLossError
from qlight.tasks.logging import step_logging_due

__all__ = ["ImageClassifier", "NonFiniteLossError", "step_logging_due"]
