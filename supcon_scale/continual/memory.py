"""The replay memory: reservoir sampling of M samples over the whole stream, kept as encoded image bytes.

Reservoir sampling (Vitter's Algorithm R): the first M samples fill the slots; the n-th sample after that replaces
slot j for j drawn uniformly from [0, n) when j < M. After n samples every one of them is in memory with
probability exactly M/n. (The authors' `utils/buffer/reservoir_update.py` draws a whole batch's slots against the
count before the batch, which is close to but not exactly M/n; here each sample is drawn in turn.)

Across ranks the slot table is replicated and the bytes are sharded. Every rank sees the same global incoming
batch ids and draws from the same seeded generator, so every rank makes the same decisions without communication;
the bytes of a slot live only on the rank whose incoming share held that sample (its owner). A step's memory batch
is drawn globally by every rank alike, and each rank trains on the drawn slots it owns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class ReservoirMemory:
    """`size` slots; `index[s]`, `labels[s]`, `owner[s]` describe slot s on every rank, `data[s]` its bytes (owner)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size < 1:
            raise ValueError(f"memory.size must be >= 1, got {size}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.index = np.full(size, -1, dtype=np.int64)  # the sample id (in the training set) held by each slot
        self.labels = np.full(size, -1, dtype=np.int64)
        self.owner = np.full(size, -1, dtype=np.int64)
        self.filled = 0
        self.seen = 0
        self.data: dict[int, bytes] = {}
        self._reservoir = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5E5])))
        self._retrieve = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x7E7])))

    def __len__(self) -> int:
        return self.filled

    def update(self, ids: np.ndarray, labels: np.ndarray, owners: np.ndarray, encode: Callable[[int], bytes]) -> None:
        """Offer the global incoming batch to the reservoir, in order; this rank encodes the samples it owns."""
        for i, y, o in zip(ids.tolist(), labels.tolist(), owners.tolist(), strict=True):
            self.seen += 1
            if self.filled < self.size:
                slot = self.filled
                self.filled += 1
            else:
                slot = int(self._reservoir.integers(0, self.seen))
                if slot >= self.size:
                    continue
            self.index[slot], self.labels[slot], self.owner[slot] = i, y, o
            if o == self.rank:
                self.data[slot] = encode(i)
            else:
                self.data.pop(slot, None)

    def draw(self, n: int) -> np.ndarray:
        """`min(n, filled)` distinct slots, uniformly (the authors' random retrieval); the same on every rank."""
        k = min(n, self.filled)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        return np.sort(self._retrieve.choice(self.filled, size=k, replace=False)).astype(np.int64)

    def local(self, slots: np.ndarray) -> np.ndarray:
        """The slots among `slots` whose bytes this rank holds."""
        return slots[self.owner[slots] == self.rank]

    def owned(self) -> np.ndarray:
        """Every filled slot this rank holds (for the class means at test time)."""
        return self.local(np.arange(self.filled, dtype=np.int64))

    # -----------------------------------------------------------------------------------------------------------
    # Checkpointing: plain tensors and JSON strings, so `torch.load(weights_only=True)` reads it back

    def state_dict(self) -> dict[str, Any]:
        slots = sorted(self.data)
        blobs = [self.data[s] for s in slots]
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        blob = b"".join(blobs)
        return {
            "size": self.size,
            "world_size": self.world_size,
            "filled": self.filled,
            "seen": self.seen,
            "index": torch.from_numpy(self.index.copy()),
            "labels": torch.from_numpy(self.labels.copy()),
            "owner": torch.from_numpy(self.owner.copy()),
            "reservoir_rng": json.dumps(self._reservoir.bit_generator.state),
            "retrieve_rng": json.dumps(self._retrieve.bit_generator.state),
            "slots": torch.tensor(slots, dtype=torch.int64),
            "offsets": torch.from_numpy(offsets),
            "bytes": torch.tensor(np.frombuffer(blob, dtype=np.uint8)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size or int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"train.resume: the saved memory has size {state['size']} on {state['world_size']} ranks; this run "
                f"has memory.size={self.size} on {self.world_size}"
            )
        self.filled, self.seen = int(state["filled"]), int(state["seen"])
        self.index = state["index"].numpy().copy()
        self.labels = state["labels"].numpy().copy()
        self.owner = state["owner"].numpy().copy()
        self._reservoir.bit_generator.state = json.loads(state["reservoir_rng"])
        self._retrieve.bit_generator.state = json.loads(state["retrieve_rng"])
        raw = state["bytes"].numpy().tobytes()
        offsets = state["offsets"].tolist()
        self.data = {int(s): raw[offsets[k] : offsets[k + 1]] for k, s in enumerate(state["slots"].tolist())}
