"""Metric sinks beside `metrics.jsonl`: TensorBoard and Weights & Biases get the same records, on rank 0.

Each sink is behind its `log.*` key and its extra (`pip install 'supcon_scale[tensorboard]'`, `[wandb]`); the
import happens only when the key is on. `check` runs on every rank before anything is written, so a missing extra
stops every rank with the same one-line error; `build` opens the sinks on rank 0 once the run has its out_dir.
A sink that fails later is dropped with one warning by `console.MetricsLog`: a dashboard never stops training.
"""

from __future__ import annotations

import numbers
import secrets
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from supcon_scale.config import ConfigError, LogConfig, RunView
from supcon_scale.files import write_text

WANDB_ID_FILE = "wandb_run_id"  # in out_dir: a resumed run continues the same W&B run


class Sink(Protocol):
    name: str

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record (booleans and None left out), keyed as the record names them."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v
    }


class TensorBoardSink:
    """Every number of a record as the scalar `train/<name>` at the record's step (torch.utils.tensorboard)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(f"train/{k}", v, global_step=int(record["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run (offline unless `log.wandb_mode=online`) whose id is kept in out_dir, so a resume continues it."""

    name = "wandb"

    def __init__(self, cfg: RunView):
        import wandb

        out = Path(cfg.out_dir)
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else new_run_id()
        out.mkdir(parents=True, exist_ok=True)
        write_text(id_file, run_id + "\n")  # a link planted at the id file is replaced, never followed
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            dir=str(out),
            id=run_id,
            resume="allow",
            mode=cfg.log.wandb_mode,
            name=out.name,
            config=cfg.to_dict(),
            # our stderr stays ours (W&B would otherwise wrap it), and no sampling thread of system metrics
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def write(self, record: Mapping[str, Any]) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars(record).items()}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def new_run_id() -> str:
    """Eight characters of [a-z0-9], as W&B's own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


EXTRAS: dict[str, tuple[str, str]] = {
    # log key -> (module whose import proves the extra is there, extra name)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def check(log: LogConfig) -> None:
    """Every sink the config turns on can be imported, or a one-line ConfigError naming the key and the extra."""
    import importlib

    for key, (module, extra) in EXTRAS.items():
        if not getattr(log, key):
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"log.{key}=true needs the {extra} extra: pip install 'supcon_scale[{extra}]'") from None


def build(cfg: RunView, warn: Callable[[str], None]) -> list[Sink]:
    """The sinks `cfg.log` turns on (call on rank 0 only, after `check`). One that fails to open is left out with a
    warning: raising here, on rank 0 alone, would leave the other ranks waiting in their first collective."""
    makers: dict[str, Callable[[], Sink]] = {
        "tensorboard": lambda: TensorBoardSink(Path(cfg.out_dir) / "tensorboard"),
        "wandb": lambda: WandbSink(cfg),
    }
    opened = []
    for key, make in makers.items():
        if getattr(cfg.log, key):
            try:
                opened.append(make())
            except Exception as exc:  # noqa: BLE001 - any failure of a third-party library
                warn(f"the {key} sink failed to start and is off for this run: {type(exc).__name__}: {exc}")
    return opened
