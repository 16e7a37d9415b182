"""The ``qlight`` command: LightningCLI with qlight's models, data, callbacks and loggers.

``qlight fit|validate|test|predict --config configs/<dataset>/<experiment>.yaml``; later ``--config``
files and ``--key value`` flags override earlier ones. Short class names work in YAML
(``class_path: BCGD``) because this module imports qlight's packages.

Around Lightning's run the command adds a run's lifecycle: checkpoints are checked before anything
expensive starts and must hold the configured network (:mod:`qlight.checkpoints`); a command given
a checkpoint continues that checkpoint's run (:mod:`qlight.runs`); SIGTERM/SIGINT stop ``fit``
between two steps with a checkpoint (:mod:`qlight.interrupt`); bad input is one ``qlight: error:``
line with exit status 2 (:mod:`qlight.config_errors`); and the output is quiet unless ``--verbose``
(:mod:`qlight.console`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, RichModelSummary
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

import qlight
import qlight.callbacks
import qlight.data
import qlight.loggers
from qlight._lightning_compat import callbacks_of, process_rank, set_callbacks, summary_max_depth
from qlight.callbacks.throughput import Throughput
from qlight.checkpoints import CheckpointError, model_differences, read_checkpoint
from qlight.config_errors import QlightArgumentParser
from qlight.console import QuietModelSummary, be_quiet, set_verbose, verbose
from qlight.data import DatasetError, ImageDataModule
from qlight.interrupt import (
    Interrupted,
    StopOnSignal,
    exit_status,
    immediate_stop_handlers,
    lightning_handles_signals,
    restore_handlers,
)
from qlight.loggers import CSVLogger, RunInfo, WandbLogger
from qlight.protocols import NamedDataset, RunDescriber, TrainingMethod
from qlight.runs import (
    RunCheckpoint,
    RunRecord,
    csv_logger,
    find_last_checkpoint,
    fit_summary,
    run_dir_of,
    wandb_id_of,
)
from qlight.tasks import ImageClassifier

# ckpt_path values Lightning resolves itself (qlight resolves "last" for fit)
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class QlightSaveConfig(SaveConfigCallback):
    """Save the resolved config next to the run and into the W&B run config.

    Also declares the W&B summaries of the validation accuracies as their maximum over the run: the
    papers report the best accuracy during training, and the W&B run table then shows that number.
    """

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # evaluating a run's checkpoint must not replace the run's training config
            return
        for logger in trainer.loggers:
            if isinstance(logger, qlight.loggers.WandbLogger) and logger.mode != "disabled":
                config = self.parser.dump(self.config, skip_none=False, format="json")
                run = logger.experiment
                run.config.update({"qlight": json.loads(config)}, allow_val_change=True)
                top_k = pl_module.top_k if isinstance(pl_module, ImageClassifier) else 5
                for key in ("val/acc1", f"val/acc{top_k}"):
                    run.define_metric(key, summary="max")


class ConfigError(ValueError):
    """A bad value in the user's config or data, reported as one line instead of a traceback."""


def _root_cause(err: BaseException) -> BaseException:
    while (nxt := err.__cause__ or err.__context__) is not None:
        err = nxt
    return err


