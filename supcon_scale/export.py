"""The exported encoder: a timm state dict that records how to rebuild itself, and a timm `local-dir:` folder.

`encoder.safetensors` holds the encoder's tensors (`timm.create_model(architecture, num_classes=0, **kwargs)`
accepts them) and, in its safetensors metadata (strings only), the construction arguments:

    encoder        timm architecture name
    cifar_stem     "1" for the 3x3 stride-1 stem without max-pool (ResNets), else "0"
    kwargs         JSON object of the keyword arguments passed to timm.create_model (img_size, patch_size, ...)
    input_size     JSON [C, H, W] the encoder was trained at
    mean, std      JSON per-channel normalisation of its inputs
    num_features   width of the pooled feature vector

An export written before these keys existed holds only `encoder` and `cifar_stem`; it still loads (kwargs empty,
input size from the run's config). Beside the run's `encoder.safetensors` the run writes `encoder_timm/`:
`config.json` (timm's own `save_config_for_hf`: architecture, model_args, input size, mean/std, num_features) and
`model.safetensors`, which `timm.create_model("local-dir:PATH", pretrained=True, num_classes=0)` loads offline.
`encoder_from_export` is the one way every tool here rebuilds an encoder; it never fetches anything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from supcon_scale.checkpoint import read_meta
from supcon_scale.console import warn
from supcon_scale.files import write_replacing
from supcon_scale.models import create_encoder, fixed_size_kwargs
from supcon_scale.resilience import NonFiniteError
from supcon_scale.weights import first_nonfinite, load_matching, load_tensors

ENCODER_FILE = "encoder.safetensors"
EMA_FILE = "encoder_ema.safetensors"  # the EMA weights' encoder (`train.ema_decay`), in the same format
TIMM_FOLDER = "encoder_timm"


def encoder_metadata(
    architecture: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    cifar_stem: bool = False,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    num_features: int | None = None,
) -> dict[str, str]:
    """The construction arguments as safetensors metadata (every value a string); `num_features` is measured on a
    meta-device build when not given."""
    kwargs = dict(kwargs or {})
    if num_features is None:
        with torch.device("meta"):  # no memory, no initialisation cost: only the width is read
            num_features = int(create_encoder(architecture, cifar_stem, kwargs=kwargs).num_features)
    meta = {"encoder": architecture, "cifar_stem": str(int(cifar_stem)), "kwargs": json.dumps(kwargs, sort_keys=True)}
    meta["num_features"] = str(int(num_features))
    if image_size is not None:
        meta["input_size"] = json.dumps([3, int(image_size), int(image_size)])
    if mean is not None and std is not None:
        meta["mean"], meta["std"] = json.dumps([float(m) for m in mean]), json.dumps([float(s) for s in std])
    return meta


def names_export(encoder: str) -> bool:
    """Whether a config's encoder entry is a path to an export (the continual learner may start from one)."""
    return encoder.endswith(".safetensors") or "/" in encoder


def metadata_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    """The construction arguments of a run's encoder from its resolved config (`RunConfig.to_dict()`, or a
    continual run's: its mean/std sit in `data`, its encoder may be an export or the non-timm reduced_resnet18)."""
    model, data = config["model"], config["data"]
    name, cifar_stem = model["encoder"], bool(model.get("cifar_stem", False))
    if names_export(name):  # the architecture the export records
        return read_metadata(Path(name) / ENCODER_FILE if Path(name).is_dir() else name)
    if not timm.is_model(name):  # an encoder of this package's own (reduced_resnet18): its name only
        return {"encoder": name, "cifar_stem": str(int(cifar_stem))}
    size = int(data["image_size"])
    norm = data.get("augment", data)
    return encoder_metadata(
        name,
        kwargs=fixed_size_kwargs(name, model.get("kwargs") or {}, size),
        cifar_stem=cifar_stem,
        image_size=size,
        mean=norm.get("mean"),
        std=norm.get("std"),
    )


