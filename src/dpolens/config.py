"""Stage configs: dataclasses filled from YAML files and `--set key=value`, strictly.

An unknown key or a value of the wrong type is an error that names the key. Nested
dataclasses are addressed with dots (`--set eval.limit=100`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dpolens.artifacts import DpolensError, read_yaml

T = TypeVar("T")


class ConfigError(DpolensError):
    pass


def at_least(obj: Any, minimum: float, *names: str) -> None:
    """Refuse, before any compute, a numeric setting below `minimum` (None means "not set")."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(device: str) -> None:
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"unknown device '{device}' (auto, cpu, cuda, cuda:N, mps)")


@dataclasses.dataclass
class RunSettings:
    """What every stage config carries besides its own settings."""

    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps: where every model of the stage runs
    dtype: str = "float32"  # weights and compute: float32, bfloat16 or float16 (base/aligned comparisons stay float32)
    seed: int = 0  # every random choice of the stage (splits, sampling, bootstraps)
    progress: bool = True  # progress bars

    def __post_init__(self):
        check_device(self.device)
        if self.dtype not in ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ConfigError(f"unknown dtype '{self.dtype}' (float32, bfloat16, float16)")

    def require_float32(self, why: str) -> None:
        if self.dtype != "float32":
            raise ConfigError(f"dtype must be float32 here ({why}), got '{self.dtype}'")


def _check(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not fit {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_check(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, Path):
        return str(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config {cls.__name__}: {e}") from None


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(raw: str, what: str) -> Any:
    """A command-line value read as a YAML scalar, list or mapping; a syntax error names `what`."""
    value = read_yaml(raw, what, is_text=True) if raw != "" else ""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "2e-5" as a string
    return value


def parse_set(items: list[str] | None) -> dict:
    """Turn `["a.b=1", "c=x"]` into a nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        value = parse_value(raw, f"--set {key.strip()}")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    options: dict | None = None,
    sets: list[str] | None = None,
    section: str | None = None,
) -> T:
    """Defaults < YAML file < command-line options (those given) < `--set` overrides.

    A study file holds one mapping per stage (`probe:`, `pairs:`, `dpo:`, ...): with `section`,
    only that stage's mapping is read when the file has it.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p, "config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping")
        data = loaded
        if section and isinstance(loaded.get(section), dict):
            data = loaded[section]
    data = merge(data, {k: v for k, v in (options or {}).items() if v is not None})
    data = merge(data, parse_set(sets))
    return from_dict(cls, data)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation as written in the source: the comment at the end of its line,
    after the comment lines just above it (base classes first, so subclasses may re-document)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()[1:]
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            m = _FIELD_LINE.match(text)
            if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                docs[m.group(1)] = " ".join(above + [m.group(2).strip()] if m.group(2) else above)
            above = []
    return docs


_FIELD_LINE = re.compile(r"(\w+)\s*:[^#]*?(?:#\s?(.*))?$")


def flat_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted path, type, doc) of every leaf field of config dataclass `cls`, nested ones included."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += flat_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, tp, docs.get(f.name, "")))
    return out