class QlightCLI(LightningCLI):
    """LightningCLI that checkpoints on ``val/acc1``, names runs and manages a run's lifecycle.

    See the module doc.
    """

    _checkpoint: dict[str, Any] | None = None

    @override
    def instantiate_classes(self) -> None:
        """Instantiate, turning qlight's validation errors (wrapped by jsonargparse) into a ConfigError."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _root_cause(err)
            if isinstance(cause, ValueError | FileNotFoundError) and cause is not err:
                raise ConfigError(str(cause)) from err
            raise

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        extra: list[Callback] = [RunRecord()]
        if self.subcommand == "fit":
            extra.append(StopOnSignal())
        trainer = super()._instantiate_trainer(config, [*callbacks, *extra])
        if not verbose():
            set_callbacks(trainer, [
                QuietModelSummary(max_depth=summary_max_depth(cb))
                if isinstance(cb, ModelSummary) and type(cb) in (ModelSummary, RichModelSummary)
                else cb
                for cb in callbacks_of(trainer)
            ])
        return trainer

    @override
    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint files, right after parsing and before anything expensive.

        A missing, truncated or foreign checkpoint (``ckpt_path``, ``model.init_from``) is one
        ``qlight: error:`` line before any data are decoded or loggers created. Lightning's own
        version of this method loads ``ckpt_path`` unchecked and silently replaces the configured
        model with the checkpoint's hyper-parameters, resetting the optimizer and LR schedule to the
        class defaults; qlight keeps the config and compares it with the checkpoint instead
        (:meth:`_check_model`).
        """
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if config is None:
            return
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            self._checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
        init_from = config.get("model.init_args.init_from")
        if init_from:
            read_checkpoint(init_from, "model.init_from", lightning=False)

    @override
    def before_instantiate_classes(self) -> None:
        """Give a run with a :func:`~qlight.loggers.run_tag` its own ``default_root_dir`` (``logs/<tag>``).

        Lightning writes the requeue checkpoint (``hpc_ckpt_N.ckpt``) there on SIGUSR1 and a requeued
        job resumes from the newest one it finds; with the shared default (the working directory) a
        job could resume from another job's checkpoint.
        """
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is None:
            return
        tag = qlight.loggers.run_tag()
        if tag and config.get("trainer") and not config["trainer"].get("default_root_dir"):
            config["trainer"]["default_root_dir"] = os.path.join("logs", tag)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # warm-up (compilation, graph capture) timed apart from steady-state epoch time, in every run
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    # ------------------------------------------------------------------ before each subcommand
    def _describe_run(self) -> None:
        info = describe_run(self.model, self.datamodule, self.trainer, self._get(self.config, "seed_everything"))
        for logger in self.trainer.loggers:
            if isinstance(logger, RunDescriber):
                logger.describe_run(info)

    def _prepare(self, subcommand: str) -> None:
        """Name the run and continue the checkpoint's run, if one is given.

        Finds the checkpoint it continues, checks that checkpoint against the config and points the loggers
        and the checkpoint folder at its run.
        """
        self._describe_run()
        config = self.config_init[subcommand]
        ckpt_path = config.get("ckpt_path")
        checkpoint = self._checkpoint
        if subcommand == "fit" and ckpt_path == "last":
            found = self._find_last()
            ckpt_path = config["ckpt_path"] = str(found) if found is not None else None
            checkpoint = read_checkpoint(found, "ckpt_path") if found is not None else None
        if checkpoint is not None and ckpt_path:
            self._check_model(ckpt_path, checkpoint)
            self._continue_run(subcommand, ckpt_path, checkpoint)
        if subcommand == "fit":
            self._drop_lr_monitor_without_logger()

    def _find_last(self) -> Path | None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this experiment's run folders.

        Of the run named by ``$QLIGHT_RUN_ID`` or the SLURM job, when one is set; ``None`` starts afresh.
        """
        csv = csv_logger(self.trainer)
        if csv is not None:
            tag = qlight.loggers.run_tag()
            found = find_last_checkpoint(csv.root_dir, f"{tag or '*'}/checkpoints")
            where = Path(csv.root_dir) / (tag or "")
        else:  # no CSV run folder: Lightning's checkpoint folder
            callback = self.trainer.checkpoint_callback
            dirpath = callback.dirpath if isinstance(callback, ModelCheckpoint) else None
            where = Path(dirpath or Path(self.trainer.default_root_dir) / "checkpoints")
            found = find_last_checkpoint(where)
        if found is None:
            _note(f"--ckpt_path last: no checkpoint of this run under {where}/, so it starts from the beginning")
        return found

    def _check_model(self, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        """The config must build the network the checkpoint holds (one line naming each difference)."""
        saved = checkpoint.get("hyper_parameters")
        if not isinstance(saved, dict):
            return
        differences = model_differences(dict(self.model.hparams), saved)
        if differences:
            run = run_dir_of(ckpt_path, checkpoint)
            config = run / "config.yaml" if run is not None and (run / "config.yaml").is_file() else None
            use = f"--config {config}" if config else "the config.yaml saved in the run folder that wrote it"
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} holds a different model than the config (config vs checkpoint): "
                + "; ".join(differences) + f"; use the checkpoint's own config: {use}"
            )

    def _continue_run(self, subcommand: str, ckpt_path: str, checkpoint: dict[str, Any]) -> None:
        """Log into the checkpoint's run.

        Its folder (``<run>/<subcommand>/`` when evaluating), its W&B run and its checkpoint folder.
        """
        run = run_dir_of(ckpt_path, checkpoint)
        if run is None:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                if subcommand == "fit":
                    logger.continue_in(run, replace="later")
                else:
                    logger.continue_in(run / subcommand, replace="same")
            elif isinstance(logger, WandbLogger) and (wandb_id := wandb_id_of(checkpoint)):
                logger.continue_run(wandb_id)
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(run / "checkpoints")
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:  # continuing it is the point
                warnings.filterwarnings(
                    "ignore", message=f"Checkpoint directory {re.escape(str(callback.dirpath))} exists and is not empty"
                )

    def _drop_lr_monitor_without_logger(self) -> None:
        callbacks = callbacks_of(self.trainer)
        monitors = [cb for cb in callbacks if isinstance(cb, LearningRateMonitor)]
        if monitors and not self.trainer.loggers:
            set_callbacks(self.trainer, [cb for cb in callbacks if cb not in monitors])
            _note("no logger (trainer.logger is false), so LearningRateMonitor is dropped: it needs one")

    def before_fit(self) -> None:
        """Prepare the run (see :meth:`_prepare`); LightningCLI calls ``before_<subcommand>``."""
        self._prepare("fit")

    def before_validate(self) -> None:
        """Prepare the run (see :meth:`_prepare`)."""
        self._prepare("validate")

    def before_test(self) -> None:
        """Prepare the run (see :meth:`_prepare`)."""
        self._prepare("test")

    def before_predict(self) -> None:
        """Prepare the run (see :meth:`_prepare`)."""
        self._prepare("predict")

    def after_fit(self) -> None:
        """Print what the run produced (:func:`~qlight.runs.fit_summary`)."""
        if self.trainer.is_global_zero:
            print(fit_summary(self.trainer), flush=True)

    def _say_where_metrics_went(self) -> None:
        csv = csv_logger(self.trainer)
        if csv is not None and self.trainer.is_global_zero:
            print(f"qlight: metrics: {os.path.join(csv.log_dir, 'metrics.csv')}", flush=True)

    def after_validate(self) -> None:
        """Print where the metrics went."""
        self._say_where_metrics_went()

    def after_test(self) -> None:
        """Print where the metrics went."""
        self._say_where_metrics_went()

    # ------------------------------------------------------------------ signals
    @override
    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; SIGTERM/SIGINT stop it as :class:`~qlight.interrupt.Interrupted` (see that module)."""
        context = "before training started; nothing to save" if subcommand == "fit" else ""
        previous = {} if lightning_handles_signals(self.trainer) else immediate_stop_handlers(context)
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise self._interrupted() from None
        finally:
            restore_handlers(previous)

    def _interrupted(self) -> Interrupted:
        stop = next((cb for cb in callbacks_of(self.trainer) if isinstance(cb, StopOnSignal)), None)
        if stop is None or stop.signum is None or stop.checkpoint is None:
            return Interrupted(signal.SIGTERM)
        step, epoch = stop.stopped_at or (self.trainer.global_step, self.trainer.current_epoch)
        saved = Path(self.trainer.log_dir or ".") / "config.yaml"
        config = f"--config {saved}" if saved.is_file() else "<the same arguments>"
        return Interrupted(
            stop.signum,
            stop.checkpoint,
            f"stopped by {signal.Signals(stop.signum).name} after step {step} (epoch {epoch}); saved "
            f"{stop.checkpoint}; resume with: qlight fit {config} --ckpt_path {stop.checkpoint}",
        )


