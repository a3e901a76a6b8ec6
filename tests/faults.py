"""Fault injection for the reliability tests: the CLI's `train` with a fault hook, run as a script by torchrun.

    torchrun ... tests/faults.py train --config ... key=value ...     (faults from $SUPCON_FAULTS)

The package has no fault switch of its own: only this test entry point reads the variable, and it reaches the
trainer through the public Hook protocol. The faults are real ones (a SIGKILL, a NaN, a process dying inside a
save), injected at exact steps so a test can check what survives:

    SUPCON_FAULTS="kill_rank=1@5; nan_steps=2-3,5-9; die_in_save=4; hold=SIGTERM@2:1"

- `kill_rank=R@S`   rank R SIGKILLs itself right after step S, on the first torchrun attempt only
                    (`TORCHELASTIC_RESTART_COUNT` = 0), so an elastic restart gets past it.
- `nan_steps=A-B,.` the inputs of those steps are multiplied by NaN (loss and gradients become non-finite).
- `die_in_save=S`   rank 0 SIGKILLs itself inside the save of step S (every file written but `meta.json`), on the
                    first attempt only.
- `hold=SIG@S[:R]`  after step S (its metrics written), rank R (every rank without `:R`) waits until it has
                    received SIG, the run's preemption signal; the preemption check of step S then sees it. A test
                    waits for step S in metrics.jsonl, then signals: no sleep decides which step is preempted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from supcon_scale.hooks import Hook, StepInfo
from supcon_scale.resilience import PREEMPT_SIGNALS, PreemptionHandler

ENV = "SUPCON_FAULTS"
HOLD_TIMEOUT_S = 240.0  # the reliability tests' subprocess timeout: a hold never outlives its test


@dataclass
class Faults:
    kill_rank: tuple[int, int] | None = None  # (rank, step)
    nan_steps: set[int] = field(default_factory=set)
    die_in_save: int | None = None
    hold: tuple[str, int, int | None] | None = None  # (signal name, step, rank or None for every rank)


def parse(spec: str) -> Faults:
    """Parse a `SUPCON_FAULTS` value; a malformed one raises ValueError naming the variable."""
    faults = Faults()
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        key, _, value = item.partition("=")
        try:
            if key == "kill_rank":
                rank, step = value.split("@")
                faults.kill_rank = (int(rank), int(step))
            elif key == "nan_steps":
                for span in value.split(","):
                    lo, _, hi = span.partition("-")
                    faults.nan_steps.update(range(int(lo), int(hi or lo) + 1))
            elif key == "die_in_save":
                faults.die_in_save = int(value)
            elif key == "hold":
                name, _, where = value.partition("@")
                step, _, rank = where.partition(":")
                if name not in PREEMPT_SIGNALS:
                    raise ValueError(name)
                faults.hold = (name, int(step), int(rank) if rank else None)
            else:
                raise ValueError(key)
        except ValueError:
            raise ValueError(f"{ENV}: cannot parse {item!r} (see tests/faults.py)") from None
    return faults


def first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for(name: str) -> None:
    """Block until this process has received `name`, seen through the run's own handler (never a second one)."""
    handler = getattr(signal.getsignal(getattr(signal, name)), "__self__", None)
    if not isinstance(handler, PreemptionHandler):
        raise RuntimeError(f"{ENV}: hold={name} but the run's preemption signal is another (train.preempt_signal)")
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not handler.signalled:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ENV}: no {name} within {HOLD_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


class FaultHook(Hook):
    """Injects `faults` into the run of the rank `rank`."""

    def __init__(self, faults: Faults, rank: int) -> None:
        self.faults, self.rank = faults, rank

    def on_batch(self, step: int, views: list[torch.Tensor], labels: torch.Tensor):
        if step in self.faults.nan_steps:
            views = [v * float("nan") for v in views]
        return views, labels

    def on_step(self, info: StepInfo) -> None:
        if self.faults.kill_rank == (self.rank, info.step) and first_attempt():
            _die()
        if self.faults.hold is not None:
            name, step, rank = self.faults.hold
            if info.step == step and rank in (None, self.rank):
                _wait_for(name)

    def on_save(self, step: int, path: Path) -> None:
        if step == self.faults.die_in_save and self.rank == 0 and first_attempt():
            _die()


def hooks_from_env() -> list[Hook]:
    spec = os.environ.get(ENV, "")
    if not spec.strip():
        return []
    return [FaultHook(parse(spec), int(os.environ.get("RANK", "0")))]


if __name__ == "__main__":
    from supcon_scale.cli import main
    from supcon_scale.distributed import record

    sys.exit(record(main)(sys.argv[1:], hooks=hooks_from_env()))
