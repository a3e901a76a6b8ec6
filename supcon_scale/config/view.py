"""`RunView`: what a run's components (the Checkpointer, the TrainLogger and its sinks) read of a run's config.

A training run's `RunConfig` is one; a continual run's `ContinualRun` (continual/learner.py, one method and seed of
a continual config) is another. Typing the components with this protocol, not `RunConfig` or `Any`, says exactly
what a new kind of run must provide to reuse them.
"""

from __future__ import annotations

from typing import Any, Protocol

from supcon_scale.config.schema import LogConfig


class TrainView(Protocol):
    """The `train` keys the components read: cadence, resume, preemption and reporting."""

    checkpoint_every_steps: int | None
    keep_last: int
    resume: str | None
    preempt_signal: str
    log_every: int
    progress: bool


class OptimView(Protocol):
    """The optimizer's name, which a resume that cannot load its state names."""

    name: str


class RunView(Protocol):
    """A run as its components see it: where it writes, its seed, those sections and the config its checkpoints keep."""

    @property
    def out_dir(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def train(self) -> TrainView: ...

    @property
    def log(self) -> LogConfig: ...

    @property
    def optim(self) -> OptimView: ...

    def to_dict(self) -> dict[str, Any]: ...
