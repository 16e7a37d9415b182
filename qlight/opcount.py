"""Count ATen ops and host syncs, attributed to named phases: what a GPU would see, measured on a CPU.

Small CIFAR networks on a GPU are limited by kernel launches and host synchronisations, not by
arithmetic. Both are deterministic and countable on any device: every ATen op that reaches the
dispatcher is (at most) one kernel launch, and every ``aten._local_scalar_dense`` (``.item()``,
``bool(tensor)``, ``float(tensor)``) is a device-to-host synchronisation. Unlike times, these counts
do not vary between runs, so tests can pin them.

:class:`OpCounter` is a ``TorchDispatchMode`` that adds every op to the phase on top of its stack;
:meth:`OpCounter.phase` (a context manager) and :meth:`OpCounter.wrap` (for methods) push a phase. Ops
that only reinterpret metadata (views, ``detach``) or only allocate (``empty``) are counted separately
(``views``): they launch no kernel on a GPU.

Plain PyTorch, no Lightning: usable from any loop::

    counter = OpCounter()
    with counter:
        with counter.phase("model"):
            loss = net(x).sum()
            loss.backward()
    print(counter.total("model"), counter.syncs)
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ALLOC_OPS", "SYNC_OPS", "OpCounter"]

#: ops that copy a device value to the host (a synchronisation on a GPU)
SYNC_OPS = ("_local_scalar_dense",)


#: ops that launch no kernel: allocations (the caching allocator serves them on a GPU) and profiler markers
#: (``record_function`` ranges that Lightning and ``torch.optim`` open around every step)
ALLOC_OPS = (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
)


def _is_view(func: Any) -> bool:
    """Ops that alias their input (views, detach) or only allocate launch no kernel."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return False
    name = func.__name__.split(".")[0]
    if name in ("detach", "alias", "lift_fresh") or name in ALLOC_OPS:
        return True
    returns = schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


class OpCounter(TorchDispatchMode):
    """Count kernel-launching ATen ops, view ops and host syncs per phase.

    Attributes:
        ops: ``{phase: Counter({op name: count})}`` of kernel-launching ops.
        views: ``{phase: count}`` of view/alias ops (no kernel).
        syncs: ``{phase: count}`` of host synchronisations.
        enabled: while False, nothing is recorded (the mode stays installed).
    """

    def __init__(self, default_phase: str = "other") -> None:
        super().__init__()
        self.stack: list[str] = [default_phase]
        self.ops: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.views: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.enabled = True

    # ------------------------------------------------------------------ recording
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.enabled:
            phase = self.stack[-1]
            name = func.__name__
            if name.split(".")[0] in SYNC_OPS:
                self.syncs[phase] += 1
            if _is_view(func):
                self.views[phase] += 1
            else:
                self.ops[phase][name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the ops inside the block to ``name`` (nested phases win)."""
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    def wrap(self, obj: Any, method: str, phase: str) -> None:
        """Replace ``obj.method`` (on the instance) by a wrapper that runs it inside ``phase``."""
        original: Callable[..., Any] = getattr(obj, method)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.phase(phase):
                return original(*args, **kwargs)

        setattr(obj, method, wrapped)

    # ------------------------------------------------------------------ reading
    def reset(self) -> None:
        """Forget everything recorded (the phase stack is kept)."""
        self.ops.clear()
        self.views.clear()
        self.syncs.clear()

    def total(self, phase: str | None = None) -> int:
        """Kernel-launching ops of one phase, or of all phases."""
        if phase is not None:
            return sum(self.ops[phase].values()) if phase in self.ops else 0
        return sum(sum(c.values()) for c in self.ops.values())

    def summary(self) -> dict[str, dict[str, int]]:
        """``{phase: {"ops": n, "views": n, "syncs": n}}`` for every phase seen."""
        phases = set(self.ops) | set(self.views) | set(self.syncs)
        return {
            p: {"ops": self.total(p), "views": self.views[p], "syncs": self.syncs[p]} for p in sorted(phases)
        }

    def snapshot(self) -> dict[str, Counter[str]]:
        """A copy of the per-phase op counters (for differences between two points in time)."""
        return {p: Counter(c) for p, c in self.ops.items()}


def _self_test() -> None:  # pragma: no cover - a quick manual check
    counter = OpCounter()
    with counter, counter.phase("demo"):
        x = torch.ones(3)
        (x * 2).sum().item()
    print(counter.summary())


if __name__ == "__main__":  # pragma: no cover
    _self_test()
