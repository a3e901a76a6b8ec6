"""The rules between sections and against the run (`check_run`): the config-level ones; the engine rules are
`engines.check` (engines/rules.py), which the trainer runs right after."""

from __future__ import annotations

import warnings

from supcon_scale.config.keys import ConfigError
from supcon_scale.config.parse import _build
from supcon_scale.config.schema import RunConfig


def check_run(cfg: RunConfig, world_size: int | None = None, device_type: str | None = None) -> None:
    """Every key's type and range again, then the rules between sections and against the run.

    The trainer calls it once, before it writes anything, and then the engine rules (`engines.check`, which this
    layer cannot import); `world_size` and `device_type` ("cuda", "cpu") are the run's, and the rules that need them
    are skipped when they are None.
    """
    _build(RunConfig, cfg.to_dict(), "")  # a RunConfig built in Python gets the loader's checks too
    if world_size is not None and cfg.data.global_batch_size % world_size:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by the world size {world_size}"
        )
    if device_type is not None and cfg.data.backend == "dali-gpu" and device_type != "cuda":
        raise ConfigError("data.backend=dali-gpu needs a CUDA GPU but this process has none (use dali or dali-cpu)")
    if cfg.loss.ce_weight > 0 and cfg.loss.name != "supcon":
        why = {"simclr": "has no labels", "cross_entropy": "is cross-entropy already", "genscl": "has label vectors"}
        raise ConfigError(
            f"loss.ce_weight={cfg.loss.ce_weight}: one-stage SupCon + cross-entropy needs loss.name=supcon; "
            f"loss.name={cfg.loss.name} {why.get(cfg.loss.name, 'is not supcon')} (set loss.ce_weight=0)"
        )
    _check_sampler(cfg)
    check_queue(cfg)


def _check_sampler(cfg: RunConfig) -> None:
    """`data.m_per_class` must divide the global batch under the m_per_class sampler, and does nothing without it
    (the rules that need the labels are the plan's, data/balanced.py)."""
    data = cfg.data
    if data.sampler == "m_per_class" and data.global_batch_size % data.m_per_class:
        raise ConfigError(
            f"data.m_per_class={data.m_per_class} does not divide data.global_batch_size={data.global_batch_size}"
        )
    default = type(data).__dataclass_fields__["m_per_class"].default
    if data.sampler == "random" and data.m_per_class != default:
        warnings.warn(
            f"data.m_per_class={data.m_per_class} does nothing with data.sampler=random (set data.sampler=m_per_class)",
            stacklevel=2,
        )


QUEUE_BUDGET_BYTES = 2**30  # the key queue's float32 rows on the device: at most 1 GiB (MoCo's 65,536 x 128 is 32 MiB)


def check_queue(cfg: RunConfig) -> None:
    """`loss.queue_size`: whole samples of data.views views, within the memory budget, and a loss that has keys."""
    size = cfg.loss.queue_size
    if size == 0:
        return
    if cfg.loss.name not in ("supcon", "simclr"):
        raise ConfigError(
            f"loss.queue_size={size} needs loss.name=supcon or simclr; loss.name={cfg.loss.name} has "
            + ("label vectors, which a queue's keys do not carry" if cfg.loss.name == "genscl" else "no embeddings")
        )
    if size % cfg.data.views:
        raise ConfigError(f"loss.queue_size={size} must be a multiple of data.views={cfg.data.views} (whole samples)")
    if size * cfg.model.feat_dim * 4 > QUEUE_BUDGET_BYTES:
        raise ConfigError(
            f"loss.queue_size={size} keys of model.feat_dim={cfg.model.feat_dim} floats take "
            f"{size * cfg.model.feat_dim * 4 / 2**30:.2f} GiB, over the queue's 1 GiB budget"
        )
