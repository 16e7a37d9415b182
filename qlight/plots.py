"""Read a run's ``metrics.csv`` and draw the :class:`~qlight.callbacks.QuantDiagnostics` curves of several runs.

Draws with matplotlib (a qlight dependency)::

    from qlight.plots import diagnostics_figure
    diagnostics_figure({"BCGD": "logs/.../version_0", "BinaryConnect": "logs/.../version_0"})
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DIAGNOSTIC_LABELS", "diagnostics_figure", "last_value", "metrics_csv", "read_metrics"]

#: Axis labels of the diagnostics quantities.
DIAGNOSTIC_LABELS = {
    "flip_ratio": "flip ratio (levels changed since the previous log)",
    "quant_error": "quantization error ‖w − Q(w)‖ / ‖w‖",
    "clip_fraction": "latent weights at or beyond the top level",
    "grad_norm": "latent-weight gradient norm",
    "alpha": "activation resolution α (mean over layers)",
    "zero_fraction": "activation inputs on level 0",
    "top_fraction": "activation inputs on the top level",
}

Series = tuple[list[int], list[float]]


def metrics_csv(run: str | Path) -> Path:
    """``run`` itself if it is a file, else ``run/metrics.csv`` (a CSVLogger version folder)."""
    path = Path(run)
    path = path if path.is_file() else path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.csv at {str(path)!r}; pass a run folder (logs/<group>/<name>/version_N)")
    return path


def read_metrics(run: str | Path) -> dict[str, Series]:
    """Every numeric column of a run's ``metrics.csv`` as ``(steps, values)``, in file order.

    Lightning's CSV logger writes one row per logging call, so each column is filled in some rows only;
    empty cells are skipped.
    """
    out: dict[str, Series] = {}
    with open(metrics_csv(run), newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(number)
    return out


def diagnostics_figure(
    runs: Mapping[str, str | Path],
    quantities: Sequence[str] = ("flip_ratio", "quant_error", "alpha"),
    layer: str | None = None,
    axes: Sequence[Any] | None = None,
    logy: Sequence[str] = (),
) -> Figure:
    """One panel per quantity, one line per run: ``diag/<quantity>`` (or ``diag/<layer>/<quantity>``) over steps.

    Args:
        runs: label -> run folder or ``metrics.csv`` path.
        quantities: names as logged by :class:`~qlight.callbacks.QuantDiagnostics`.
        layer: a layer or activation name (``layer1.0.conv1``) instead of the network aggregate.
        axes: matplotlib axes to draw into (one per quantity); None makes a new row of panels.
        logy: quantities drawn on a logarithmic y axis (e.g. ``quant_error`` when scaled and unscaled
            quantizers are compared).

    A run that did not log a quantity (e.g. a float run) is left out of that panel; a quantity no run
    logged raises ``ValueError`` naming the quantities that were logged.
    """
    import matplotlib.pyplot as plt
    metrics = {label: read_metrics(path) for label, path in runs.items()}
    prefix = f"diag/{layer}/" if layer else "diag/"
    if axes is None:
        fig, created = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 3.2), squeeze=False)
        axes = list(created[0])
    else:
        fig = axes[0].figure
    if len(axes) != len(quantities):
        raise ValueError(f"axes has {len(axes)} panels for {len(quantities)} quantities")
    for ax, quantity in zip(axes, quantities, strict=True):
        key = prefix + quantity
        drawn = 0
        for label, columns in metrics.items():
            if key in columns:
                steps, values = columns[key]
                ax.plot(steps, values, marker=".", label=label)
                drawn += 1
        if not drawn:
            logged = sorted({k for columns in metrics.values() for k in columns if k.startswith(prefix)})
            raise ValueError(f"no run logged {key!r}; logged: {logged[:12]}{' ...' if len(logged) > 12 else ''}")
        ax.set_title(f"{layer} {quantity}" if layer else quantity)
        if quantity in logy:
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(DIAGNOSTIC_LABELS.get(quantity, quantity), fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def last_value(run: str | Path, key: str) -> float:
    """The last logged value of ``key`` in a run (NaN if it was never logged)."""
    series = read_metrics(run).get(key)
    return series[1][-1] if series else math.nan
