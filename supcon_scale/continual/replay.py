"""The continual run's data on the trainer's loop: the stream's schedule as its loader, the replay memory as a hook.

Each step: the `StreamLoader` yields this rank's share of the global incoming batch, as the objective's views; the
`Replay` hook (on_batch) draws the global memory batch and appends the drawn slots this rank holds; after the step
(on_step) it offers the global incoming batch to the reservoir (first epoch of a task only, so that each sample is
offered once). A sample's views depend only on (run seed, step, kind, sample id) (`views.sample_seed`), so ranks
augment as one process does and a resumed run as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from supcon_scale.continual.memory import ReservoirMemory
from supcon_scale.continual.stream import ClassIncrementalStream, ImageSource, decode
from supcon_scale.continual.views import INCOMING, MEMORY, sample_seed, seeded_views
from supcon_scale.distributed import Context
from supcon_scale.hooks import StatefulHook, StepInfo

Transforms = Sequence[Callable[[Image.Image], torch.Tensor]]
Batch = tuple[int, bool, list[torch.Tensor], torch.Tensor]


class StreamLoader:
    """The stream's schedule as the trainer's batches: `(task, task_end, views, labels)` from its position on.

    The trainer's epoch is the task, so a task's last step is an epoch end: the accuracy row and a checkpoint there.
    Its state (the checkpoint's data position) is the number of steps done.
    """

    def __init__(
        self,
        stream: ClassIncrementalStream,
        train: ImageSource,
        transforms: Transforms,
        ctx: Context,
        dtype: torch.dtype,
    ):
        self.stream, self.train, self.transforms, self.ctx, self.dtype = stream, train, transforms, ctx, dtype
        self.schedule = stream.schedule()
        self.share = stream.batch_size // ctx.world_size
        self.position = 0
        self.offered = np.zeros(0, dtype=np.int64)  # the global incoming batch the memory sees after this step

    def __len__(self) -> int:
        return len(self.schedule)

    def set_epoch(self, epoch: int) -> None:
        """A fresh start: from the stream's first step (the stream is one schedule over every task)."""
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.position}

    def load_state_dict(self, state: dict) -> None:
        step = int(state["step"])
        if not 0 <= step <= len(self.schedule):
            raise ValueError(f"its stream position, step {step}, is outside this stream's {len(self.schedule)} steps")
        self.position = step

    def batches(self) -> Iterator[Batch]:
        while self.position < len(self.schedule):
            step = self.position
            task, epoch, b = self.schedule[step]
            ids = self.stream.batch(task, epoch, b)
            mine = ids[self.ctx.rank * self.share : (self.ctx.rank + 1) * self.share]
            seeds = [sample_seed(self.stream.seed, step, INCOMING, int(i)) for i in mine]
            views = seeded_views([self.train.image(int(i)) for i in mine], seeds, self.transforms)
            labels = torch.from_numpy(self.train.labels[mine]).to(self.ctx.device)
            self.offered = ids if epoch == 0 else ids[:0]
            self.position += 1
            end = self.position == len(self.schedule) or self.schedule[self.position][0] != task
            yield task, end, [v.to(self.ctx.device, self.dtype) for v in views], labels


class Replay(StatefulHook):
    """The reservoir memory on the trainer's loop: draws the memory batch beside each incoming batch (the drawn
    slots this rank holds, their views seeded as the incoming ones) and offers the stream's batch after the step."""

    state_key = "memory"

    def __init__(self, memory: ReservoirMemory, loader: StreamLoader, batch_size: int):
        self.memory, self.loader, self.batch_size = memory, loader, batch_size
        self.owners = np.arange(loader.stream.batch_size) // loader.share  # the rank holding each incoming sample
        self.drawn = 0  # this step's global memory batch (ER's loss divides by it)

    def on_batch(self, step: int, views: list[torch.Tensor], labels: torch.Tensor):
        memory = self.memory
        slots = memory.draw(self.batch_size)  # the same slots on every rank
        self.drawn = len(slots)
        held = memory.local(slots)
        if len(held) == 0:
            return views, labels
        seeds = [sample_seed(self.loader.stream.seed, step - 1, MEMORY, int(memory.index[s])) for s in held]
        drawn = seeded_views([decode(memory.data[int(s)]) for s in held], seeds, self.loader.transforms)
        views = [torch.cat([v, d.to(v.device, v.dtype)]) for v, d in zip(views, drawn, strict=True)]
        return views, torch.cat([labels, torch.from_numpy(memory.labels[held]).to(labels.device)])

    def on_step(self, info: StepInfo) -> None:
        ids = self.loader.offered
        if len(ids):
            self.memory.update(ids, self.loader.train.labels[ids], self.owners, self.loader.train.encoded)

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state)
