"""2-process CPU DDP (gloo): BCGD + BinaryRelax keep every rank identical.

Each rank trains on its own shard, so agreement is not trivial: after every optimizer step the
latent quantized kernels, their quantizations, the activation resolutions alpha (max-calibrated,
then learned) and the schedule values rho and mix are all-gathered and compared bit for bit inside
the hook, on every rank (``STYLE.md`` §3 rule 7).
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
from torch import Tensor, nn

from qlight.callbacks import BCGD, BinaryRelax
from qlight.quant import quant_acts, quant_layers


class RankAgreement(Callback):
    """Assert after every optimizer step that all ranks hold the same quantization state."""

    def __init__(self) -> None:
        self.checks = 0
        self.expected_acc1: list[float] = []
        self._logits: Tensor | None = None
        self._hits = self._seen = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        def keep(module: nn.Module, args: Any, output: Tensor) -> None:
            if module.training:
                self._logits = output.detach()

        pl_module.model.register_forward_hook(keep)  # the training step's own logits

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bcgd = next(c for c in trainer.callbacks if isinstance(c, BCGD))
        layers = [m for _, m in quant_layers(pl_module)]
        state = (
            [m.weight for m in layers]
            + [m.quantized_weight() for m in layers]
            + [m.weight_quantizer.mix for m in layers]
            + [a.alpha for _, a in quant_acts(pl_module)]
            + [bcgd._rho]
        )
        flat = torch.cat([t.detach().reshape(-1).float() for t in state])
        gathered = trainer.strategy.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), f"ranks disagree after step {trainer.global_step}"
        inputs = trainer.strategy.all_gather(batch[0].sum())
        assert inputs[0] != inputs[1], "ranks must train on different data, or agreement is trivial"
        self.checks += 1
        assert self._logits is not None
        self._hits += int((self._logits.argmax(1) == batch[1]).sum())
        self._seen += len(batch[1])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # this rank's top-1 hits counted here, from the step's logits; summed over the ranks
        counts = trainer.strategy.all_gather(torch.tensor([self._hits, self._seen])).sum(0)
        self.expected_acc1.append(float(counts[0] / counts[1]))
        self._hits = self._seen = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.expected_acc1:  # the previous epoch's logged value counts both ranks' samples
            assert float(trainer.callback_metrics["train/acc1"]) == pytest.approx(self.expected_acc1[-1])


def _worker(rank: int, port: int) -> None:
    """One DDP rank, launched externally the way torchrun/srun do (Lightning then does not re-launch).

    Each rank builds its own (identically seeded) model, so nothing is pickled across processes.
    """
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
         "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    torch.set_num_threads(1)
    task = make_task(momentum=0.9, weight_decay=1e-4, alpha_stage_epochs=1)
    agreement = RankAgreement()
    relax = BinaryRelax(eta0=1.0, eta_growth=2.0, eta_every=1, switch_epoch=1)
    callbacks = [relax, BCGD(rho=0.01), agreement]
    trainer = make_trainer([*callbacks, CloseProcessGroup()], max_epochs=2, strategy="ddp", devices=2)
    trainer.fit(task, loader(8))
    # 8 batches over 2 ranks = 4 steps per epoch, each checked on both ranks
    assert trainer.world_size == 2 and agreement.checks == 8
    # the logged training accuracy counts both ranks' own samples (each rank's hits are its own: they are no
    # module buffer, which DDP would overwrite with rank 0's before every forward)
    assert float(trainer.callback_metrics["train/acc1"]) == pytest.approx(agreement.expected_acc1[-1])
    assert len(agreement.expected_acc1) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="CPU DDP with gloo is tested on POSIX")
def test_ranks_stay_identical_under_ddp() -> None:
    """A failed assertion on either rank fails the test (spawn re-raises it and stops the other)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port,), nprocs=2, join=True)
