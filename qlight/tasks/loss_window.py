"""The training losses of one logging window, kept on the device: one kernel per step, read when logged.

``train/loss`` is the mean over the steps since it was last written, and a non-finite loss must stop the run
naming its step. Both need every step's loss, but reading a loss on the host every step is a synchronisation
per step on a GPU. So each step copies its loss into the next slot of a device buffer (one ``copy_``), and the
window is read once, when Lightning writes the logs anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LossWindow"]


class LossWindow:
    """Per-micro-batch training losses since the last :meth:`reset`, in a growing device buffer.

    Args:
        capacity: initial number of slots (it doubles when a window is longer, e.g. with a large
            ``log_every_n_steps``; that copy happens once).
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = max(1, int(capacity))
        self.count = 0
        self.first_step = 0
        self._buffer: Tensor | None = None

    def reset(self, first_step: int) -> None:
        """Start a new window whose first loss belongs to optimizer step ``first_step``."""
        self.count = 0
        self.first_step = int(first_step)

    def record(self, loss: Tensor) -> None:
        """Store ``loss`` (a 0-dim tensor) in the next slot without reading it."""
        buffer = self._buffer
        if buffer is None or buffer.device != loss.device or buffer.dtype != loss.dtype:
            buffer = self._buffer = torch.empty(self.capacity, device=loss.device, dtype=loss.dtype)
        elif self.count == buffer.numel():
            grown = torch.empty(2 * buffer.numel(), device=buffer.device, dtype=buffer.dtype)
            grown[: self.count].copy_(buffer)
            buffer = self._buffer = grown
        buffer[self.count].copy_(loss.detach())
        self.count += 1

    def values(self) -> Tensor:
        """The window's losses (a view of the buffer)."""
        assert self._buffer is not None and self.count > 0, "empty loss window"
        return self._buffer[: self.count]

    def mean(self) -> Tensor:
        """Mean loss of the window (a device tensor; no host read)."""
        return self.values().mean()

    def first_nonfinite(self, micro_batches_per_step: int = 1) -> int | None:
        """The optimizer step of the window's first non-finite loss, or None (one host read)."""
        if self.count == 0:
            return None
        bad = ~torch.isfinite(self.values())
        index = int(torch.where(bad.any(), bad.int().argmax(), -1))
        if index < 0:
            return None
        return self.first_step + index // max(1, micro_batches_per_step)
