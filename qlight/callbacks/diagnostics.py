"""Seeing inside quantized training: per-layer diagnostics logged as ``diag/<layer>/<quantity>``.

What a researcher needs to tell *why* one method beats another (larq's ``FlipRatio`` is the nearest peer):
how often the quantized weights still change, how far the latent weights sit from their quantization, how
many of them press against the top level or the clip bound, how large the latent gradients are, and how the
activation resolutions α and the occupancy of the lowest and highest activation levels evolve.

Cost: nothing at all on ordinary steps. Every quantity is computed on the device on logging steps only
(every ``every_n_steps`` optimizer steps and on each epoch's last batch): forward hooks that count activation
levels are attached for that one batch, the gradient norms are read right before that optimizer step, and
the weights are measured after it. All values then reach the host in one transfer. Under DDP the weights,
their gradients (all-reduced) and α are identical on every rank; the activation counts are summed over the
ranks, so every rank logs the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from qlight._lightning_compat import logged_step, step_logging_due
from qlight.quant import (
    QuantAct,
    QuantConv2d,
    QuantLinear,
    TensorQuantizer,
    act_quant,
    quant_acts,
    quant_layers,
)

__all__ = [
    "FIXED_TOP_LEVEL",
    "QuantDiagnostics",
    "activation_level_counts",
    "changed_levels",
    "level_pattern",
    "top_level",
]

#: Unscaled quantizers have a fixed grid whose top level is 1 (also the AQE/BNN latent clip bound);
#: every other (scaled) quantizer's top level is the largest magnitude of Q(w), per tensor or channel.
FIXED_TOP_LEVEL: dict[str, float] = {"sign": 1.0, "ternary_unit": 1.0, "pow2_unit": 1.0}

#: Two level patterns differ where they differ by more than this relative amount. Distinct levels of every
#: built-in quantizer (up to 8 bits) differ by at least 1/127 relative; one level seen at two different
#: scales differs by float rounding (~1e-7).
FLIP_RTOL = 1e-3

_WEIGHT_QUANTITIES = ("flip_ratio", "quant_error", "clip_fraction", "grad_norm")
_ACT_QUANTITIES = ("alpha", "zero_fraction", "top_fraction")


def top_level(q: Tensor, quantizer: TensorQuantizer) -> Tensor:
    """The quantizer's top level for ``q = Q(w)``: broadcastable against ``q`` (per channel when per-channel).

    :data:`FIXED_TOP_LEVEL` for unscaled quantizers; ``max|Q(w)|`` otherwise (every built-in scaled quantizer
    puts the largest weight on its top level, so this is the top of its grid, not merely the largest used).
    """
    fixed = FIXED_TOP_LEVEL.get(quantizer.quantizer)
    if fixed is not None:
        return torch.full((), fixed, dtype=q.dtype, device=q.device)
    a = q.abs()
    if quantizer.per_channel and q.dim() >= 1:
        return a.reshape(a.shape[0], -1).amax(dim=1).reshape((-1,) + (1,) * (q.dim() - 1))
    return a.amax()


def level_pattern(q: Tensor, top: Tensor) -> Tensor:
    """``Q(w) / top``: which level each entry takes, independent of the scale (±1 for binary weights)."""
    return q / torch.where(top > 0, top, torch.ones_like(top))


def changed_levels(pattern: Tensor, reference: Tensor) -> Tensor:
    """Boolean mask of the entries whose level differs between two :func:`level_pattern` tensors."""
    return (pattern - reference).abs() > FLIP_RTOL * torch.maximum(pattern.abs(), reference.abs())


def activation_level_counts(act: QuantAct, x: Tensor) -> Tensor:
    """``[#inputs on level 0, #inputs on the top level L·α]`` of ``act`` for the input ``x`` (int64, on x's device).

    The levels are those of the layer's own forward (:func:`qlight.quant.act_quant` with α clamped to its range,
    the layer's bits and rounding mode), evaluated in float32.
    """
    alpha = act.alpha.detach().float().clamp(act.alpha_min, act.alpha_max)
    level = torch.round(act_quant(x.detach().float(), alpha, act.bits, act.mode) / alpha)
    return torch.stack([(level == 0).sum(), (level == act.levels).sum()])


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule was compiled in place (``nn.Module.compile``) or wrapped by dynamo."""
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
        for m in module.modules()
    )


