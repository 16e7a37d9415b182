"""SIGTERM and SIGINT outside SLURM: stop between two steps, save a checkpoint that resumes exactly.

A scheduler, a script or Ctrl+C that stops ``qlight fit`` must neither lose the work since the last
checkpoint nor leave an exit status of 0 that reads as "finished". So, on a single-process run:

- the first SIGTERM or SIGINT lets the current optimizer step finish (and the validation that is
  running or due after it), then writes ``last.ckpt`` into the run's checkpoint folder, prints one
  line saying how to resume, and the process exits with ``128 + signal`` (143 for SIGTERM, 130 for
  SIGINT);
- a second signal aborts at once (the default action of that signal);
- a signal before the first training step (data decoding, the sanity check) stops at once, as
  there is nothing to save yet.

The checkpoint is written when Lightning stops between steps (its ``SIGTERMException`` after the
step's ``on_train_batch_end`` hooks and any due validation), the same state a requeued or resumed run
expects: the loader position, the model, optimizer and callback states all describe "step N done",
so ``qlight fit --ckpt_path <it>`` reads the same remaining batches and ends with the same weights
as a run that was never stopped (``tests/test_interrupt.py``).

Inside SLURM with auto-requeue Lightning's own handling stays in charge (SIGUSR1 saves a requeue
checkpoint and requeues the job). Multi-process (DDP) runs stop as Lightning does; the exit status
is still ``128 + signal``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from qlight._lightning_compat import cluster_environment, set_stop_requested

__all__ = ["Interrupted", "StopOnSignal", "exit_status", "immediate_stop_handlers", "lightning_handles_signals",
           "restore_handlers"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A run stopped by a signal; ``checkpoint`` is the file that continues it (``None``: nothing saved)."""

    def __init__(self, signum: int, checkpoint: str | None = None, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.checkpoint = checkpoint


def exit_status(signum: int) -> int:
    """The shell's status of a process ended by ``signum``: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + signum


def _say(text: str) -> None:
    """Write one line to stderr from a signal handler (no buffered ``print``: it is not reentrant)."""
    os.write(2, f"{text}\n".encode())


def immediate_stop_handlers(context: str = "") -> dict[int, Any]:
    """Make SIGTERM/SIGINT stop the command at once; returns the handlers replaced.

    The stop is an :class:`Interrupted` whose message ends in ``context``; :func:`restore_handlers` puts
    the returned handlers back.

    In ``fit`` they are active until training starts, when :class:`StopOnSignal` takes over.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum, message=" ".join(filter(None, [f"stopped by {signal.Signals(signum).name}", context])))

    previous: dict[int, Any] = {}
    for signum in SIGNALS:
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, stop)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the signal handlers :func:`immediate_stop_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def lightning_handles_signals(trainer: Trainer) -> bool:
    """Whether Lightning handles the signals: SLURM auto-requeue or several processes (DDP).

    qlight then leaves SIGTERM/SIGINT to Lightning.
    """
    environment = cluster_environment(trainer)
    slurm = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    return slurm or trainer.world_size > 1


class StopOnSignal(Callback):
    """Turn the first SIGTERM/SIGINT during ``fit`` into a between-steps checkpoint (see the module doc).

    After the run stopped, :attr:`signum` is the signal, :attr:`checkpoint` the file written and
    :attr:`stopped_at` the ``(global_step, epoch)`` it holds; the CLI turns them into one line and
    the exit status.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.checkpoint: str | None = None
        self.stopped_at: tuple[int, int] | None = None
        self._training = False
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ the handler
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._training:
            raise Interrupted(signum, message=f"stopped by {name} before training started; nothing to save")
        if self.signum is not None:  # the second signal: its default action, now
            _say(f"qlight: second {name}: aborting without a checkpoint")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        _say(f"qlight: {name} received: stopping after the current step to save a checkpoint "
             "(send it again to abort at once)")

    def _install(self, trainer: Trainer) -> None:
        """Replace Lightning's SIGTERM handler (registered just before the sanity check) and SIGINT's."""
        if self._previous or lightning_handles_signals(trainer):
            return
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    # ------------------------------------------------------------------ hooks
    @override
    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)
        self._training = bool(self._previous)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning raises SIGTERMException once this step's hooks (and a due validation) are done
        if self.signum is not None:
            set_stop_requested(trainer, True)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # let a validation inside fit finish: with the flag set, Lightning stops it after one batch
        if self.signum is not None and trainer.state.fn == "fit":
            set_stop_requested(trainer, False)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.signum is not None and trainer.state.fn == "fit":
            set_stop_requested(trainer, True)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.signum is None or not isinstance(exception, SIGTERMException):
            return
        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint = str(path)
        self.stopped_at = (trainer.global_step, trainer.current_epoch)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._training = False
        restore_handlers(self._previous)
        self._previous = {}

    @staticmethod
    def _checkpoint_path(trainer: Trainer) -> Path:
        """``last.ckpt`` in the run's checkpoint folder: what ``--ckpt_path last`` resumes."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        name = getattr(callback, "CHECKPOINT_NAME_LAST", None) or "last"
        ext = getattr(callback, "FILE_EXTENSION", ".ckpt")
        return Path(folder) / f"{name}{ext}"
