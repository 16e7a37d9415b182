"""A run's identity across invocations: its folder, its W&B run and its checkpoints.

A run lives in one CSV folder, ``logs/<group>/<name>/<version>/``, holding ``metrics.csv``, the
resolved ``config.yaml`` and ``checkpoints/``. A checkpoint knows its run twice: by where it lies
(``<run>/checkpoints/*.ckpt``) and by what :class:`RunRecord` wrote into it (the run folder and the
W&B run id). So a command given a checkpoint continues that run instead of starting a new one:

- ``qlight fit --ckpt_path <run>/checkpoints/last.ckpt`` appends to the run's ``metrics.csv``
  (rows the interrupted run logged after the checkpoint are replaced), keeps writing its
  checkpoints there and logs into the same W&B run;
- ``qlight fit --ckpt_path last`` resumes the newest run folder of the configured experiment (the
  folder named by ``$QLIGHT_RUN_ID`` or the SLURM job, when one is set), and starts the run afresh,
  saying so, when there is none;
- ``qlight validate|test|predict --ckpt_path <run>/checkpoints/X.ckpt`` writes into
  ``<run>/validate/`` (``test/``, ``predict/``) and the run's W&B run, with the metrics at the
  checkpoint's step, instead of a new ``version_N`` and a new W&B run each time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from qlight._lightning_compat import existing_experiment, set_evaluated_position
from qlight.checkpoints import read_checkpoint
from qlight.loggers import CSVLogger, WandbLogger

__all__ = [
    "RunCheckpoint", "RunRecord", "csv_logger", "find_last_checkpoint", "fit_summary", "run_dir_of", "wandb_id_of",
    "wandb_logger",
]

IDENTITY_KEY = "qlight_run"
"""Key of the run identity (``run_dir``, ``wandb_id``) inside a checkpoint dict."""

RUN_FILES = ("config.yaml", "metrics.csv", "hparams.yaml")


def run_dir_of(ckpt_path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> Path | None:
    """The run folder a checkpoint belongs to, or ``None`` for a checkpoint outside any run.

    Where the file lies wins (``<run>/checkpoints/<file>`` with the run's files beside), so a run
    folder that was moved or copied continues where it is now; otherwise the folder recorded in the
    checkpoint, if it still exists.
    """
    path = Path(ckpt_path)
    run = path.parent.parent
    if path.parent.name == "checkpoints" and any((run / name).is_file() for name in RUN_FILES):
        return run
    recorded = (checkpoint.get(IDENTITY_KEY) or {}).get("run_dir")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return None


def wandb_id_of(checkpoint: Mapping[str, Any]) -> str | None:
    """The W&B run id recorded in the checkpoint (``None`` before qlight recorded one, or without W&B)."""
    return (checkpoint.get(IDENTITY_KEY) or {}).get("wandb_id")


def find_last_checkpoint(root: str | os.PathLike[str], folders: str = ".") -> Path | None:
    """The newest ``last*.ckpt`` in ``root/<folders>`` (a glob such as ``*/checkpoints``: any run version)."""
    found = [p for p in Path(root).glob(f"{folders}/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the run's last state.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint is
    written at the same step: with ``save_top_k=1`` on ``val/acc1`` it is a copy of the best
    checkpoint, and resuming from it silently repeats every epoch since the best one. Here it is
    written at every validation (or training-epoch end) again, as before. Checkpoint states are
    stored under ``ModelCheckpoint``'s key, so checkpoints move freely between the two classes.
    """

    @property
    @override
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, due)

    def _save_last_if_missed(self, trainer: Trainer, due: bool) -> None:
        if due and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def csv_logger(trainer: Trainer) -> CSVLogger | None:
    """The trainer's qlight CSV logger (the run folder), if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)


def wandb_logger(trainer: Trainer) -> WandbLogger | None:
    """The trainer's active qlight W&B logger, if any."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.mode != "disabled"), None)


class RunRecord(Callback):
    """Record the run's identity in every checkpoint; re-home what a loaded checkpoint remembers.

    On save: the absolute run folder and the W&B run id (under ``checkpoint["qlight_run"]``).

    On load: ``ModelCheckpoint`` remembers its folder and the paths of the best and last
    checkpoints, and forgets them all (with a warning) when its folder is not spelled exactly as
    before; a resumed run would then lose track of its best checkpoint and write ``last-v1.ckpt``.
    When the loaded checkpoint lies in the callback's folder (the same folder, spelled relatively or
    absolutely, or a run folder moved since), the remembered paths are moved there. When evaluating a
    checkpoint, the metrics are logged at its step and epoch rather than at 0.
    """

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        csv, wandb = csv_logger(trainer), wandb_logger(trainer)
        checkpoint[IDENTITY_KEY] = {
            "run_dir": os.path.abspath(csv.log_dir) if csv is not None else None,
            "wandb_id": wandb.version if wandb is not None else None,
        }

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        loaded = trainer.ckpt_path
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            state = states.get(callback.state_key)
            if not state or not callback.dirpath or state.get("dirpath") == callback.dirpath:
                continue
            here = loaded is not None and _same_dir(os.path.dirname(str(loaded)), callback.dirpath)
            if here or _same_dir(state.get("dirpath"), callback.dirpath):
                states[callback.state_key] = _rehome(state, str(callback.dirpath))
        if trainer.state.fn != "fit":
            set_evaluated_position(trainer, int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0)))


def _same_dir(a: str | None, b: str | os.PathLike[str]) -> bool:
    if not a:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def _rehome(state: dict[str, Any], dirpath: str) -> dict[str, Any]:
    """A ModelCheckpoint state whose folder and remembered files are in ``dirpath``."""

    def move(path: Any) -> Any:
        return os.path.join(dirpath, os.path.basename(path)) if isinstance(path, str) and path else path

    state = dict(state, dirpath=dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return state


def fit_summary(trainer: Trainer) -> str:
    """What a finished ``fit`` produced, in a few lines.

    The best ``val/acc1`` and its epoch, the best and last checkpoints, ``metrics.csv`` and the W&B run (its
    URL, or how to upload an offline run).
    """
    lines = [f"qlight: fit done: {trainer.current_epoch} epoch(s), {trainer.global_step} step(s)"]
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint):
        best, score = callback.best_model_path, callback.best_model_score
        if best and score is not None and os.path.isfile(best):
            epoch = read_checkpoint(best, "best checkpoint").get("epoch", "?")
            lines.append(f"  best {callback.monitor} {float(score):.4f} at epoch {epoch}: {best}")
        elif callback.monitor:
            lines.append(f"  best {callback.monitor}: none (no validation logged it)")
        if callback.last_model_path:
            lines.append(f"  last checkpoint: {callback.last_model_path}")
    csv = csv_logger(trainer)
    if csv is not None:
        lines.append(f"  metrics: {os.path.join(csv.log_dir, 'metrics.csv')}")
    wandb = wandb_logger(trainer)
    if wandb is not None and existing_experiment(wandb) is not None:
        lines.append(f"  W&B: {wandb.where()}")
    return "\n".join(lines)
