"""One continual run (a method and a seed): the stream's steps, the replay memory, evaluation after every task,
checkpoints at every task's end and every `train.checkpoint_every_steps`, and resume from any of them.

Each step: this rank's share of the global incoming batch, the drawn memory slots it holds, one update through the
engine (ddp, or deepspeed ZeRO <= 2: the training engines), then the global incoming batch offered to the
reservoir (first epoch of a task only, so that each sample is offered once). After the last step of a task the
model is scored on the test classes of every task so far: one row of the accuracy matrix.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supcon_scale import checkpoint, engines
from supcon_scale.config import OptimConfig
from supcon_scale.console import MetricsLog, TrainProgress, console
from supcon_scale.continual import config, metrics, models
from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.er import ER
from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.continual.models import wide
from supcon_scale.continual.ncm import NearestClassMean, class_sums
from supcon_scale.continual.scr import SCR
from supcon_scale.continual.stream import ClassIncrementalStream, ImageSource, build_stream, decode, load_sources
from supcon_scale.continual.views import INCOMING, MEMORY, plain_transform, sample_seed
from supcon_scale.distributed import Context, all_reduce_mean, all_reduce_sum, flatten
from supcon_scale.engines import Engine, EngineSpec
from supcon_scale.engines.spec import LR_REFERENCE_BATCH
from supcon_scale.files import write_text
from supcon_scale.resilience import Preempted, PreemptionHandler
from supcon_scale.resume import under

RESULT = "result.json"
# Keys a continual run may change when it resumes: where it writes, which runs it makes, how it saves and reports.
# Any other change (the stream's tasks, classes, order; the memory; the model, the optimizer) cannot continue.
FREE = ("out_dir", "methods", "seeds", "train", "engine.backend", "data.on_bad_file")


@dataclass(frozen=True)
class ContinualStep:
    """Handed to each hook's `on_step` after every step (the fault-injection tests raise from it)."""

    step: int  # steps done so far, this one included
    task: int
    epoch: int
    loss: torch.Tensor
    task_end: bool
    last: bool


@dataclass
class RunResult:
    method: str
    seed: int
    matrix: list[list[float | None]]  # a[i][j], None above the diagonal
    summary: dict[str, Any]
    steps: int
    seconds: float
    skipped_steps: int = 0
    classes: list[list[str]] = field(default_factory=list)  # the class names of each task

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "matrix": self.matrix,
            **self.summary,
            "steps": self.steps,
            "seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
            "tasks": self.classes,
        }


def run_dir(cfg: ContinualConfig, method: str, seed: int) -> Path:
    return Path(cfg.out_dir) / method / f"seed_{seed}"


