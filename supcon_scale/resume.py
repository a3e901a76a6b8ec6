"""What a resume continues from and what it may change.

- Which checkpoint: `train.resume=auto` takes the newest complete checkpoint of `out_dir/checkpoints/` that is not
  damaged (a damaged one is skipped with a warning naming it). A resume from an older checkpoint moves the newer
  ones, which that lineage abandoned, to `checkpoints/abandoned/`, so a later `auto` continues the run that went on.
- What may change: the run's resolved config is compared with the checkpoint's. A key that changes what is trained
  is refused by name unless `train.allow_changes` lists it (or its section); keys in FREE cannot change what is
  trained and pass. Every accepted change is printed and kept: `config_history/` holds each replaced config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from supcon_scale import checkpoint, config
from supcon_scale.console import console
from supcon_scale.distributed import flatten
from supcon_scale.files import write_replacing, write_text

# Keys that cannot change what is trained: where and how the run reports, saves and feeds itself.
FREE = (
    "out_dir", "device", "log", "train.log_every", "train.checkpoint_every_steps", "train.keep_last",
    "train.resume", "train.allow_changes", "train.max_bad_steps", "train.compile", "train.knn_every_epochs",
    "train.preempt_signal", "train.progress", "train.profile_steps", "data.workers", "data.dali_threads",
    "data.hw_decoder_load", "data.manifest", "data.on_bad_file", "data.eval_crop", "model.channels_last",
    "model.activation_checkpointing", "model.init_from", "engine.backend",
)  # fmt: skip
HISTORY = "config_history"
ABANDONED = "abandoned"


def under(key: str, names: tuple[str, ...] | list[str]) -> bool:
    """Whether `key` is one of `names` or inside one of them (a section)."""
    return any(key == n or key.startswith(n + ".") for n in names)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def changes(saved: Mapping[str, Any], cfg: config.RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, this run's)} for every key of the schema whose value differs; a key the
    checkpoint predates counts as its default."""
    old = {**flatten(config.RunConfig().to_dict()), **flatten(saved)}
    new = flatten(cfg.to_dict())
    return {k: (old.get(k), v) for k, v in new.items() if json.dumps(old.get(k)) != json.dumps(v)}


def check_changes(meta: Mapping[str, Any], cfg: config.RunConfig, source: Path) -> dict[str, tuple[Any, Any]]:
    """The accepted changes of resuming `cfg` from the checkpoint `source`; a change of what is trained that
    `train.allow_changes` does not list is a one-line ValueError naming every such key (nothing written yet)."""
    found = changes(meta["config"], cfg)
    allowed = config.allowed_changes(cfg.train.allow_changes)
    refused = [k for k in found if not under(k, FREE) and not under(k, allowed)]
    if refused:
        listed = ", ".join(f"{k} {_shown(found[k][0])} -> {_shown(found[k][1])}" for k in refused)
        raise ValueError(
            f"train.resume: {source} was trained with another config: {listed}; these change what is trained (the "
            f"schedule, the model, the data or the maths): list them in train.allow_changes={','.join(refused)} "
            "to continue anyway, or start a new out_dir"
        )
    if cfg.engine.name == "deepspeed" and any(k.startswith("optim.") for k in found):
        raise ValueError(
            f"train.allow_changes: changing {', '.join(k for k in found if k.startswith('optim.'))} on resume is not "
            "supported with engine.name=deepspeed (its optimizer state is partitioned); start a new out_dir"
        )
    return found


def fresh_optimizer(saved: dict[str, Any], fresh: dict[str, Any]) -> None:
    """After an accepted optim.* change: this run's freshly built optimizer (its hyperparameters, no momentum) in
    place of the saved one, and the schedule's saved position over this run's base learning rates (torch's
    optimizer and LRScheduler state-dict formats; LambdaLR: lr = initial_lr x lambda(step))."""
    old_opt, new_opt = saved["optimizer"], fresh["optimizer"]
    old_groups, new_groups = old_opt.get("param_groups", []), new_opt.get("param_groups", [])
    if len(old_groups) == len(new_groups):
        for old, new in zip(old_groups, new_groups, strict=True):
            if old.get("initial_lr") and new.get("initial_lr") and "lr" in old:
                new["lr"] = new["initial_lr"] * old["lr"] / old["initial_lr"]
    sched = dict(fresh["scheduler"])
    for k in ("last_epoch", "_step_count"):
        if k in saved["scheduler"]:
            sched[k] = saved["scheduler"][k]
    if "_last_lr" in sched:
        sched["_last_lr"] = [g["lr"] for g in new_groups]
    saved["optimizer"], saved["scheduler"] = new_opt, sched


