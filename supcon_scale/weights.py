"""Weights on disk: safetensors and tensors-only `torch.save` files read with one-line errors naming the file, and a
state dict checked against a module (missing, unexpected, mis-shaped or narrowed keys) before it loads.

Checkpoints (checkpoint.py), the exported encoder (export.py) and the distillation teacher read weights through here.
Nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file


def encoder_state(model_state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    """The encoder's entries of a full SupConModel state dict, with the `encoder.` prefix removed (only the online
    encoder's: a sibling's are under `momentum.module.encoder.`, `ema.module.encoder.`, which `prefix` can name)."""
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}


def first_nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding NaN or inf, or None."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_tensors(path: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a corrupt, truncated or foreign file is a one-line ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' SafetensorError (bad header, too large, truncated) or an OSError
        raise ValueError(f"{source or path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def load_weights(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a `torch.save` file of tensors only (never an arbitrary pickle)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path, f"{key}: {path}")
    state = load_torch(path, f"{key}:")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key}: {path} does not hold a state dict of tensors")
    return state


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
    # A cast tensor (int64 weights, f16 where f32 was saved) would load silently, rounded or truncated; a wider
    # float than the module's (fp32 masters into a bf16 module) is fine.
    dtypes = [
        f"{k} {str(state[k].dtype).removeprefix('torch.')} vs {str(own[k].dtype).removeprefix('torch.')}"
        for k in own
        if k in state and not _dtype_fits(state[k].dtype, own[k].dtype)
    ]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}")
        if dtypes:
            parts.append(f"dtype mismatch {'; '.join(dtypes[:5])}{' ...' if len(dtypes) > 5 else ''}")
        raise ValueError(f"checkpoint {source} does not fit this model: {' | '.join(parts)}")


def _dtype_fits(saved: torch.dtype, own: torch.dtype) -> bool:
    """Whether a tensor saved as `saved` loads into one of dtype `own` without losing what it holds."""
    if saved == own:
        return True
    if saved.is_floating_point and own.is_floating_point:
        return saved.itemsize > own.itemsize
    return False


def load_torch(path: Path, what: str = "checkpoint") -> Any:
    """A `torch.save` file of tensors and primitives (`weights_only`); anything else is a one-line ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: never fall back to unsafe loading
        raise ValueError(f"{what} {path}: refused to load ({str(exc).splitlines()[0]})") from None
