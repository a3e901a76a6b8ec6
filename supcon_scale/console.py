"""Human output (rich progress and tables, rank 0 only) and machine output (JSONL metrics)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for row in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return t
