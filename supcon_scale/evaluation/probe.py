"""The online linear probe (`train.online_probe`): solo-learn's online classifier, as a hook beside the loss.

A linear classifier on the encoder features, detached (`models.Output.features`: no gradient reaches the encoder),
trained with its own optimizer (SGD, `train.online_probe_lr`, momentum 0.9, no weight decay, constant LR) after each
step that was taken. Every rank holds the same classifier and trains it on the step's features and labels gathered
from every rank, so every rank makes the same update and the probe is the one a single process would train on the
global batch, on any engine. Its top-1 on the training views (before each update, as solo-learn reports it) is
counted over each log window and joins the log line with its n and 95% Wilson interval (`log_fields`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from supcon_scale import distributed
from supcon_scale.evaluation.stats import wilson_interval
from supcon_scale.hooks import StatefulHook, StepInfo

MOMENTUM = 0.9


class OnlineProbe(StatefulHook):
    """`nn.Linear(num_features, num_classes)` trained on each taken step's detached features; `log_fields()` gives
    the window's `probe_top1`, `probe_top1_interval_95` and `probe_n` (views of every rank) and starts a new window.

    Its weights, momentum buffers and the open window's counts are checkpointed, so a resume continues exactly.
    `equal_batches` (`data.drop_last`): every rank holds as many views, so the gather needs no size exchange.
    """

    state_key = "online_probe"

    def __init__(
        self, num_features: int, num_classes: int, lr: float, device: torch.device, seed: int = 0,
        equal_batches: bool = True,
    ) -> None:  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank, whatever ran before
            torch.manual_seed(seed)
            self.linear = nn.Linear(num_features, num_classes)
        self.linear.to(device)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=0.0)
        self.correct = torch.zeros((), dtype=torch.long, device=device)  # on the device: no host read per step
        self.seen = 0
        self.equal_batches = equal_batches

    def on_step(self, info: StepInfo) -> None:
        if not info.stepped:  # a skipped step trains nothing, the probe included
            return
        features = getattr(info.output, "features", None)
        if features is None or info.labels is None:
            raise ValueError("train.online_probe: the step's output holds no encoder features (models.build features)")
        self.train_on(*self.gather(features, info.labels))

    def gather(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's `[B, V, F]` features and `[B]` labels of every rank as rows (every view has its sample's
        label), in rank order."""
        b, v, f = features.shape
        x, y = features.reshape(b * v, f).float(), labels.repeat_interleave(v)
        _, world = distributed.world()
        if world == 1:
            return x, y
        sizes = [b * v] * world if self.equal_batches else distributed.local_sizes(b * v, x.device)
        return distributed.all_gather_no_grad(x, sizes), distributed.all_gather_no_grad(y, sizes)

    def train_on(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One SGD step of the cross-entropy on rows `x` with labels `y`; counts the rows it got right before it."""
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = self.linear(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += y.numel()

    def log_fields(self) -> dict[str, Any]:
        """The window's top-1 with its n and 95% Wilson interval (nothing when no step was taken); a new window."""
        if self.seen == 0:
            return {}
        correct, n = int(self.correct), self.seen
        self.correct.zero_()
        self.seen = 0
        return {"probe_top1": correct / n, "probe_top1_interval_95": list(wilson_interval(correct, n)), "probe_n": n}

    def state_dict(self) -> dict[str, Any]:
        return {
            "linear": {k: v.detach().cpu().clone() for k, v in self.linear.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "correct": int(self.correct),
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.linear.load_state_dict(state["linear"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves the momentum buffers to the weights' device
        self.correct.fill_(int(state["correct"]))
        self.seen = int(state["seen"])


def _to_cpu(tree: Any) -> Any:
    """Copies of a state's tensors on the CPU (the optimizer's state dict holds references to its live buffers)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_cpu(v) for v in tree)
    return tree
