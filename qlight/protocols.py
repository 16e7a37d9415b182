"""What the CLI and the run bookkeeping read from the objects a config names, declared as Protocols.

A config can name any callback, DataModule or logger class; qlight reads a few attributes of them when they
have them. Each such attribute is a :class:`typing.Protocol` here, checked with ``isinstance`` (on an object,
or on a class resolved from a class path), instead of ``getattr`` with a default scattered over the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from qlight.loggers import RunInfo

__all__ = ["NamedDataset", "RunDescriber", "TrainingMethod"]


@runtime_checkable
class TrainingMethod(Protocol):
    """A callback that is a training method (BCGD, BinaryRelax, AQE, EDE): runs are named after the first one."""

    #: short lower-case name (``bcgd``, ``binaryrelax``, ``aqe``, ``ede``); empty for a base class
    method_name: str


@runtime_checkable
class NamedDataset(Protocol):
    """A DataModule that names its data (``cifar10``, ``imagenet``): run names, W&B groups and report cells."""

    dataset_name: str


@runtime_checkable
class RunDescriber(Protocol):
    """A logger that names its run, group and tags from the experiment before the run starts."""

    def describe_run(self, info: RunInfo) -> None:
        """Fill in what the config left empty from ``info``."""
        ...