def check_folders(out_dir: Path) -> None:
    """Refuse a link (or a file) planted where a resume writes a folder: it would be followed."""
    for folder in (out_dir / HISTORY, checkpoint.checkpoint_root(out_dir) / ABANDONED):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise ValueError(f"out_dir: {folder} is a link or a file, not a folder; refusing to write through it")


def record(out_dir: Path, cfg: config.RunView, meta: Mapping[str, Any], found: Mapping[str, tuple]) -> None:
    """Main rank, once the resume is accepted: print each change, keep the replaced config in config_history/,
    then write the current config.yaml."""
    step = int(meta["step"])
    if found:
        lines = [f"{k}: {_shown(old)} -> {_shown(new)}" for k, (old, new) in found.items()]
        for line in lines:
            console.print(f"config change from step {step + 1}: {line}")
        header = "".join(f"# from step {step + 1} on: {line}\n" for line in lines)
        body = yaml.safe_dump(meta["config"], sort_keys=False)
        history = out_dir / HISTORY
        history.mkdir(exist_ok=True)
        write_text(history / f"until_step_{step:08d}.yaml", f"# the resolved config of steps 1-{step}\n{header}{body}")
    write_replacing(out_dir / "config.yaml", lambda tmp: config.save(cfg, tmp))


# ---------------------------------------------------------------------------------------------------------------
# Which checkpoint


def damage(path: Path) -> str | None:
    """Why the complete checkpoint `path` cannot be resumed, from cheap reads (meta.json, the weights' header, the
    files' presence and zip directories), or None."""
    try:
        meta = checkpoint.read_meta(path)
        for name in ("model.safetensors", "train_state.pt", "rank_0.pt"):
            if not (path / name).is_file():
                return f"{name} is missing"
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            tag = f.metadata() or {}
        checkpoint.check_identity(path / "model.safetensors", tag, meta)
        for rank_file in sorted(path.glob("*.pt")):
            checkpoint.check_zip(rank_file)
    except ValueError as exc:
        return str(exc)
    except Exception as exc:  # safetensors' SafetensorError: a corrupt or truncated header
        return f"model.safetensors is not readable ({str(exc).splitlines()[0]})"
    return None


def resolve(out_dir: str | Path, resume: str | None, quiet: bool = False) -> Path | None:
    """The checkpoint `train.resume` names: None (a fresh start), the path given, or for `auto` the newest
    complete, undamaged checkpoint of `out_dir` (each damaged newer one skipped with a warning naming it)."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    root = checkpoint.checkpoint_root(out_dir)
    done = sorted((p for p in root.iterdir() if checkpoint.is_complete(p)), reverse=True) if root.is_dir() else []
    for path in done:
        problem = damage(path)
        if problem is None:
            return path
        if not quiet:
            console.print(f"[yellow]warning[/] checkpoint {path} is damaged ({problem}); trying the previous one")
    if done:
        raise ValueError(f"train.resume=auto: every checkpoint in {root} is damaged (newest {done[0].name})")
    return None


def set_aside(out_dir: str | Path, resumed: Path, step: int) -> Path | None:
    """Main rank, at a resume from `resumed` (step `step`): move this out_dir's newer checkpoints, abandoned by
    the lineage that goes on from here, to checkpoints/abandoned/; the folder, or None when there were none."""
    root = checkpoint.checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    newer = [p for p in root.iterdir() if checkpoint.STEP_DIR.match(p.name) and int(p.name[5:]) > step]
    newer = [p for p in newer if p.resolve() != Path(resumed).resolve()]
    if not newer:
        return None
    folder = root / ABANDONED / f"after_step_{step:08d}_{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True)
    for p in sorted(newer):
        p.rename(folder / p.name)
    console.print(
        f"resumed from step {step}: moved the newer checkpoints of the abandoned lineage "
        f"({', '.join(p.name for p in sorted(newer))}) to {folder}"
    )
    return folder
