"""Atomic, resumable checkpoints and the exported encoder.

A checkpoint is a directory `OUT/checkpoints/step_XXXXXXXX/` that becomes visible only when complete: every file
is written into `.tmp-step_XXXXXXXX/`, fsynced, and the directory renamed; `meta.json` is written last, so a
directory without it is never picked (the DCP/torchtitan rule, FACTS.md section 9). Loading never unpickles
arbitrary objects: tensors live in safetensors or `torch.load(weights_only=True)` files, the rest is JSON.

    model.safetensors     full model state (encoder + head)
    encoder.safetensors   the encoder alone, a plain timm state dict (see `export_encoder`)
    train_state.pt        optimizer, scheduler, scaler
    rank_<r>.pt           that rank's RNG states and data position
    meta.json             step, epoch, resolved config, loss convention, world size, engine
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from supcon_scale import distributed
from supcon_scale.models import create_encoder

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


# ---------------------------------------------------------------------------------------------------------------
# Encoder export: what evaluation and downstream users load


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full SupConModel state dict, with the `encoder.` prefix removed."""
    return {k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")}


def export_encoder(
    encoder: nn.Module | dict[str, torch.Tensor], path: str | Path, encoder_name: str, cifar_stem: bool = False
) -> Path:
    """Write the encoder (a module or its state dict) as a timm state dict: `timm.create_model(name,
    num_classes=0).load_state_dict(...)` accepts it."""
    path = Path(path)
    if isinstance(encoder, nn.Module):
        encoder = encoder.state_dict()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata={"encoder": encoder_name, "cifar_stem": str(int(cifar_stem))})
    _fsync(tmp)
    os.replace(tmp, path)
    return path


def load_encoder(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """Load an exported encoder (a `.safetensors` file or a checkpoint directory holding one) in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "encoder.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint: no encoder at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "encoder" not in meta:
        raise ValueError(f"checkpoint {path}: no 'encoder' name in its metadata; was it written by supcon_scale?")
    encoder = create_encoder(meta["encoder"], cifar_stem=meta.get("cifar_stem") == "1")
    load_matching(encoder, load_file(str(path)), str(path))
    return encoder.eval(), meta


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming missing, unexpected and mis-shaped keys."""
    check_matching(module.state_dict(), state, source)
    module.load_state_dict(state)


def check_matching(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line ValueError naming missing, unexpected and mis-shaped keys of `state` against `own`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # numel 0: a ZeRO-3 partitioned parameter, whose local shape says nothing about the model's
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].numel() > 0 and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}")
        raise ValueError(f"checkpoint {source} does not fit this model: {' | '.join(parts)}")


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / META).is_file()


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `out_dir`, or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if is_complete(p))
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_pos"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, int(has_gauss), gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    out_dir: str | Path,
    step: int,
    epoch: int,
    engine_state: dict[str, Any],
    config: dict[str, Any],
    data_state: dict[str, Any],
    keep_last: int = 3,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes the shared files, each rank its own RNG and data position."""
    rank, world = distributed.world()
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    distributed.barrier()
    _save_torch({"rng": rng_state(), "data": data_state}, tmp / f"rank_{rank}.pt")
    distributed.barrier()
    if rank == 0:
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in engine_state["model"].items()},
            str(tmp / "model.safetensors"),
        )
        _fsync(tmp / "model.safetensors")
        train_state = {k: engine_state.get(k) for k in ("optimizer", "scheduler", "scaler")}
        _save_torch(train_state, tmp / "train_state.pt")
        model_cfg = config["model"]
        export_encoder(encoder_state(engine_state["model"]), tmp / "encoder.safetensors", model_cfg["encoder"], model_cfg.get("cifar_stem", False))
        meta = {
            "step": step,
            "epoch": epoch,
            "world_size": world,
            "engine": config["engine"]["name"],
            "loss": config["loss"],
            "config": config,
            "time": time.time(),
            **(extra_meta or {}),
        }
        _write_text(tmp / META, json.dumps(meta, indent=2))
        if final.exists():  # a re-save of the same step (e.g. after a restart) replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _purge(root, keep_last)
    distributed.barrier()
    return final


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint directory: (meta, engine_state, this rank's {"rng", "data"} or None if not saved)."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"train.resume: {path} is not a complete checkpoint directory (no {META})")
    meta = json.loads((path / META).read_text())
    engine_state = {"model": load_file(str(path / "model.safetensors"))}
    engine_state.update(_load_torch(path / "train_state.pt"))
    rank, _ = distributed.world()
    rank_file = path / f"rank_{rank}.pt"
    rank_state = _load_torch(rank_file) if rank_file.is_file() else None
    return meta, engine_state, rank_state


def _purge(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and stale temporary directories."""
    done = sorted(p for p in root.iterdir() if is_complete(p))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def copy_atomic(src: Path, dst: Path) -> Path:
    """Copy a file so that `dst` is either the old file or the complete new one, never a partial copy."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    _fsync(tmp)
    os.replace(tmp, dst)
    return dst


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: never fall back to unsafe loading
        raise ValueError(f"checkpoint {path}: refused to load ({str(exc).splitlines()[0]})") from None


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)
