"""Reading raw values into the schema's dataclasses: each value checked against its key's type and range, an
override's text parsed once its key's type is known; every refusal a one-line ConfigError naming the dotted key."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml

from supcon_scale.config.keys import ConfigError, _name, _num, _short
from supcon_scale.yamlload import Loader

INT64_MAX = 2**63 - 1


def build(cls: type, raw: Any, path: str = "") -> Any:
    """The keyword-only dataclass `cls` (a schema of `key(...)` fields) from `raw`, every key checked.

    Unknown keys, wrong types and values outside a key's range raise a ConfigError naming the dotted key (under
    the prefix `path`); a section's `_check(path)` then checks the rules between its own keys.
    """
    return _build(cls, raw, path)


class _Override:
    """The text of a `key=value` override, parsed once the key's type is known."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text.strip()

    def __repr__(self) -> str:
        return repr(self.text)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> plain values, or a one-line ConfigError naming `where` (a file or an override key)."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        raise ConfigError(f"{where}: invalid YAML ({exc.problem or exc.context}{mark})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({str(exc).splitlines()[0] if str(exc) else 'error'})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML (nested too deeply)") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's, e.g. an int of 5,000 digits
        raise ConfigError(f"{where}: invalid YAML value ({_short(str(exc))})") from None


# Keys of older configs (and of the SupContrast reference scripts) -> their current name.
RENAMED = {
    "loss.temp": "loss.temperature",
    "data.batch_size": "data.global_batch_size",
    "optim.lr": "optim.base_lr",
    "optim.learning_rate": "optim.base_lr",
    "train.save_freq": "train.checkpoint_every_steps",
    "train.save_every": "train.checkpoint_every_steps",
    "train.warm_epochs": "train.warmup_epochs",
}


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(raw).__name__} {_short(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        dotted = f"{path}.{_name(name)}" if path else _name(name)
        if name not in fields:
            if dotted in RENAMED:
                raise ConfigError(f"config key {dotted} was renamed to {RENAMED[dotted]} (an older config?)")
            near = difflib.get_close_matches(str(name), sorted(fields), n=1)
            hint = f" (did you mean {(path + '.' if path else '') + near[0]}?)" if near else ""
            raise ConfigError(f"unknown config key {_name(dotted)}{hint}")
        value = _coerce(hints[name], value, dotted)
        _check_range(value, fields[name].metadata, dotted)
        kwargs[name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "_check"):
        obj._check(path)
    return obj


_NULLS = ("", "~", "null", "Null", "NULL")
# What YAML 1.1 reads as a string but is a float for a float key: 1e-4 (PyYAML needs a dot), inf, nan.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Override):
        if origin in (typing.Union, types.UnionType) and type(None) in args and value.text in _NULLS:
            return None
        plain = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
        if all(a is str or typing.get_origin(a) is Literal for a in plain):
            value = value.text  # as typed: a path may hold `#`, `: ` or look like a number
        else:
            value = _parse_yaml(value.text, f"override {path}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_short(value)} matches none of {tp}")
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, args))}; got {_short(value)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__} {_short(value)}")
        return {_mapping_key(k, path): _plain_value(v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {type(value).__name__} {_short(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {_short(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    return _coerce_scalar(tp, value, path)


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    """A float, int, bool or str key's value, converting only where it is lossless (int -> float, "1e-4" -> float)."""
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(re.sub(r"^([-+]?)\.(?=[a-zA-Z])", r"\1", value.strip()))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(
                    f"{path} must be a finite number, got an integer of {len(str(value))} digits"
                ) from None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT64_MAX:
                raise ConfigError(f"{path} must fit in 64 bits, got {_short(value)}")
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema annotation this loader does not know
        raise AssertionError(f"unsupported annotation {tp} at {path}")
    raise ConfigError(f"{path} must be {tp.__name__}, got {type(value).__name__} {_short(value)}")


def _mapping_key(name: Any, path: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{path}: key {_short(name)} must be a Python identifier (a keyword argument name)")
    return name


def _plain_value(value: Any, path: str) -> Any:
    """A value of a mapping key (model.kwargs): YAML scalars, lists and mappings of them; an override is YAML."""
    if isinstance(value, _Override):
        value = _parse_yaml(value.text, f"override {path}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path} must be finite, got {value}")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{path} must not contain a NUL character")
    if isinstance(value, Mapping):
        return {_mapping_key(k, path): _plain_value(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"{path} must be a number, string, boolean, null, list or mapping; got {_short(value)}")


def _check_range(value: Any, meta: Mapping[str, Any], path: str) -> None:
    """`value` (already of the key's type) against the key's declared range; None passes (an optional key)."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(f"{path} must not contain a NUL character")
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{path} must not be empty")
    bounds = meta.get("range")
    if bounds is None or value is None or dataclasses.is_dataclass(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path} must be finite, got {value}")
        return
    items = value if isinstance(value, (tuple, list)) else (value,)
    ranges = bounds if isinstance(bounds, tuple) else (bounds,) * len(items)
    for i, (x, rng) in enumerate(zip(items, ranges, strict=True)):
        problem = rng.problem(x)
        if problem:
            where = f"{path}[{i}]" if isinstance(value, (tuple, list)) else path
            raise ConfigError(f"{where} {problem}, got {_num(x) if math.isfinite(x) else x}")
