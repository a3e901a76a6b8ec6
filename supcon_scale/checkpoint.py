"""Atomic, resumable checkpoints, and the `Checkpointer` that saves and resumes a run.

A checkpoint is a directory `OUT/checkpoints/step_XXXXXXXX/` that becomes visible only when complete: every file
is written into `.tmp-step_XXXXXXXX/`, fsynced, and the directory renamed; `meta.json` is written last, so a
directory without it is never picked (the rule of PyTorch's distributed checkpoint and torchtitan). Loading never
unpickles arbitrary objects: tensors live in safetensors or `torch.load(weights_only=True)` files, the rest is JSON.

    model.safetensors     full model state (encoder + head); the encoder is stored once, here (its metadata names
                          it; `export.encoder_from_export` reads it; older checkpoints' encoder.safetensors too)
    train_state.pt        optimizer, scheduler, scaler
    rank_<r>.pt           that rank's RNG states and data position
    meta.json             step, epoch, run id, resolved config, loss convention, world size, engine

Every file carries the run id and step of meta.json (the weights in their safetensors metadata, the others in a
"checkpoint" entry): a file copied in from another step or run is refused, naming it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from supcon_scale import averaging, distributed
from supcon_scale.config import RunConfig, RunView
from supcon_scale.config import save as write_config
from supcon_scale.console import console
from supcon_scale.data import Resumable
from supcon_scale.files import OutDirLock, check_lock_held, fsync, new_file, take_lock, write_replacing
from supcon_scale.hooks import Hook, StatefulHook, StepInfo
from supcon_scale.resilience import NonFiniteError, Preempted, PreemptionHandler
from supcon_scale.weights import check_matching, encoder_state, first_nonfinite, load_tensors, load_torch

if TYPE_CHECKING:  # the types only: objectives/teacher.py imports this module, and engines/ would pull in timm
    from supcon_scale.engines import Engine
    from supcon_scale.objectives import Objective

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
# Bounds of meta.json's counters: far beyond any real run, well inside what the loader's arithmetic handles.
MAX_STEP = 10**9
MAX_WORLD = 2**20


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
    *,
    rank_extra: dict[str, Any] | None = None,
    before_commit: Callable[[Path], None] | None = None,
    run_id: str | None = None,
) -> Path:
    """Collective: every rank calls it. Rank 0 writes the shared files, each rank its own RNG and data position
    (plus `rank_extra`); `before_commit(tmp_dir)` runs on every rank once all files but `meta.json` are written.
    Every file is tagged with `run_id` (a new one when None) and `step`."""
    rank, world = distributed.world()
    tag = {"run_id": str(distributed.broadcast_object(run_id or uuid.uuid4().hex)), "step": step}
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    # Diverged weights are never saved over good checkpoints (nor exported): every rank stops with the same error.
    bad = first_nonfinite(engine_state["model"]) if rank == 0 else None
    bad = distributed.broadcast_object(bad)
    if bad is not None:
        raise NonFiniteError(f"step {step}: model weight {bad} holds NaN or inf; not saving it over {root}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if root.is_symlink():
            raise ValueError(f"out_dir: {root} is a symbolic link; refusing to write checkpoints through it")
        _remove(tmp)  # a stale attempt, or a planted link (the link goes, its target stays)
        tmp.mkdir()  # a directory this run created: nothing inside it can be a planted link
    distributed.barrier()
    _save_torch(
        {"rng": rng_state(), "data": data_state, **(rank_extra or {}), "checkpoint": tag}, tmp / f"rank_{rank}.pt"
    )
    distributed.barrier()
    if rank == 0:
        _write_shared(tmp, engine_state, config["model"], tag)
    if before_commit is not None:
        before_commit(tmp)
    distributed.barrier()
    if rank == 0:
        meta = {
            "step": step,
            "epoch": epoch,
            "world_size": world,
            "run_id": tag["run_id"],
            "engine": config["engine"]["name"],
            "loss": config["loss"],
            "config": config,
            "time": time.time(),
            **(extra_meta or {}),
        }
        _commit(tmp, final, meta, keep_last)
    distributed.barrier()
    return final


def _write_shared(tmp: Path, engine_state: dict[str, Any], model_cfg: dict[str, Any], tag: dict[str, Any]) -> None:
    """Rank 0's part of a save: the weights (tagged, with the encoder's name) and the optimizer state."""
    # The encoder's name in the weights' metadata: export.encoder_from_export reads it (stored once).
    names = {"encoder": str(model_cfg["encoder"]), "cifar_stem": str(int(model_cfg.get("cifar_stem", False)))}
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in engine_state["model"].items()},
        str(tmp / "model.safetensors"),
        metadata={**names, "run_id": tag["run_id"], "step": str(tag["step"])},
    )
    fsync(tmp / "model.safetensors")
    train_state = {k: engine_state.get(k) for k in ("optimizer", "scheduler", "scaler")}
    _save_torch({**train_state, "checkpoint": tag}, tmp / "train_state.pt")


def _commit(tmp: Path, final: Path, meta: dict[str, Any], keep_last: int) -> None:
    """`meta.json` last, then the rename that makes the checkpoint visible, and the purge of older ones."""
    new_file(tmp / META, lambda p: p.write_text(json.dumps(meta, indent=2)))
    _remove(final)  # a re-save of the same step (e.g. after a restart) replaces the old one
    os.replace(tmp, final)
    fsync(final.parent)
    _purge(final.parent, keep_last)


def load(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint directory: (meta, engine_state, this rank's {"rng", "data"} or None if not saved)."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"train.resume: {path} is not a complete checkpoint directory (no {META})")
    meta = read_meta(path)
    weights = path / "model.safetensors"
    engine_state = {"model": load_tensors(weights)}
    bad = first_nonfinite(engine_state["model"])
    if bad is not None:
        raise ValueError(f"train.resume: {path / 'model.safetensors'}: tensor {bad} holds NaN or inf")
    try:
        with safe_open(str(weights), framework="pt") as f:
            check_identity(weights, f.metadata() or {}, meta)
    except ValueError:
        raise
    except Exception as exc:  # safetensors' SafetensorError
        raise ValueError(
            f"checkpoint {weights}: not a readable safetensors file ({str(exc).splitlines()[0]})"
        ) from None
    engine_state.update(_load_part(path / "train_state.pt", ("optimizer", "scheduler"), meta))
    rank, _ = distributed.world()
    rank_file = path / f"rank_{rank}.pt"
    rank_state = _load_part(rank_file, ("rng", "data"), meta) if rank_file.is_file() else None
    return meta, engine_state, rank_state


def check_identity(path: Path, tag: dict[str, Any], meta: dict[str, Any]) -> None:
    """A one-line ValueError when the file `path`, tagged `tag`, belongs to another checkpoint than `meta`
    (another step or run); files of checkpoints written before the tags pass."""
    if "run_id" not in meta:
        return
    if "run_id" not in tag:
        raise ValueError(f"checkpoint {path}: carries no run id and step; a file copied in from an older checkpoint?")
    got = (str(tag.get("run_id")), str(tag.get("step")))
    if got != (str(meta["run_id"]), str(meta["step"])):
        raise ValueError(
            f"checkpoint {path}: belongs to step {got[1]} of run {got[0]}, but its meta.json to step {meta['step']} "
            f"of run {meta['run_id']}; a file copied in from another checkpoint?"
        )


def check_zip(path: Path) -> None:
    """A cheap check of a `torch.save` file: its zip directory is readable (a truncated file's is not)."""
    try:
        with zipfile.ZipFile(path):
            pass
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path.name} is not a readable torch.save file ({exc})") from None