def engine_spec(cfg: ContinualConfig, world_size: int) -> EngineSpec:
    """What the engines read of this run: the step's LR is `optim.lr` itself (no batch scaling), held constant."""
    batch = cfg.stream.batch_size + cfg.memory.batch_size
    return EngineSpec(
        engine=cfg.engine,
        optim=OptimConfig(
            name=cfg.optim.name,
            base_lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            schedule="constant",
            exclude_bn_bias=False,
        ),
        precision=cfg.precision,
        global_batch=-(-batch // world_size) * world_size,  # DeepSpeed wants train_batch_size = micro batch x ranks
        lr_batch=LR_REFERENCE_BATCH,  # the batch at which the scaling rule leaves base_lr as it is
        image_size=cfg.data.image_size,
        channels_last=cfg.model.channels_last,
        sync_bn=cfg.model.sync_bn,
    )


def fit(
    cfg: ContinualConfig,
    method: str,
    seed: int,
    ctx: Context,
    sources: tuple[ImageSource, ImageSource] | None = None,
    hooks: Sequence[Any] = (),
) -> RunResult:
    """Train `method` on the class-incremental stream of `seed` and score it after every task."""
    config.check(cfg, ctx.world_size)
    train, test = sources if sources is not None else load_sources(cfg, ctx)
    stream = build_stream(cfg, train, test, seed)
    out_dir = run_dir(cfg, method, seed)
    agent = SCR(cfg) if method == "scr" else ER(cfg)
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = models.build(cfg.model, len(train.classes) if agent.supervised_head else None)
    schedule = stream.schedule()
    engine = engines.build(engine_spec(cfg, ctx.world_size), ctx, model, len(schedule), 0)
    memory = ReservoirMemory(cfg.memory.size, seed, ctx.rank, ctx.world_size)
    step, rows = _resume(cfg, out_dir, engine, memory, ctx, method, seed)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = {**cfg.to_dict(), "loss": agent.convention(), "method": method, "seed": seed}
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=ctx.is_main)
    share = cfg.stream.batch_size // ctx.world_size
    owners = np.arange(cfg.stream.batch_size) // share
    start = time.time()
    saved = step

    def save(done: int, task: int) -> None:
        nonlocal saved
        state = {"step": done, "rows": json.dumps(rows), "memory": memory.state_dict()}
        checkpoint.save(
            out_dir,
            done,
            task,
            engine.state_dict(),
            config_dict,
            state,
            cfg.train.keep_last,
            extra_meta={"method": method, "seed": seed, "task": task, "matrix_rows": rows},
        )
        saved = done

    preemption = PreemptionHandler(cfg.train.preempt_signal)
    engine.train()
    try:
        with TrainProgress(len(schedule), step, enabled=ctx.is_main and cfg.train.progress) as progress:
            while step < len(schedule):
                task, epoch, b = schedule[step]
                ids = stream.batch(task, epoch, b)
                mine = ids[ctx.rank * share : (ctx.rank + 1) * share]
                slots = memory.draw(cfg.memory.batch_size)
                held = memory.local(slots)
                images = [train.image(int(i)) for i in mine] + [decode(memory.data[int(s)]) for s in held]
                labels = torch.from_numpy(np.concatenate([train.labels[mine], memory.labels[held]]))
                seeds = [sample_seed(seed, step, INCOMING, int(i)) for i in mine]
                seeds += [sample_seed(seed, step, MEMORY, int(memory.index[s])) for s in held]
                loss, _ = agent.step(engine, images, labels, seeds, len(mine), len(ids), len(slots))
                if epoch == 0:
                    memory.update(ids, train.labels[ids], owners, train.encoded)
                step += 1
                last = step == len(schedule)
                task_end = last or schedule[step][0] != task
                if task_end:
                    rows.append(evaluate(cfg, engine, agent, memory, stream, test, task))
                    engine.train()
                    log.write({"step": step, "task": task, "accuracy": rows[-1]})
                    if ctx.is_main:
                        seen = [f"{a:.3f}" for a in rows[-1] if a is not None]
                        console.print(
                            f"{method} seed {seed}: after task {task + 1}/{stream.num_tasks}: {' '.join(seen)}"
                        )
                if step % 10 == 0 or task_end:
                    value = all_reduce_mean(loss).item()
                    log.write({"step": step, "task": task, "epoch": epoch, "loss": value, "memory": len(memory)})
                    progress.update(step, f"{method} seed {seed} task {task + 1} loss {value:.3f}")
                every = cfg.train.checkpoint_every_steps
                if task_end or (every and step % every == 0):
                    save(step, task)
                if preemption.requested(ctx.device):
                    if saved != step:
                        save(step, task)
                    raise Preempted(
                        f"preempted at step {step} of {method} seed {seed}; checkpoint in {out_dir}",
                        step,
                        str(checkpoint.latest(out_dir)),
                    )
                info = ContinualStep(step, task, epoch, loss, task_end, last)
                for hook in hooks:
                    hook.on_step(info)
    finally:
        preemption.close()
    matrix = metrics.as_matrix(rows)
    result = RunResult(
        method,
        seed,
        rows,
        metrics.summarize(matrix),
        step,
        time.time() - start,
        engine.skipped_steps,
        [[train.classes[c] for c in t] for t in stream.tasks],
    )
    if ctx.is_main:  # the config beside the result: a later resume under another stream is refused by name
        write_text(out_dir / RESULT, json.dumps(plain_json({**result.to_dict(), "config": cfg.to_dict()}), indent=2))
    return result


def _refuse_changes(saved: dict[str, Any], cfg: ContinualConfig, source: Path) -> None:
    """A one-line ValueError naming every key that differs from `saved` (the config `source` was run with)."""
    old, new = flatten(saved), flatten(cfg.to_dict())
    found = [k for k, v in new.items() if k in old and not under(k, FREE) and json.dumps(old[k]) != json.dumps(v)]
    if found:
        listed = ", ".join(f"{k} {json.dumps(old[k])} -> {json.dumps(new[k])}" for k in found)
        raise ValueError(
            f"train.resume: {source} was run with another config: {listed}; a changed stream, memory or model "
            "cannot continue it: set these back, or choose another out_dir"
        )


def check_resumable(cfg: ContinualConfig, method: str, seed: int) -> None:
    """Before any run trains: the finished result or the checkpoint this run would continue from was made under
    this config (a 2-task result under a 5-task config, or a stream changed mid-run, is refused by name)."""
    if cfg.train.resume is None:
        return
    where = run_dir(cfg, method, seed)
    if cfg.train.resume == "auto" and (where / RESULT).is_file():
        try:
            done = json.loads((where / RESULT).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where / RESULT}: not readable JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(done, dict):
            raise ValueError(f"{where / RESULT}: not a result (a JSON object)")
        if isinstance(done.get("config"), dict):
            _refuse_changes(done["config"], cfg, where / RESULT)
        elif len(done.get("matrix") or []) != cfg.stream.tasks:  # a result written before the config was kept
            raise ValueError(
                f"train.resume: {where / RESULT} holds {len(done.get('matrix') or [])} tasks but stream.tasks="
                f"{cfg.stream.tasks}; choose another out_dir"
            )
        return
    path = checkpoint.latest(where) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is not None and checkpoint.is_complete(path):
        _refuse_changes(checkpoint.read_meta(path)["config"], cfg, path)


