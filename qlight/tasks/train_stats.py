"""The training step's bookkeeping, kept on the device: the loss window, the hit counts, the non-finite check.

``train/loss`` is the mean over the steps since it was last written, and a non-finite loss must stop the run
naming its step. Both need every step's loss, but reading a loss on the host every step is a synchronisation
per step on a GPU. So each step copies its loss into the next slot of a device buffer (one ``copy_``), and the
window is read once, when Lightning writes the logs anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LossWindow", "NonFiniteLossError", "TrainingStats"]


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


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss became NaN or infinite."""


class TrainingStats:
    """What the training step records besides the loss it returns: the loss window and top-k hit counts.

    Each step costs a few device kernels and no host read: the loss goes into the :class:`LossWindow`, and the
    hits (rank of the true class among the top ``k`` logits: ``hits[0]`` top-1, ``hits.sum()`` top-k) are
    added to a device counter, read and reduced over ranks at epoch end (a torchmetrics update per step costs
    more Python than a small CIFAR network's forward).

    Args:
        top_k: the k of the top-k accuracy (top-1 is always counted).
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.losses = LossWindow()
        self.seen = 0
        #: the epoch's last window mean when Lightning did not write that step (logged at epoch end)
        self.unwritten_loss: Tensor | None = None
        self._hits: Tensor | None = None

    def start(self, global_step: int) -> None:
        """Start training at optimizer step ``global_step``: an empty window, no hits."""
        self.losses.reset(global_step)
        self.reset_hits()

    def record(self, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """Record one training batch (no host read)."""
        self.losses.record(loss)
        hits = self._hits
        if hits is None or hits.device != logits.device:
            hits = self._hits = torch.zeros(self.top_k, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            hits.add_((logits.topk(self.top_k, dim=1).indices == target.unsqueeze(1)).sum(0))
        self.seen += len(target)

    def window_mean(self, micro_batches_per_step: int, epoch: int, precision: str) -> Tensor:
        """The window's mean loss (a device tensor), after checking every loss in it is finite (one host read).

        Raises:
            NonFiniteLossError: naming the optimizer step and epoch of the first non-finite loss.
        """
        bad_step = self.losses.first_nonfinite(micro_batches_per_step)
        if bad_step is not None:
            full = precision in ("32", "32-true", "64", "64-true")
            raise NonFiniteLossError(
                f"training loss became non-finite at global step {bad_step} (epoch {epoch}); "
                "lower the learning rate or check the data"
                + ("" if full else f" (or train in full precision: the run uses precision={precision}; "
                   "try --trainer.precision 32-true)")
            )
        return self.losses.mean()

    def epoch_counts(self) -> Tensor | None:
        """``[top-1 hits, …, top-k hits, images seen]`` of this rank's epoch (None before any batch)."""
        if not self.seen or self._hits is None:
            return None
        seen = torch.tensor([self.seen], device=self._hits.device)
        return torch.cat([self._hits, seen])

    def reset_hits(self) -> None:
        """Start counting a new epoch's hits."""
        if self._hits is not None:
            self._hits.zero_()
        self.seen = 0
