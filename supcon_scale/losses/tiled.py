"""Memory-efficient row statistics of the SupCon logits: blocks of anchors x contrast, per-row statistics only.

The forward keeps a running log-sum-exp per anchor row (one per column mask: every column, the positives, the
negatives); the backward recomputes each block and applies the closed form d LSE / d s = softmax (docs/BACKGROUND.md,
the loss), so memory is O((n + M) * D + block^2) and the [n, M] logits never exist. Every softmax is taken as
exp(s + log w - lse) over its own mask, which is <= 1 wherever w > 0: the backward cannot overflow at any
temperature (a negative far above the positives' log-sum-exp is simply outside the positives' mask). Gradients flow
to both the anchors and the contrast set, so a gathered contrast set hands its gradient to the all-gather's
backward, which sums it over ranks.

A queue's keys (`zk`, [K, D], no gradient) are a second part of the contrast set: columns M..M+K after the batch's M.
The column tiles walk the batch part, then the key part; nothing concatenates the two, and no gradient buffer is
allocated for the keys (memory O((n + M) * D + block^2) beside the keys themselves).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

if TYPE_CHECKING:
    from supcon_scale.losses.positives import MaskKind, Positives


def _host_cols(pos: Positives) -> Sequence[int]:
    """The anchors' own columns on the host: known from the shapes (a range) unless anchors were selected."""
    return pos.self_col_host if pos.self_col_host is not None else pos.self_col.tolist()


def _tiles(
    n: int, m: int, block: int, self_cols: Sequence[int], k: int = 0
) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(r0, r1, c0, c1, i0, i1): a block and the anchors i0..i1 whose own column falls inside it. The columns are
    the batch's m, then (a queue) the k keys', so no block straddles the two parts."""
    cols = [(c0, min(m, c0 + block)) for c0 in range(0, m, block)]
    cols += [(c0, min(m + k, c0 + block)) for c0 in range(m, m + k, block)]
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        for c0, c1 in cols:
            yield r0, r1, c0, c1, bisect_left(self_cols, c0, r0, r1), bisect_left(self_cols, c1, r0, r1)


def _block_buffer(za: torch.Tensor, zc: torch.Tensor, block: int, zk: torch.Tensor | None = None) -> torch.Tensor:
    """One reusable block of logits: allocating a fresh one per tile lets the C allocator keep tens of MiB."""
    cols = zc.shape[0] if zk is None else max(zc.shape[0], zk.shape[0])
    return za.new_empty(min(block, za.shape[0]) * min(block, cols))


def _columns(zc: torch.Tensor, zk: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    """Contrast rows c0..c1 of one tile: the batch's, or (columns from M on) the keys'."""
    m = zc.shape[0]
    return zc[c0:c1] if c0 < m else zk[c0 - m : c1 - m]


def _block_logits(
    za: torch.Tensor,
    zc: torch.Tensor,
    self_col: torch.Tensor,
    tile: tuple[int, ...],
    inv_tau: float,
    buf: torch.Tensor,
    zk: torch.Tensor | None = None,
) -> torch.Tensor:
    """s = z_a z_c^T / tau for one block (written into `buf`), self-similarity -inf (out of every denominator)."""
    r0, r1, c0, c1, i0, i1 = tile
    s = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
    torch.mm(
        za[r0:r1] * inv_tau, _columns(zc, zk, c0, c1).T, out=s
    )  # scaling the [rows, D] side saves a pass over the block
    if i1 > i0:
        s[torch.arange(i0 - r0, i1 - r0, device=s.device), self_col[i0:i1] - c0] = -math.inf
    return s


def _block_mask(
    pos: Positives, kind: MaskKind, self_col: torch.Tensor, tile: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Column weights of one block for a mask kind, the anchor's own column zeroed."""
    r0, r1, c0, c1, i0, i1 = tile
    w = pos.mask(kind, slice(r0, r1), slice(c0, c1), dtype)
    if i1 > i0:
        w[torch.arange(i0 - r0, i1 - r0, device=w.device), self_col[i0:i1] - c0] = 0.0
    return w


