"""The collapse watch: how spread the embeddings are, and one warning when a run has collapsed.

`std_of_l2_normalized` is lightly's (lightly.utils.debug.std_of_l2_normalized): the mean over dimensions of the
per-dimension standard deviation of the L2-normalised embeddings. 0 is total collapse (every embedding the same);
embeddings spread evenly on the unit sphere of R^D give about 1/sqrt(D). A collapsed SupCon run also shows in its
loss: with every logit equal each anchor's softmax is uniform over the M - 1 other views of the contrast set, so the
loss sits at log(M - 1) (ln 511 = 6.236 at 2 x 256 views; the objective knows its own value, `uniform_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from supcon_scale import distributed

LOW_STD = 0.1  # collapsed below LOW_STD / sqrt(D): a tenth of the healthy spread
UNIFORM_TOLERANCE = 1e-3  # nats: a loss this close to the uniform-logit loss has nothing left to learn from
PATIENCE = 3  # log windows in a row before the warning


def std_of_l2_normalized(z: torch.Tensor) -> torch.Tensor:
    """lightly's metric on the rows of `z` `[N, D]` in one process: mean_d std_n(z_n / |z_n|)_d (unbiased std)."""
    return F.normalize(z, dim=-1).std(dim=0).mean()


def embedding_std(z: torch.Tensor) -> float:
    """Collective: `std_of_l2_normalized` over the embeddings of every rank (`z` `[..., D]`, flattened to rows),
    from one all-reduce of per-dimension sums and sums of squares in float64."""
    rows = F.normalize(z.detach().reshape(-1, z.shape[-1]).double(), dim=-1)
    d = rows.shape[1]
    stats = torch.cat([rows.sum(0), (rows * rows).sum(0), rows.new_tensor([rows.shape[0]])])
    stats = distributed.all_reduce_sum(stats)
    total, squares, n = stats[:d], stats[d : 2 * d], stats[-1]
    var = ((squares - total * total / n) / (n - 1).clamp_min(1)).clamp_min(0)
    return float(var.sqrt().mean())


class CollapseWatch:
    """Fed each log window's embedding std and loss; says once per run, after `PATIENCE` windows in a row, that the
    embeddings stay collapsed (std below LOW_STD / sqrt(D)) or the loss sits at its uniform-logit value."""

    def __init__(self, patience: int = PATIENCE):
        self.patience = patience
        self.low = self.flat = 0  # windows in a row with a collapsed std / a loss at the uniform value
        self.warned = False

    def check(self, std: float, dim: int, loss: float, uniform: float | None) -> str | None:
        """The warning's text the first time the run has looked collapsed for `patience` windows, else None."""
        healthy = 1 / math.sqrt(dim)
        self.low = self.low + 1 if std < LOW_STD * healthy else 0
        self.flat = self.flat + 1 if uniform is not None and abs(loss - uniform) < UNIFORM_TOLERANCE else 0
        if self.warned or max(self.low, self.flat) < self.patience:
            return None
        self.warned = True
        seen = []
        if self.low >= self.patience:
            seen.append(f"embedding std {std:.2g} (healthy about 1/sqrt({dim}) = {healthy:.3f})")
        if self.flat >= self.patience:
            seen.append(f"loss {loss:.4f} at log(M - 1) = {uniform:.4f}, the loss of equal logits")
        return (
            f"the embeddings look collapsed: {' and '.join(seen)} for {max(self.low, self.flat)} log windows in a "
            "row; try a learning-rate warm-up (train.warmup_epochs) or a lower optim.base_lr"
        )
