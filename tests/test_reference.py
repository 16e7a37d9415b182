"""The papers' numbers as data: every cell keyed like qlight's runs, values as published, and every shipped
config a cell names exists, is the cell it claims (by qlight's own key derivation) and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlight.cell import CellKey, cell_key
from qlight.cli import main
from qlight.reference import ReferenceError, load_reference, lookup

ROOT = Path(__file__).resolve().parents[1]
CELLS = load_reference()
CONFIGS = sorted({c.config for c in CELLS if c.config})


def _cell(paper: str, table: str, row: str, arch: str | None = None) -> object:
    (found,) = [c for c in CELLS if (c.paper, c.table, c.row) == (paper, table, row) and arch in (None, c.arch)]
    return found


def test_tables_are_complete() -> None:
    by_table = {}
    for cell in CELLS:
        by_table[(cell.paper, cell.table)] = by_table.get((cell.paper, cell.table), 0) + 1
    assert by_table[("AQE", "Table I")] == 16 * 4
    assert by_table[("AQE", "Table II")] == 17 * 4
    assert by_table[("AQE", "Table V")] == 27
    assert by_table[("BCGD", "abstract and README figure")] == 3


def test_values_as_published() -> None:
    assert _cell("BCGD", "abstract and README figure", "BinaryConnect (rho = 0), 1-bit weights, 4-bit activations "
                 '(README figure "4a1w")').top1 == 62.98
    t1 = _cell("AQE", "Table I", "3/3", "convnet_a")
    assert (t1.dataset, t1.method, t1.w_bits, t1.a_bits, t1.top1) == ("cifar10", "aqe", 3, 3, 90.6)
    assert t1.config == "configs/cifar10/convnet_a_aqe_w3a3.yaml"
    inputs_1_weights_16 = _cell("AQE", "Table I", "1/16", "convnet_b")
    assert (inputs_1_weights_16.w_bits, inputs_1_weights_16.a_bits, inputs_1_weights_16.top1) == (16, 1, 87.6)
    ste = _cell("AQE", "Table II", "1/1 STE", "convnet_d")
    assert (ste.method, ste.top1, ste.config) == ("ste", 51.5, "configs/cifar100/convnet_d_ste_w1a1.yaml")
    assert _cell("AQE", "Table II", "32/32", "convnet_c").config == "configs/cifar100/convnet_c_float.yaml"
    minw = _cell("AQE", "Table V", "MINW-Net 1/1 (first layer FP)")
    assert minw.top1 == pytest.approx(100 - 47.87) and minw.top5 == pytest.approx(100 - 26.04)
    alexnet = _cell("AQE", "Table IV", "Ours 3/8")
    assert alexnet.top1 == pytest.approx(56.0) and alexnet.top5 == pytest.approx(79.5)


def test_lookup_uses_the_config_to_tell_first_last_layer_variants() -> None:
    key = CellKey("imagenet", "resnet18", "bcgd", 1, 4)
    for name, expected in (("resnet18_bcgd_w1a4.yaml", 64.36), ("resnet18_bcgd_w1a4_fl.yaml", 65.46)):
        config = yaml.safe_load((ROOT / "configs" / "imagenet" / name).read_text())
        assert lookup(key, config).top1 == expected
    # a 16-bit float part in the paper is qlight's fp32 part
    assert lookup(CellKey("cifar10", "convnet_a", "aqe", 32, 1)).top1 == pytest.approx(90.1)
    assert lookup(CellKey("cifar10", "convnet_a", "bcgd", 1, 1)) is None


@pytest.mark.parametrize("config", CONFIGS)
def test_referenced_configs_exist_and_are_their_cell(config: str) -> None:
    path = ROOT / config
    assert path.is_file(), config
    loaded = yaml.safe_load(path.read_text())
    key = cell_key(loaded)
    cells = [c for c in CELLS if c.config == config]
    assert all(c.matches(key, loaded) for c in cells), (config, key)


def _build(config: str, root: Path, extra: list[str]) -> object:
    return main(["--config", str(ROOT / config), "--config", str(ROOT / "configs/logger/csv_only.yaml"),
                 "--data.root", str(root), *extra], run=False)


def _family(config: str) -> tuple[str, str]:
    """(dataset, method) of a config path, for one build per family in the default suite."""
    dataset, name = config.split("/")[1:]
    return dataset, next(m for m in ("aqe", "ste", "bcgd", "float") if f"_{m}" in name)


REPRESENTATIVES = sorted({_family(c): c for c in CONFIGS}.values())


def _build_all(configs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    monkeypatch.chdir(tmp_path)
    for config in configs:
        if config.startswith("configs/imagenet"):
            cli = _build(config, request.getfixturevalue("imagenet_folder"), ["--data.num_classes", "3"])
        else:
            root = request.getfixturevalue("cifar100_pickle" if "cifar100" in config else "cifar10_folder")
            cli = _build(config, root, [])
        assert cell_key(yaml.safe_load((ROOT / config).read_text())).arch in cli.model.hparams["model"]


def test_one_referenced_config_per_family_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 request: pytest.FixtureRequest) -> None:
    assert 6 <= len(REPRESENTATIVES) <= 12
    _build_all(REPRESENTATIVES, tmp_path, monkeypatch, request)


@pytest.mark.slow
def test_every_referenced_config_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        request: pytest.FixtureRequest) -> None:
    _build_all(CONFIGS, tmp_path, monkeypatch, request)


def test_a_malformed_reference_file_names_its_table(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"paper": "X", "tables": [
        {"table": "T9", "dataset": "cifar10", "columns": ["a", "b"], "method": "aqe", "unit": "fraction",
         "rows": [["1/1", 0.5]]}]}))
    with pytest.raises(ReferenceError, match=r"x.yaml table 0 \(T9\) row 1/1: 1 values for 2 columns"):
        load_reference(tmp_path)
