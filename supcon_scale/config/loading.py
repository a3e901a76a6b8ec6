"""Reading a config: YAML files with `base:` inheritance (each relative to the file naming it), dotted `key=value`
overrides, and writing the resolved config back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from supcon_scale.config.keys import ConfigError, _name, _short
from supcon_scale.config.parse import _Override, _parse_yaml, build
from supcon_scale.config.schema import RunConfig
from supcon_scale.config.view import RunView

MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few KB; anything larger is not a config
MAX_BASE_DEPTH = 32  # files in one `base:` chain


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (following `base:` links), apply `a.b=value` overrides and return a validated RunConfig."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from nested plain values, with every key's type and range checked."""
    return build(RunConfig, raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file `path` merged over its `base:` files (each relative to the file naming it).

    `path` may name a packaged recipe (`imagenet/supcon_resnet50`); a file at `path` wins.
    """
    from supcon_scale import recipes

    return _read_chain(recipes.find(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each `a.b=value` of `overrides` in `raw` (in place; returned), to be read by `build`.

    A value is taken as typed for a string key (`out_dir=runs/exp #3` keeps the `#3`) and read as YAML for the
    other keys (numbers, booleans, lists, null), once `build` knows the key's type.
    """
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"override {_short(item)} must look like key.sub=value")
        _set_dotted(raw, name, _Override(value))
    return raw


def _read_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config {_name(path)}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {_name(path)}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {_name(path)}: not UTF-8 text (byte {exc.start})") from None


def _read_chain(path: Path) -> dict[str, Any]:
    """The file at `path` merged over its `base:` files (each relative to the file that names it)."""
    layers: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while True:
        shown = _name(path)
        if len(layers) == MAX_BASE_DEPTH:
            raise ConfigError(f"config {shown}: the `base:` chain is longer than {MAX_BASE_DEPTH} files")
        if not path.is_file():
            raise ConfigError(f"config file not found: {shown}")
        real = path.resolve()
        if real in seen:
            raise ConfigError(f"config {shown}: `base:` inheritance forms a cycle")
        seen.add(real)
        data = _parse_yaml(_read_file(path), f"config {shown}")
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"config {shown}: top level must be a mapping, got {type(data).__name__}")
        base = data.pop("base", None)
        layers.append(data)
        if base is None:
            break
        if not isinstance(base, str) or not base.strip() or "\0" in base:
            raise ConfigError(f"config {shown}: base must be the path of another YAML file, got {_short(base)}")
        path = path.parent / base
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        _deep_merge(merged, layer)
    return merged


def _deep_merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _set_dotted(raw: dict[str, Any], name: str, value: Any) -> None:
    node = raw
    parts = name.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {_name(name)}: {_name(part)} is not a section")
        node = child
    old = node.get(parts[-1])
    if isinstance(value, _Override) and isinstance(old, dict):
        # `loss={variant: in}` over a recipe's loss section: merged into it, the section's other keys kept
        parsed = _parse_yaml(value.text, f"override {_name(name)}")
        if isinstance(parsed, dict):
            _deep_merge(old, parsed)
            return
    node[parts[-1]] = value


def save(cfg: RunView, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
