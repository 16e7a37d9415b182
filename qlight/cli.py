"""The ``qlight`` command: LightningCLI with qlight's models, data, callbacks and loggers.

``qlight fit|validate|test|predict --config configs/<dataset>/<experiment>.yaml``; later ``--config``
files and ``--key value`` flags override earlier ones. Short class names work in YAML
(``class_path: BCGD``) because this module imports qlight's packages.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

import qlight
import qlight.callbacks
import qlight.data
import qlight.loggers
from qlight.callbacks.throughput import Throughput
from qlight.data import DatasetError
from qlight.loggers import RunInfo
from qlight.tasks import ImageClassifier


class QlightSaveConfig(SaveConfigCallback):
    """Save the resolved config next to the run and into the W&B run config.

    Also declares the W&B summaries of the validation accuracies as their maximum over the run: the
    papers report the best accuracy during training, and the W&B run table then shows that number.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, qlight.loggers.WandbLogger) and logger.mode != "disabled":
                config = self.parser.dump(self.config, skip_none=False, format="json")
                run = logger.experiment
                run.config.update({"qlight": json.loads(config)}, allow_val_change=True)
                for key in ("val/acc1", f"val/acc{getattr(pl_module, 'top_k', 5)}"):
                    run.define_metric(key, summary="max")


class ConfigError(ValueError):
    """A bad value in the user's config or data, reported as one line instead of a traceback."""


def _root_cause(err: BaseException) -> BaseException:
    while (nxt := err.__cause__ or err.__context__) is not None:
        err = nxt
    return err


class QlightCLI(LightningCLI):
    """LightningCLI that always checkpoints on ``val/acc1`` and names runs from the experiment."""

    def instantiate_classes(self) -> None:
        """Instantiate, turning qlight's validation errors (wrapped by jsonargparse) into a ConfigError."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = _root_cause(err)
            if isinstance(cause, ValueError | FileNotFoundError) and cause is not err:
                raise ConfigError(str(cause)) from err
            raise

    def before_instantiate_classes(self) -> None:
        """Give a run with a :func:`~qlight.loggers.run_tag` its own ``default_root_dir`` (``logs/<tag>``).

        Lightning writes the requeue checkpoint (``hpc_ckpt_N.ckpt``) there on SIGUSR1 and a requeued
        job resumes from the newest one it finds; with the shared default (the working directory) a
        job could resume from another job's checkpoint.
        """
        tag = qlight.loggers.run_tag()
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if tag and config is not None and config.get("trainer") and not config["trainer"].get("default_root_dir"):
            config["trainer"]["default_root_dir"] = os.path.join("logs", tag)

    def _parse_ckpt_path(self) -> None:
        """``fit --ckpt_path``: keep the config's model. Lightning re-parses the checkpoint's hyper-parameters
        into it, and qlight's omit the optimizer and LR scheduler (callables), which a resumed run would
        then silently replace by the defaults (SGD 0.1, no schedule). validate/test still rebuild from them."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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

    def _describe_run(self) -> None:
        info = describe_run(self.model, self.datamodule, self.trainer, self._get(self.config, "seed_everything"))
        for logger in self.trainer.loggers:
            describe = getattr(logger, "describe_run", None)
            if describe is not None:
                describe(info)

    def before_fit(self) -> None:
        self._describe_run()

    def before_validate(self) -> None:
        self._describe_run()

    def before_test(self) -> None:
        self._describe_run()

    def before_predict(self) -> None:
        self._describe_run()


def describe_run(model: LightningModule, datamodule: LightningDataModule | None, trainer: Trainer, seed: Any) -> RunInfo:
    """Dataset, architecture, method and bits of a configured experiment."""
    dataset = getattr(datamodule, "dataset_name", None) or type(datamodule).__name__.removesuffix("DataModule").lower()
    arch = str(model.hparams.get("model", type(model).__name__)).removeprefix("torchvision.")
    spec = getattr(model, "quant_spec", None)
    methods = [cb.method_name for cb in trainer.callbacks if getattr(cb, "method_name", None)]
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

    A bad config or data path exits with status 2 and one ``qlight: error: ...`` line.
    """
    try:
        return _build_cli(args, run)
    except (ConfigError, DatasetError) as err:  # DatasetError: data checked when the run starts
        print(f"qlight: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


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
    main()


def _build_cli(args: ArgsType, run: bool) -> QlightCLI:
    return QlightCLI(
        model_class=ImageClassifier,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=QlightSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "version": f"qlight {qlight.__version__}",
            "epilog": "Also: qlight export --ckpt_path CKPT [--format qlight|onnx|qonnx] [--verify] writes the truly "
            "quantized network (qlight export --help); qlight grid PROTOCOL runs a table's cells with seeds; "
            "qlight report [logs/] tabulates them.",
        },
        args=args,
        run=run,
    )
