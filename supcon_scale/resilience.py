"""What keeps a long run alive: preemption signals, the non-finite step guard, and their exit codes."""

from __future__ import annotations

import math
import signal

import torch

from supcon_scale import distributed

# The trainer exits with this status after a preemption checkpoint; launch/slurm.sbatch requeues on it.
EXIT_PREEMPTED = 3


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the step, the loss and the newest good checkpoint."""


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (as SLURM or torchrun send it) into a flag checked at step boundaries.

    Ranks may receive the signal at different times, so `requested()` agrees across ranks with one tiny all-reduce:
    every rank then checkpoints at the same step.
    """

    def __init__(self, signal_name: str):
        self.signum = getattr(signal, signal_name)
        self._flag = False
        self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self._flag = True

    def requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self._flag else 0], device=device, dtype=torch.int32)
        return bool(distributed.all_reduce_sum(flag).item() > 0)

    def close(self) -> None:
        signal.signal(self.signum, self._previous)


class NonFiniteGuard:
    """Counts skipped steps whose loss or gradients were not finite; stops the run after `max_bad` in a row."""

    def __init__(self, max_bad: int, fp16: bool):
        self.max_bad = max_bad
        self.fp16 = fp16  # fp16 loss scaling skips steps while it calibrates: those are not failures
        self.in_a_row = 0
        self.total = 0

    def update(self, step: int, loss: float, stepped: bool, newest_checkpoint: str | None) -> None:
        bad = not stepped and (not self.fp16 or not math.isfinite(loss))
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_bad:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} non-finite steps in a row (loss={loss}); "
                f"newest good checkpoint: {newest_checkpoint or 'none'}"
            )
