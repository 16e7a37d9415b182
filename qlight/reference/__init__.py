"""The papers' published numbers as data, keyed like qlight's runs, so a report can print them beside ours.

Each YAML file in this folder holds one paper: ``paper``, ``citation`` and ``tables``. A table block gives
shared fields (``table``, ``dataset``, ``arch``, ``method``, ``w``, ``a``, ``config``, ``note``, ``match``)
and ``unit`` — ``percent`` (top-1 accuracy), ``fraction`` (0.884), ``error_percent`` (top-1 error) or
``loss_percent`` (accuracy lost against ``baseline``) — and then either

- ``cells``: a list of single cells, each overriding the shared fields and giving ``row``, ``top1`` and
  optionally ``top5``; or
- ``rows`` + ``columns``: a matrix as printed in the paper, one column per architecture and one row per
  bit setting, the row label read as ``rows_are`` (``a/w``: "M/N" = activation bits / weight bits). A row
  is ``[label, value, ...]`` or a mapping with ``row``, ``values`` and overrides.

``config`` is the shipped experiment that reproduces the cell (a template filled with ``{dataset}``,
``{arch}``, ``{method}``, ``{w}``, ``{a}``), or null when qlight ships none. ``match`` holds conditions on
a run's resolved config (dotted keys) for cells that share a key but differ in setup, e.g. ImageNet
ResNet-18 with the first and last layer float.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlight.cell import CellKey, dotted_get, normalize_bits

__all__ = ["ReferenceCell", "ReferenceError", "load_reference", "lookup"]

REFERENCE_DIR = Path(__file__).resolve().parent
_UNITS = ("percent", "fraction", "error_percent", "loss_percent")
_SHARED = ("table", "dataset", "arch", "method", "w", "a", "config", "note", "match", "unit")


class ReferenceError(ValueError):
    """A malformed reference file, named with the table and row."""


@dataclass(frozen=True)
class ReferenceCell:
    """One published number: what was trained, the top-1 (and top-5) accuracy in percent, and where it is from."""

    paper: str
    table: str
    row: str
    dataset: str
    arch: str
    method: str
    w_bits: int
    a_bits: int | None  # None: not stated by the paper (the cell then matches no run)
    top1: float
    top5: float | None = None
    config: str | None = None
    match: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def source(self) -> str:
        """``AQE Table I, row 1/1``."""
        return f"{self.paper} {self.table}, row {self.row}"

    def matches(self, key: CellKey, config: dict[str, Any] | None = None) -> bool:
        """Whether a run of cell ``key`` with resolved ``config`` is what this number measures."""
        if (key.dataset, key.arch, key.method) != (self.dataset, self.arch, self.method):
            return False
        if self.a_bits is None or (key.w_bits, key.a_bits) != (
            normalize_bits(self.w_bits),
            normalize_bits(self.a_bits),
        ):
            return False
        if not self.match:
            return True
        if config is None:
            return False
        view = _with_quant_defaults(config)
        return all(dotted_get(view, k) == v for k, v in self.match.items())


def _with_quant_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``model.init_args.quant`` completed by QuantSpec's defaults (a shipped YAML omits them)."""
    quant = dotted_get(config, "model.init_args.quant")
    if not isinstance(quant, dict):
        return config
    from qlight.quant import QuantSpec

    try:
        full = dataclasses.asdict(QuantSpec(**quant))
    except (TypeError, ValueError):
        return config
    model = dict(config["model"])
    model["init_args"] = {**model["init_args"], "quant": full}
    return {**config, "model": model}


def _convert(value: float, unit: str, baseline: float | None) -> float:
    if unit == "fraction":
        return round(100.0 * value, 4)
    if unit == "error_percent":
        return round(100.0 - value, 4)
    if unit == "loss_percent":
        assert baseline is not None
        return round(baseline - value, 4)
    return float(value)


