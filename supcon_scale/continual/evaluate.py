"""The accuracy matrix of a continual run: after each task, the model scored on the test classes of every task
so far (one row), by nearest class mean over the memory (SCR, `ncm.py`) or the softmax head (ER).

`AccuracyMatrix` is a hook whose cadence is the task boundary: the stream loader's epochs are tasks, so it acts
at each epoch end; its rows are checkpointed with the run (a `StatefulHook`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence

import torch

from supcon_scale.console import MetricsLog, console
from supcon_scale.continual.config import ContinualConfig
from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.continual.models import DTYPES, wide
from supcon_scale.continual.ncm import NearestClassMean, class_sums
from supcon_scale.continual.stream import ClassIncrementalStream, ImageSource, decode
from supcon_scale.continual.views import plain_transform
from supcon_scale.distributed import all_reduce_sum
from supcon_scale.engines import Engine
from supcon_scale.hooks import StatefulHook, StepInfo


class AccuracyMatrix(StatefulHook):
    """Row `task` of the accuracy matrix after each task's last step, to `metrics` and the console."""

    state_key = "rows"

    def __init__(
        self,
        cfg: ContinualConfig,
        engine: Engine,
        classifier: str,
        memory: ReservoirMemory,
        stream: ClassIncrementalStream,
        test: ImageSource,
        metrics: MetricsLog,
        name: str,
    ):
        self.cfg, self.engine, self.classifier, self.memory = cfg, engine, classifier, memory
        self.stream, self.test, self.metrics, self.name = stream, test, metrics, name
        self.rows: list[list[float | None]] = []  # a[i][j], None above the diagonal

    def on_step(self, info: StepInfo) -> None:
        if not info.epoch_end:
            return
        task = info.epoch
        row = evaluate(self.cfg, self.engine, self.classifier, self.memory, self.stream, self.test, task)
        self.rows.append(row)
        self.engine.train()
        seen = [a for a in row if a is not None]
        self.metrics.write({"step": info.step, "task": task, "accuracy": row, "stage_accuracy": sum(seen) / len(seen)})
        if self.engine.ctx.is_main:
            shown = " ".join(f"{a:.3f}" for a in seen)
            console.print(f"{self.name}: after task {task + 1}/{self.stream.num_tasks}: {shown}")

    def state_dict(self) -> str:
        return json.dumps(self.rows)

    def load_state_dict(self, state: str) -> None:
        self.rows = json.loads(state)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def evaluate(
    cfg: ContinualConfig,
    engine: Engine,
    classifier: str,
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
    dtype = DTYPES[cfg.model.dtype]

    def embed(images: list, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        outs = []
        for chunk in _batches(images, size):
            x = torch.stack([transform(img) for img in chunk]).to(ctx.device, dtype)
            with engine.autocast():
                outs.append(wide(fn(x)))
        return torch.cat(outs) if outs else torch.zeros((0, model.encoder.num_features), device=ctx.device, dtype=dtype)

    if classifier == "ncm":
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
