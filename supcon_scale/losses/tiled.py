"""Memory-efficient log-sum-exps of the SupCon logits: blocks of anchors x contrast, per-row statistics only.

The forward keeps a running log-sum-exp per anchor row; the backward recomputes each block and applies the closed
form d LSE / d s = softmax (docs/BACKGROUND.md, the loss), so memory is O((n + M) * D + block^2) and the [n, M] logits never
exist. Gradients flow to both the anchors and the contrast set, so a gathered contrast set hands its gradient to
the all-gather's backward, which sums it over ranks.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterator

import torch
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from supcon_scale.losses.supcon import Positives


def _tiles(n: int, m: int, block: int, self_cols: list[int]) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(r0, r1, c0, c1, i0, i1): a block and the anchors i0..i1 whose own column falls inside it."""
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        for c0 in range(0, m, block):
            c1 = min(m, c0 + block)
            yield r0, r1, c0, c1, bisect_left(self_cols, c0, r0, r1), bisect_left(self_cols, c1, r0, r1)


def _block_buffer(za: torch.Tensor, zc: torch.Tensor, block: int) -> torch.Tensor:
    """One reusable block of logits: allocating a fresh one per tile lets the C allocator keep tens of MiB."""
    return za.new_empty(min(block, za.shape[0]) * min(block, zc.shape[0]))


def _block_logits(
    za: torch.Tensor, zc: torch.Tensor, self_col: torch.Tensor, tile: tuple[int, ...], inv_tau: float,
    buf: torch.Tensor,
) -> torch.Tensor:
    """s = z_a z_c^T / tau for one block (written into `buf`), self-similarity set to -inf (out of every denominator)."""
    r0, r1, c0, c1, i0, i1 = tile
    s = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
    torch.mm(za[r0:r1] * inv_tau, zc[c0:c1].T, out=s)  # scaling the [rows, D] side saves a pass over the block
    if i1 > i0:
        s[torch.arange(i0 - r0, i1 - r0, device=s.device), self_col[i0:i1] - c0] = -math.inf
    return s


def _block_weights(pos: "Positives", self_col: torch.Tensor, tile: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    r0, r1, c0, c1, i0, i1 = tile
    w = pos.block(slice(r0, r1), slice(c0, c1), dtype)
    if i1 > i0:
        w[torch.arange(i0 - r0, i1 - r0, device=w.device), self_col[i0:i1] - c0] = 0.0
    return w


def _consume_lse(s: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of a block, overwriting it (no temporaries); rows of only -inf give -inf."""
    peak = s.amax(1)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    s.sub_(peak[:, None]).exp_()
    return s.sum(1).log_().add_(peak)


# exp(x) stays a normal float for x >= -80 (fp32) / -700 (fp64): the bound on the logits' spread for a fixed shift.
_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


class TiledLogSumExp(torch.autograd.Function):
    """(za [n, D], zc [M, D]) -> LSE over contrast columns of each anchor row, and the positive-weighted LSE."""

    @staticmethod
    def forward(ctx, za, zc, pos, inv_tau: float, block: int, with_pos: bool):
        n, m = za.shape[0], zc.shape[0]
        self_col = pos.self_col
        tiles = list(_tiles(n, m, block, self_col.tolist()))
        lse_all = za.new_full((n,), -math.inf)
        lse_pos = za.new_full((n,), -math.inf) if with_pos else za.new_zeros(n)
        # Unit rows bound every logit by |s| <= shift, so when 2 * shift fits the exponent range a single fixed shift
        # replaces the running row maximum (saving two passes per block); tiny temperatures use the running form.
        shift = inv_tau * float(za.detach().norm(dim=1).max()) * float(zc.detach().norm(dim=1).max())
        fixed = 2 * shift <= _EXP_RANGE.get(za.dtype, 0.0)
        sums = za.new_zeros(n)
        buf = _block_buffer(za, zc, block)
        for tile in tiles:
            r0, r1 = tile[0], tile[1]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf)
            if fixed:
                sums[r0:r1] += s.sub_(shift).exp_().sum(1)
                if with_pos:
                    w = _block_weights(pos, self_col, tile, s.dtype)
                    lse_pos[r0:r1] = torch.logaddexp(lse_pos[r0:r1], _consume_lse(w.log_().add_(s.log_()).add_(shift)))
                continue
            if with_pos:
                w = _block_weights(pos, self_col, tile, s.dtype)
                lse_pos[r0:r1] = torch.logaddexp(lse_pos[r0:r1], _consume_lse(w.log_().add_(s)))
            lse_all[r0:r1] = torch.logaddexp(lse_all[r0:r1], _consume_lse(s))
        if fixed:
            lse_all = sums.log_().add_(shift)
        ctx.save_for_backward(za, zc, lse_all, lse_pos)
        ctx.pos, ctx.tiles, ctx.inv_tau, ctx.with_pos, ctx.block = pos, tiles, inv_tau, with_pos, block
        ctx.shared = za is zc  # one process, every view an anchor: both gradients go into one [M, D] buffer
        return lse_all, lse_pos

    @staticmethod
    @once_differentiable
    def backward(ctx, g_all, g_pos):
        za, zc, lse_all, lse_pos = ctx.saved_tensors
        pos, inv_tau = ctx.pos, ctx.inv_tau
        self_col = pos.self_col
        grad_za = torch.zeros_like(za)
        grad_zc = grad_za if ctx.shared else torch.zeros_like(zc)
        buf = _block_buffer(za, zc, ctx.block)
        for tile in ctx.tiles:
            r0, r1, c0, c1 = tile[:4]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf)
            if ctx.with_pos:  # d/ds log sum_c w exp(s) = w exp(s - lse_pos)
                e = (s - lse_pos[r0:r1, None]).exp_().mul_(_block_weights(pos, self_col, tile, s.dtype))
                e.mul_(g_pos[r0:r1, None])
            s.sub_(lse_all[r0:r1, None]).exp_()  # softmax over the contrast set
            if ctx.with_pos:
                s.mul_(g_all[r0:r1, None]).add_(e)
                grad_za[r0:r1].addmm_(s, zc[c0:c1], alpha=inv_tau)
                grad_zc[c0:c1].addmm_(s.T, za[r0:r1], alpha=inv_tau)
                continue
            # Row gradients scale small [rows, D] matrices instead of the block: diag(g) P Z = g * (P Z).
            g = g_all[r0:r1, None] * inv_tau
            grad_za[r0:r1].addcmul_(torch.mm(s, zc[c0:c1]), g)
            grad_zc[c0:c1].addmm_(s.T, za[r0:r1] * g)
        return grad_za, (None if ctx.shared else grad_zc), None, None, None, None


def log_sum_exps(
    za: torch.Tensor, zc: torch.Tensor, pos: "Positives", inv_tau: float, block: int, with_pos: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked equivalent of the dense LSEs in `supcon._dense_log_sum_exps`."""
    lse_all, lse_pos = TiledLogSumExp.apply(za, zc, pos, inv_tau, block, with_pos)
    return lse_all, (lse_pos if with_pos else None)
