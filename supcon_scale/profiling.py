"""`train.profile_steps=A-B`: a torch.profiler trace of steps A to B of a real run, plus a CUDA memory snapshot.

Every rank writes its own files into out_dir/profile (as torchtitan does: a straggler shows in its rank's trace):
`trace_rank{R}_steps{A}-{B}.json`, a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing) where
each profiled step is a `step N` range, and on a GPU `memory_rank{R}_steps{A}-{B}.pickle`, the allocator's history
over those steps (drag it onto https://pytorch.org/memory_viz). The profiler starts in step A's `on_batch` and stops
after step B, so the other steps run unprofiled.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from supcon_scale.hooks import Hook, StepInfo

MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept; a ResNet-50 step makes a few thousand


class Profiler(Hook):
    """Profiles steps `first` to `last` (inclusive) and writes the trace (and memory snapshot) when `last` ends."""

    def __init__(self, first: int, last: int, out_dir: str | Path, rank: int, device: torch.device):
        self.first, self.last, self.rank = first, last, rank
        self.cuda = device.type == "cuda"
        self.dir = Path(out_dir) / "profile"
        self.prof: torch.profiler.profile | None = None
        self.step_range: torch.profiler.record_function | None = None

    @property
    def trace_path(self) -> Path:
        return self.dir / f"trace_rank{self.rank}_steps{self.first}-{self.last}.json"

    @property
    def memory_path(self) -> Path:
        return self.dir / f"memory_rank{self.rank}_steps{self.first}-{self.last}.pickle"

    def on_batch(self, step: int, views: list[torch.Tensor], labels: torch.Tensor):
        if step == self.first and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
            self.prof.start()
        if self.prof is not None:
            self.step_range = torch.profiler.record_function(f"step {step}")
            self.step_range.__enter__()
        return views, labels

    def on_step(self, info: StepInfo) -> None:
        if self.prof is None:
            return
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if info.step >= self.last or info.last:
            self._finish()

    def _finish(self) -> None:
        assert self.prof is not None
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.trace_path))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.memory_path))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.prof = None
        if self.rank == 0:
            written = f"{self.trace_path}" + (f" and {self.memory_path}" if self.cuda else "")
            print(f"profile of steps {self.first}-{self.last}: {written}", file=sys.stderr, flush=True)
