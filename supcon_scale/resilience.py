"""What keeps a long run alive: preemption signals, the non-finite step guard, and their exit codes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from supcon_scale import distributed

# The trainer exits with this status after a preemption checkpoint; launch/slurm.sbatch requeues on it.
EXIT_PREEMPTED = 3
# Signals that mean "this job is being preempted": the agent forwards them to the workers (see `torchrun_main`).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# Seconds `supcon-scale torchrun` waits for the workers' preemption save before killing them (torchrun's is 30).
SHUTDOWN_TIMEOUT_S = 300
# What a node's local rank 0 writes into the agent's private folder once a preemption checkpoint is complete.
PREEMPT_RECORD = "preempted.json"


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written (`step`, `checkpoint`)."""

    def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: loader workers ignore the preemption signals; only the trainer acts on them.

    torchrun forwards a signal to each worker's whole process group, and SLURM signals every process of the step,
    so a loader worker killed by SIGTERM would make the trainer raise "DataLoader worker ... is killed by signal"
    before its preemption checkpoint. The trainer still shuts its loader workers down when it exits.
    """
    for name in PREEMPT_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the step, the loss and the newest good checkpoint."""


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (as SLURM or torchrun send it) into a flag checked at step boundaries.

    Ranks may receive the signal at different times, so `requested()` agrees across ranks with one tiny all-reduce
    every step: every rank then checkpoints at the same step. It is a CPU all-reduce (`distributed.any_rank`), so
    the check never waits for the GPU; a single process reads its own flag.
    """

    def __init__(self, signal_name: str):
        self.signum = getattr(signal, signal_name)
        self._flag = False
        self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self._flag = True

    @property
    def signalled(self) -> bool:
        """Whether this process has received the signal (its own flag, not yet agreed with the other ranks)."""
        return self._flag

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether any rank has been signalled (`device` is unused: the agreement runs on the CPU)."""
        return distributed.any_rank(self._flag)

    def close(self) -> None:
        signal.signal(self.signum, self._previous)


class NonFiniteGuard:
    """Counts skipped steps whose loss or gradients were not finite; stops the run after `max_bad` in a row."""

    def __init__(self, max_bad: int, fp16: bool):
        self.max_bad = max_bad
        self.fp16 = fp16  # fp16 loss scaling skips steps while it calibrates: those are not failures
        self.in_a_row = 0
        self.total = 0

    def update(self, step: int, loss: torch.Tensor, stepped: bool, newest_checkpoint: object) -> None:
        """Every step: a good one resets the count of bad steps "in a row". Reads the loss only on skipped steps."""
        if stepped:
            self.in_a_row = 0
            return
        loss = loss.item()
        bad = not self.fp16 or not math.isfinite(loss)
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


def notify_agent(done: Preempted | None = None) -> None:
    """After a preemption checkpoint, tell this node's torchrun agent to stop instead of restarting the workers.

    A worker exiting with EXIT_PREEMPTED looks like a crash to torchrun, which restarts it when
    `--max-restarts` > 0 (and never returns 3 itself). SIGTERM is in the agent's default signals to handle: it
    shuts the workers down and raises SignalException, which `torchrun_main` turns into EXIT_PREEMPTED. Only the
    node's local rank 0 does it, and only once the checkpoint is complete on every rank; it first records `done`
    (the checkpoint written) for `supcon-scale torchrun`, which claims a checkpoint only when it finds that record.
    """
    launch = distributed.launch_env()
    if launch.under_agent and launch.local_rank == 0 and parent_is_torchrun():
        if done is not None and launch.agent_dir:
            record_preemption(Path(launch.agent_dir), {"step": done.step, "checkpoint": done.checkpoint})
        os.kill(os.getppid(), signal.SIGTERM)