def _short_names(names: list[str]) -> list[str]:
    """Drop the task's ``model.`` prefix that every name shares (``model.layer1.0.conv1`` -> ``layer1.0.conv1``)."""
    if names and all(n.startswith("model.") for n in names):
        return [n.removeprefix("model.") for n in names]
    return names


class QuantDiagnostics(Callback):
    """Log per-layer and network-wide diagnostics of quantized training (``docs/diagnostics.md``).

    Per weight-quantized layer (``diag/<layer>/<quantity>``) and aggregated (``diag/<quantity>``):

    - ``flip_ratio``: fraction of the entries of Q(w) whose level changed since the previous log (for binary
      weights the fraction of signs); aggregated: all flips over all entries. The reference is checkpointed,
      so a resumed run continues it.
    - ``quant_error``: ``‖w − Q(w)‖ / ‖w‖``; aggregated over all quantized weights together.
    - ``clip_fraction``: fraction of latent weights at or beyond the quantizer's top level (:func:`top_level`:
      the clip bound 1 of unscaled AQE/BNN quantizers, ``max|Q(w)|`` of scaled ones).
    - ``grad_norm``: L2 norm of the latent weights' gradient right before the optimizer step (after
      unscaling, before gradient clipping); aggregated: the global norm.

    Per :class:`~qlight.quant.QuantAct` (``diag/<act>/<quantity>``) and aggregated:

    - ``alpha``: the resolution the forward uses (clamped to its range); aggregated: the mean.
    - ``zero_fraction`` / ``top_fraction``: fraction of its inputs on level 0 / on the top level (saturation),
      counted during the logging step's training forward (every call of a shared module), summed over DDP ranks.

    Method knobs (``bcgd/rho``, ``binaryrelax/eta``, ``aqe/alpha``, ``ede/t``) stay with their callbacks.

    Values are written straight to the trainer's loggers (CSV and W&B alike) at the step Lightning uses for
    ``train/loss``, together with ``epoch``; :attr:`latest` holds the last values on every rank.

    Args:
        every_n_steps: log every this many optimizer steps (and on each epoch's last batch); None follows the
            trainer's ``log_every_n_steps``.
        histograms: at each epoch end also log W&B histograms of every quantized layer's latent weights
            (``diag/<layer>/latent_weight``) and of all α (``diag/alpha_hist``); no-op without a W&B logger.
    """

    def __init__(self, every_n_steps: int | None = None, histograms: bool = False) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"QuantDiagnostics every_n_steps={every_n_steps!r} must be a positive integer or None")
        self.every_n_steps = every_n_steps
        self.histograms = bool(histograms)
        self.latest: dict[str, float] = {}
        self._layers: list[QuantConv2d | QuantLinear] = []
        self._layer_names: list[str] = []
        self._acts: list[QuantAct] = []
        self._act_names: list[str] = []
        self._reference: dict[str, Tensor] = {}
        self._due = False
        self._grad_sq: Tensor | None = None
        self._counts: Tensor | None = None
        self._totals: list[int] = []
        self._hooks: list[RemovableHandle] = []
        self._warned_unmeasured = False

    # ------------------------------------------------------------------ set-up and state
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":  # diagnostics describe training
            return
        layers, acts = quant_layers(pl_module), quant_acts(pl_module)
        if not layers and not acts:
            raise ValueError(
                f"QuantDiagnostics found no quantized layer (QuantConv2d/QuantLinear) or QuantAct in "
                f"{type(pl_module).__name__}; give the model a quantization spec (model.init_args.quant) "
                "or drop the callback"
            )
        self._layers = [m for _, m in layers]
        self._layer_names = _short_names([n for n, _ in layers])
        self._acts = [m for _, m in acts]
        self._act_names = _short_names([n for n, _ in acts])
        if self.histograms and not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            rank_zero_info("QuantDiagnostics: histograms=True has no effect without a W&B logger")

    @override
    def state_dict(self) -> dict[str, Any]:
        """The flip-ratio reference (level pattern at the last log) of every layer, on the CPU."""
        return {"reference": {name: ref.detach().cpu() for name, ref in self._reference.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reference = dict(state_dict.get("reference", {}))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Move a restored reference to the weights' device; start it afresh where there is none."""
        restored, fresh = dict(self._reference), []
        restored_any = bool(restored)
        self._reference = {}
        with torch.no_grad():
            for name, layer in zip(self._layer_names, self._layers, strict=True):
                ref = restored.pop(name, None)
                if ref is None or ref.shape != layer.weight.shape:
                    fresh.append(name)
                    self._reference[name] = self._pattern(layer)
                else:
                    self._reference[name] = ref.to(layer.weight.device, torch.float32)
        if restored_any and (restored or fresh):
            rank_zero_warn(
                f"QuantDiagnostics: the checkpoint's flip-ratio reference does not fit this model (layers "
                f"{(sorted(restored) or fresh)[:3]} ...); the flip ratio restarts for those layers"
            )
        if _is_compiled(pl_module):
            rank_zero_warn(
                "QuantDiagnostics: the network is compiled; forward hooks added after compilation do not run "
                "inside its graphs, so activation zero/top fractions are logged only where they ran (alpha and "
                "every weight diagnostic are always logged)"
            )
            self._warned_unmeasured = True

    # ------------------------------------------------------------------ the step
    def _logging_due(self, trainer: Trainer, batch_idx: int) -> bool:
        if self.every_n_steps is None:
            return step_logging_due(trainer, batch_idx)
        last = batch_idx + 1 >= trainer.num_training_batches
        if not (last or (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
            return False
        return last or (logged_step(trainer) + 1) % self.every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._due = self._logging_due(trainer, batch_idx)
        if self._due and self._acts:
            self._attach_counters(pl_module.device)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._due or not self._layers:
            return
        with torch.no_grad():
            grads = [m.weight.grad for m in self._layers]
            present = [g for g in grads if g is not None]
            norms = iter(torch._foreach_norm(present) if present else [])
            zero = torch.zeros((), device=pl_module.device)
            self._grad_sq = torch.stack(
                [next(norms).double() if g is not None else zero.double() for g in grads]
            ).square()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._due:
            return
        self._due = False
        self._detach_counters()
        self._write(trainer, self.measure(trainer))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.histograms:
            self._log_histograms(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach_counters()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._detach_counters()

    # ------------------------------------------------------------------ activation counting
    def _attach_counters(self, device: torch.device) -> None:
        self._detach_counters()
        self._counts = torch.zeros(len(self._acts), 2, dtype=torch.long, device=device)
        self._totals = [0] * len(self._acts)
        for i, act in enumerate(self._acts):
            self._hooks.append(act.register_forward_hook(self._counter(i)))

    def _counter(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not module.training:
                return
            assert self._counts is not None
            x = inputs[0]
            with torch.no_grad():
                self._counts[index].add_(activation_level_counts(self._acts[index], x))
            self._totals[index] += x.numel()

        return hook

    def _detach_counters(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------ measuring
    def _pattern(self, layer: QuantConv2d | QuantLinear) -> Tensor:
        q = layer.quantized_weight().float()
        return level_pattern(q, top_level(q, layer.weight_quantizer))

    @torch.no_grad()
    def measure(self, trainer: Trainer) -> dict[str, float]:
        """Measure everything now (one host transfer), advance the flip-ratio reference, return the values.

        Gradient norms are included when ``on_before_optimizer_step`` ran on this logging step, activation
        fractions when the counting hooks were attached for it.
        """
        parts: list[Tensor] = []
        if self._layers:
            parts.append(torch.stack([self._weight_sums(n, m) for n, m in zip(self._layer_names, self._layers,
                                                                             strict=True)]).flatten())
        grad_sq, self._grad_sq = self._grad_sq, None
        if grad_sq is not None:
            parts.append(grad_sq)
        counts, self._counts = self._counts, None
        if self._acts:
            parts.append(torch.stack([a.alpha.detach().double().clamp(a.alpha_min, a.alpha_max) for a in self._acts]))
            if counts is not None:
                totals = torch.tensor(self._totals, device=counts.device)
                parts.append(trainer.strategy.reduce(torch.cat([counts.flatten(), totals]), reduce_op="sum").double())
        device = parts[0].device
        values = torch.cat([p.to(device) for p in parts]).tolist()
        return self._summarise(values, with_grads=grad_sq is not None, with_counts=counts is not None)

    def _weight_sums(self, name: str, layer: QuantConv2d | QuantLinear) -> Tensor:
        """``[#level changes since the reference, ‖w − Q(w)‖², ‖w‖², #|w| ≥ top]``; advances the reference."""
        w = layer.weight.detach().float()
        q = layer.quantized_weight().float()
        top = top_level(q, layer.weight_quantizer)
        pattern = level_pattern(q, top)
        ref = self._reference.get(name)
        flips = changed_levels(pattern, ref).sum() if ref is not None else torch.zeros((), device=w.device)
        self._reference[name] = pattern
        clipped = ((w.abs() >= top) & (top > 0)).sum()
        return torch.stack([flips.double(), (w - q).square().sum().double(), w.square().sum().double(),
                            clipped.double()])

    def _summarise(self, values: list[float], with_grads: bool, with_counts: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        n_layers, n_acts = len(self._layers), len(self._acts)
        it = iter(values)
        if n_layers:
            stats = [[next(it) for _ in range(4)] for _ in range(n_layers)]
            sizes = [m.weight.numel() for m in self._layers]
            grads = [next(it) for _ in range(n_layers)] if with_grads else None
            for i, name in enumerate(self._layer_names):
                flips, err_sq, w_sq, clipped = stats[i]
                out[f"diag/{name}/flip_ratio"] = flips / sizes[i]
                out[f"diag/{name}/quant_error"] = math.sqrt(err_sq / w_sq) if w_sq > 0 else 0.0
                out[f"diag/{name}/clip_fraction"] = clipped / sizes[i]
                if grads is not None:
                    out[f"diag/{name}/grad_norm"] = math.sqrt(grads[i])
            total = sum(sizes)
            err_sq, w_sq = sum(s[1] for s in stats), sum(s[2] for s in stats)
            out["diag/flip_ratio"] = sum(s[0] for s in stats) / total
            out["diag/quant_error"] = math.sqrt(err_sq / w_sq) if w_sq > 0 else 0.0
            out["diag/clip_fraction"] = sum(s[3] for s in stats) / total
            if grads is not None:
                out["diag/grad_norm"] = math.sqrt(sum(grads))
        if n_acts:
            alphas = [next(it) for _ in range(n_acts)]
            for name, alpha in zip(self._act_names, alphas, strict=True):
                out[f"diag/{name}/alpha"] = alpha
            out["diag/alpha"] = sum(alphas) / n_acts
            if with_counts:
                counts = [next(it) for _ in range(2 * n_acts)]
                totals = [next(it) for _ in range(n_acts)]
                measured = [i for i in range(n_acts) if totals[i] > 0]
                for i in measured:
                    out[f"diag/{self._act_names[i]}/zero_fraction"] = counts[2 * i] / totals[i]
                    out[f"diag/{self._act_names[i]}/top_fraction"] = counts[2 * i + 1] / totals[i]
                if measured:
                    seen = sum(totals[i] for i in measured)
                    out["diag/zero_fraction"] = sum(counts[2 * i] for i in measured) / seen
                    out["diag/top_fraction"] = sum(counts[2 * i + 1] for i in measured) / seen
                if len(measured) < n_acts and not self._warned_unmeasured:
                    self._warned_unmeasured = True
                    missing = [self._act_names[i] for i in range(n_acts) if totals[i] == 0]
                    rank_zero_warn(
                        f"QuantDiagnostics: activations {missing[:3]} saw no training input on a logging step; "
                        "their zero/top fractions are not logged"
                    )
        return out

    # ------------------------------------------------------------------ writing
    def _write(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Hand the values to every logger at the step Lightning writes ``train/loss`` at."""
        self.latest = metrics
        step = logged_step(trainer)
        row: dict[str, float] = {**metrics, "epoch": trainer.current_epoch}  # an int, as Lightning writes it
        for logger in trainer.loggers:
            logger.log_metrics(row, step=step)

    def _log_histograms(self, trainer: Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        data: dict[str, Any] = {
            f"diag/{name}/latent_weight": wandb.Histogram(layer.weight.detach().float().cpu().numpy())
            for name, layer in zip(self._layer_names, self._layers, strict=True)
        }
        if self._acts:
            alphas = torch.stack([a.alpha.detach().float().clamp(a.alpha_min, a.alpha_max) for a in self._acts])
            data["diag/alpha_hist"] = wandb.Histogram(alphas.cpu().numpy())
        step = logged_step(trainer)
        for logger in loggers:
            logger.experiment.log({**data, "trainer/global_step": step})