def export_encoder(encoder: nn.Module | dict[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write the encoder (a module or its state dict) as a timm state dict with its construction `metadata`."""
    path = Path(path)
    if isinstance(encoder, nn.Module):
        encoder = encoder.state_dict()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.items()}
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteError(f"refusing to export {path}: the encoder's {bad} holds NaN or inf")
    meta = dict(metadata)
    return write_replacing(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported encoder file; a missing, unreadable or foreign file is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: no encoder at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' SafetensorError: a corrupt, truncated or huge header
        raise ValueError(f"checkpoint {path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if "encoder" not in meta:
        raise ValueError(f"checkpoint {path}: no 'encoder' name in its metadata; was it written by supcon_scale?")
    return meta


def _json(meta: Mapping[str, str], key: str, kind: type, source: Path) -> Any:
    """One JSON-valued metadata entry, checked: a foreign or edited file names itself and the key."""
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        value = None
    if not isinstance(value, kind):
        raise ValueError(f"checkpoint {source}: metadata {key!r} is not a JSON {kind.__name__}: {meta[key][:80]!r}")
    return value


def input_size(meta: Mapping[str, str]) -> int | None:
    """The side of the square input the encoder was trained at, when its export records it."""
    return int(json.loads(meta["input_size"])[-1]) if "input_size" in meta else None


def _encoder_file(path: Path) -> tuple[Path, dict[str, str]]:
    """The encoder file of an export path (a file, a run directory, a checkpoint directory) and its metadata.

    A checkpoint directory without `encoder.safetensors` rebuilds from its `model.safetensors` and `meta.json`."""
    if path.is_dir() and not (path / ENCODER_FILE).is_file() and (path / "model.safetensors").is_file():
        return path / "model.safetensors", metadata_from_config(read_meta(path)["config"])
    path = path / ENCODER_FILE if path.is_dir() else path
    return path, read_metadata(path)


def encoder_file(path: str | Path) -> tuple[Path, dict[str, str]]:
    """The file holding an export's encoder weights (`encoder.safetensors`, or a checkpoint's `model.safetensors`),
    what `model.init_from` of a fine-tuning run names, and the construction arguments it records."""
    return _encoder_file(Path(path))


def encoder_from_export(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """The encoder an export describes, with its weights, in eval mode, and the export's metadata.

    `path`: an `encoder.safetensors` file (or `encoder_ema.safetensors`, the EMA weights), or a run or checkpoint
    directory holding one (a directory means its `encoder.safetensors`: the online weights)."""
    path = Path(path)
    file, meta = _encoder_file(path)
    kwargs = _json(meta, "kwargs", dict, file) if "kwargs" in meta else {}
    try:
        encoder = create_encoder(meta["encoder"], meta.get("cifar_stem") == "1", f"checkpoint {file}", kwargs)
    except TypeError as exc:  # a keyword argument the architecture does not take (an edited or foreign file)
        raise ValueError(f"checkpoint {file}: metadata 'kwargs' does not build {meta['encoder']} ({exc})") from None
    state = load_tensors(file)
    if file.name == "model.safetensors":  # the full model of a checkpoint: its encoder's entries
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    bad = first_nonfinite(state)
    if bad is not None:
        raise ValueError(f"checkpoint {file}: tensor {bad} holds NaN or inf (a diverged run?)")
    load_matching(encoder, state, str(file))
    return encoder.eval(), meta


def write_timm_folder(encoder_file: str | Path, folder: str | Path) -> Path | None:
    """Write `folder/model.safetensors` and `folder/config.json` (timm's `save_config_for_hf` layout) for the
    exported encoder; None, with a warning, for a CIFAR-stem ResNet (timm has no argument that builds that stem)."""
    from timm.models._hub import save_config_for_hf

    encoder, meta = encoder_from_export(encoder_file)
    folder = Path(folder)
    if meta.get("cifar_stem") == "1":
        warn(f"{folder}: not written; timm cannot rebuild a CIFAR-stem encoder from a config (use {encoder_file})")
        return None
    if folder.is_symlink():
        raise ValueError(f"out_dir: {folder} is a symbolic link; refusing to write the timm export through it")
    folder.mkdir(parents=True, exist_ok=True)
    data_config: dict[str, Any] = {}
    if "input_size" in meta:
        data_config["input_size"] = tuple(json.loads(meta["input_size"]))
    if "mean" in meta and "std" in meta:
        data_config["mean"], data_config["std"] = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    # The weights are this run's, not those of the architecture's default pretrained tag and licence.
    model_config = {"pretrained_cfg": {"tag": "supcon_scale", "license": None}}
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    write_replacing(folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    # config.json last: a folder with it is complete (as meta.json in a checkpoint)
    write_replacing(
        folder / "config.json",
        lambda tmp: save_config_for_hf(encoder, str(tmp), model_config=model_config, data_config=data_config),
    )
    return folder
