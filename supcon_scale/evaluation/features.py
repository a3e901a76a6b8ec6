"""Frozen-encoder feature extraction, sharded over ranks and all-gathered back into dataset order."""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn as nn

from supcon_scale import distributed
from supcon_scale.files import write_replacing
from supcon_scale.resilience import ignore_preemption_signals


def freeze(encoder: nn.Module) -> nn.Module:
    """Eval mode (batch-norm running statistics frozen, the paper's stage 2) and no gradients."""
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


# The evaluation commands' numeric flags and what each must be: positive (> 0) or non-negative, and finite.
POSITIVE = ("lr", "temperature", "image_size", "batch_size", "epochs", "k", "work_size", "per_class", "max_images")
NON_NEGATIVE = ("workers", "weight_decay", "label_smoothing")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the largest float flag torch can take


def check_args(args: argparse.Namespace) -> None:
    """Refuse an evaluation command's flags that would run on garbage (`--lr nan` gives chance-level results with
    exit 0, `--image-size -1` a traceback deep in a transform): a one-line ValueError naming the flag."""
    for name, value in vars(args).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            raise ValueError(f"{flag}: must be a finite number, got {value}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # `--lr 1e300`: an overflow inside the optimizer
            raise ValueError(f"{flag}: {value} does not fit in float32, the precision the model computes in")
        if name in POSITIVE and value <= 0:
            raise ValueError(f"{flag}: must be > 0, got {value}")
        if name in NON_NEGATIVE and value < 0:
            raise ValueError(f"{flag}: must be >= 0, got {value}")
    device = getattr(args, "device", None)
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"--device: {device!r} is not cpu, cuda or cuda:N")


def default_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class _Indexed(torch.utils.data.Dataset):
    """This rank's strided slice of a dataset, returning the global index with each item."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int]):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[self.indices[i]]
        return image, int(label), self.indices[i]


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(features [N, D] float32 on CPU, labels [N], timing) for every item of `dataset`, in dataset order.

    With a process group up each rank encodes the indices `rank::world` and the pieces are all-gathered, so every
    rank returns the same full matrix. `amp` runs the encoder under bf16 autocast on GPU (features kept in fp32).
    """
    device = default_device(device)
    was_training = encoder.training
    encoder.eval().to(device)  # eval mode only: a monitor mid-training must not flip requires_grad
    rank, world = distributed.world()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        _Indexed(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=ignore_preemption_signals,  # the kNN monitor runs mid-training: a preemption must find it
    )  # fmt: skip
    feats, labels, order = [], [], []
    start = time.perf_counter()
    for images, y, idx in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            f = encoder(images)
        feats.append(f.float())
        labels.append(y.to(device))
        order.append(idx.to(device))
    dim = int(getattr(encoder, "num_features", 0)) or (feats[0].shape[1] if feats else 0)
    local_f = torch.cat(feats) if feats else torch.zeros((0, dim), device=device)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    local_i = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    encoder.train(was_training)
    all_f = distributed.all_gather_no_grad(local_f)
    all_y = distributed.all_gather_no_grad(local_y)
    all_i = distributed.all_gather_no_grad(local_i)
    assert all_i.numel() == len(dataset), "every item is encoded exactly once across ranks"
    perm = torch.argsort(all_i)
    timing = {"seconds": seconds, "images_per_s": len(indices) / max(seconds, 1e-9) * world, "images": len(dataset)}
    return all_f[perm].cpu(), all_y[perm].cpu().long(), timing


def save_features(path: str | Path, features: torch.Tensor, labels: torch.Tensor, key: str) -> None:
    """Cache features next to a run (safetensors); `key` identifies encoder + data so a stale cache is never reused."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"features": features.contiguous(), "labels": labels.contiguous()}
    write_replacing(path, lambda tmp: save_file(state, str(tmp), metadata={"key": key}))


def load_features(path: str | Path, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached `(features, labels)` if `path` exists and was written for `key`, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
    data = load_file(str(path))
    return data["features"], data["labels"]


def cache_key(encoder: nn.Module, paths: list[str], image_size: int) -> str:
    """A short hash of the encoder's weights, the file list and the image size."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).to(torch.float32).numpy().tobytes()[:4096])
        h.update(str(float(t.detach().float().sum())).encode())
    for p in paths:
        h.update(os.fsencode(p))  # a name that is not UTF-8 hashes as its bytes
    h.update(str(image_size).encode())
    return h.hexdigest()[:32]
