"""Human output (rich progress and tables, rank 0 only) and machine output (JSONL metrics)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from supcon_scale.distributed import all_reduce_mean
from supcon_scale.hooks import Hook, StepInfo

console = Console(stderr=True)


class MetricsLog:
    """Appends one JSON object per line; only the main rank writes."""

    def __init__(self, path: str | Path | None, enabled: bool = True):
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


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

    def __enter__(self) -> "TrainProgress":
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


class TrainLogger(Hook):
    """The run's metrics: every `every` steps and at the last, the loss averaged over ranks, the LR and views/s go to
    `metrics.jsonl` and the progress bar. Reading the loss is a host synchronisation, so it happens only then.
    A context manager: the progress bar lives as long as the block."""

    def __init__(self, path: Path, every: int, total_steps: int, start_step: int, engine: Any, is_main: bool,
                 progress: bool):
        self.metrics = MetricsLog(path, enabled=is_main)
        self.progress = TrainProgress(total_steps, start_step, enabled=is_main and progress)
        self.every, self.engine = every, engine
        self.loss = float("nan")  # the last logged loss
        self.window_start, self.window_views = time.time(), 0

    def __enter__(self) -> "TrainLogger":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def on_step(self, info: StepInfo) -> None:
        self.window_views += info.views
        if info.step % self.every and not info.last:
            return
        self.loss = all_reduce_mean(info.loss).item()
        rate = self.window_views / max(time.time() - self.window_start, 1e-9)
        self.metrics.write({"step": info.step, "epoch": info.epoch, "loss": self.loss, "lr": self.engine.lr,
                            "views_per_s": rate, "skipped_steps": self.engine.skipped_steps})
        self.progress.update(info.step, f"epoch {info.epoch} loss {self.loss:.4f} {rate:,.0f} views/s")
        self.window_start, self.window_views = time.time(), 0


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for row in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return t
