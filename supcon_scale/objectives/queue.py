"""The labelled key queue (`loss.queue_size`): the last K key views of the global batch order, with their labels.

MoCo (He et al. 2020, Sec. 3.2) keeps a FIFO of keys as extra negatives; PaCo (Cui et al. 2021) labels them so that
same-label keys are positives of a supervised contrastive loss; XBM (Wang et al. 2020) fills it with the encoder's
own detached embeddings. The queue is global: every step it takes all ranks' keys gathered in rank order (the order
the loss gathers the batch in), so every rank holds the same content whatever the world size, and a checkpoint of
any rank restores it. Keys are staged by the objective's forward and enter in `on_step` only when the step was
applied: a skipped (non-finite) step leaves no trace.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from supcon_scale import distributed
from supcon_scale.hooks import StatefulHook, StepInfo

NO_LABEL = -1  # the stored label of a key staged without labels (SimCLR never reads key labels)


class KeyQueue(StatefulHook):
    """A ring buffer of `size` key rows ([size, dim] float32 on `device`, `views` rows per queued sample, sample
    major) with one label per sample, a write pointer and a fill count (both in samples). `equal_batches` (every
    rank the same batch size, data.drop_last) saves the per-step exchange of the ranks' sizes and its host read."""

    state_key = "key_queue"

    def __init__(
        self, size: int, dim: int, views: int, device: torch.device | str = "cpu", equal_batches: bool = False
    ):
        if size <= 0 or size % views:
            raise ValueError(f"loss.queue_size must be a positive multiple of data.views={views}, got {size}")
        self.views, self.equal_batches = views, equal_batches
        self.slots = size // views  # queued samples
        self.keys = torch.zeros(size, dim, dtype=torch.float32, device=device)
        self.labels = torch.full((self.slots,), NO_LABEL, dtype=torch.long, device=device)
        self.ptr = 0  # the next sample slot to write
        self.filled = 0  # sample slots holding keys
        self._staged: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled keys [filled * V, D] and their labels [filled], in slot order (views, not copies)."""
        return self.keys[: self.filled * self.views], self.labels[: self.filled]

    def stage(self, keys: torch.Tensor, labels: torch.Tensor | None) -> None:
        """This rank's keys of the step ([B, V, D] or [B * V, D] sample-major) and labels [B]; enqueued by
        `on_step` if the step is applied. The keys are detached and normalised to unit rows."""
        keys = keys.detach().reshape(-1, self.keys.shape[1])
        if keys.shape[0] % self.views:
            raise ValueError(f"{keys.shape[0]} key rows are not whole samples of {self.views} views")
        labels = None if labels is None or labels.ndim != 1 else labels.detach()
        self._staged = (F.normalize(keys.float(), dim=1), labels)

    def on_step(self, info: StepInfo) -> None:
        """Collective: enqueue the staged keys of an applied step (all ranks' keys, in rank order)."""
        staged, self._staged = self._staged, None
        if staged is None or not info.stepped:
            return
        keys, labels = staged
        n = keys.shape[0] // self.views
        if labels is None:
            labels = torch.full((n,), NO_LABEL, dtype=torch.long, device=keys.device)
        sizes = [n] * distributed.world()[1] if self.equal_batches else distributed.local_sizes(n, keys.device)
        keys = distributed.all_gather_no_grad(keys, [s * self.views for s in sizes])
        labels = distributed.all_gather_no_grad(labels.long(), sizes)
        self.enqueue(keys, labels)

    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """FIFO: write the global batch's `keys` [N * V, D] and `labels` [N] at the pointer, wrapping around; a batch
        larger than the queue keeps its last samples."""
        n = labels.shape[0]
        keys = keys.reshape(n, self.views, self.keys.shape[1])
        if n > self.slots:  # only the newest `slots` samples would survive the wrap
            keys, labels, self.ptr = keys[n - self.slots :], labels[n - self.slots :], (self.ptr + n) % self.slots
            n = self.slots
        slots = (self.ptr + torch.arange(n)) % self.slots
        with torch.no_grad():
            self.keys.view(self.slots, self.views, -1)[slots.to(self.keys.device)] = keys.to(self.keys)
            self.labels[slots.to(self.labels.device)] = labels.to(self.labels)
        self.ptr = (self.ptr + n) % self.slots
        self.filled = min(self.slots, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and ints (a `weights_only` load); the same on every rank."""
        return {
            "keys": self.keys.cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "ptr": self.ptr,
            "filled": self.filled,
            "views": self.views,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["keys"].shape) != tuple(self.keys.shape) or state["views"] != self.views:
            raise ValueError(
                f"the checkpoint's key queue is {tuple(state['keys'].shape)} keys of {state['views']} views, this "
                f"run's {tuple(self.keys.shape)} of {self.views} (loss.queue_size, model.feat_dim, data.views)"
            )
        self.keys.copy_(state["keys"])
        self.labels.copy_(state["labels"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
        self._staged = None
