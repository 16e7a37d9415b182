"""qlight.plots: reading Lightning's sparse metrics.csv and drawing diagnostics curves of several runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlight.plots import diagnostics_figure, last_value, read_metrics

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

CSV = """epoch,step,train/loss,diag/flip_ratio,diag/quant_error,diag/conv1/flip_ratio,val/acc1
0,1,2.3,,,,
0,1,,0.25,0.5,0.125,
0,3,,0.125,0.4,0.0,
0,3,,,,,0.1
"""


def _run(tmp_path: Path, name: str, text: str = CSV) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "metrics.csv").write_text(text)
    return folder


def test_read_metrics_skips_empty_cells(tmp_path: Path) -> None:
    metrics = read_metrics(_run(tmp_path, "a"))
    assert metrics["diag/flip_ratio"] == ([1, 3], [0.25, 0.125])
    assert metrics["train/loss"] == ([1], [2.3])
    assert metrics["val/acc1"] == ([3], [0.1])
    assert "epoch" not in metrics and "step" not in metrics
    assert last_value(tmp_path / "a" / "metrics.csv", "diag/quant_error") == 0.4
    assert last_value(tmp_path / "a", "diag/alpha") != last_value(tmp_path / "a", "diag/alpha")  # NaN


def test_missing_run_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics.csv at .*nowhere"):
        read_metrics(tmp_path / "nowhere")


def test_diagnostics_figure_draws_one_line_per_run(tmp_path: Path) -> None:
    runs = {"bcgd": _run(tmp_path, "a"), "float": _run(tmp_path, "b", "epoch,step,val/acc1\n0,3,0.2\n")}
    fig = diagnostics_figure(runs, ("flip_ratio", "quant_error"), logy=("quant_error",))
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == ["bcgd"]  # the float run logged no diagnostics
    assert list(left.lines[0].get_xdata()) == [1, 3] and list(left.lines[0].get_ydata()) == [0.25, 0.125]
    assert right.get_yscale() == "log" and left.get_yscale() == "linear"
    layer = diagnostics_figure(runs, ("flip_ratio",), layer="conv1")
    assert list(layer.axes[0].lines[0].get_ydata()) == [0.125, 0.0]


def test_unlogged_quantity_names_what_was_logged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no run logged 'diag/alpha'; logged: \['diag/conv1/flip_ratio'"):
        diagnostics_figure({"a": _run(tmp_path, "a")}, ("alpha",))
