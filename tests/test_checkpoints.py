"""read_checkpoint: every unusable checkpoint is one clear line, never torch's weights_only advice."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from qlight.checkpoints import CheckpointError, read_checkpoint


def _lightning_ckpt(path: Path) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(3)}, "hyper_parameters": {"model": "resnet20"}}, path)
    return path


def test_reads_a_lightning_checkpoint(tmp_path: Path) -> None:
    data = read_checkpoint(_lightning_ckpt(tmp_path / "a.ckpt"), "ckpt_path")
    assert torch.equal(data["state_dict"]["model.w"], torch.ones(3))


def test_plain_state_dict_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert set(read_checkpoint(path, "model.init_from", lightning=False)) == {"w"}
    with pytest.raises(CheckpointError, match=r"^ckpt_path='.*sd.pt' is not a Lightning checkpoint"):
        read_checkpoint(path, "ckpt_path")


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "text", "unsafe", "list"])
def test_unusable_files_are_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "x.ckpt"
    if case == "folder":
        path.mkdir()
    elif case == "truncated":
        _lightning_ckpt(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "unsafe":
        torch.save({"state_dict": {}, "obj": pickle.PickleError("x")}, path)
    elif case == "list":
        torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, "ckpt_path")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"ckpt_path={str(path)!r}")
    assert "weights_only" not in message
    expected = {
        "missing": "no such file",
        "folder": "is a folder",
        "truncated": "truncated",
        "text": "truncated",
        "unsafe": "not allow-listed",
        "list": "holds a list",
    }[case]
    assert expected in message
