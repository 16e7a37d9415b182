"""Protocols and their expansion into runs: configs × seeds × ``--set`` overrides, each with a fixed name.

A protocol is a small YAML file (``configs/protocols/*.yaml``)::

    name: bcgd_resnet20_w1a4        # optional; default: the file name
    description: ...                # optional, printed by --dry-run
    seeds: [0, 1, 2]
    parallel: 2                     # optional default for --parallel
    config: [configs/logger/csv_only.yaml]   # optional fragments composed after every run's own config
    set: {trainer.max_epochs: 15}   # optional overrides for every run (dotted LightningCLI keys)
    runs:
      float: {config: configs/cifar10/resnet20_float.yaml}
      bcgd:
        config: configs/cifar10/resnet20_bcgd_w1a4.yaml
        init_from: float            # the same seed's float run, its last.ckpt ({run: float, checkpoint: best})
        set: {...}                  # optional overrides for this run

Config paths are read relative to the working directory, else relative to the folders above the protocol
file (so ``configs/...`` works from the repository root and from the protocol's own tree).

A plain experiment config given to ``qlight grid`` is a one-run protocol named ``grid``. On the command line,
``--set key=value`` applies to every run; repeating a key sweeps it (``--set model.optimizer.init_args.lr=0.1
--set model.optimizer.init_args.lr=0.05`` doubles the grid). Each run is named
``<protocol>-<run>-s<seed>-<hash>``, the hash covering its configs and overrides, so the same command gives
the same names (and finds its finished runs), and a changed override gives new runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["GridError", "Protocol", "RunSpec", "expand", "load_protocol", "parse_overrides"]

_PROTOCOL_KEYS = ("name", "description", "seeds", "parallel", "config", "set", "runs")
_RUN_KEYS = ("config", "set", "init_from")
#: keys the grid sets itself, never through --set / set:
_MANAGED = {
    "seed_everything": "the grid sets it from --seeds / the protocol's seeds",
    "ckpt_path": "the grid resumes unfinished runs from their newest checkpoint itself",
    "config": "pass fragments with --config or the protocol's config: list",
}


class GridError(ValueError):
    """Bad input to ``qlight grid`` (protocol, override, option), in one line."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: what ``qlight fit`` gets, its fixed name and the run it starts from."""

    name: str
    protocol: str
    key: str
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...]
    parent: str | None = None
    parent_checkpoint: str = "last"

    def fit_args(self, init_from: str | None = None, ckpt_path: str | None = None) -> list[str]:
        """Arguments after ``qlight fit``."""
        args: list[str] = []
        for config in self.configs:
            args += ["--config", config]
        args += [f"--{k}={v}" for k, v in self.overrides]
        args.append(f"--seed_everything={self.seed}")
        if init_from:
            args.append(f"--model.init_from={init_from}")
        if ckpt_path:
            args.append(f"--ckpt_path={ckpt_path}")
        return args

    @property
    def parse_key(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        """What the resolved config depends on (not the seed): runs sharing it are checked once."""
        return self.configs, self.overrides


@dataclass
class Protocol:
    """A loaded protocol: runs (key -> config files, overrides, parent key) and defaults."""

    name: str
    path: Path | None
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    parallel: int | None = None
    configs: list[str] = field(default_factory=list)  # as written (names are hashed from these)
    resolved: dict[str, str] = field(default_factory=dict)  # written -> path to pass
    overrides: list[tuple[str, str]] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


def override_value(value: Any) -> str:
    """A YAML value as the string LightningCLI parses back to it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _check_key(key: str, where: str) -> str:
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*\+?", key):
        raise GridError(f"{where}: {key!r} is not a dotted config key (e.g. trainer.max_epochs)")
    base = key.rstrip("+")
    if base in _MANAGED:
        raise GridError(f"{where}: {key!r} cannot be overridden: {_MANAGED[base]}")
    return key


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """``key=value`` strings of ``--set``, in order; the value is passed to LightningCLI as written."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise GridError(f"--set {item!r}: expected key=value, e.g. --set trainer.max_epochs=1")
        out.append((_check_key(key, f"--set {item!r}"), value))
    return out


def _mapping_overrides(data: Any, where: str) -> list[tuple[str, str]]:
    if data is None:
        return []
    if not isinstance(data, dict):
        raise GridError(f"{where}: expected a mapping of dotted keys to values, got {type(data).__name__}")
    return [(_check_key(str(k), where), override_value(v)) for k, v in data.items()]


def _config_list(data: Any, where: str) -> list[str]:
    if data is None:
        return []
    items = [data] if isinstance(data, str) else data
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise GridError(f"{where}: expected a config path or a list of them")
    return list(items)


def resolve_config(written: str, where: str, protocol_path: Path | None) -> str:
    """The path to pass for a config written in a protocol (cwd first, then the protocol's parent folders)."""
    path = Path(written)
    if path.is_absolute() or path.is_file():
        if not path.is_file():
            raise GridError(f"{where}: config {written!r} does not exist")
        return written
    looked = ["the working directory"]
    if protocol_path is not None:
        for folder in protocol_path.resolve().parents:
            if (folder / path).is_file():
                return str(folder / path)
        looked.append(f"the folders above {protocol_path}")
    raise GridError(f"{where}: config {written!r} not found (looked in {' and '.join(looked)})")


def load_protocol(path: str | Path) -> Protocol:
    """Read a protocol file, or wrap a plain experiment config as a one-run protocol."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"protocol or config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = str(err).splitlines()[0]
        raise GridError(f"{path}: not valid YAML ({line})") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a protocol (with runs:) or an experiment config (a mapping)")
    if "runs" not in data:  # a plain experiment config: one run, named after the file
        run = {"config": [str(path)], "set": [], "init_from": None, "checkpoint": "last"}
        return Protocol(name="grid", path=None, runs={path.stem: run}, resolved={str(path): str(path)})
    unknown = sorted(set(data) - set(_PROTOCOL_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {unknown}; valid: {list(_PROTOCOL_KEYS)}")
    name = str(data.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise GridError(f"{path}: name={name!r}; use letters, digits, '_', '.' and '-'")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise GridError(f"{path}: seeds={seeds!r}; expected a non-empty list of integers")
    parallel = data.get("parallel")
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise GridError(f"{path}: parallel={parallel!r}; expected a positive integer")
    runs = data["runs"]
    if not isinstance(runs, dict) or not runs:
        raise GridError(f"{path}: runs: expected a mapping of run names to {{config: ..., init_from: ...}}")
    protocol = Protocol(name=name, path=path, description=str(data.get("description") or "").strip(),
                        seeds=seeds, parallel=parallel)
    protocol.configs = _config_list(data.get("config"), f"{path}: config")
    protocol.overrides = _mapping_overrides(data.get("set"), f"{path}: set")
    for key, run in runs.items():
        where = f"{path}: runs.{key}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)):
            raise GridError(f"{where}: use letters, digits, '_', '.' and '-' in run names")
        if not isinstance(run, dict):
            raise GridError(f"{where}: expected a mapping with config: (and optionally set:, init_from:)")
        unknown = sorted(set(run) - set(_RUN_KEYS))
        if unknown:
            raise GridError(f"{where}: unknown key(s) {unknown}; valid: {list(_RUN_KEYS)}")
        configs = _config_list(run.get("config"), f"{where}.config")
        if not configs:
            raise GridError(f"{where}: config: is required")
        parent = run.get("init_from")
        checkpoint = "last"
        if isinstance(parent, dict):
            checkpoint = parent.get("checkpoint", "last")
            parent = parent.get("run")
        if parent is not None and parent not in runs:
            raise GridError(f"{where}.init_from: {parent!r} is not a run of this protocol; runs: {list(runs)}")
        if checkpoint not in ("last", "best"):
            raise GridError(f"{where}.init_from.checkpoint={checkpoint!r}; valid: ['last', 'best']")
        protocol.runs[str(key)] = {
            "config": configs,
            "set": _mapping_overrides(run.get("set"), f"{where}.set"),
            "init_from": parent,
            "checkpoint": checkpoint,
        }
    for written in protocol.configs + [c for r in protocol.runs.values() for c in r["config"]]:
        protocol.resolved[written] = resolve_config(written, str(path), path)
    _check_acyclic(protocol)
    return protocol


def _check_acyclic(protocol: Protocol) -> None:
    for start in protocol.runs:
        seen, key = [start], protocol.runs[start]["init_from"]
        while key is not None:
            if key in seen:
                raise GridError(f"{protocol.path}: init_from forms a cycle: {' -> '.join(seen + [key])}")
            seen.append(key)
            key = protocol.runs[key]["init_from"]


def _ordered_keys(protocol: Protocol) -> list[str]:
    """Run keys with every parent before its children, otherwise in file order."""
    depth: dict[str, int] = {}
    for key in protocol.runs:
        d, parent = 0, protocol.runs[key]["init_from"]
        while parent is not None:
            d, parent = d + 1, protocol.runs[parent]["init_from"]
        depth[key] = d
    return sorted(protocol.runs, key=lambda k: depth[k])


def _digest(configs: list[str], overrides: list[tuple[str, str]]) -> str:
    text = json.dumps({"configs": configs, "set": overrides})
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def expand(
    protocols: list[Protocol],
    seeds: list[int] | None = None,
    overrides: list[tuple[str, str]] | None = None,
    extra_configs: list[str] | None = None,
) -> list[RunSpec]:
    """Every run of ``protocols`` for every seed and every combination of repeated ``--set`` keys.

    Overrides apply in order: the protocol's ``set``, the run's ``set``, then the command line; configs:
    the run's, the protocol's ``config``, then ``extra_configs`` (``--config``).
    """
    by_key: dict[str, list[str]] = defaultdict(list)
    for key, value in overrides or []:
        by_key[key].append(value)
    axes = [[(k, v) for v in values] for k, values in by_key.items()]
    combos = list(itertools.product(*axes)) if axes else [()]
    extra = list(extra_configs or [])
    runs: list[RunSpec] = []
    for protocol in protocols:
        for combo in combos:
            names: dict[tuple[str, int], str] = {}
            for key in _ordered_keys(protocol):
                run = protocol.runs[key]
                written = run["config"] + protocol.configs + extra
                configs = tuple(protocol.resolved.get(c, c) for c in written)
                merged = protocol.overrides + run["set"] + list(combo)
                if run["init_from"] is not None and any(k == "model.init_from" for k, _ in merged):
                    raise GridError(
                        f"run {key}: --set model.init_from conflicts with init_from: {run['init_from']}"
                    )
                digest = _digest(written, merged)
                for seed in seeds if seeds is not None else protocol.seeds:
                    name = f"{protocol.name}-{key}-s{seed}-{digest}"
                    names[(key, seed)] = name
                    parent = run["init_from"]
                    runs.append(
                        RunSpec(
                            name=name,
                            protocol=protocol.name,
                            key=key,
                            seed=seed,
                            configs=configs,
                            overrides=tuple(merged),
                            parent=names[(parent, seed)] if parent is not None else None,
                            parent_checkpoint=run["checkpoint"],
                        )
                    )
    duplicates = sorted(name for name, n in Counter(r.name for r in runs).items() if n > 1)
    if duplicates:
        raise GridError(f"two runs expand to the same name {duplicates[0]}: give the protocols different names")
    return runs
