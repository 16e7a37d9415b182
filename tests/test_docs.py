"""The README and docs/results.md say true things: the Train section's commands run offline as written,
the setup says how to avoid the CUDA wheels on a CPU machine, and the results page speaks of the project
and its hardware only."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qlight.cli import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def commands(text: str, program: str = "qlight") -> list[list[str]]:
    """The shell commands of the text's code blocks that start with ``program`` (continuations joined)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(program + " "):
                found.append(shlex.split(line))
    return found


def test_setup_says_how_to_install_a_cpu_only_torch() -> None:
    setup = section("Setup")
    cpu = setup.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < setup.rindex('pip install -e ".[dev,export]"')


def test_train_commands_read_data_that_is_there_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``qlight`` command of the Train section names concrete paths (no ``<placeholder>``) and its
    data root is the zip beside the repository or a run's saved config; the fit commands parse."""
    monkeypatch.chdir(REPO)
    found = [c for c in commands(section("Train")) if c[1] in ("fit", "validate", "test")]  # export: its own test
    assert len(found) >= 4
    for command in found:
        assert not [a for a in command if a.startswith("<")], command
        if "--config" in command and command[command.index("--config") + 1].endswith("/config.yaml"):
            continue  # a run's saved config holds its data root
        assert command[command.index("--data.root") + 1] == "../shared/data/cifar10-jpeg.zip", command
        with pytest.raises(SystemExit) as exit_info:
            main([*command[1:], "--print_config"])
        assert exit_info.value.code == 0, command


def test_results_page_speaks_of_the_project_and_its_hardware_only() -> None:
    text = (REPO / "docs" / "results.md").read_text()
    for word in ("session", "issue #", "issues #", "the brief", "device tool", "$OUT", "device-minutes"):
        assert word not in text.lower(), word
