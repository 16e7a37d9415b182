"""Argument checks of :mod:`qlight.quant` and the one error they raise, which a QuantSpec renames.

Every check of a quantizer, estimator or layer argument raises a :class:`QuantArgError` that names the
argument, its value and what is valid, e.g. ``bits=3 is not supported by quantizer='binary'; valid: [1]``.
:class:`~qlight.quant.policy.QuantSpec` builds the layers from its fields and reports the same errors under
its field names (``QuantSpec.w_bits=3 is not supported by weight='binary'; valid: [1]``) with
:meth:`QuantArgError.renamed`, instead of checking the same rules a second time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from typing_extensions import override

__all__ = ["Arg", "ChoiceError", "QuantArgError", "check_choice", "check_that"]


@dataclass(frozen=True)
class Arg:
    """The name of an argument inside an error text (renamed when a QuantSpec reports the error)."""

    name: str


class QuantArgError(ValueError):
    """A bad argument, as a text whose argument names stay replaceable.

    Args:
        parts: the text in pieces: plain strings and :class:`Arg` names. The first name is the argument the
            error is about (its subject); the others are arguments it refers to (``by quantizer='binary'``).
    """

    def __init__(self, *parts: str | Arg) -> None:
        self.parts = parts
        super().__init__("".join(p.name if isinstance(p, Arg) else p for p in parts))

    def __reduce__(self) -> tuple[type[QuantArgError], tuple[str | Arg, ...]]:
        return (QuantArgError, self.parts)  # picklable (DDP workers): a subclass comes back as its text

    @property
    def subject(self) -> str:
        """The argument the error is about."""
        return next(p.name for p in self.parts if isinstance(p, Arg))

    def renamed(self, names: Mapping[str, str], prefix: str = "") -> QuantArgError:
        """The same error with argument names replaced by ``names`` and the subject prefixed with ``prefix``."""
        return QuantArgError(*_rename(self.parts, names, prefix))


class ChoiceError(QuantArgError):
    """A value outside a set of choices: ``<arg>=<value> is not supported [by <arg>=<value>]; valid: [...]``.

    Args:
        arg: the argument's name.
        value: the rejected value.
        valid: the choices.
        by: the argument (name, value) whose value decides the choices, if any.
        problem: what is wrong with the value (a registry says ``is not registered``).
    """

    def __init__(
        self, arg: str, value: Any, valid: Sequence[Any], by: tuple[str, Any] | None = None,
        problem: str = "is not supported",
    ) -> None:
        self.arg, self.value, self.valid, self.by, self.problem = arg, value, list(valid), by, problem
        context: tuple[str | Arg, ...] = (" by ", Arg(by[0]), f"={by[1]!r}") if by is not None else ()
        super().__init__(Arg(arg), f"={value!r} {problem}", *context, f"; valid: {self.valid}")

    def within(self, arg: str, value: Any) -> ChoiceError:
        """This error with ``by <arg>=<value>`` when it does not say yet what decides its choices."""
        if self.by is not None:
            return self
        return ChoiceError(self.arg, self.value, self.valid, (arg, value), self.problem)

    @override
    def renamed(self, names: Mapping[str, str], prefix: str = "") -> QuantArgError:
        """As :meth:`QuantArgError.renamed`; a QuantSpec words every rejected choice ``is not supported``."""
        renamed = ChoiceError(self.arg, self.value, self.valid, self.by)
        return QuantArgError(*_rename(renamed.parts, names, prefix))


def _rename(parts: tuple[str | Arg, ...], names: Mapping[str, str], prefix: str) -> tuple[str | Arg, ...]:
    out: list[str | Arg] = []
    for part in parts:
        if isinstance(part, Arg):
            name = names.get(part.name, part.name)
            if not any(isinstance(p, Arg) for p in out):  # the subject
                name = prefix + name
            out.append(Arg(name))
        else:
            out.append(part)
    return tuple(out)


def check_choice(name: str, value: Any, choices: Sequence[Any], by: tuple[str, Any] | None = None) -> None:
    """Raise ``<name>=<value!r> is not supported; valid: [...]`` (a :class:`ChoiceError`) unless ``value in choices``."""
    if value not in choices:
        raise ChoiceError(name, value, choices, by)


def check_that(ok: bool, name: str, value: Any, requirement: str) -> None:
    """Raise ``<name>=<value!r> <requirement>`` (a :class:`QuantArgError`) unless ``ok``."""
    if not ok:
        raise QuantArgError(Arg(name), f"={value!r} {requirement}")