def _load_part(path: Path, needed: tuple[str, ...], meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `.pt` file: a mapping holding `needed`, of this checkpoint (one-line errors otherwise)."""
    state = load_torch(path)
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise ValueError(f"checkpoint {path}: not a mapping with {', '.join(needed)}; not a supcon_scale file?")
    check_identity(path, state.pop("checkpoint", None) or {}, meta)
    return state


def _count(meta: dict[str, Any], name: str, lo: int, hi: int, source: Path) -> int:
    value = meta.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"checkpoint {source}: {name}={str(value)[:60]} is not an integer in [{lo}, {hi}]")
    return value


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json, checked: step and epoch non-negative integers within bounds, world_size >= 1, the
    config a mapping with a model section; anything else is a one-line ValueError naming the file."""
    source = Path(path) / META if Path(path).is_dir() else Path(path)
    try:
        meta = json.loads(source.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"checkpoint {source}: not readable JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {source}: holds a {type(meta).__name__}, not a JSON object")
    _count(meta, "step", 0, MAX_STEP, source)
    _count(meta, "epoch", 0, MAX_STEP, source)
    _count(meta, "world_size", 1, MAX_WORLD, source)
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("loss"), dict):
        raise ValueError(f"checkpoint {source}: 'config' is not a mapping with model and loss sections")
    return meta


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _purge(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and stale temporary directories."""
    done = sorted(p for p in root.iterdir() if is_complete(p))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _save_torch(obj: Any, path: Path) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: a full disk surfaces as the OSError behind torch's RuntimeError
            torch.save(obj, f)

    new_file(path, write)


def check_fresh_start(out_dir: str | Path, resume: str | None, newest: Path | None = None) -> None:
    """Refuse to start a new run (`resume` None) in an `out_dir` that holds checkpoints; a read, no write, so the
    CLI runs it before the data scan or anything else touches `out_dir`."""
    newest = latest(out_dir) if newest is None else newest
    if resume is None and newest is not None:
        # Starting over here would interleave two runs' checkpoints (and keep_last would prune the new ones).
        raise ValueError(
            f"out_dir: {out_dir} already holds checkpoints (newest {newest.name}); set "
            "train.resume=auto to continue that run, or choose another out_dir"
        )


# ---------------------------------------------------------------------------------------------------------------
# The trainer's checkpointing component: resume, cadence, the preemption save, the exported encoder


class Checkpointer(Hook):
    """Decides when a run saves and restores it: every `train.checkpoint_every_steps`, at each epoch's end, at the
    end of the run and when a preemption signal arrives (then it raises `Preempted` once the save is complete).

    `engine`, `loader` and `objective` are the run's parts whose state a checkpoint holds; `hooks` may add files to
    each save (`Hook.on_save`). A hook itself, called after the others (a preemption ends the step with `Preempted`).
    Use it as a context manager: the preemption signal handler and the out_dir lock live as long as the block.
    """

    def __init__(
        self,
        cfg: RunView,
        ctx: distributed.Context,
        engine: Engine,
        loader: Resumable,
        objective: Objective,
        hooks: Sequence[Hook],
    ) -> None:
        self.cfg, self.ctx, self.engine, self.loader, self.objective = cfg, ctx, engine, loader, objective
        self.hooks = hooks
        self.out_dir = Path(cfg.out_dir)
        self.newest = latest(self.out_dir)
        self.run_id: str | None = None  # the run's id, tagged on every checkpoint file (kept across resumes)
        self.saved_step = -1
        self.preemption = PreemptionHandler(cfg.train.preempt_signal)
        self.lock = OutDirLock(self.out_dir) if ctx.is_main else None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.preemption.close()
        self.release()

    def release(self) -> None:
        """Give up the out_dir lock (the main rank's); a later trainer then starts without any takeover."""
        if self.lock is not None:
            self.lock.release()

    def resume(self) -> tuple[int, int]:
        """Restore engine, data position, RNG and objective state per `train.resume`; returns (step, epoch).

        Writes the resolved `config.yaml` only once the run is known to be allowed in `out_dir`.
        """
        take_lock(self.lock)
        try:
            return self._resume()
        except BaseException:
            self.release()
            raise

    def _resume(self) -> tuple[int, int]:
        from supcon_scale import resume  # beside this module: which checkpoint, and what a resume may change

        # The main rank picks (a damaged newest is skipped with a warning) and every rank resumes from its pick.
        path = resume.resolve(self.out_dir, self.cfg.train.resume) if self.ctx.is_main else None
        path = distributed.broadcast_object(path)
        check_fresh_start(self.out_dir, None if path is None else str(path), self.newest)
        if path is None:
            if self.ctx.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_replacing(self.out_dir / "config.yaml", lambda tmp: write_config(self.cfg, tmp))
            self.run_id = str(distributed.broadcast_object(uuid.uuid4().hex))
            self.loader.set_epoch(0)
            return 0, 0
        # Every refusal comes before anything is written: the config, the files, the shapes, the states.
        if not is_complete(Path(path)):
            raise ValueError(f"train.resume: {path} is not a complete checkpoint directory (no {META})")
        accepted = self.check_resume(read_meta(path), Path(path))
        meta, engine_state, rank_state = load(path)
        saved_world = int(meta["world_size"])
        own = self.engine.unwrapped().state_dict()
        engine_state["model"] = averaging.fill_missing(engine_state["model"], own)  # an accepted sibling change
        check_matching(own, engine_state["model"], str(path))
        step, epoch = int(meta["step"]), int(meta["epoch"])
        if any(k.startswith("optim.") for k in accepted):
            resume.fresh_optimizer(engine_state, self.engine.state_dict())
        # The data position is global (samples consumed of the epoch's order), the same in every rank's file: a
        # rank the saving job did not have reads rank 0's, and the loader re-shards the rest of the epoch.
        data_state = (rank_state or _load_part(Path(path) / "rank_0.pt", ("rng", "data"), meta))["data"]
        try:
            self.loader.load_state_dict(data_state)
        except ValueError as exc:
            raise ValueError(f"train.resume: {path}: {exc}") from None
        self._restore_hooks(data_state, Path(path))
        try:
            self.engine.load_state_dict(engine_state)  # optimizer state re-partitioned by the engine on another world
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(
                f"train.resume: {path}: its optimizer state does not fit this run's optim.name={self.cfg.optim.name} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            self.objective.load_rank_state(rank_state.get("objective", {}))
        else:
            # A rank new to the job has no streams to continue: fresh ones from (seed, rank, step), so new ranks
            # differ from each other and from a run started afresh. The objective's streams start from its seed.
            distributed.seed_everything(distributed.rank_seed(self.cfg.seed, self.ctx.rank, step))
        self.saved_step = step
        self.run_id = str(meta.get("run_id") or distributed.broadcast_object(uuid.uuid4().hex))
        if self.ctx.is_main:  # accepted: now the writes (the abandoned lineage aside, the config and its history)
            resume.check_folders(self.out_dir)
            resume.set_aside(self.out_dir, Path(path), step)
            resume.record(self.out_dir, self.cfg, meta, accepted)
        distributed.barrier()
        self.newest = latest(self.out_dir)
        world = self.ctx.world_size
        moved = "" if saved_world == world else f" (saved by {saved_world} ranks, now {world})"
        console.print(f"resumed from {path} at step {step}, epoch {epoch}{moved}")
        return step, epoch

    def check_resume(self, meta: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
        """Refuse a checkpoint this run cannot continue (a one-line ValueError naming the keys); returns the accepted
        config changes. The training run's rules are resume.py's; another kind of run (continual) overrides it."""
        from supcon_scale import resume

        assert isinstance(self.cfg, RunConfig), "a run of another kind overrides check_resume"
        return resume.check_changes(meta, self.cfg, path)

    def _stateful(self) -> list[StatefulHook]:
        return [hook for hook in self.hooks if isinstance(hook, StatefulHook)]

    def _restore_hooks(self, data_state: dict[str, Any], path: Path) -> None:
        """Each stateful hook's state, saved beside the data position (`save`)."""
        for hook in self._stateful():
            if hook.state_key not in data_state:
                raise ValueError(f"train.resume: {path}: holds no {hook.state_key} state for this run's hooks")
            hook.load_state_dict(data_state[hook.state_key])

    def on_step(self, info: StepInfo) -> None:
        """The cadence: a preemption save (then `Preempted`), the periodic save, and the epoch-end / final save."""
        if self.preemption.requested(self.ctx.device):
            self.save(info.step, info.epoch)
            raise Preempted(f"preempted at step {info.step}; checkpoint {self.newest}", info.step, str(self.newest))
        every = self.cfg.train.checkpoint_every_steps
        if (every and info.step % every == 0) or info.epoch_end or info.last:
            self.save(info.step, info.epoch)

    def save(self, step: int, epoch: int) -> None:
        """Collective: write the checkpoint of `step` (once per step, however many reasons ask for it)."""
        if step == self.saved_step:
            return
        check_lock_held(self.lock, self.out_dir, f"stopping without saving step {step}")

        def before_commit(tmp: Path) -> None:
            for hook in self.hooks:
                hook.on_save(step, tmp)

        self.newest = save(
            self.out_dir,
            step,
            epoch,
            self.engine.state_dict(),
            self.cfg.to_dict(),
            {**self.loader.state_dict(), **{hook.state_key: hook.state_dict() for hook in self._stateful()}},
            self.cfg.train.keep_last,
            extra_meta={"loss_convention": self.objective.convention()},
            rank_extra={"objective": self.objective.rank_state()},
            before_commit=before_commit,
            run_id=self.run_id,
        )
        self.saved_step = step

    def export(self) -> Path | None:
        """Write the newest checkpoint's encoder to `out_dir/encoder.safetensors` with its construction arguments,
        and `out_dir/encoder_timm/` (timm's `local-dir:` layout, export.py), on the main rank; its path, or None.
        With EMA weights (`train.ema_decay`) their encoder goes to `out_dir/encoder_ema.safetensors` too."""
        if self.newest is None:
            return None
        path = self.out_dir / "encoder.safetensors"
        if self.ctx.is_main:
            from supcon_scale import export  # export.py reads meta.json through this module

            weights = load_tensors(self.newest / "model.safetensors")
            meta = export.metadata_from_config(self.cfg.to_dict())
            export.export_encoder(encoder_state(weights), path, meta)
            export.write_timm_folder(path, self.out_dir / export.TIMM_FOLDER)
            ema = encoder_state(weights, "ema.module.encoder.")  # train.ema_decay: the EMA weights' encoder
            if ema:
                export.export_encoder(ema, self.out_dir / export.EMA_FILE, meta)
        return path