def _note(text: str) -> None:
    """One line about a choice qlight made for the user."""
    if process_rank() == 0:
        print(f"qlight: note: {text}", file=sys.stderr, flush=True)


def describe_run(
    model: LightningModule, datamodule: LightningDataModule | None, trainer: Trainer, seed: Any
) -> RunInfo:
    """Dataset, architecture, method and bits of a configured experiment."""
    if isinstance(datamodule, NamedDataset):
        dataset = datamodule.dataset_name
    else:
        dataset = type(datamodule).__name__.removesuffix("DataModule").lower()
    arch = str(model.hparams.get("model", type(model).__name__)).removeprefix("torchvision.")
    spec = model.quant_spec if isinstance(model, ImageClassifier) else None
    methods = [cb.method_name for cb in callbacks_of(trainer) if isinstance(cb, TrainingMethod) and cb.method_name]
    if methods:
        method = methods[0]
    else:
        method = "float" if spec is None else "ste"
    bits = bits_tag(spec)
    return RunInfo(dataset=dataset, arch=arch, method=method, bits=bits, seed=seed if isinstance(seed, int) else None)


def bits_tag(spec: Any) -> str:
    """``w1a4`` style tag of a quantization spec (``float`` for none; 32 marks a float part)."""
    if spec is None:
        return "float"
    w = spec.weight_bits if spec.weight != "float" else 32
    a = spec.a_bits if spec.act != "float" else 32
    return f"w{w}a{a}"


