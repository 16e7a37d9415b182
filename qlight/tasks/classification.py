"""Image classification with an optional quantization spec: the one LightningModule of qlight.

The module is complete without callbacks (DESIGN.md contract 1): the quantized structure is built in
``__init__`` from ``quant``, so ``ImageClassifier.load_from_checkpoint`` and ``qlight validate
--ckpt_path`` rebuild it from the saved hyper-parameters and report hard-quantized accuracy. Methods
such as BCGD and AQE live in callbacks that only schedule and blend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from qlight._lightning_compat import step_logging_due, step_values_written
from qlight.checkpoints import read_checkpoint
from qlight.models import build_model
from qlight.models.resnet_cifar import ShortcutA
from qlight.quant import (
    QuantAct,
    QuantSpec,
    TensorQuantizer,
    clamp_alphas_,
    param_groups,
    quant_acts,
    quantize_model,
    set_calibrating,
)
from qlight.tasks.optim import fast_kernels, merge_groups, relayout_checkpoint
from qlight.tasks.train_stats import NonFiniteLossError, TrainingStats

__all__ = ["COMPILE_MODES", "SCHEDULER_INTERVALS", "ImageClassifier", "NonFiniteLossError"]

# The hyper-parameters hold a QuantSpec; resuming (`ckpt_path`) and `load_from_checkpoint` unpickle
# with weights_only=True (torch >= 2.6), which refuses classes that are not allow-listed.
torch.serialization.add_safe_globals([QuantSpec])

#: torch.compile modes (None: the default); the ones with CUDA graphs need a step marker per training step
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: when the LR scheduler steps: every epoch or every optimizer step
SchedulerInterval = Literal["epoch", "step"]
SCHEDULER_INTERVALS: tuple[SchedulerInterval, ...] = get_args(SchedulerInterval)


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD(lr=0.1, momentum=0.9, wd=1e-4): the usual CIFAR recipe when a config names none."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _check_arguments(
    label_smoothing: float, scheduler_interval: str, compile_mode: str | None, compile_backend: str
) -> None:
    """The task's own arguments (the model, the spec and the factories check theirs)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
    if scheduler_interval not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval={scheduler_interval!r}; valid: {list(SCHEDULER_INTERVALS)}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={compile_mode!r} is not a torch.compile mode; valid: {list(COMPILE_MODES)}")
    backends = sorted(torch._dynamo.list_backends(exclude_tags=()))
    if compile_backend not in backends:
        raise ValueError(f"compile_backend={compile_backend!r} is not a torch.compile backend; valid: {backends}")