def record_preemption(folder: Path, record: dict[str, Any]) -> None:
    """Write `record` as PREEMPT_RECORD into the agent's private folder: only a real directory of this user (the
    agent made it with mkdtemp), never through a link; any failure leaves no record, so the agent claims nothing."""
    try:
        st = os.lstat(folder)
        if not os.path.isdir(folder) or os.path.islink(folder) or st.st_uid != os.getuid():
            return
        fd = os.open(folder / PREEMPT_RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
    except OSError:
        return


def read_preemption(folder: Path) -> dict[str, Any] | None:
    """The record a worker left in the agent's folder, or None."""
    try:
        record = json.loads((folder / PREEMPT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def parent_is_torchrun(pid: int | None = None) -> bool:
    """Whether this process's parent is a torchrun agent (`torchrun`, `python -m torch.distributed.run` or
    `supcon-scale torchrun`), read from its command line: a stray TORCHELASTIC_RUN_ID in a plain run must never
    make a preempted run signal the user's own job script."""
    try:
        argv = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(a) == b"torchrun" or a == b"torch.distributed.run" for a in argv[:6])


def torchrun_help() -> str:
    """What `supcon-scale torchrun` adds to torchrun, printed before torchrun's own `--help`."""
    return (
        "supcon-scale torchrun: torchrun with the same arguments, and exit statuses a scheduler can act on:\n"
        f"  {EXIT_PREEMPTED}  the job was preempted (SIGTERM/SIGUSR1/SIGUSR2 forwarded, or a worker exited "
        f"{EXIT_PREEMPTED}): its checkpoint is written; requeue it, train.resume=auto continues from it\n"
        "  1  a worker failed (plain torchrun exits 1 for a preemption too)\n"
        "  128+N  the agent itself died of signal N\n"
        f"Added unless given: --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 (SLURM's --signal)"
        f" and --shutdown-timeout {SHUTDOWN_TIMEOUT_S} (torchrun's 30 s is short for a preemption checkpoint).\n"
        "torchrun's own options follow.\n"
    )


def _asks_help(argv: list[str]) -> bool:
    """`-h`/`--help` among torchrun's own options (before `-m MODULE` or the script), not the script's."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return True
        if arg in ("-m", "--module", "--no-python", "--no_python") or arg.endswith(".py"):
            return False
    return False


def torchrun_main(argv: list[str]) -> int:
    """`supcon-scale torchrun ...`: torchrun whose exit status is EXIT_PREEMPTED when the job was preempted.

    Plain torchrun exits 1 both when its workers exit with EXIT_PREEMPTED and when it is itself signalled, so a
    launcher script cannot tell "requeue" from "crashed". The agent also handles SIGUSR1/SIGUSR2 here (plain
    torchrun dies of them, leaving its workers behind) and forwards them, as SLURM's `--signal` sends them.
    """
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if _asks_help(argv):
        print(torchrun_help(), flush=True)

    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        argv = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2", *argv]
    if not any(a.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for a in argv):
        # torchrun SIGKILLs its workers 30 s after forwarding a signal: too short for a preemption checkpoint of a
        # large model on a network file system.
        argv = ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), *argv]
    # The workers' "checkpoint written" record comes back through a private folder of this agent: a worker stuck
    # in a collective swallows the signal and is killed after the shutdown timeout, having written nothing.
    folder = Path(tempfile.mkdtemp(prefix="supcon-torchrun-"))
    os.environ[distributed.AGENT_DIR_VAR] = str(folder)
    try:
        run.main(argv)
    except SignalException as exc:
        if exc.sigval.name in PREEMPT_SIGNALS:
            return _preempted_status(exc.sigval.name, read_preemption(folder))
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        if EXIT_PREEMPTED in codes:  # a worker exits 3 only once its preemption checkpoint is complete
            return EXIT_PREEMPTED
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _preempted_status(signal_name: str, record: dict[str, Any] | None) -> int:
    """The agent's exit status and line after forwarding a preemption signal: 3 only for a confirmed checkpoint."""
    if record is None:
        print(
            f"supcon-scale torchrun: {signal_name} forwarded, but no worker confirmed a checkpoint (stopped before "
            "the first step, or killed after --shutdown-timeout: stuck in a collective?); exit 1, not requeued: "
            "see the workers' log",
            file=sys.stderr,
        )
        return 1
    print(
        f"supcon-scale torchrun: {signal_name} forwarded; the workers wrote checkpoint {record.get('checkpoint')} "
        f"(preempted at step {record.get('step')}); exit {EXIT_PREEMPTED} (requeue)",
        file=sys.stderr,
    )
    return EXIT_PREEMPTED