def _cell(paper: str, spec: dict[str, Any], where: str) -> ReferenceCell:
    """One cell from merged table + cell fields."""
    missing = [k for k in ("dataset", "arch", "method", "w", "top1") if spec.get(k) is None]
    if missing or "a" not in spec:
        raise ReferenceError(f"{where}: missing {missing or ['a']}")
    unit = spec.get("unit", "percent")
    if unit not in _UNITS:
        raise ReferenceError(f"{where}: unit={unit!r}; valid: {list(_UNITS)}")
    baseline = spec.get("baseline") or {}
    if unit == "loss_percent" and "top1" not in baseline:
        raise ReferenceError(f"{where}: unit 'loss_percent' needs baseline: {{top1: ..., top5: ...}}")
    fields = {"dataset": spec["dataset"], "arch": spec["arch"], "method": spec["method"],
              "w": spec["w"], "a": spec["a"] if spec["a"] is not None else "null"}
    config = spec.get("config")
    top5 = spec.get("top5")
    return ReferenceCell(
        paper=paper,
        table=str(spec.get("table", "")),
        row=str(spec.get("row", "")),
        dataset=str(spec["dataset"]),
        arch=str(spec["arch"]),
        method=str(spec["method"]),
        w_bits=int(spec["w"]),
        a_bits=None if spec["a"] is None else int(spec["a"]),
        top1=_convert(spec["top1"], unit, baseline.get("top1")),
        top5=None if top5 is None else _convert(top5, unit, baseline.get("top5")),
        config=config.format(**fields) if isinstance(config, str) else None,
        match=dict(spec.get("match") or {}),
        note=str(spec.get("note") or ""),
    )


def _row_bits(label: str, rows_are: str, where: str) -> tuple[int, int]:
    """(w, a) of a matrix row label such as ``1/16`` or ``1/1 STE``."""
    first, _, second = label.split()[0].partition("/")
    try:
        x, y = int(first), int(second)
    except ValueError:
        raise ReferenceError(f"{where}: row label {label!r} is not 'M/N'") from None
    if rows_are == "a/w":
        return y, x
    if rows_are == "w/a":
        return x, y
    raise ReferenceError(f"{where}: rows_are={rows_are!r}; valid: ['a/w', 'w/a']")


def _table_cells(paper: str, table: dict[str, Any], where: str) -> list[ReferenceCell]:
    shared = {k: table[k] for k in (*_SHARED, "baseline") if k in table}
    out = []
    for i, cell in enumerate(table.get("cells") or []):
        out.append(_cell(paper, {**shared, **cell}, f"{where} cell {i} ({cell.get('row', '?')})"))
    columns = table.get("columns") or []
    for row in table.get("rows") or []:
        spec = dict(row) if isinstance(row, dict) else {"row": row[0], "values": row[1:]}
        label = str(spec.pop("row"))
        values = spec.pop("values")
        here = f"{where} row {label}"
        if len(values) != len(columns):
            raise ReferenceError(f"{here}: {len(values)} values for {len(columns)} columns")
        w, a = _row_bits(label, str(table.get("rows_are", "a/w")), here)
        for arch, value in zip(columns, values, strict=True):
            merged = {**shared, "row": label, "arch": arch, "w": w, "a": a, **spec, "top1": value}
            out.append(_cell(paper, merged, f"{here} ({arch})"))
    return out


@functools.cache
def load_reference(folder: Path = REFERENCE_DIR) -> tuple[ReferenceCell, ...]:
    """Every published cell in ``folder`` (by default qlight's own reference files), file by file."""
    cells: list[ReferenceCell] = []
    for path in sorted(Path(folder).glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        paper = str(data.get("paper") or path.stem)
        for i, table in enumerate(data.get("tables") or []):
            cells += _table_cells(paper, table, f"{path.name} table {i} ({table.get('table', '?')})")
    return tuple(cells)


def lookup(key: CellKey, config: dict[str, Any] | None = None) -> ReferenceCell | None:
    """The published number for a run of cell ``key`` (resolved ``config``), or None.

    Among several candidates, one with ``match`` conditions that hold wins over a plain one; the BCGD/AQE
    papers win over external anchors (listed in ``anchors.yaml``).
    """
    candidates = [c for c in load_reference() if c.matches(key, config)]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (len(c.match), c.paper in ("BCGD", "AQE")))