class ImageClassifier(LightningModule):
    """Train, validate and test a (quantized) image classifier.

    Args:
        model: architecture name from :func:`qlight.models.build_model` (e.g. ``resnet20``, ``vgg11``,
            ``torchvision.resnet18``).
        model_kwargs: extra constructor arguments of the architecture.
        num_classes: number of classes (linked from the DataModule by the CLI).
        quant: quantization spec; ``None`` trains the float model.
        optimizer: optimizer factory called with the parameter groups (SGD, Adam, ... from YAML).
        lr_scheduler: scheduler factory called with the optimizer (MultiStepLR, CosineAnnealingLR, ...).
        scheduler_interval: step the scheduler every ``epoch`` or every optimizer ``step``.
        label_smoothing: cross-entropy label smoothing.
        init_from: checkpoint (``.ckpt`` of qlight or a plain ``state_dict`` file) whose weights
            initialise the model at the start of ``fit``; the BCGD recipe starts from a float model.
        alpha_lr_factor: learning-rate multiplier of the activation resolutions alpha.
        alpha_weight_decay: weight decay of alpha (``None``: the optimizer's; the BCGD code uses 1e-4).
        bias_weight_decay: weight decay of biases and BN shifts (``None``: the optimizer's).
        alpha_calibration_steps: max-calibrate alpha (alpha = max|x|/L per batch) during the first
            this-many optimizer steps of training (at least 1 when ``quant.alpha_init='calibrate'``).
        alpha_stage_epochs: max-calibrate alpha until this epoch and learn it afterwards (the BCGD
            code's ``stage``; 0 learns alpha from the first epoch).
        channels_last: keep weights and activations in channels-last memory format (faster convs
            on GPUs with tensor cores).
        compile: ``torch.compile`` the network (in place, so checkpoint keys do not change): its training
            forward and backward (AOTAutograd) and its evaluation forward become compiled graphs.
        compile_mode: ``torch.compile`` mode: ``default``, ``reduce-overhead`` (CUDA graphs: each compiled
            graph replays with one launch; the step marks itself with ``cudagraph_mark_step_begin``),
            ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        compile_backend: ``torch.compile`` backend: ``inductor`` (fused kernels) or ``aot_eager`` (the same
            graphs run op by op: eager numerics, used to check the compiled path on a CPU).
    """

    def __init__(
        self,
        model: str = "resnet20",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        quant: QuantSpec | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: SchedulerInterval = "epoch",
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        alpha_lr_factor: float = 1.0,
        alpha_weight_decay: float | None = None,
        bias_weight_decay: float | None = None,
        alpha_calibration_steps: int = 0,
        alpha_stage_epochs: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        _check_arguments(label_smoothing, scheduler_interval, compile_mode, compile_backend)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self._build_network(model, model_kwargs, num_classes, quant, channels_last)
        self._build_calibration(alpha_calibration_steps, alpha_stage_epochs, init_from)
        self._build_metrics(num_classes)

    def _build_network(
        self, model: str, model_kwargs: dict[str, Any] | None, num_classes: int, quant: QuantSpec | None,
        channels_last: bool,
    ) -> None:
        """The architecture, quantized as ``quant`` says (the structure lives here, not in callbacks)."""
        self.model = build_model(model, num_classes=num_classes, **(model_kwargs or {}))
        # option-A shortcuts: record the placement in the hyper-parameters, so checkpoints say which they use
        # (checkpoints without it were trained with the earlier symmetric one: see on_load_checkpoint)
        self._shortcut_pad_explicit = "shortcut_pad" in (model_kwargs or {})
        if self._shortcuts():
            self.hparams["model_kwargs"] = {**(model_kwargs or {}), "shortcut_pad": self._shortcuts()[0].pad}
        # LightningCLI stores hparams["quant"] as a plain dict; code reads the spec from here
        self.quant_spec = QuantSpec(**quant) if isinstance(quant, dict) else quant
        if self.quant_spec is not None:
            quantize_model(self.model, self.quant_spec)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _build_calibration(self, calibration_steps: int, stage_epochs: int, init_from: str | None) -> None:
        """When the activation resolutions α are max-calibrated instead of learned."""
        self.quant_acts = [m for _, m in quant_acts(self.model)]
        if (calibration_steps or stage_epochs) and not self.quant_acts:
            raise ValueError(
                "alpha_calibration_steps/alpha_stage_epochs need quantized activations "
                "(quant.act='relu_quant'); this model has none"
            )
        # quant.alpha_init='calibrate' means max-calibration on at least the first step
        self.calibration_steps = calibration_steps
        if self.quant_spec is not None and self.quant_spec.alpha_init == "calibrate":
            self.calibration_steps = max(1, calibration_steps)
        if self.quant_spec is not None and self.quant_spec.alpha_init == "checkpoint" and not init_from:
            raise ValueError("quant.alpha_init='checkpoint' needs model.init_from (the checkpoint holding alpha)")
        self._calibrating: bool | None = None

    def _build_metrics(self, num_classes: int) -> None:
        """Validation and test accuracies (torchmetrics, synchronised over ranks) and the training step's stats."""
        self.top_k = min(5, num_classes)
        metrics = MetricCollection(
            {
                # validate_args=False: the checks call torch.unique on the targets, a host sync per step
                "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
                f"acc{self.top_k}": MulticlassAccuracy(
                    num_classes, top_k=self.top_k, average="micro", validate_args=False
                ),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # train/loss (the mean since it was last written), the non-finite check and train/acc: read only when
        # the logs are written (:mod:`qlight.tasks.train_stats`)
        self.train_stats = TrainingStats(self.top_k)

    # ------------------------------------------------------------------ set-up
    @override
    def configure_model(self) -> None:
        """Compile once the module sits on its device (idempotent)."""
        hp = self.hparams
        if hp["compile"] and not getattr(self, "_compiled", False):
            mode = hp["compile_mode"] if hp["compile_backend"] == "inductor" else None
            self.model.compile(mode=mode, backend=hp["compile_backend"])
            self._compiled = True

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams["init_from"]:
            self.load_init_weights(self.hparams["init_from"])

    def load_init_weights(self, path: str | Path) -> None:
        """Copy weights from a float (or quantized) checkpoint into this model.

        Every tensor of the checkpoint's network must match a tensor of this model by name and
        shape; tensors only the quantized model has (alpha, quantizer buffers) keep their init
        unless the checkpoint carries them.
        """
        path = Path(path)
        ckpt = read_checkpoint(path, "model.init_from", lightning=False)  # weights_only, one-line errors
        state = ckpt.get("state_dict", ckpt)
        hparams = ckpt.get("hyper_parameters")
        if isinstance(hparams, dict) and self._shortcuts():
            pad = (hparams.get("model_kwargs") or {}).get("shortcut_pad", "symmetric")
            if self._shortcut_pad_explicit and pad != self._shortcuts()[0].pad:
                raise ValueError(
                    f"model.init_from={str(path)!r} was trained with shortcut_pad={pad!r}, but "
                    f"model.model_kwargs.shortcut_pad={self._shortcuts()[0].pad!r}; drop the setting to use the "
                    "checkpoint's, or initialise from a checkpoint with the same placement"
                )
            self._use_shortcut_pad(pad, f"model.init_from={str(path)!r}")
        state = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith(("_", "train_", "val_", "test_"))}
        own = self.model.state_dict()
        unknown = sorted(k for k in state if k not in own)
        wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        if unknown or wrong:
            raise ValueError(
                f"model.init_from={str(path)!r} does not fit model={self.hparams['model']!r}: "
                f"unexpected tensors {unknown[:5]}, shape mismatches {wrong[:5]}"
            )
        missing = sorted(k for k in own if k not in state)
        alpha_missing = [k for k in missing if k.endswith("alpha")]
        if self.quant_spec is not None and self.quant_spec.alpha_init == "checkpoint" and alpha_missing:
            raise ValueError(
                f"quant.alpha_init='checkpoint' but model.init_from={str(path)!r} has no activation "
                f"resolutions (e.g. {alpha_missing[0]!r}); use alpha_init='table' or 'calibrate'"
            )
        quantizer_prefixes = tuple(
            f"{name}." for name, m in self.model.named_modules(remove_duplicate=False)
            if isinstance(m, QuantAct | TensorQuantizer)
        )
        not_quant_state = [k for k in missing if not k.startswith(quantizer_prefixes)]
        if not_quant_state:
            raise ValueError(f"model.init_from={str(path)!r} lacks tensors of the network: {not_quant_state[:5]}")
        self.model.load_state_dict(state, strict=False)
        rank_zero_info(f"qlight: initialised {len(state)} tensors from {path} ({len(missing)} quantizer tensors kept)")

    def _group_overrides(self) -> dict[str, dict[str, float]]:
        """Hyper-parameters each base parameter group sets itself (groups with equal overrides merge)."""
        hp = self.hparams
        overrides: dict[str, dict[str, float]] = {"biases": {}, "alphas": {}}
        if hp["bias_weight_decay"] is not None:
            overrides["biases"]["weight_decay"] = hp["bias_weight_decay"]
        if hp["alpha_weight_decay"] is not None:
            overrides["alphas"]["weight_decay"] = hp["alpha_weight_decay"]
        if hp["alpha_lr_factor"] != 1.0:
            overrides["alphas"]["lr_factor"] = hp["alpha_lr_factor"]
        return overrides

    def _param_groups(self) -> list[dict[str, Any]]:
        return merge_groups(param_groups(self.model), self._group_overrides())

    @override
    def configure_optimizers(self) -> Any:
        """Parameter groups only where hyper-parameters differ; fused (CUDA) or foreach kernels (:mod:`.optim`)."""
        hp = self.hparams
        optimizer = fast_kernels(self.optimizer_factory(self._param_groups()))
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_factor", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": hp["scheduler_interval"]}}

    def _shortcuts(self) -> list[ShortcutA]:
        return [m for m in self.model.modules() if isinstance(m, ShortcutA)]

    def _use_shortcut_pad(self, pad: str, source: str) -> None:
        """Make the network's option-A shortcuts pad as the weights in ``source`` were trained."""
        shortcuts = self._shortcuts()
        if not shortcuts or shortcuts[0].pad == pad:
            return
        rank_zero_info(f"qlight: {source} was trained with shortcut_pad={pad!r}; the network uses it")
        for shortcut in shortcuts:
            shortcut.pad = pad
        self.hparams["model_kwargs"] = {**(self.hparams.get("model_kwargs") or {}), "shortcut_pad": pad}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild what the checkpoint was trained with, and fit its optimizer state to today's groups.

        - Option-A shortcut placement: the checkpoint's ``model_kwargs.shortcut_pad``; a checkpoint without it
          predates the setting and used the symmetric placement, so it evaluates exactly as before.
        - Optimizer and scheduler state saved with other parameter groups (older qlight, other overrides) is
          re-laid out (:func:`~qlight.tasks.optim.relayout_checkpoint`).
        """
        saved = (checkpoint.get("hyper_parameters") or {}).get("model_kwargs") or {}
        self._use_shortcut_pad(saved.get("shortcut_pad", "symmetric"), "the checkpoint")
        groups = self._param_groups()
        layout = [tuple(g["name"].split("+")) for g in groups]
        sizes = {name: len(params) for name, params in param_groups(self.model).items()}
        relayout_checkpoint(checkpoint, layout, sizes, owner=type(self).__name__)

    # ------------------------------------------------------------------ steps
    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.hparams["label_smoothing"])

    @override
    def on_train_start(self) -> None:
        self.train_stats.start(self.global_step)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        calibrate = self.global_step < self.calibration_steps or self.current_epoch < hp["alpha_stage_epochs"]
        if calibrate != self._calibrating:
            self._set_calibrating(calibrate)
        if hp["compile"] and hp["compile_mode"] in CUDA_GRAPH_MODES:
            # a new iteration for CUDA-graph trees: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()

    @override
    def on_validation_model_eval(self) -> None:
        # Max-calibration is a training rule: evaluating must neither fit alpha to validation batches
        # nor leave a validation-fitted alpha for the next training step (breaks exact resume).
        super().on_validation_model_eval()
        self._set_calibrating(False)

    def _set_calibrating(self, calibrate: bool) -> None:
        set_calibrating(self.quant_acts, calibrate)
        self._calibrating = calibrate

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and loss of a training batch: the network forward and what its backward differentiates."""
        logits = self(x)
        return logits, self._loss(logits, y)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, loss = self.forward_loss(x, y)
        self.train_stats.record(loss, logits, y)
        if step_logging_due(self.trainer, batch_idx):
            self._log_train_loss()
        return loss

    def _log_train_loss(self) -> None:
        """Log the window's mean loss (or stop on a non-finite one) and start the next window."""
        stats = self.train_stats
        if stats.losses.count:
            trainer = self.trainer
            mean_loss = stats.window_mean(trainer.accumulate_grad_batches, self.current_epoch, str(trainer.precision))
            self.log("train/loss", mean_loss, prog_bar=True)
            stats.unwritten_loss = None if step_values_written(trainer) else mean_loss
        stats.losses.reset(self.global_step + 1)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The authors clamp the stored alpha in place to [alpha_min, alpha_max] before every use. The
        # forward's clamp is straight-through, so without this a learned alpha drifts past it (even below
        # zero), stops moving the forward, and the layer stays dead. Idempotent between optimizer steps.
        if self.quant_acts:
            clamp_alphas_(self.quant_acts)

    @override
    def on_train_epoch_end(self) -> None:
        stats = self.train_stats
        if stats.unwritten_loss is not None:  # e.g. epochs shorter than log_every_n_steps
            self.log("train/loss", stats.unwritten_loss, prog_bar=True)
            stats.unwritten_loss = None
        counts = stats.epoch_counts()
        if counts is not None:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum").double()
            top1, topk, seen = counts[0], counts[:-1].sum(), counts[-1]
            self.log_dict({"train/acc1": (top1 / seen).float(), f"train/acc{self.top_k}": (topk / seen).float()})
        stats.reset_hits()

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics(self.val_metrics)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_metrics)

    def _log_epoch_metrics(self, metrics: MetricCollection) -> None:
        """Log the epoch's accuracies (synchronised over DDP ranks by torchmetrics) and reset them.

        Computed once per epoch here rather than by logging the metric objects in every step:
        Lightning moves a logged metric object to the device on every ``log`` call, which cost
        more per step than the model's forward for small CIFAR networks.
        """
        if any(m.update_called for m in metrics.values()):
            values = metrics.compute()
            acc1 = f"{metrics.prefix}acc1"
            self.log(acc1, values.pop(acc1), prog_bar=acc1 == "val/acc1")
            self.log_dict(values)
        metrics.reset()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metrics: MetricCollection) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self._loss(logits, y), sync_dist=True)
        metrics.update(logits, y)

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).argmax(dim=1)