def main(args: ArgsType = None, run: bool = True) -> QlightCLI:
    """Entry point of ``qlight`` and ``python -m qlight`` (``run=False`` builds without running).

    A bad config, data path or checkpoint exits with status 2 and one ``qlight: error: ...`` line; a
    run stopped by SIGTERM/SIGINT exits with 143/130 and one line saying how to resume. ``--verbose``
    (anywhere on the command line) restores the libraries' full output.
    """
    loud = False
    if args is None:  # the command line: LightningCLI reads sys.argv itself
        loud = "--verbose" in sys.argv[1:]
        sys.argv[1:] = [a for a in sys.argv[1:] if a != "--verbose"]
    elif isinstance(args, list | tuple):
        loud = "--verbose" in args
        args = [a for a in args if a != "--verbose"]
    previous = os.environ.get("QLIGHT_VERBOSE")
    if loud:
        set_verbose(True)
    be_quiet()
    try:
        return _build_cli(args, run)
    except (ConfigError, DatasetError, CheckpointError) as err:  # DatasetError: data checked when the run starts
        print(f"qlight: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        if process_rank() == 0:
            print(f"qlight: {stop}", file=sys.stderr, flush=True)
        raise SystemExit(exit_status(stop.signum)) from None
    finally:
        if loud:
            if previous is None:
                os.environ.pop("QLIGHT_VERBOSE", None)
            else:
                os.environ["QLIGHT_VERBOSE"] = previous


def console_main() -> None:
    """The ``qlight`` console script: run the CLI and exit 0 on success (main returns the CLI object).

    ``qlight export --ckpt_path C [--format qlight|onnx|qonnx] [--verify]`` writes the truly quantized model of
    a checkpoint and checks it in its runtime (:mod:`qlight.export`).
    """
    if sys.argv[1:2] in (["report"], ["grid"]):  # qlight report / qlight grid (qlight.commands)
        from qlight.commands import run_subcommand

        raise SystemExit(run_subcommand(sys.argv[1], sys.argv[2:]))
    if sys.argv[1:2] == ["export"]:
        from qlight.export import main as export_main

        try:
            export_main(sys.argv[2:])
        except (FileNotFoundError, ValueError) as err:
            print(f"qlight: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    status = 1
    try:
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    finally:
        _finish_wandb(status)


def _finish_wandb(status: int) -> None:
    """Close the W&B run before the interpreter exits.

    W&B's exit hook prints its closing lines with ANSI colours even into a file, and marks a run stopped
    by a signal as finished.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=status)


CLASS_HELP = (
    "Options of the chosen classes: --model.help ImageClassifier, --data.help CIFAR10DataModule (or "
    "ImageNetDataModule, ...), --trainer.callbacks.help BCGD (or AQE, ...), --trainer.logger.help "
    "qlight.loggers.WandbLogger. --print_config shows the resolved config; --verbose shows the libraries' "
    "full output."
)


def _build_cli(args: ArgsType, run: bool) -> QlightCLI:
    subcommand_kwargs = {sub: {"epilog": CLASS_HELP} for sub in ("fit", "validate", "test", "predict")}
    return QlightCLI(
        model_class=ImageClassifier,
        datamodule_class=ImageDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=QlightSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=QlightArgumentParser,
        parser_kwargs={
            "prog": "qlight",
            "version": qlight.__version__,
            "epilog": "Also: qlight export --ckpt_path CKPT [--format qlight|onnx|qonnx] [--verify] writes the truly "
            "quantized network (qlight export --help); qlight grid PROTOCOL runs a table's cells with seeds; "
            "qlight report [logs/] tabulates them. --verbose (any command) shows the libraries' full output.",
            **subcommand_kwargs,
        },
        args=args,
        run=run,
    )