def plain_json(obj: Any) -> Any:
    """NaN (forgetting of a single task, an interval over one seed) as null: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    return obj


def load_result(cfg: ContinualConfig, method: str, seed: int) -> RunResult | None:
    """The finished run's result, if `run_dir` holds one."""
    path = run_dir(cfg, method, seed) / RESULT
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    summary = {
        k: d[k]
        for k in ("final_average_accuracy", "average_forgetting", "average_incremental_accuracy", "stage_accuracy")
    }
    return RunResult(
        d["method"], d["seed"], d["matrix"], summary, d["steps"], d["seconds"], d["skipped_steps"], d["tasks"]
    )


def _resume(
    cfg: ContinualConfig, out_dir: Path, engine: Engine, memory: ReservoirMemory, ctx: Context, method: str, seed: int
) -> tuple[int, list]:
    """Restore weights, optimizer, memory (slot table and this rank's bytes), RNGs and the matrix rows so far."""
    newest = checkpoint.latest(out_dir)
    if cfg.train.resume is None:
        if newest is not None:
            raise ValueError(
                f"out_dir: {out_dir} already holds checkpoints (newest {newest.name}); set train.resume=auto to "
                "continue, or choose another out_dir"
            )
        return 0, []
    path = newest if cfg.train.resume == "auto" else Path(cfg.train.resume)
    if path is None:
        return 0, []
    meta, engine_state, rank_state = checkpoint.load(path)
    _refuse_changes(meta["config"], cfg, path)
    if int(meta["world_size"]) != ctx.world_size or rank_state is None:
        # The memory's bytes are sharded by rank: another world size would lose or duplicate samples.
        raise ValueError(
            f"train.resume: {path} was saved by {meta['world_size']} ranks but this run has {ctx.world_size}; "
            f"relaunch with {meta['world_size']} ranks"
        )
    if meta.get("method") != method or meta.get("seed") != seed:
        raise ValueError(
            f"train.resume: {path} is a checkpoint of {meta.get('method')} seed {meta.get('seed')}, "
            f"not {method} seed {seed}"
        )
    checkpoint.check_matching(engine.unwrapped().state_dict(), engine_state["model"], str(path))
    engine.load_state_dict(engine_state)
    memory.load_state_dict(rank_state["data"]["memory"])
    checkpoint.set_rng_state(rank_state["rng"])
    step = int(rank_state["data"]["step"])
    if ctx.is_main:
        console.print(f"resumed {method} seed {seed} from {path} at step {step}")
    return step, json.loads(rank_state["data"]["rows"])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate(
    cfg: ContinualConfig,
    engine: Engine,
    agent: SCR | ER,
    memory: ReservoirMemory,
    stream: ClassIncrementalStream,
    test: ImageSource,
    task: int,
) -> list[float | None]:
    """Row `task` of the accuracy matrix: accuracy on each seen task's test classes (None for tasks not seen yet).

    Each rank scores every world-th test image and embeds the memory samples it holds; class sums, counts and
    correct answers are summed over ranks.
    """
    ctx = engine.ctx
    model = engine.unwrapped()
    model.eval()
    transform = plain_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)
    size = cfg.train.eval_batch_size
    dtype = models.DTYPES[cfg.model.dtype]

    def embed(images: list, fn) -> torch.Tensor:
        outs = []
        for chunk in _batches(images, size):
            x = torch.stack([transform(img) for img in chunk]).to(ctx.device, dtype)
            with engine.autocast():
                outs.append(wide(fn(x)))
        return torch.cat(outs) if outs else torch.zeros((0, model.encoder.num_features), device=ctx.device, dtype=dtype)

    if agent.classifier == "ncm":
        held = memory.owned()
        feats = embed([decode(memory.data[int(s)]) for s in held], model.encoder)
        labels = torch.from_numpy(memory.labels[held]).to(ctx.device)
        sums, counts = class_sums(feats, labels, len(test.classes))
        ncm = NearestClassMean(all_reduce_sum(sums), all_reduce_sum(counts))

        def predict(x: torch.Tensor) -> torch.Tensor:
            with engine.autocast():
                return ncm.predict(wide(model.encoder(x)))
    else:

        def predict(x: torch.Tensor) -> torch.Tensor:
            with engine.autocast():
                return wide(model(x)).argmax(1)

    correct = torch.zeros(stream.num_tasks, dtype=torch.float64, device=ctx.device)
    for j in range(task + 1):
        ids = stream.test_ids[j][ctx.rank :: ctx.world_size]
        for chunk in _batches(ids, size):
            x = torch.stack([transform(test.image(int(i))) for i in chunk]).to(ctx.device, dtype)
            truth = torch.from_numpy(test.labels[chunk]).to(ctx.device)
            correct[j] += (predict(x) == truth).sum()
    correct = all_reduce_sum(correct).cpu()
    return [float(correct[j]) / len(stream.test_ids[j]) if j <= task else None for j in range(stream.num_tasks)]
