"""Training-data order and augmentation randomness that resume exactly, mid-epoch included.

A run resumed from a checkpoint saved inside an epoch (a SLURM requeue, a crash) must read the
same remaining batches, with the same random crops and flips, as the run that was never
interrupted. Lightning restores the model, optimizer, loops and callbacks but not the global
random number generators nor the position inside the data. So here:

- :class:`ResumableSampler` draws the epoch's order from ``(seed, epoch)`` alone (as
  ``DistributedSampler`` does) and shards it across ranks itself, so Lightning leaves it in place;
  after a mid-epoch resume it starts the epoch after the samples already trained on.
- :class:`ResumableDataLoader` implements the ``state_dict``/``load_state_dict`` protocol with which
  Lightning checkpoints a loader's position (the protocol of torchdata's ``StatefulDataLoader``).
- :func:`batch_seed` gives each training batch's augmentation its own seed, a function of the run
  seed, rank, epoch and batch position, so crops and flips do not depend on what else drew from
  the global generator before.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from qlight._lightning_compat import batches_finished, batches_started, run_seed


class ResumableSampler(DistributedSampler):
    """Per-epoch shuffle from ``(seed, epoch)``, sharded over ranks, that can start an epoch part-way.

    A ``DistributedSampler`` (Lightning sees one and does not wrap it again) that also works on a
    single process (``num_replicas=1``). Rank ``r`` of ``R`` reads positions ``r, r + R, ...`` of the
    epoch's permutation, so the first ``k`` batches of every rank are exactly the first
    ``k * batch_size * R`` positions: the position a resumed run skips is one number.

    Args:
        dataset: the training set (only its length is used).
        num_replicas: number of ranks.
        rank: this rank.
        seed: the run seed; the order of epoch ``e`` is ``randperm`` seeded with ``seed + e``.
        drop_last: drop the tail that does not divide evenly over the ranks (instead of repeating
            samples to pad it).
        with_epoch: yield ``(index, epoch)`` pairs, so a dataset in a worker process knows the epoch
            (for per-sample augmentation seeds) without shared state.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        with_epoch: bool = False,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]  # only its length is used: any Sized will do
            num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last,
        )
        self.with_epoch = with_epoch
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next pass over ``epoch`` start after its first ``skip`` samples of this rank."""
        self._resume = (epoch, skip)

    def __iter__(self) -> Iterator[Any]:
        indices: Iterator[Any] = super().__iter__()
        if self._resume is not None and self._resume[0] <= self.epoch:
            epoch, skip = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = itertools.islice(indices, skip, None)
        if self.with_epoch:
            epoch = self.epoch
            return ((i, epoch) for i in indices)
        return indices


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position Lightning saves in checkpoints and restores on resume.

    Lightning calls :meth:`state_dict` whenever it writes a checkpoint and, when a run resumes
    inside an epoch, :meth:`load_state_dict` before that epoch iterates. The position is the number
    of batches the training loop has *finished*, read from :attr:`trainer` (set by the DataModule),
    not counted here: Lightning and worker processes fetch batches ahead of the step that uses them.
    Only a :class:`ResumableSampler` is resumed; if Lightning replaced it (``overfit_batches``), the
    loader saves and restores nothing.
    """

    trainer: Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        """The loader's position for the checkpoint (Lightning saves it)."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):  # e.g. replaced by Lightning for overfit_batches
            return {}
        done = 0
        if self.trainer is not None:
            done = batches_finished(self.trainer)
        return {
            "epoch": sampler.epoch,
            "samples": done * (self.batch_size or 1) * sampler.num_replicas,
            "seed": sampler.seed,
            "num_samples": len(sampler.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpoint's epoch after its samples (Lightning calls this on resume)."""
        sampler = self.sampler
        if not state or not isinstance(sampler, ResumableSampler):
            return
        now = {"seed": sampler.seed, "num_samples": len(sampler.dataset)}  # type: ignore[arg-type]
        changed = {k: (state[k], v) for k, v in now.items() if state.get(k) != v}
        if changed:
            rank_zero_warn(
                "the training data or seed differ from the checkpoint's ("
                + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
                + "), so the resumed epoch cannot continue the checkpoint's data order; it starts over"
            )
            return
        # the samples already trained on, over all ranks, are a prefix of the epoch's order
        sampler.resume(state["epoch"], math.ceil(state["samples"] / sampler.num_replicas))


def resumable_train_loader(
    dataset: Any, batch_size: int, trainer: Trainer | None, with_epoch: bool = False, **options: Any
) -> ResumableDataLoader:
    """The training loader of a DataModule: this rank's shard in (run seed, epoch) order.

    The last incomplete batch is dropped and the position is checkpointed by Lightning. ``options`` go to
    ``DataLoader``.
    """
    world_size = trainer.world_size if trainer is not None else 1
    sampler = ResumableSampler(
        dataset,
        num_replicas=world_size,
        rank=trainer.global_rank if trainer is not None else 0,
        seed=run_seed(),
        with_epoch=with_epoch,
    )
    # the epoch a resumed run continues (Lightning sets it again at every epoch start)
    sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
    loader = ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **options)
    loader.trainer = trainer
    return loader


class BatchGenerators:
    """One generator per device, re-seeded for every training batch from its position.

    The seed is :func:`batch_seed` of the run seed, rank, epoch and the batch's position in the
    epoch (Lightning's count of batches started so far, restored on resume), so a resumed run draws
    the same augmentation as an uninterrupted one. Seeding is a host-side operation: no sync.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, trainer: Trainer, device: torch.device) -> torch.Generator:
        """The generator of ``device``, seeded for the current training batch."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        position = batches_started(trainer)
        seed = batch_seed(run_seed(), trainer.global_rank, trainer.current_epoch, position)
        return self._generators[device].manual_seed(seed)


def batch_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A 63-bit seed for one training batch's random augmentation.

    A hash rather than a sum, so that neighbouring ``(epoch, batch)`` pairs give unrelated streams.
    """
    digest = hashlib.blake2b(f"{seed}/{rank}/{epoch}/{batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
