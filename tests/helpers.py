"""Shared test helpers: a tiny quantized task, one crash/resume harness and one state comparison.

- :func:`make_task`, :func:`batches`, :func:`loader`, :func:`make_trainer`: an :class:`ImageClassifier` on a
  tiny registered network (one activation module used twice, like a ResNet block), random data and a quiet
  CPU trainer; :class:`StepRecorder` records what each optimizer step saw.
- :func:`training_state`, :func:`checkpoint_state`, :func:`assert_same_state`: every parameter and buffer of
  the module plus the optimizer's tensors, from a live run or from a checkpoint file, compared bit for bit.
- :func:`crash_and_resume`: an uninterrupted run against one that crashes after a step (with a checkpoint
  at that step) and resumes from it; :class:`ResumableLoader` resumes a fixed batch list mid-epoch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from qlight._lightning_compat import batches_finished
from qlight.models import list_models, register_model
from qlight.quant import QuantSpec, quant_layers
from qlight.tasks import ImageClassifier

CONF = Path(__file__).parent / "conf"

# ----------------------------------------------------------------------------------------------------
# a tiny quantized task


class TinyNet(nn.Module):
    """conv-BN-act-conv-BN-act (one activation module used twice, like a ResNet block) + linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = self.act1
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


if "bcgd_tiny" not in list_models():
    register_model("bcgd_tiny")(TinyNet)

W1A4 = QuantSpec(weight="binary", w_bits=1, act="relu_quant", a_bits=4)


def make_task(
    quant: QuantSpec | None = W1A4,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    milestones: list[int] | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """ImageClassifier on the tiny net with SGD (and an optional MultiStepLR), seeded init."""
    seed_everything(0)
    scheduler = None
    if milestones:
        scheduler = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=milestones)
    return ImageClassifier(
        model="bcgd_tiny",
        quant=quant,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay),
        lr_scheduler=scheduler,
        **kwargs,
    )


def batches(n: int = 8, batch_size: int = 8, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``n`` batches of random 3x8x8 images with random labels."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, 8, 8, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(n)
    ]


