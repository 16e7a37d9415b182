"""Subcommands beside LightningCLI's ``fit``/``validate``/...: ``qlight report`` and ``qlight grid``.

Each is an argparse program; bad input (a ValueError: a path, a key, a value) is one
``qlight: error: ...`` line and exit status 2, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from typing_extensions import override

__all__ = ["SUBCOMMANDS", "ArgumentParser", "run_subcommand"]

SUBCOMMANDS = ("report", "grid")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``qlight: error:`` line (a ValueError), not usage text and exit."""

    @override
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def run_subcommand(name: str, argv: Sequence[str]) -> int:
    """Run ``qlight <name> <argv>`` and return its exit status."""
    if name == "report":
        from qlight.report.main import main
    elif name == "grid":
        from qlight.grid.main import main
    else:
        raise ValueError(f"unknown subcommand {name!r}; valid: {list(SUBCOMMANDS)}")
    try:
        return main(list(argv))
    except ValueError as err:
        print(f"qlight: error: {err}", file=sys.stderr)
        return 2
