"""Human output (rich progress and tables, or plain log lines, rank 0 only) and machine output (JSONL metrics and
the sinks beside it); warnings on every rank, prefixed with the rank.

A run's log line, every `train.log_every` steps when stderr is not a terminal (a SLURM job's log) or `log.plain`:

    2026-12-01 20:42:27 step 120/3000 epoch 2 loss 5.1234 emb-std 0.0712 probe top-1 45.20% [43.1, 47.3] \
        (n=2,560) lr 0.48 1,234 views/s data 3% fwd+bwd 85% optim 9% eta 1:02:03 mem 10.2 GiB

`emb-std` is the collapse watch's spread of the step's embeddings (losses/collapse.py: 0 is collapse, about
1/sqrt(D) healthy); `probe top-1` the online probe's accuracy on the window's training views (`train.online_probe`,
with its 95% interval and n). `data`, `fwd+bwd` and `optim` are shares of the window's wall time (StepClock: the
rest went to hooks, monitors and checkpoint saves); `mem` (GPU only) is the window's peak of allocated device memory.

A kNN monitor's result (`train.knn_every_epochs`) gets a line of its own when it arrives, with its 95% interval:

    2026-12-01 21:02:10 step 1000/3000 epoch 0 knn top-1 75.83% [71.2, 79.9] (n=360, k=144)

Every metrics.jsonl record carries `time` (UNIX seconds) and `time_iso` (UTC), the moment it was written.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from supcon_scale import sinks
from supcon_scale.config import RunView
from supcon_scale.distributed import all_reduce_mean, world
from supcon_scale.files import METRICS, open_append
from supcon_scale.hooks import Hook, StepInfo
from supcon_scale.losses.collapse import CollapseWatch, embedding_std

if TYPE_CHECKING:  # the type only: engines/ would pull timm into every user of this module
    from supcon_scale.engines import Engine

# soft_wrap: a line in a job's log file stays one line (rich would wrap it at 80 columns off a terminal)
console = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")


def warn(message: str) -> None:
    """A one-line warning on this rank's stderr, prefixed with the rank (a job log interleaves the ranks' lines)."""
    lines = str(message).strip().splitlines()
    print(f"[rank {world()[0]}] warning: {lines[0] if lines else ''}", file=sys.stderr, flush=True)


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().strip().splitlines()
        return f"[rank {self.rank}] {record.levelname.lower()}: {text[0] if text else ''}"


@contextlib.contextmanager
def rank_stderr(rank: int) -> Iterator[None]:
    """While the block runs, the package's log records and Python warnings go to stderr as one line each, prefixed
    with the rank, on every rank (the default would print them unprefixed, or not at all below WARNING)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(rank))
    loggers = [logging.getLogger("supcon_scale"), logging.getLogger("py.warnings")]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(min(lg.getEffectiveLevel(), logging.WARNING))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg, (propagate, level) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.propagate, lg.level = propagate, level


