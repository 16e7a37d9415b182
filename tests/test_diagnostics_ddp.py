"""2-process CPU DDP (gloo): QuantDiagnostics logs the same values on both ranks.

Each rank trains on its own shard, so the activation counts differ between ranks; the logged fractions must
be those of both ranks' inputs together, and every other value (weights, gradients after the all-reduce, α)
must agree bit for bit. Checked inside the run, after every log, on every rank.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import pytest
import torch
from helpers import CloseProcessGroup, loader, make_task, make_trainer
from lightning.pytorch import Callback, LightningModule, Trainer

from qlight.callbacks import BCGD, QuantDiagnostics


class LocalCounts(QuantDiagnostics):
    """Keeps this rank's activation counts (before the reduction) of the last log."""

    def measure(self, trainer: Trainer) -> dict[str, float]:
        assert self._counts is not None
        self.local = torch.cat([self._counts.flatten(), torch.tensor(self._totals)]).clone()
        return super().measure(trainer)


class SameOnEveryRank(Callback):
    """After QuantDiagnostics: all ranks logged the same names and values; the fractions are global."""

    def __init__(self, diag: LocalCounts) -> None:
        self.diag = diag
        self.checks = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        logged = self.diag.latest
        names = sorted(logged)
        assert "diag/act1/zero_fraction" in names and "diag/grad_norm" in names
        values = torch.tensor([logged[n] for n in names], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(values)
        assert torch.equal(gathered[0], gathered[1]), f"ranks logged different values at step {trainer.global_step}"
        local = trainer.strategy.all_gather(self.diag.local)  # [zero, top, total] of each rank
        assert not torch.equal(local[0], local[1]), "ranks must see different inputs, or agreement is trivial"
        zero, top, total = local.sum(0).tolist()
        assert logged["diag/act1/zero_fraction"] == zero / total
        assert logged["diag/act1/top_fraction"] == top / total
        self.checks += 1


def _worker(rank: int, port: int) -> None:
    """One DDP rank, launched externally the way torchrun/srun do (Lightning then does not re-launch)."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
         "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    torch.set_num_threads(1)
    diag = LocalCounts(every_n_steps=1)
    check = SameOnEveryRank(diag)
    trainer = make_trainer([BCGD(rho=0.01), diag, check, CloseProcessGroup()], max_epochs=1, strategy="ddp", devices=2)
    trainer.fit(make_task(momentum=0.9), loader(8))
    assert trainer.world_size == 2 and check.checks == 4  # 8 batches over 2 ranks, a log every step


@pytest.mark.skipif(sys.platform == "win32", reason="CPU DDP with gloo is tested on POSIX")
def test_every_rank_logs_the_same_values() -> None:
    """A failed assertion on either rank fails the test (spawn re-raises it and stops the other)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port,), nprocs=2, join=True)