def loader(n: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader[tuple[Tensor, Tensor]]:
    """Unshuffled random 3x8x8 images with random labels."""
    x, y = (torch.cat(t) for t in zip(*batches(n, batch_size, seed), strict=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_trainer(callbacks: list[Callback], root: Path | None = None, **kwargs: Any) -> Trainer:
    """A quiet, deterministic CPU trainer without logger, checkpoints or sanity check (``kwargs`` override)."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


class StepRecorder(Callback):
    """Before BCGD (earlier in the callback list): w, grad and the forward weight G of each step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, list[Tensor]]] = []
        self.final: dict[str, list[Tensor]] = {}

    @staticmethod
    def _params(pl_module: LightningModule) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        quantized = [m.weight for _, m in quant_layers(pl_module)]
        floats = [pl_module.model.fc.weight, pl_module.model.bn1.weight]
        return quantized, floats

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        q, f = self._params(pl_module)
        self.steps.append(
            {
                "w": [p.detach().clone() for p in q],
                "g": [p.grad.clone() for p in q],
                "G": [m.training_weight() for _, m in quant_layers(pl_module)],
                "fw": [p.detach().clone() for p in f],
                "fg": [p.grad.clone() for p in f],
            }
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        q, f = self._params(pl_module)
        self.final = {"w": [p.detach().clone() for p in q], "fw": [p.detach().clone() for p in f]}


# ----------------------------------------------------------------------------------------------------
# state comparison


def _with_optimizer(model_state: dict[str, Tensor], optimizer_state: dict[str, Any]) -> dict[str, Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in model_state.items()}
    for i, s in optimizer_state["state"].items():
        state.update({f"optim.{i}.{k}": v.clone() for k, v in s.items() if isinstance(v, Tensor)})
    return state


def training_state(task: LightningModule, trainer: Trainer) -> dict[str, Tensor]:
    """Every parameter and buffer of the module plus the optimizer's tensors (momentum buffers, steps)."""
    return _with_optimizer(task.state_dict(), trainer.optimizers[0].state_dict())


def checkpoint_state(path: str | Path) -> dict[str, Tensor]:
    """:func:`training_state` of the run that wrote the checkpoint ``path``."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    return _with_optimizer(data["state_dict"], data["optimizer_states"][0])


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """The same tensors under the same names, bit for bit."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different}"


# ----------------------------------------------------------------------------------------------------
# crash and resume


class CrashAt(Callback):
    """Raise before the optimizer step ``step`` runs (a crash after ``step`` completed steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class ResumableLoader:
    """A fixed batch sequence per epoch that resumes mid-epoch at the first unprocessed batch.

    Lightning saves ``state_dict()`` in the checkpoint and calls ``load_state_dict()`` before the
    resumed epoch iterates (the protocol torchdata's ``StatefulDataLoader`` implements). The position
    is read from the trainer's batch progress, so the loader does not depend on Lightning's prefetching.
    """

    def __init__(self, data: list[tuple[Tensor, Tensor]]) -> None:
        self.data = data
        self.trainer: Trainer | None = None
        self._start = 0

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self._start = self._start, 0
        yield from self.data[start:]

    def state_dict(self) -> dict[str, int]:
        assert self.trainer is not None
        return {"next": batches_finished(self.trainer) % len(self.data)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = state["next"]


#: ``fit(callbacks, root, ckpt_path) -> (task, trainer)``: one complete run of a test's training setup; it
#: must turn checkpointing on when ``callbacks`` hold a ModelCheckpoint
Fit = Callable[[list[Callback], Path, str | None], tuple[LightningModule, Trainer]]


@dataclass
class CrashResume:
    """Final states of an uninterrupted and a crashed-then-resumed run, and the callbacks of each."""

    straight: dict[str, Tensor]
    resumed: dict[str, Tensor]
    straight_callbacks: list[Callback]
    resumed_callbacks: list[Callback]
    checkpoint: Path


def crash_and_resume(fit: Fit, tmp_path: Path, crash_step: int, make_callbacks: Callable[[], list[Callback]]) -> CrashResume:
    """Run ``fit`` straight through; run it again, crashing after ``crash_step`` optimizer steps with a
    checkpoint saved at that step; resume a third run from that checkpoint. Each run gets fresh callbacks."""
    straight_callbacks = make_callbacks()
    task, trainer = fit(straight_callbacks, tmp_path / "straight", None)
    straight = training_state(task, trainer)

    at_crash = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=crash_step, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([*make_callbacks(), CrashAt(crash_step), at_crash], tmp_path / "crashed", None)
    checkpoint = tmp_path / "ckpt" / f"step={crash_step}.ckpt"
    resumed_callbacks = make_callbacks()
    task, trainer = fit(resumed_callbacks, tmp_path / "resumed", str(checkpoint))
    return CrashResume(straight, training_state(task, trainer), straight_callbacks, resumed_callbacks, checkpoint)


def checkpointing(callbacks: list[Callback]) -> bool:
    """Whether a run with ``callbacks`` must enable checkpointing (one of them is a ModelCheckpoint)."""
    return any(isinstance(c, ModelCheckpoint) for c in callbacks)


def tiny_fit(data: list[tuple[Tensor, Tensor]], epochs: int, **task_kwargs: Any) -> Fit:
    """:data:`Fit` of the tiny task (:func:`make_task` with ``task_kwargs``) on ``data``, resumable mid-epoch,
    validating on its first batch."""
    val = DataLoader(TensorDataset(*(torch.cat(t) for t in zip(*data[:1], strict=True))), batch_size=8)

    def fit(callbacks: list[Callback], root: Path, ckpt_path: str | None) -> tuple[LightningModule, Trainer]:
        task = make_task(**task_kwargs)
        train = ResumableLoader(data)
        trainer = make_trainer(callbacks, root, max_epochs=epochs, enable_checkpointing=checkpointing(callbacks))
        train.trainer = trainer
        trainer.fit(task, train, val, ckpt_path=ckpt_path)
        return task, trainer

    return fit


class CloseProcessGroup(Callback):
    """Destroy the gloo process group when a DDP fit ends.

    A spawned rank that exits with its process group still open can abort while the interpreter shuts down
    (gloo's threads outlive it: "terminate called without an active exception"), failing a test that passed.
    """

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Close the group after a barrier, so no rank leaves while another still talks to it."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def authors_act_forward(x: Tensor, a: float, level: int) -> Tensor:
    """The BCGD authors' quantized ReLU forward (``QtUniFunction``, ``nets/quant_uni_type.py``, fw='quant').

    Boolean masks and Python-float thresholds, as their code computes it: ``x > (L−1)α`` goes to the top level.
    """
    out = x.clone()
    out[x <= 0] = 0
    ind = x.gt(0) * x.le(a * (level - 1))
    out[ind] = (x[ind] / a).ceil() * a
    out[x > a * (level - 1)] = a * level
    return out
