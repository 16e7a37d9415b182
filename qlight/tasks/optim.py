"""Optimizer set-up that costs few kernel launches: merged parameter groups and multi-tensor kernels.

A step of ``torch.optim.SGD`` with momentum and weight decay is four multi-tensor kernels per parameter group
with ``foreach``, one fused kernel per group with ``fused`` (CUDA), and four kernels *per tensor* without
either (PyTorch's default on the CPU). qlight therefore

- builds one parameter group per distinct set of hyper-parameters, not one per kind of parameter
  (quantized kernels, other weights and biases share a group unless an override separates them), and
- switches SGD, Adam and AdamW to their fused kernels on CUDA and to ``foreach`` elsewhere, unless the
  config chose (``fused``/``foreach`` set explicitly).

Group layouts change with the config (and changed in qlight's history), so a checkpoint's optimizer and
scheduler state is re-laid out on load (:func:`relayout_checkpoint`): every layout is a partition of the same
ordered sequence of base groups, and the parameter order inside the state never changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

__all__ = ["BASE_GROUPS", "GroupLayout", "fast_kernels", "merge_groups", "relayout_checkpoint"]

#: the kinds of parameters, in the order their tensors appear in the optimizer state
BASE_GROUPS = ("quantized_weights", "weights", "biases", "alphas")

#: a layout: the groups of an optimizer, each a tuple of base-group names
GroupLayout = list[tuple[str, ...]]

#: device types on which :func:`fast_kernels` picks the fused kernels (elsewhere ``foreach``, whose per-tensor
#: arithmetic equals the default loop's bit for bit). ``benchmarks/step_ops.py`` adds "cpu" to count what a
#: GPU runs.
FUSED_DEVICES: tuple[str, ...] = ("cuda",)


def merge_groups(
    groups: Mapping[str, Sequence[nn.Parameter]], overrides: Mapping[str, Mapping[str, float]]
) -> list[dict[str, Any]]:
    """One optimizer group per distinct override set, base groups in :data:`BASE_GROUPS` order.

    Args:
        groups: parameters by base-group name (empty groups are skipped).
        overrides: per base group, the hyper-parameters it sets itself (e.g. ``{"weight_decay": 0.0}``,
            ``{"lr_factor": 0.1}``); groups with equal overrides are merged.

    Returns:
        ``[{"name": "quantized_weights+weights+biases", "params": [...], **overrides}, ...]``.
    """
    merged: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
    for name in BASE_GROUPS:
        params = list(groups.get(name, ()))
        if not params:
            continue
        own = dict(overrides.get(name, {}))
        key = tuple(sorted(own.items()))
        if key in merged:
            merged[key]["params"].extend(params)
            merged[key]["name"] += f"+{name}"
        else:
            merged[key] = {"name": name, "params": params, **own}
    return list(merged.values())


def layout_of(param_groups: Sequence[Mapping[str, Any]]) -> GroupLayout:
    """The layout of an optimizer's (or a saved state's) groups, read from their names."""
    return [tuple(str(g.get("name", "")).split("+")) for g in param_groups]


def fast_kernels(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """An equivalent optimizer that uses fused kernels on CUDA and ``foreach`` kernels elsewhere.

    Only for ``SGD``, ``Adam`` and ``AdamW`` (exact types) with neither ``fused`` nor ``foreach`` set, before
    the first step; anything else is returned as is. The ``foreach`` kernels compute the same per-tensor
    arithmetic as the default loop.
    """
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return optimizer
    defaults = dict(optimizer.defaults)
    if defaults.get("fused") is not None or defaults.get("foreach") is not None:
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    accepted = inspect.signature(type(optimizer).__init__).parameters
    fusable = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if fusable and "fused" in accepted:
        defaults.update(fused=True, foreach=None)
    elif "foreach" in accepted:
        defaults.update(foreach=True, fused=None)
    else:
        return optimizer
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    return type(optimizer)(groups, **{k: v for k, v in defaults.items() if k in accepted})


def relayout_checkpoint(
    checkpoint: dict[str, Any], current: GroupLayout, sizes: Mapping[str, int], owner: str = "qlight"
) -> None:
    """Rewrite the optimizer and scheduler state of ``checkpoint`` in place to the ``current`` group layout.

    Args:
        checkpoint: a Lightning checkpoint dict (``optimizer_states``, ``lr_schedulers``).
        current: the layout the run builds now.
        sizes: number of tensors per base group (non-empty groups only).
        owner: who asks, for the warning when hyper-parameters of merged groups disagree.
    """
    states = checkpoint.get("optimizer_states") or []
    if len(states) != 1:
        return
    state = states[0]
    saved = layout_of(state.get("param_groups", []))
    if saved == current or not all(all(n in BASE_GROUPS for n in g) for g in saved):
        return
    saved_names = [n for g in saved for n in g]
    current_names = [n for g in current for n in g]
    if saved_names != current_names or any(sizes.get(n, 0) == 0 for n in saved_names):
        return  # a different model: let the optimizer's own check report it
    base_dicts: dict[str, dict[str, Any]] = {}
    for group, d in zip(saved, state["param_groups"], strict=True):
        params = list(d["params"])
        for name in group:
            n = sizes[name]
            base_dicts[name] = {**d, "params": params[:n]}
            params = params[n:]
    new_groups = []
    for group in current:
        first = base_dicts[group[0]]
        merged = {**first, "name": "+".join(group), "params": [i for n in group for i in base_dicts[n]["params"]]}
        for name in group[1:]:
            other = {k: v for k, v in base_dicts[name].items() if k not in ("params", "name")}
            mine = {k: v for k, v in first.items() if k not in ("params", "name")}
            if other != mine:
                rank_zero_warn(
                    f"{owner}: the checkpoint's optimizer groups {group[0]!r} and {name!r} have different "
                    f"hyper-parameters; the merged group continues with those of {group[0]!r}"
                )
        new_groups.append(merged)
    state["param_groups"] = new_groups
    owner_of = {name: i for i, group in enumerate(saved) for name in group}
    for scheduler in checkpoint.get("lr_schedulers") or []:
        for key, value in list(scheduler.items()):
            if isinstance(value, list) and len(value) == len(saved):
                scheduler[key] = [value[owner_of[group[0]]] for group in current]
