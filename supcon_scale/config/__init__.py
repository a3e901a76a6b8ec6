"""Typed run configuration: YAML files with `base:` inheritance plus dotted `key=value` overrides.

Every key is declared once, beside its default, a one-line description and its valid range (`key(...)`, keys.py),
and `schema()` lists them all (schema.py, for `supcon-scale config show` and the tests). Loading (loading.py,
parse.py) rejects unknown keys (suggesting the nearest valid name), wrong types, non-finite and out-of-range numbers
with a `ConfigError` (a ValueError) whose one-line message names the dotted key. Rules that tie keys of different
sections together, or a key to the run's world size and device, live in `check_run` (checks.py), which the trainer
calls once before it writes anything; the engine rules are `engines.check`, run right after it.
"""

from __future__ import annotations

from supcon_scale.config.checks import check_run
from supcon_scale.config.keys import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range, key
from supcon_scale.config.loading import (
    MAX_BASE_DEPTH,
    MAX_CONFIG_BYTES,
    apply_overrides,
    from_dict,
    load,
    read_yaml,
    save,
)
from supcon_scale.config.parse import INT64_MAX, RENAMED, build
from supcon_scale.config.schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESERVED_MODEL_KWARGS,
    AugmentConfig,
    DataConfig,
    EngineConfig,
    KDConfig,
    Key,
    LogConfig,
    LossConfig,
    MixConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    allowed_changes,
    plain,
    profile_range,
    schema,
)
from supcon_scale.config.view import OptimView, RunView, TrainView

__all__ = [
    "COUNT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INT64_MAX",
    "MAX_BASE_DEPTH",
    "MAX_CONFIG_BYTES",
    "NON_NEGATIVE",
    "POSITIVE",
    "PROBABILITY",
    "RENAMED",
    "RESERVED_MODEL_KWARGS",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "KDConfig",
    "Key",
    "LogConfig",
    "LossConfig",
    "MixConfig",
    "ModelConfig",
    "OptimConfig",
    "Range",
    "OptimView",
    "RunConfig",
    "RunView",
    "TrainConfig",
    "TrainView",
    "allowed_changes",
    "apply_overrides",
    "build",
    "check_run",
    "from_dict",
    "key",
    "load",
    "plain",
    "profile_range",
    "read_yaml",
    "save",
    "schema",
]
