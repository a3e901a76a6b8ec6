"""Who is a positive of whom in the SupCon loss: the weights w_rc (`supcon.py`'s docstring), their masks and sums.

Integer ids (class or image) per contrast row or unit label vectors (GenSCL), the official loss's `positives_cap`,
and the low-rank positive sum sum_c w_rc (z_r . z_c) computed through class sums without the [n, M] matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

MaskKind = Literal["all", "pos", "neg", "den"]


@dataclass
class Positives:
    """Who is a positive of whom: integer ids per contrast row, or unit label vectors per contrast row."""

    anchor_ids: torch.Tensor | None  # [n] long (compact class or image ids)
    contrast_ids: torch.Tensor | None  # [M] long
    anchor_vecs: torch.Tensor | None  # [n, C] unit rows (zero rows allowed)
    contrast_vecs: torch.Tensor | None  # [M, C]
    self_col: torch.Tensor  # [n] column of each anchor's own embedding in the contrast set (increasing)
    views: int = 1  # contrast rows are sample-major: column c belongs to sample c // views
    cap: int | None = None  # positives_cap // views other samples kept per anchor (ids only); None keeps all
    contrast_rank: torch.Tensor | None = None  # [M] rank of the column's sample within its class (global order)
    anchor_limit: torch.Tensor | None = None  # [n] an anchor keeps the same-class samples of rank < its limit
    # `self_col` on the host (a range) and a bound on the ids: from the shapes, so nothing is read back from the GPU
    # (None after `select`, which is data-dependent).
    self_col_host: range | None = None
    num_ids: int | None = None

    def select(self, keep: torch.Tensor) -> Positives:
        """The same structure restricted to the anchors `keep` (an index tensor)."""
        return Positives(
            None if self.anchor_ids is None else self.anchor_ids[keep],
            self.contrast_ids,
            None if self.anchor_vecs is None else self.anchor_vecs[keep],
            self.contrast_vecs,
            self.self_col[keep],
            self.views,
            self.cap,
            self.contrast_rank,
            None if self.anchor_limit is None else self.anchor_limit[keep],
            num_ids=self.num_ids,
        )

    def self_weight(self) -> torch.Tensor:
        """w of each anchor with itself (1 for ids; |y|^2 for vectors, 0 for a zero label vector)."""
        if self.anchor_vecs is None:
            return torch.ones(self.self_col.shape[0], dtype=torch.float64, device=self.self_col.device)
        return (self.anchor_vecs * self.anchor_vecs).sum(1)

    def total_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_r = sum over the contrast set, self excluded (after the cap)."""
        if self.anchor_vecs is None:
            same = self.id_counts()[self.anchor_ids]
            if self.cap is None:
                return (same - 1).to(dtype)
            # the anchor's own image's other views, plus every view of at most `cap` other same-label images
            return (self.views - 1 + self.views * (same // self.views - 1).clamp_max(self.cap)).to(dtype)
        return (self.anchor_vecs @ self.contrast_vecs.sum(0) - self.self_weight()).to(dtype)

    def negatives(self) -> torch.Tensor:
        """Number of negatives (other ids) of each anchor; ids only."""
        return self.contrast_ids.shape[0] - self.id_counts()[self.anchor_ids]

    def id_counts(self) -> torch.Tensor:
        """Contrast rows per id. `torch.bincount` sizes its output from the largest id, a host read; a scatter into
        `num_ids` slots does not."""
        if self.num_ids is None:
            return torch.bincount(self.contrast_ids)
        counts = self.contrast_ids.new_zeros(self.num_ids)
        return counts.scatter_add_(0, self.contrast_ids, torch.ones_like(self.contrast_ids))

    def block(self, rows: slice, cols: slice, dtype: torch.dtype) -> torch.Tensor:
        """Dense positive weights for a block of anchors x contrast columns (self not yet zeroed), after the cap."""
        if self.anchor_vecs is None:
            same = self.anchor_ids[rows, None] == self.contrast_ids[None, cols]
            if self.cap is not None:
                col = torch.arange(self.contrast_ids.shape[0], device=same.device)[cols]
                own = (self.self_col[rows, None] // self.views) == (col[None, :] // self.views)
                same &= own | (self.contrast_rank[None, cols] < self.anchor_limit[rows, None])
            return same.to(dtype)
        return (self.anchor_vecs[rows] @ self.contrast_vecs[cols].T).to(dtype)

    def mask(self, kind: MaskKind, rows: slice, cols: slice, dtype: torch.dtype) -> torch.Tensor:
        """Column weights of a block (self not yet zeroed): pos = kept positives, neg = other ids, den = both."""
        if kind == "pos":
            return self.block(rows, cols, dtype)
        other = self.anchor_ids[rows, None] != self.contrast_ids[None, cols]
        if kind == "den":
            other |= self.block(rows, cols, torch.bool)
        assert kind in ("neg", "den"), kind
        return other.to(dtype)

    def weighted_sum(self, za: torch.Tensor, zc: torch.Tensor, zk: torch.Tensor | None = None) -> torch.Tensor:
        """sum_c w_rc (z_r . z_c), self excluded, without the [n, M] matrix: class sums (ids) or Y^T Z (vectors).
        `zk`: a queue's keys, contrast rows after zc's (ids only), in the class sums without gradient.

        The self term z_r . z_r is |z_r|^2, 1 for a unit row and 0 for a zero row, and has zero gradient through the
        normalisation, so it is subtracted as that constant (saving two [M, D] temporaries).
        """
        self_dot = (torch.linalg.vector_norm(za.detach(), dim=1) > 0).to(za.dtype)
        if self.anchor_vecs is None:
            k = self.num_ids or int(self.contrast_ids.max()) + 1
            return _ClassSumDot.apply(za, zc, self.anchor_ids, self.contrast_ids, k, zk) - self_dot
        proj = self.contrast_vecs.to(zc.dtype).T @ zc  # [C, D]
        ya = self.anchor_vecs.to(zc.dtype)
        return torch.linalg.vecdot(ya @ proj, za) - self.self_weight().to(zc.dtype) * self_dot


class _ClassSumDot(torch.autograd.Function):
    """z_r . (sum of the contrast rows of r's class), row by row, through [classes, D] sums only.

    Autograd would keep the gathered [M, D] class sums for backward and build two more [M, D] temporaries there;
    this keeps the [classes, D] sums and works in row chunks. When the anchors are the contrast set (one process,
    every view an anchor) both gradients land in one buffer. A queue's keys `zk` (contrast rows M.., ids after the
    batch's) add their class sums without gradient.
    """

    CHUNK = 4096

    @staticmethod
    def forward(ctx, za, zc, anchor_ids, contrast_ids, k: int, zk=None):
        if zk is None:
            sums = zc.new_zeros((k, zc.shape[1])).index_add_(0, contrast_ids, zc)
        else:
            m = zc.shape[0]
            sums = zc.new_zeros((k, zc.shape[1])).index_add_(0, contrast_ids[:m], zc)
            sums.index_add_(0, contrast_ids[m:], zk)
            contrast_ids = contrast_ids[:m]  # the rows that take a gradient
        out = za.new_empty(za.shape[0])
        for i in range(0, za.shape[0], _ClassSumDot.CHUNK):
            j = i + _ClassSumDot.CHUNK
            out[i:j] = torch.linalg.vecdot(za[i:j], sums[anchor_ids[i:j]])
        ctx.save_for_backward(za, sums, anchor_ids, contrast_ids)
        ctx.shared = za is zc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        za, sums, anchor_ids, contrast_ids = ctx.saved_tensors
        grad_sums = torch.zeros_like(sums)  # d/d sums_k = sum over anchors r of class k of g_r z_r
        grad_za = torch.empty_like(za)
        for i in range(0, za.shape[0], _ClassSumDot.CHUNK):
            j = i + _ClassSumDot.CHUNK
            g = grad[i:j, None]
            grad_sums.index_add_(0, anchor_ids[i:j], za[i:j] * g)
            torch.mul(sums[anchor_ids[i:j]], g, out=grad_za[i:j])
        if ctx.shared:  # za is zc: add the contrast side's gradient, sums_{class(c)}, into the same buffer
            for i in range(0, za.shape[0], _ClassSumDot.CHUNK):
                j = i + _ClassSumDot.CHUNK
                grad_za[i:j] += grad_sums[contrast_ids[i:j]]
            return grad_za, None, None, None, None, None
        return grad_za, grad_sums[contrast_ids], None, None, None, None


def compact_ids(labels: torch.Tensor) -> torch.Tensor:
    """Labels to ids in [0, len(labels)), equal exactly where the labels are: a sort, no data-dependent shape
    (`torch.unique` reads its output size back from the GPU)."""
    sorted_labels, order = torch.sort(labels)
    starts = torch.ones_like(sorted_labels, dtype=torch.long)
    starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    ids = torch.empty_like(starts)
    ids[order] = starts.cumsum(0) - 1
    return ids


def capped(pos: Positives, ids: torch.Tensor, cap: int) -> Positives:
    """`pos` with `positives_cap` applied: `cap` other samples per anchor, the first of its label in global order."""
    order = torch.argsort(ids, stable=True)  # samples grouped by label, in batch order within a label
    counts = torch.bincount(ids, minlength=ids.shape[0])
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(ids.shape[0], device=ids.device) - starts[ids[order]]
    contrast_rank = rank.repeat_interleave(pos.views)
    own_rank = contrast_rank[pos.self_col]
    # the first `cap` of the label, skipping the anchor's own image when it is one of them
    limit = cap + (own_rank < cap).long()
    return dataclasses.replace(pos, cap=cap, contrast_rank=contrast_rank, anchor_limit=limit)