class MetricsLog:
    """Appends one JSON object per line, each stamped with when it was written (`time`, UNIX seconds, and
    `time_iso`, UTC), and hands the record to each sink (they keep their own clocks); only the main rank writes.

    A sink that raises is dropped with one warning: a dashboard never stops training. `echo`, when set, sees every
    record too (the TrainLogger prints a monitor's rows on the console with it).
    """

    def __init__(self, path: str | Path | None, enabled: bool = True, sinks: Iterable[sinks.Sink] = ()):
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks) if enabled else []
        self.echo: Callable[[Mapping[str, Any]], None] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        now = datetime.datetime.now(datetime.UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # both stamps name the same millisecond
        stamp = {"time": now.timestamp(), "time_iso": now.isoformat(timespec="milliseconds")}
        with open_append(self.path) as f:
            f.write(json.dumps({**clean, **stamp}) + "\n")
        for sink in list(self.sinks):
            try:
                sink.write(clean)
            except Exception as exc:  # noqa: BLE001 - any failure of a third-party sink
                self.sinks.remove(sink)
                warn(f"the {sink.name} sink failed and is off for the rest of the run: {type(exc).__name__}: {exc}")
        if self.echo is not None:
            self.echo(clean)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                warn(f"closing the {sink.name} sink failed: {type(exc).__name__}: {exc}")
        self.sinks = []


class TrainProgress:
    """A rich progress bar over the whole run's optimizer steps (a no-op on other ranks or when disabled)."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.progress = (
            Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            if enabled
            else None
        )
        self.total_steps = total_steps
        self.start_step = start_step

    def __enter__(self) -> TrainProgress:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total_steps, completed=self.start_step, status="")
        return self

    def update(self, step: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


class Clock:
    """The step timer's interface; this one keeps no time (`log.timing=false`: no marks, no shares).

    The marks come from the code whose time they bound, never from a hook, so no share depends on the hooks' order:
    `batches` marks `free` as the loop asks the loader for the next batch, `trainer.train_step` marks `start` (the
    batch is in hand), `mark` (forward+backward done) and `stop` (the update done).
    """

    def resume(self) -> None:
        """The run starts (or continues): a window begins."""

    def batches(self, items: Iterable[T]) -> Iterator[T]:
        """`items`, with `wait` marked before each is asked for."""
        it = iter(items)
        while True:
            self.wait()
            try:
                item = next(it)
            except StopIteration:
                return
            yield item

    def wait(self) -> None:
        """The loop asks the loader for the next batch."""

    def start(self) -> None:
        """`train_step` starts on a batch."""

    def mark(self) -> None:
        """`train_step`'s forward+backward is done."""

    def stop(self) -> None:
        """`train_step`'s update is done."""

    def shares(self) -> dict[str, float]:
        return {}


NO_CLOCK = Clock()  # train_step's default: a caller that keeps no time (a benchmark, a test)


class StepClock(Clock):
    """Where a log window's wall time goes: waiting for the loader, forward+loss+backward, the optimizer step.

    Marks per step (see `Clock`): `free` (the loop asks the loader), `batch` (train_step starts), `mark` (its
    backward is done) and `stop` (it returned). Data wait is batch - free (the `on_batch` hooks included: a replay
    batch is data), forward+backward mark - batch (DDP's gradient all-reduce overlaps it), optimizer stop - mark.
    The hooks' `on_step`, monitors and checkpoint saves fall between stop and the next free: in the window's wall
    time, in none of the shares. On a GPU the marks are CUDA events on the current stream, so the shares are of
    device time and a data stall shows only when it starves the GPU; `shares` syncs on the last one, at log points
    only. On the CPU they are perf_counter readings.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list[Any]] = []  # [free, batch, mark, stop] per step of the window
        self.free = self.window_start = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def resume(self) -> None:
        self.free = self.window_start = self._now()

    def wait(self) -> None:
        self.free = self._now()

    def start(self) -> None:
        # A step taken without `batches` (a benchmark, a caller's loop) has no data wait: free is used once.
        self.steps.append([self.free, self._now(), None, None])
        self.free = None

    def mark(self) -> None:
        if self.steps:
            self.steps[-1][2] = self._now()

    def stop(self) -> None:
        if self.steps:
            self.steps[-1][3] = self._now()

    def shares(self) -> dict[str, float]:
        """{data, compute, optim}: shares of the wall time since the last call (ends at the last `stop`)."""
        steps, self.steps = [s for s in self.steps if s[3] is not None], []
        if not steps or self.window_start is None:
            return {}
        end = steps[-1][3]
        if self.cuda:
            end.synchronize()
        wall = max(self._seconds(self.window_start, end), 1e-12)
        self.window_start = end
        data = sum(self._seconds(free, batch) for free, batch, _, _ in steps if free is not None)
        compute = sum(self._seconds(batch, mark or stop) for _, batch, mark, stop in steps)
        optim = sum(self._seconds(mark, stop) for _, _, mark, stop in steps if mark is not None)
        return {"data_share": data / wall, "compute_share": compute / wall, "optim_share": optim / wall}


class TrainLogger(Hook):
    """The run's metrics: every `train.log_every` steps and at the last, the loss averaged over ranks, the LR,
    views/s and the time shares go to `metrics.jsonl` and its sinks, and to the progress bar (a terminal) or one
    plain line (stderr not a terminal, or `log.plain`). Reading the loss is a host synchronisation, so it happens
    only then. A context manager: the bar and the sinks live as long as the block. Its `clock` goes to
    `trainer.train_step` and around the loop's batches (see `Clock`).

    Each record also holds `embedding_std` of the step's embeddings (the collapse watch, which warns once when the
    run looks collapsed; `uniform_loss(views)` is the objective's loss at equal logits or None, and no watch runs
    without it) and the fields of each of `feeders` (`log_fields()`, asked on every rank at each log point: the
    online probe's window top-1); a feeder must have seen the step already, so it comes before the logger."""

    def __init__(
        self,
        cfg: RunView,
        engine: Engine,
        total_steps: int,
        feeders: Sequence[Any] = (),
        uniform_loss: Callable[[int], float | None] | None = None,
    ):
        ctx = engine.ctx
        sinks.check(cfg.log)  # on every rank: a missing extra stops them all, before anything is written
        self.cfg, self.engine, self.total_steps, self.is_main = cfg, engine, total_steps, ctx.is_main
        self.every = cfg.train.log_every
        self.metrics = MetricsLog(Path(cfg.out_dir) / METRICS, enabled=ctx.is_main)
        self.metrics.echo = self._echo  # a monitor's row (the kNN top-1) gets its own console line
        self.clock = StepClock(ctx.device) if cfg.log.timing else Clock()
        self.plain = cfg.log.plain or not console.is_terminal
        self.cuda = ctx.device if ctx.device.type == "cuda" else None
        self.loss = float("nan")  # the last logged loss
        self.start_step, self.start_time = 0, time.time()
        self.window_start, self.window_views = time.time(), 0
        self.progress = TrainProgress(total_steps, 0, enabled=False)
        self.lines = False  # plain lines: decided when the block starts
        self.feeders, self.uniform_loss, self.watch = list(feeders), uniform_loss, CollapseWatch()

    def on_resume(self, step: int, epoch: int) -> None:
        self.start_step, self.start_time = step, time.time()
        self.window_start = self.start_time
        self.clock.resume()

    def __enter__(self) -> TrainLogger:
        show = self.is_main and self.cfg.train.progress
        self.progress = TrainProgress(self.total_steps, self.start_step, enabled=show and not self.plain)
        self.lines = show and self.plain
        if self.is_main:
            self.metrics.sinks = sinks.build(self.cfg, warn)  # out_dir has passed the checkpointer's check
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
        self.metrics.close()

    def _echo(self, record: Mapping[str, Any]) -> None:
        """A monitor's row on the console: one plain line, or the progress bar's status."""
        if "knn_top1" not in record:
            return
        if self.lines:
            print(log_line(record, self.total_steps, 0.0), file=sys.stderr, flush=True)
        self.progress.update(int(record["step"]), f"epoch {record['epoch']} {knn_text(record)}")

    def on_step(self, info: StepInfo) -> None:
        self.window_views += info.views
        if info.step % self.every and not info.last:
            return
        self.loss = all_reduce_mean(info.loss).item()
        now = time.time()
        record = {
            "step": info.step,
            "epoch": info.epoch,
            "loss": self.loss,
            "lr": self.engine.lr,
            "views_per_s": self.window_views / max(now - self.window_start, 1e-9),
            "skipped_steps": self.engine.skipped_steps,
            **self.clock.shares(),
        }
        record.update(self._step_fields(info))
        if self.cuda is not None:
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.cuda) / 2**30
            torch.cuda.reset_peak_memory_stats(self.cuda)
        self.metrics.write(record)
        rate = f"{record['views_per_s']:,.0f} views/s"
        self.progress.update(info.step, f"epoch {info.epoch} loss {self.loss:.4f} {rate}")
        if self.lines:
            eta = (now - self.start_time) / max(info.step - self.start_step, 1) * (self.total_steps - info.step)
            print(log_line(record, self.total_steps, eta), file=sys.stderr, flush=True)
        self.window_start, self.window_views = time.time(), 0

    def _step_fields(self, info: StepInfo) -> dict[str, Any]:
        """The collapse watch's `embedding_std` (its warning, once, on the main rank) and the feeders' fields."""
        fields: dict[str, Any] = {}
        z = getattr(info.output, "z", info.output)  # the embeddings: a models.Output's z, or the tensor itself
        if isinstance(z, torch.Tensor):
            fields["embedding_std"] = embedding_std(z)
            if self.uniform_loss is not None:  # an embedding run (a classifier's logits are no embeddings)
                uniform = self.uniform_loss(info.views)
                said = self.watch.check(fields["embedding_std"], z.shape[-1], self.loss, uniform)
                if said is not None and self.is_main:
                    warn(f"step {info.step}: {said}")
        for feeder in self.feeders:
            fields.update(feeder.log_fields())
        return fields