def _consume_lse(s: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp of a block, overwriting it (no temporaries); rows of only -inf give -inf."""
    peak = s.amax(1)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    s.sub_(peak[:, None]).exp_()
    return s.sum(1).log_().add_(peak)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (an empty mask) -> 0, so exp(-inf - lse) stays 0 instead of exp(nan)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


# exp(x) stays a normal float for x >= -80 (fp32) / -700 (fp64): the bound on the logits' spread for a fixed shift.
_EXP_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


class TiledRowStats(torch.autograd.Function):
    """(za [n, D], zc [M, D]) -> per anchor row: the LSE over each mask's columns, then (`linear`) sum_P w s.

    `masks` lists mask kinds ("all", "pos", "neg", "den"; see `Positives.mask`); the outputs follow that order.
    `zk` (or None): the queue's keys, contrast columns M.. without gradient.
    """

    @staticmethod
    def forward(ctx, za, zc, pos, inv_tau: float, block: int, masks: tuple, linear: bool, zk=None):
        n, m = za.shape[0], zc.shape[0]
        self_col = pos.self_col
        tiles = list(_tiles(n, m, block, _host_cols(pos), 0 if zk is None else zk.shape[0]))
        masked = [k for k in masks if k != "all"]
        lse = {k: za.new_full((n,), -math.inf) for k in masks}
        lin = za.new_zeros(n) if linear else None
        # Unit rows bound every logit by |s| <= shift, so when 2 * shift fits the exponent range a single fixed shift
        # replaces the running row maximum (saving two passes per block); tiny temperatures use the running form.
        # The loss passes unit (or zero) rows (supcon.normalize): |s| <= 1/tau bounds every logit, no norm read back.
        shift = inv_tau
        fixed = 2 * shift <= _EXP_RANGE.get(za.dtype, 0.0)
        sums = za.new_zeros(n)
        buf = _block_buffer(za, zc, block, zk)
        for tile in tiles:
            r0, r1 = tile[0], tile[1]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf, zk)
            if linear:  # sum_P w s (s is -inf only off the positives, at the anchor's own column)
                w = _block_mask(pos, "pos", self_col, tile, s.dtype)
                lin[r0:r1] += torch.where(w > 0, s, 0.0).mul_(w).sum(1)
            for kind in masked:  # these leave `s` intact; the "all" LSE below consumes it
                w = _block_mask(pos, kind, self_col, tile, s.dtype)
                lse[kind][r0:r1] = torch.logaddexp(lse[kind][r0:r1], _consume_lse(w.log_().add_(s)))
            if "all" not in lse:
                continue
            if fixed:
                sums[r0:r1] += s.sub_(shift).exp_().sum(1)
            else:
                lse["all"][r0:r1] = torch.logaddexp(lse["all"][r0:r1], _consume_lse(s))
        if fixed and "all" in lse:
            lse["all"] = sums.log_().add_(shift)
        outs = [lse[k] for k in masks] + ([lin] if linear else [])
        ctx.save_for_backward(za, zc, zk, *outs[: len(masks)])
        ctx.pos, ctx.tiles, ctx.inv_tau, ctx.block, ctx.masks, ctx.linear = pos, tiles, inv_tau, block, masks, linear
        ctx.shared = za is zc  # one process, every view an anchor: both gradients go into one [M, D] buffer
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        za, zc, zk, *lses = ctx.saved_tensors
        pos, inv_tau, masks, m = ctx.pos, ctx.inv_tau, ctx.masks, zc.shape[0]
        self_col = pos.self_col
        binary = pos.anchor_vecs is None  # 0/1 weights (ids), not GenSCL's cosines
        g_lse = dict(zip(masks, grads[: len(masks)], strict=True))
        safe = {k: _finite(v) for k, v in zip(masks, lses, strict=True) if k != "all"}
        lse_all = lses[masks.index("all")] if "all" in masks else None
        g_lin = grads[len(masks)] if ctx.linear else None
        grad_za = torch.zeros_like(za)
        grad_zc = grad_za if ctx.shared else torch.zeros_like(zc)
        buf = _block_buffer(za, zc, ctx.block, zk)
        for tile in ctx.tiles:
            r0, r1, c0, c1 = tile[:4]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf, zk)
            cols = _columns(zc, zk, c0, c1)
            acc = None  # d loss / d s of this block from the masked statistics
            if g_lin is not None:  # d/ds sum_c w s = w
                acc = _block_mask(pos, "pos", self_col, tile, s.dtype).mul_(g_lin[r0:r1, None])
            for kind in safe:
                w = _block_mask(pos, kind, self_col, tile, s.dtype)
                # softmax over the mask: exp(s + log w - lse) <= 1 on the mask, exactly 0 off it. With 0/1 weights
                # (ids) s - lse <= 0 on the mask, so clamping at 0 only tames the columns off it (cheaper than log w).
                if binary:
                    e = torch.sub(s, safe[kind][r0:r1, None]).clamp_max_(0.0).exp_().mul_(w)
                else:
                    e = w.log_().add_(s).sub_(safe[kind][r0:r1, None]).exp_()
                e.mul_(g_lse[kind][r0:r1, None])
                acc = e if acc is None else acc.add_(e)
            if lse_all is None:
                s = acc
            elif acc is None:
                s.sub_(lse_all[r0:r1, None]).exp_()  # softmax over the contrast set
                # Row gradients scale small [rows, D] matrices instead of the block: diag(g) P Z = g * (P Z).
                g = g_lse["all"][r0:r1, None] * inv_tau
                grad_za[r0:r1].addcmul_(torch.mm(s, cols), g)
                if c0 < m:  # the keys (columns from M on) take no gradient
                    grad_zc[c0:c1].addmm_(s.T, za[r0:r1] * g)
                continue
            else:
                s.sub_(lse_all[r0:r1, None]).exp_().mul_(g_lse["all"][r0:r1, None]).add_(acc)
            grad_za[r0:r1].addmm_(s, cols, alpha=inv_tau)
            if c0 < m:
                grad_zc[c0:c1].addmm_(s.T, za[r0:r1], alpha=inv_tau)
        return grad_za, (None if ctx.shared else grad_zc), None, None, None, None, None, None


class TiledOnePositive(torch.autograd.Function):
    """ONE_POSITIVE denominators, per anchor row, given the negatives' LSE `lse_n` (each positive p has its own
    denominator exp(s_p) + exp(lse_n)):
    L_out part: sum_P softplus(lse_n - s_p);  L_in part: LSE_P logsigmoid(s_p - lse_n).
    """

    @staticmethod
    def forward(ctx, za, zc, lse_n, pos, inv_tau: float, block: int, inside: bool, zk=None):
        n, m = za.shape[0], zc.shape[0]
        self_col = pos.self_col
        tiles = list(_tiles(n, m, block, _host_cols(pos), 0 if zk is None else zk.shape[0]))
        out = za.new_full((n,), -math.inf) if inside else za.new_zeros(n)
        buf = _block_buffer(za, zc, block, zk)
        for tile in tiles:
            r0, r1 = tile[0], tile[1]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf, zk)
            on = _block_mask(pos, "pos", self_col, tile, s.dtype) > 0
            if inside:
                u = torch.where(on, F.logsigmoid(s - lse_n[r0:r1, None]), -math.inf)
                out[r0:r1] = torch.logaddexp(out[r0:r1], _consume_lse(u))
            else:
                out[r0:r1] += torch.where(on, F.softplus(lse_n[r0:r1, None] - s), 0.0).sum(1)
        ctx.save_for_backward(za, zc, zk, lse_n, out)
        ctx.pos, ctx.tiles, ctx.inv_tau, ctx.block, ctx.inside = pos, tiles, inv_tau, block, inside
        ctx.shared = za is zc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        za, zc, zk, lse_n, out = ctx.saved_tensors
        pos, inv_tau, m = ctx.pos, ctx.inv_tau, zc.shape[0]
        self_col = pos.self_col
        grad_za = torch.zeros_like(za)
        grad_zc = grad_za if ctx.shared else torch.zeros_like(zc)
        grad_lse_n = torch.zeros_like(lse_n)
        buf = _block_buffer(za, zc, ctx.block, zk)
        for tile in ctx.tiles:
            r0, r1, c0, c1 = tile[:4]
            s = _block_logits(za, zc, self_col, tile, inv_tau, buf, zk)
            on = _block_mask(pos, "pos", self_col, tile, s.dtype) > 0
            sig = torch.where(on, torch.sigmoid(lse_n[r0:r1, None] - s), 0.0)  # d softplus(lse_n - s) / d lse_n
            if ctx.inside:  # d/du_p LSE_P(u) = exp(u_p - out), u_p = logsigmoid(s_p - lse_n), du_p/ds_p = sig_p
                share = torch.where(on, (F.logsigmoid(s - lse_n[r0:r1, None]) - out[r0:r1, None]).exp(), 0.0)
                ds = sig.mul_(share).mul_(grad[r0:r1, None])
                grad_lse_n[r0:r1] -= ds.sum(1)
            else:
                ds = sig.mul_(-grad[r0:r1, None])
                grad_lse_n[r0:r1] -= ds.sum(1)
            grad_za[r0:r1].addmm_(ds, _columns(zc, zk, c0, c1), alpha=inv_tau)
            if c0 < m:  # the keys take no gradient
                grad_zc[c0:c1].addmm_(ds.T, za[r0:r1], alpha=inv_tau)
        return grad_za, (None if ctx.shared else grad_zc), grad_lse_n, None, None, None, None, None


def row_stats(
    za: torch.Tensor,
    zc: torch.Tensor,
    pos: Positives,
    inv_tau: float,
    block: int,
    masks: tuple,
    linear: bool,
    zk: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Blocked equivalent of `dense.row_stats`; `zk`: the queue's keys after the batch's columns (no gradient)."""
    out = TiledRowStats.apply(za, zc, pos, inv_tau, block, masks, linear, zk)
    return list(out) if isinstance(out, tuple) else [out]


def one_positive(
    za: torch.Tensor,
    zc: torch.Tensor,
    lse_n: torch.Tensor,
    pos: Positives,
    inv_tau: float,
    block: int,
    inside: bool,
    zk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocked equivalent of `dense.one_positive`; `zk` as in `row_stats`."""
    return TiledOnePositive.apply(za, zc, lse_n, pos, inv_tau, block, inside, zk)
