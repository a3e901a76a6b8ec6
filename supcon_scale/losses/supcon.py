"""SupCon / SimCLR / GenSCL loss: local anchors against the (globally gathered) contrast set, exact in every variant.

Row r of the loss (Khosla et al. 2020, Eq. 2 and 3) with logits s = z_r . z_c / tau, self column excluded, weights
w_rc >= 0:
  L_out: LSE_c(s_rc) - sum_c w_rc s_rc / W_r               (W_r = sum_c w_rc)
  L_in : LSE_c(s_rc) - log sum_c w_rc exp(s_rc) + log W_r
w_rc is 1[same label] (integer labels), 1[same image] (SimCLR) or the cosine of the label vectors (GenSCL); one-hot
vectors therefore give exactly L_out. The positive part of L_out is low rank (class sums of the contrast
embeddings), so only the log-sum-exp needs the [anchors x contrast] logits: dense materialises them, tiled
(`tiled.py`) walks them in blocks.

The official release's `contrastive_loss` (google-research/supcon `losses.py`) has two more options, both here:
`denominator_mode` (which positives the denominator holds: all, one_positive = only the positive in the numerator,
only_negatives = none) and `positives_cap` (at most that many positive views per anchor besides the anchor's own
image's other views). With N the negatives (other labels) and P the kept positives of r:
  all           : LSE over P and N in place of LSE_c (a dropped positive leaves the row entirely)
  only_negatives: LSE_N in place of LSE_c (anchors with no negative are left out: the loss is unbounded there)
  one_positive  : L_out = mean_P softplus(LSE_N - s_p),  L_in = log |P| - LSE_P logsigmoid(s_p - LSE_N)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from supcon_scale import distributed
from supcon_scale.losses import tiled

Variant = Literal["out", "in"]
Contrast = Literal["all", "one"]
Scale = Literal["none", "temperature", "base_temperature"]
Impl = Literal["dense", "tiled", "auto"]
DenominatorMode = Literal["all", "one_positive", "only_negatives"]
MaskKind = Literal["all", "pos", "neg", "den"]

# Vector-label anchors whose total positive weight is below this have no positives (weights are cosines in [0, 1]).
_MIN_VECTOR_WEIGHT = 1e-6


class _Normalize(torch.autograd.Function):
    """Rows to unit length with a hand-written backward: one [M, D] buffer instead of autograd's three or four."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv = torch.where(norm > 0, norm, torch.ones_like(norm)).reciprocal_().mul_(norm > 0)
        z = x * inv
        ctx.save_for_backward(z, inv)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        z, inv = ctx.saved_tensors
        # d(x/|x|) = (g - z (g . z)) / |x|; a zero row has inv = 0 and so a zero gradient
        dot = torch.linalg.vecdot(grad, z).unsqueeze(-1)
        return torch.addcmul(grad, z, dot, value=-1.0).mul_(inv)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows to unit length; an all-zero row stays zero with a zero gradient (F.normalize would give grad/eps)."""
    return _Normalize.apply(x)


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

    def weighted_sum(self, za: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
        """sum_c w_rc (z_r . z_c), self excluded, without the [n, M] matrix: class sums (ids) or Y^T Z (vectors).

        The self term z_r . z_r is |z_r|^2, 1 for a unit row and 0 for a zero row, and has zero gradient through the
        normalisation, so it is subtracted as that constant (saving two [M, D] temporaries).
        """
        self_dot = (torch.linalg.vector_norm(za.detach(), dim=1) > 0).to(za.dtype)
        if self.anchor_vecs is None:
            k = self.num_ids or int(self.contrast_ids.max()) + 1
            return _ClassSumDot.apply(za, zc, self.anchor_ids, self.contrast_ids, k) - self_dot
        proj = self.contrast_vecs.to(zc.dtype).T @ zc  # [C, D]
        ya = self.anchor_vecs.to(zc.dtype)
        return torch.linalg.vecdot(ya @ proj, za) - self.self_weight().to(zc.dtype) * self_dot


class _ClassSumDot(torch.autograd.Function):
    """z_r . (sum of the contrast rows of r's class), row by row, through [classes, D] sums only.

    Autograd would keep the gathered [M, D] class sums for backward and build two more [M, D] temporaries there;
    this keeps the [classes, D] sums and works in row chunks. When the anchors are the contrast set (one process,
    every view an anchor) both gradients land in one buffer.
    """

    CHUNK = 4096

    @staticmethod
    def forward(ctx, za, zc, anchor_ids, contrast_ids, k: int):
        sums = zc.new_zeros((k, zc.shape[1])).index_add_(0, contrast_ids, zc)
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
            return grad_za, None, None, None, None
        return grad_za, grad_sums[contrast_ids], None, None, None


_CHOICES = {
    "variant": ("out", "in"),
    "contrast": ("all", "one"),
    "scale": ("none", "temperature", "base_temperature"),
    "impl": ("dense", "tiled", "auto"),
    "name": ("supcon", "simclr", "genscl"),
    "denominator_mode": ("all", "one_positive", "only_negatives"),
}
_CONFIG_KEYS = {"variant", "contrast", "scale", "impl", "name", "denominator_mode", "temperature", "base_temperature"}


def _check_args(args: dict) -> None:
    """Constructor arguments, for callers that build the loss from Python rather than from a checked config."""

    def where(arg: str) -> str:  # the config key too, where the argument is one (loss.build passes them through)
        return f"{arg} (loss.{arg})" if arg in _CONFIG_KEYS else arg

    for arg, allowed in _CHOICES.items():
        if args[arg] not in allowed:
            raise ValueError(f"{where(arg)} must be one of {', '.join(allowed)}; got {args[arg]!r}")
    for arg in ("temperature", "base_temperature"):
        if not args[arg] > 0 or not math.isfinite(args[arg]):
            raise ValueError(f"{where(arg)} must be a finite number > 0, got {args[arg]}")
    if args["block_size"] < 1:
        raise ValueError(f"block_size must be >= 1, got {args['block_size']}")
    cap = args["positives_cap"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ValueError(f"positives_cap (loss.positives_cap) must be an integer >= 0 or None, got {cap!r}")


class SupConLoss(nn.Module):
    """Supervised contrastive loss; `loss(features [B, V, D], labels [B] | [B, C] | [B, V, C] | None)` -> fp32.

    `positives_cap` (official `contrastive_loss`): each anchor keeps its own image's other views and every view of
    at most positives_cap / V other images of its label, namely the first ones in the global batch order (rank by
    rank, then position in the local batch); the official code takes `tf.math.top_k` of the 0/1 same-label row,
    which returns ties lowest index first. The rule is deterministic and the same on every rank.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        variant: Variant = "out",
        contrast: Contrast = "all",
        scale: Scale = "none",
        base_temperature: float = 0.07,
        gather: bool = True,
        impl: Impl = "dense",
        block_size: int = 1024,
        auto_threshold: int = 2**24,
        name: Literal["supcon", "simclr", "genscl"] = "supcon",
        denominator_mode: DenominatorMode = "all",
        positives_cap: int | None = None,
        equal_batches: bool = False,
    ):
        super().__init__()
        _check_args(locals())
        self.temperature = float(temperature)
        self.variant = variant
        self.contrast = contrast
        self.scale = scale
        self.base_temperature = float(base_temperature)
        self.gather = gather
        self.impl = impl
        self.block_size = int(block_size)
        self.auto_threshold = int(auto_threshold)
        self.name = name
        self.denominator_mode = denominator_mode
        self.positives_cap = None if positives_cap is None else int(positives_cap)
        self.equal_batches = equal_batches
        self._sizes: list[int] | None = None

    def convention(self) -> dict:
        """The loss convention as plain data, recorded in checkpoints (learning rates depend on `scale`)."""
        return {
            "name": self.name,
            "variant": self.variant,
            "contrast": self.contrast,
            "scale": self.scale,
            "temperature": self.temperature,
            "base_temperature": self.base_temperature,
            "impl": self.impl,
            "denominator_mode": self.denominator_mode,
            "positives_cap": self.positives_cap,
        }

    describe = convention

    def scale_factor(self) -> float:
        """none: Eq. 2 as written; temperature: x tau (official TF); base_temperature: x tau/base (HobbitLong)."""
        if self.scale == "temperature":
            return self.temperature
        if self.scale == "base_temperature":
            return self.temperature / self.base_temperature
        return 1.0

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if features.ndim != 3:
            raise ValueError(f"features must be [batch, views, dim], got shape {tuple(features.shape)}")
        if self.name == "simclr":
            labels = None
        b, v, d = features.shape
        if labels is not None and (
            labels.ndim not in (1, 2, 3) or labels.shape[0] != b or (labels.ndim == 3 and labels.shape[1] != v)
        ):
            raise ValueError(
                f"labels must be [{b}] integers, [{b}, classes] or per-view [{b}, {v}, classes] label vectors to "
                f"match features, got shape {tuple(labels.shape)}"
            )
        if labels is not None and labels.ndim == 1 and labels.is_floating_point():
            raise ValueError("labels of shape [batch] must be integers; use [batch, classes] for label vectors")
        device_type = features.device.type
        # fp32 even under autocast: exp overflows bf16/fp16
        with torch.autocast(device_type=device_type, enabled=False):
            dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
            return self._loss(features.to(dtype), labels, b, v)

    # ---------------------------------------------------------------------------------------------------------

    def _loss(self, features: torch.Tensor, labels: torch.Tensor | None, b: int, v: int) -> torch.Tensor:
        z = normalize(features).reshape(b * v, -1)  # sample-major rows: row = sample * V + view
        rank, world = distributed.world()
        gathering = self.gather and world > 1
        sizes = None
        if gathering:
            sizes = self._gather_sizes(b * v, z.device)
            zc, offset = distributed.all_gather_with_grad(z, sizes)
        else:
            zc, offset = z, 0
        pos = self._positives(labels, b, v, offset, zc.shape[0], gathering, z.device, sizes)
        anchor_rows = torch.arange(b, device=z.device) * v if self.contrast == "one" else None
        za = z if anchor_rows is None else z[anchor_rows]

        weight = pos.total_weight(z.dtype)
        need_negative = self.denominator_mode == "only_negatives"
        if pos.anchor_vecs is None and v >= 2 and not need_negative:
            # Every anchor has a positive (another view of its own image): known from the shapes, no host read.
            n_local, n_valid = za.shape[0], torch.tensor(float(za.shape[0]), dtype=torch.float64, device=z.device)
        else:
            threshold = 0.5 if pos.anchor_vecs is None else _MIN_VECTOR_WEIGHT
            valid = weight > threshold
            if need_negative:  # no negative: log 0 in the denominator, an unbounded loss; left out like no positive
                valid &= pos.negatives() > 0
            keep = torch.nonzero(valid).squeeze(1)
            n_local = keep.numel()
            n_valid = torch.tensor(float(n_local), dtype=torch.float64, device=z.device)
            if n_local < za.shape[0]:  # anchors without positives are left out (their |P(i)| is 0), never NaN
                za, pos, weight = za[keep], pos.select(keep), weight[keep]

        rows = self._rows(za, zc, pos, weight) * self.scale_factor()
        if not gathering:
            return rows.sum() / max(n_local, 1)
        # DDP averages the ranks' losses (and gradients). Ranks may hold different numbers of valid anchors (uneven
        # batches, anchors without positives), so each rank returns sum(local rows) * world / N_global: the mean
        # over ranks of these is exactly the global mean over all valid anchors. N_global stays on the device.
        n_global = distributed.all_reduce_sum(n_valid).clamp_(min=1.0).to(rows.dtype)
        return rows.sum() * world / n_global

    def _positives(
        self,
        labels: torch.Tensor | None,
        b: int,
        v: int,
        offset: int,
        m: int,
        gathering: bool,
        device: torch.device,
        sizes: list[int] | None = None,
    ) -> Positives:
        """Ids or unit label vectors for the contrast rows and for this rank's anchors."""
        official = self.denominator_mode != "all" or self.positives_cap is not None
        if official and labels is not None and labels.ndim != 1:
            raise ValueError(
                "loss.denominator_mode and loss.positives_cap (the official loss's options) need integer labels or "
                "none (SimCLR); label vectors (GenSCL, Mixup) have no hard negatives or positives"
            )
        if self.positives_cap is not None and self.positives_cap % v:
            raise ValueError(
                f"positives_cap (loss.positives_cap) must be a multiple of the {v} views, got {self.positives_cap}"
            )
        stride = v if self.contrast == "one" else 1
        host = range(offset, offset + b * v, stride)
        self_col = torch.arange(offset, offset + b * v, stride, device=device)
        if labels is None:  # SimCLR: the positives of a view are the other views of its image
            contrast_ids = torch.arange(m, device=device) // v
            return Positives(
                self_col // v, contrast_ids, None, None, self_col, views=v, self_col_host=host, num_ids=m // v
            )
        all_labels = distributed.all_gather_no_grad(labels, [n // v for n in sizes]) if sizes else labels
        if labels.ndim == 1:
            ids = _compact_ids(all_labels)
            contrast_ids = ids.repeat_interleave(v)
            pos = Positives(
                contrast_ids[self_col],
                contrast_ids,
                None,
                None,
                self_col,
                views=v,
                self_col_host=host,
                num_ids=all_labels.shape[0],
            )
            return pos if self.positives_cap is None else _capped(pos, ids, self.positives_cap // v)
        if labels.ndim == 3:  # per-view vectors (GenSCL mixes each view on its own): rows are sample-major already
            vecs = normalize(all_labels.to(torch.float64).reshape(-1, all_labels.shape[-1]))
        else:
            vecs = normalize(all_labels.to(torch.float64)).repeat_interleave(v, dim=0)
        return Positives(None, None, vecs[self_col], vecs, self_col, views=v, self_col_host=host)

    def _gather_sizes(self, rows: int, device: torch.device) -> list[int]:
        """Every rank's row count: one small all-gather (a host read) per step, or only on the first step (and
        whenever this rank's count changes) when `equal_batches` promises they are all the same."""
        rank, world = distributed.world()
        if self.equal_batches and self._sizes is not None and self._sizes[rank] == rows:
            return self._sizes
        sizes = distributed.local_sizes(rows, device)
        if self.equal_batches:
            if len(set(sizes)) > 1:
                raise ValueError(f"equal_batches: the ranks' batches differ ({sizes} rows); set data.drop_last=true")
            self._sizes = sizes
        return sizes

    def _use_tiled(self, n: int, m: int) -> bool:
        return self.impl == "tiled" or (self.impl == "auto" and n * m > self.auto_threshold)

    def _rows(self, za: torch.Tensor, zc: torch.Tensor, pos: Positives, weight: torch.Tensor) -> torch.Tensor:
        """Per-anchor loss (unscaled) for anchors that all have positives."""
        inv_tau = 1.0 / self.temperature
        if za.shape[0] == 0:
            return za.sum(1) * 0.0 + zc.sum() * 0.0  # keeps the graph connected for DDP
        use_tiled = self._use_tiled(za.shape[0], zc.shape[0])
        inside = self.variant == "in"
        if self.denominator_mode == "one_positive":  # each positive has its own denominator: a second pass
            if use_tiled:
                (lse_n,) = tiled.row_stats(za, zc, pos, inv_tau, self.block_size, ("neg",), False)
                part = tiled.one_positive(za, zc, lse_n, pos, inv_tau, self.block_size, inside)
            else:
                part = _dense_one_positive(za, zc, pos, inv_tau, inside)
            return torch.log(weight) - part if inside else part / weight
        # The denominator's columns: every one but self, the kept positives and the negatives (a cap drops the
        # others from the row), or the negatives only.
        den = "neg" if self.denominator_mode == "only_negatives" else "all" if pos.cap is None else "den"
        # L_out's positive sum: low rank without a cap; with one, the kept set depends on the anchor, so blockwise.
        linear = not inside and pos.cap is not None
        masks = (den, "pos") if inside else (den,)
        stats = (tiled.row_stats if use_tiled else _dense_row_stats)(
            za, zc, pos, inv_tau, self.block_size, masks, linear
        )
        if inside:
            return stats[0] - stats[1] + torch.log(weight)
        positive_sum = stats[1] if linear else pos.weighted_sum(za, zc) * inv_tau
        return stats[0] - positive_sum / weight


def _compact_ids(labels: torch.Tensor) -> torch.Tensor:
    """Labels to ids in [0, len(labels)), equal exactly where the labels are: a sort, no data-dependent shape
    (`torch.unique` reads its output size back from the GPU)."""
    sorted_labels, order = torch.sort(labels)
    starts = torch.ones_like(sorted_labels, dtype=torch.long)
    starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    ids = torch.empty_like(starts)
    ids[order] = starts.cumsum(0) - 1
    return ids


def _capped(pos: Positives, ids: torch.Tensor, cap: int) -> Positives:
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


def _dense_row_stats(
    za: torch.Tensor, zc: torch.Tensor, pos: Positives, inv_tau: float, block: int, masks: tuple, linear: bool
) -> list[torch.Tensor]:
    """From the full logits: the LSE over each mask's columns (`Positives.mask`; "all" = every column but self),
    then (`linear`) the positives' logit sum sum_c w_rc s_rc."""
    n = za.shape[0]
    rows = torch.arange(n, device=za.device)
    logits = torch.mm(za, zc.T).mul_(inv_tau)
    logits.index_put_((rows, pos.self_col), logits.new_tensor(-math.inf))
    out, w_pos = [], None
    for kind in masks:
        if kind == "all":
            out.append(torch.logsumexp(logits, dim=1))
            continue
        w = pos.mask(kind, slice(None), slice(None), za.dtype)
        w[rows, pos.self_col] = 0.0
        w_pos = w if kind == "pos" else w_pos
        out.append(torch.logsumexp(logits + torch.log(w), dim=1))  # log 0 = -inf drops the other columns
    if linear:
        if w_pos is None:
            w_pos = pos.block(slice(None), slice(None), za.dtype)
            w_pos[rows, pos.self_col] = 0.0
        out.append((torch.where(w_pos > 0, logits, 0.0) * w_pos).sum(1))
    return out


def _dense_one_positive(
    za: torch.Tensor, zc: torch.Tensor, pos: Positives, inv_tau: float, inside: bool
) -> torch.Tensor:
    """ONE_POSITIVE from the full logits: sum_P softplus(LSE_N - s_p) (L_out), LSE_P logsigmoid(s_p - LSE_N) (L_in)."""
    n = za.shape[0]
    rows = torch.arange(n, device=za.device)
    logits = torch.mm(za, zc.T).mul_(inv_tau)
    neg = pos.mask("neg", slice(None), slice(None), torch.bool)
    has_neg = neg.any(1, keepdim=True)
    # a row without negatives has LSE_N = -inf; a finite stand-in keeps logsumexp's backward free of exp(nan)
    lse_n = torch.logsumexp(torch.where(neg, logits, torch.where(has_neg, -math.inf, 0.0)), dim=1, keepdim=True)
    lse_n = torch.where(has_neg, lse_n, -math.inf)
    on = pos.block(slice(None), slice(None), torch.bool)
    on[rows, pos.self_col] = False
    s = torch.where(on, logits, 0.0)  # finite everywhere, so no inf - inf off the positives
    if inside:
        return torch.logsumexp(torch.where(on, F.logsigmoid(s - lse_n), -math.inf), dim=1)
    return torch.where(on, F.softplus(lse_n - s), 0.0).sum(1)


def build(cfg, equal_batches: bool = False) -> SupConLoss:
    """The loss named by a `LossConfig` (supcon | simclr | genscl); simclr ignores labels."""
    if cfg.name not in ("supcon", "simclr", "genscl"):
        raise ValueError(f"loss.name={cfg.name!r} is not a contrastive loss (supcon, simclr or genscl)")
    return SupConLoss(
        temperature=cfg.temperature,
        variant=cfg.variant,
        contrast=cfg.contrast,
        scale=cfg.scale,
        base_temperature=cfg.base_temperature,
        impl=cfg.impl,
        name=cfg.name,
        denominator_mode=cfg.denominator_mode,
        positives_cap=cfg.positives_cap,
        equal_batches=equal_batches,
    )