def probe_text(record: Mapping[str, Any]) -> str:
    """ "probe top-1 45.20% [43.1, 47.3] (n=2,560)": the online probe's window top-1, its 95% interval and n."""
    lo, hi = record["probe_top1_interval_95"]
    return f"probe top-1 {100 * record['probe_top1']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={record['probe_n']:,})"


def knn_text(record: Mapping[str, Any]) -> str:
    """ "knn top-1 75.83% [71.2, 79.9] (n=360, k=144)": a kNN monitor row's top-1 with its 95% interval and n."""
    lo, hi = record["knn_top1_interval_95"]
    return (f"knn top-1 {100 * record['knn_top1']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
            f"(n={record['knn_num_val']}, k={record['knn_k']})")  # fmt: skip


def log_line(record: Mapping[str, Any], total_steps: int, eta_s: float) -> str:
    """One plain line of a log record (the module docstring shows one), or of a kNN monitor's row."""
    head = [datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), f"step {record['step']}/{total_steps}"]
    if "knn_top1" in record:
        return " ".join([*head, f"epoch {record['epoch']}", knn_text(record)])
    parts = [
        *head,
        f"epoch {record['epoch']}",
        f"loss {record['loss']:.4f}",
        *([f"emb-std {record['embedding_std']:.4f}"] if record.get("embedding_std") is not None else []),
        *([probe_text(record)] if "probe_top1" in record else []),
        f"lr {record['lr']:.4g}",
        f"{record['views_per_s']:,.0f} views/s",
    ]
    if "data_share" in record:
        parts += [
            f"data {record['data_share']:.0%}",
            f"fwd+bwd {record['compute_share']:.0%}",
            f"optim {record['optim_share']:.0%}",
        ]
    parts.append(f"eta {datetime.timedelta(seconds=round(eta_s))}")
    if "max_memory_gib" in record:
        parts.append(f"mem {record['max_memory_gib']:.1f} GiB")
    return " ".join(parts)


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for row in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return t
