"""Config and command-line mistakes as one line: the key or value, what is valid, the closest match.

jsonargparse reports a typo such as ``--model.lrr 0.1`` as the 50-line usage followed by a nest of
union subtypes, ``NestedArg`` reprs and branches the user never chose. :class:`QlightArgumentParser`
keeps the one fact that matters and adds a ``difflib`` suggestion::

    qlight: error: model.lrr: ImageClassifier has no option 'lrr'; valid: model, model_kwargs, ...
    qlight: error: trainer.callbacks[AQE].alpha.law='cubic' is not valid; choose from 'constant', ...

``--verbose`` (and jsonargparse's debug mode) keep jsonargparse's own report.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from qlight.console import verbose

__all__ = ["QlightArgumentParser", "condense"]

_MAX_LISTED = 20


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _listing(choices: list[str], word: str) -> str:
    """All choices when few; otherwise the closest ones and how many there are."""
    if len(choices) <= _MAX_LISTED:
        return ", ".join(choices)
    closest = difflib.get_close_matches(word, choices, n=6, cutoff=0.0)
    return ", ".join(closest) + f", ... ({len(choices)} in all)"


def _class_options(class_path: str) -> list[str]:
    """The keyword arguments a class accepts (its ``init_args``)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _known_classes(key: str) -> list[str]:
    """Short class names the CLI resolves for ``data``, ``model``, ``trainer.callbacks`` and ``trainer.logger``."""
    import lightning.pytorch.callbacks as pl_callbacks
    import lightning.pytorch.loggers as pl_loggers

    import qlight.callbacks
    import qlight.data
    import qlight.tasks

    def public(module: Any, base: type) -> list[str]:
        return [n for n in dir(module) if not n.startswith("_") and inspect.isclass(getattr(module, n))
                and issubclass(getattr(module, n), base) and getattr(module, n) is not base]

    from lightning.pytorch import Callback, LightningModule
    from lightning.pytorch.loggers import Logger

    if key == "data":
        return public(qlight.data, qlight.data.ImageDataModule)
    if key == "model":
        return public(qlight.tasks, LightningModule)
    if key.startswith("trainer.callbacks"):
        return sorted(set(public(qlight.callbacks, Callback) + public(pl_callbacks, Callback)))
    if key.startswith("trainer.logger"):
        return ["qlight.loggers.CSVLogger", "qlight.loggers.WandbLogger", *public(pl_loggers, Logger)]
    return []


def _key_path(message: str) -> tuple[str, str | None]:
    """The dotted key of the innermost error (``model.quant``) and the class last chosen on the way."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"class_path '([^']+)'", message)
    cls = classes[-1] if classes else None
    if keys and keys[0].startswith("trainer.callbacks") and classes:
        keys[0] = f"trainer.callbacks[{classes[0].rpartition('.')[2]}]"
    return ".".join(keys), cls


def _value(message: str) -> str:
    """The innermost value jsonargparse reports (the first ``Got value:``/``Given value:``)."""
    found = re.search(r"(?:Got|Given) value: (.*)", message)
    return found.group(1).split(". Got value:")[0].strip() if found else "?"


def _options(parser: ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest and a.dest not in ("help", "config", "print_config")]


def condense(message: str, parser: ArgumentParser | None = None) -> str:
    """One line for a jsonargparse error message (see the module doc); unknown shapes keep their first line."""
    key, cls = _key_path(message)
    short_cls = cls.rpartition(".")[2] if cls else None

    if found := re.search(r"Subcommand '(\w+)' does not accept option '([\w.]+)'", message):
        sub, bad = found.groups()
        prefix, _, name = bad.rpartition(".")
        valid = [o.removeprefix(f"{prefix}.") for o in (_options(parser) if parser else [])
                 if o.startswith(f"{prefix}.") and "." not in o.removeprefix(f"{prefix}.")] if prefix else []
        hint = f"; valid under {prefix}: {_listing(valid, name)}" if valid else f"; see: qlight {sub} --help"
        return f"{bad}: unknown option{hint}{_did_you_mean(name, valid)}"

    if found := re.search(r"Option '([^']+)' is not accepted", message):
        name = found.group(1)
        valid = _class_options(cls) if cls else []
        where = f"{key}.{name}" if key else name
        owner = short_cls or "this class"
        listing = f"; valid: {_listing(valid, name)}" if valid else ""
        return f"{where}: {owner} has no option {name!r}{listing}{_did_you_mean(name, valid)}"

    literals = re.findall(r"Expected a typing\.Literal\[([^\]]*)\]", message)
    if literals:
        value = _value(message)
        choices = [c.strip() for group in literals for c in group.split(",") if c.strip()]
        plain = [c.strip("'\"") for c in choices]
        return (f"{key}={value!r} is not valid; choose from {', '.join(dict.fromkeys(choices))}"
                f"{_did_you_mean(value, plain)}")

    found = re.search(r"Expected a dot import path string: (\S+)", message)
    known = _known_classes(key.split("[")[0]) if found else []
    if found and known:
        name = found.group(1)
        return f"{key}={name!r} is not a class qlight knows; known: {_listing(known, name)}{_did_you_mean(name, known)}"

    if found := re.search(r"File does not exist: '([^']*)'", message):
        return f"{key or 'config'}: no such file {found.group(1)!r}"

    if found := re.search(r"invalid choice: '([^']*)' \(choose from ([^)]*)\)", message):
        bad, listed = found.groups()
        names = [c.strip(" '") for c in listed.split(",")]
        return f"unknown command {bad!r}; choose from {', '.join(names)}{_did_you_mean(bad, names)}"

    types = re.findall(r"Expected a <class '(\w+)'>", message)
    if types:
        value = _value(message)
        wanted = " or ".join(dict.fromkeys("null" if t == "NoneType" else t for t in types))
        return f"{key}={value!r} is not valid; expected {wanted}"

    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return " ".join(useful[:3]) if useful else message.strip()


class QlightArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one ``qlight: error:`` line and exit status 2."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active  # private, but stable since jsonargparse 4.x

        if not self.exit_on_error or debug_mode_active() or verbose():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"qlight: error: {condense(message, parser)}", file=sys.stderr)
        raise SystemExit(2)
