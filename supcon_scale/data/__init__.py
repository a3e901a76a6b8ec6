"""Training and evaluation data: `build_train_loader` picks a backend for `data.backend` (DESIGN.md data contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supcon_scale import distributed
from supcon_scale.config import DataConfig


def build_train_loader(cfg: DataConfig, ctx: distributed.Context, seed: int, out_dir: Path | None) -> Any:
    """The training loader for `cfg.backend`: yields `(views, labels)` on `ctx.device`, resumable mid-epoch.

    torchvision: Pillow + v2 transforms in DataLoader workers. dali: DALI on the GPU when one is present, else on the
    CPU; dali-cpu forces the CPU; dali-gpu requires a GPU. synthetic: random tensors (no files) for throughput tests.
    """
    if cfg.backend == "torchvision":
        from supcon_scale.data.torchvision import TorchvisionLoader

        return TorchvisionLoader(cfg, ctx, seed, out_dir)
    if cfg.backend in ("dali", "dali-cpu", "dali-gpu"):
        from supcon_scale.data.dali import DaliLoader

        return DaliLoader(cfg, ctx, seed, out_dir)
    if cfg.backend == "synthetic":
        from supcon_scale.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, ctx, seed)
    raise ValueError(f"data.backend: unknown backend {cfg.backend!r}")


__all__ = ["build_train_loader"]
