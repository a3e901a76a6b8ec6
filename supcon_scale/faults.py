"""Fault injection for the reliability tests: off unless the `SUPCON_FAULTS` environment variable names faults.

The CLI's `train` command calls `install()`; with the variable unset it does nothing. The faults are real ones
(a SIGKILL, a NaN, a process dying inside a save), injected at exact steps so a test can check what survives:

    SUPCON_FAULTS="kill_rank=1@5; nan_steps=2-3,5-9; die_in_save=4; sleep=1.5"

- `kill_rank=R@S`   rank R SIGKILLs itself right after step S, on the first torchrun attempt only
                    (`TORCHELASTIC_RESTART_COUNT` = 0), so an elastic restart gets past it.
- `nan_steps=A-B,.` the inputs of those steps are multiplied by NaN (loss and gradients become non-finite).
- `die_in_save=S`   rank 0 SIGKILLs itself inside the save of step S (model and optimizer written, `meta.json`
                    not), on the first attempt only.
- `sleep=SECONDS`   sleep after every step, so a test can deliver a signal while a given step is running.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

ENV = "SUPCON_FAULTS"


@dataclass
class Faults:
    kill_rank: tuple[int, int] | None = None  # (rank, step)
    nan_steps: set[int] = field(default_factory=set)
    die_in_save: int | None = None
    sleep: float = 0.0


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
            elif key == "sleep":
                faults.sleep = float(value)
            else:
                raise ValueError(key)
        except ValueError:
            raise ValueError(f"{ENV}: cannot parse {item!r} (see supcon_scale/faults.py)") from None
    return faults


def first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(rank: int, spec: str | None = None) -> tuple[Callable[[int, int], None], ...]:
    """Switch on the faults of `spec` (default: `$SUPCON_FAULTS`) in this process; returns the trainer hooks."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    if not spec.strip():
        return ()
    faults = parse(spec)
    from supcon_scale import checkpoint, trainer

    position = {"step": 0}  # the step fit() is about to run is position["step"] + 1

    resume = trainer._resume

    def resume_and_remember(*args: Any, **kwargs: Any) -> tuple[int, int]:
        step, epoch = resume(*args, **kwargs)
        position["step"] = step
        return step, epoch

    trainer._resume = resume_and_remember

    if faults.nan_steps:
        train_step = trainer.train_step

        def poisoned_train_step(engine, criterion, views, labels):
            if position["step"] + 1 in faults.nan_steps:
                views = [v * float("nan") for v in views]
            return train_step(engine, criterion, views, labels)

        trainer.train_step = poisoned_train_step

    if faults.die_in_save is not None and rank == 0 and first_attempt():
        export = checkpoint.export_encoder

        def export_then_die(encoder, path, *args: Any, **kwargs: Any):
            # Called by checkpoint.save after model.safetensors and train_state.pt, before meta.json.
            if position["step"] == faults.die_in_save:
                _die()
            return export(encoder, path, *args, **kwargs)

        checkpoint.export_encoder = export_then_die

    def hook(step: int, epoch: int) -> None:
        position["step"] = step
        if faults.kill_rank == (rank, step) and first_attempt():
            _die()
        if faults.sleep:
            time.sleep(faults.sleep)

    return (hook,)
