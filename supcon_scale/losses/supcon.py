"""SupCon / SimCLR / GenSCL loss: local anchors against the (globally gathered) contrast set, exact in every variant.

Row r of the loss (Khosla et al. 2020, Eq. 2 and 3) with logits s = z_r . z_c / tau, self column excluded, weights w_rc >= 0:
  L_out: LSE_c(s_rc) - sum_c w_rc s_rc / W_r               (W_r = sum_c w_rc)
  L_in : LSE_c(s_rc) - log sum_c w_rc exp(s_rc) + log W_r
w_rc is 1[same label] (integer labels), 1[same image] (SimCLR) or the cosine of the label vectors (GenSCL); one-hot
vectors therefore give exactly L_out. The positive part of L_out is low rank (class sums of the contrast
embeddings), so only the log-sum-exp needs the [anchors x contrast] logits: dense materialises them, tiled
(`tiled.py`) walks them in blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from supcon_scale import distributed
from supcon_scale.losses import tiled

Variant = Literal["out", "in"]
Contrast = Literal["all", "one"]
Scale = Literal["none", "temperature", "base_temperature"]
Impl = Literal["dense", "tiled", "auto"]

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

    def select(self, keep: torch.Tensor) -> "Positives":
        """The same structure restricted to the anchors `keep` (an index tensor)."""
        return Positives(
            None if self.anchor_ids is None else self.anchor_ids[keep],
            self.contrast_ids,
            None if self.anchor_vecs is None else self.anchor_vecs[keep],
            self.contrast_vecs,
            self.self_col[keep],
        )

    def self_weight(self) -> torch.Tensor:
        """w of each anchor with itself (1 for ids; |y|^2 for vectors, 0 for a zero label vector)."""
        if self.anchor_vecs is None:
            return torch.ones(self.self_col.shape[0], dtype=torch.float64, device=self.self_col.device)
        return (self.anchor_vecs * self.anchor_vecs).sum(1)

    def total_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_r = sum over the contrast set, self excluded."""
        if self.anchor_vecs is None:
            counts = torch.bincount(self.contrast_ids)
            return (counts[self.anchor_ids] - 1).to(dtype)
        return (self.anchor_vecs @ self.contrast_vecs.sum(0) - self.self_weight()).to(dtype)

    def block(self, rows: slice, cols: slice, dtype: torch.dtype) -> torch.Tensor:
        """Dense weights for a block of anchors x contrast columns (self not yet zeroed)."""
        if self.anchor_vecs is None:
            return (self.anchor_ids[rows, None] == self.contrast_ids[None, cols]).to(dtype)
        return (self.anchor_vecs[rows] @ self.contrast_vecs[cols].T).to(dtype)

    def weighted_sum(self, za: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
        """sum_c w_rc (z_r . z_c), self excluded, without the [n, M] matrix: class sums (ids) or Y^T Z (vectors).

        The self term z_r . z_r is |z_r|^2, 1 for a unit row and 0 for a zero row, and has zero gradient through the
        normalisation, so it is subtracted as that constant (saving two [M, D] temporaries).
        """
        self_dot = (torch.linalg.vector_norm(za.detach(), dim=1) > 0).to(za.dtype)
        if self.anchor_vecs is None:
            return _ClassSumDot.apply(za, zc, self.anchor_ids, self.contrast_ids) - self_dot
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
    def forward(ctx, za, zc, anchor_ids, contrast_ids):
        k = int(contrast_ids.max()) + 1
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
            return grad_za, None, None, None
        return grad_za, grad_sums[contrast_ids], None, None


class SupConLoss(nn.Module):
    """Supervised contrastive loss; `loss(features [B, V, D], labels [B] | [B, C] | [B, V, C] | None)` -> fp32."""

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
    ):
        super().__init__()
        checks = {
            "loss.variant": (variant, ("out", "in")),
            "loss.contrast": (contrast, ("all", "one")),
            "loss.scale": (scale, ("none", "temperature", "base_temperature")),
            "loss.impl": (impl, ("dense", "tiled", "auto")),
            "loss.name": (name, ("supcon", "simclr", "genscl")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        if not temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        if not base_temperature > 0:
            raise ValueError(f"loss.base_temperature must be > 0, got {base_temperature}")
        if block_size < 1:
            raise ValueError(f"loss.block_size must be >= 1, got {block_size}")
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
        with torch.autocast(device_type=device_type, enabled=False):  # fp32 even under autocast: exp overflows bf16/fp16
            dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
            return self._loss(features.to(dtype), labels, b, v)

    # ---------------------------------------------------------------------------------------------------------

    def _loss(self, features: torch.Tensor, labels: torch.Tensor | None, b: int, v: int) -> torch.Tensor:
        z = normalize(features).reshape(b * v, -1)  # sample-major rows: row = sample * V + view
        rank, world = distributed.world()
        gathering = self.gather and world > 1
        if gathering:
            zc, offset = distributed.all_gather_with_grad(z)
        else:
            zc, offset = z, 0
        pos = self._positives(labels, b, v, offset, zc.shape[0], gathering, z.device)
        anchor_rows = torch.arange(b, device=z.device) * v if self.contrast == "one" else None
        za = z if anchor_rows is None else z[anchor_rows]

        weight = pos.total_weight(z.dtype)
        threshold = 0.5 if pos.anchor_vecs is None else _MIN_VECTOR_WEIGHT
        keep = torch.nonzero(weight > threshold).squeeze(1)
        n_valid = torch.tensor(float(keep.numel()), dtype=torch.float64, device=z.device)
        if keep.numel() < za.shape[0]:  # anchors without positives are left out (their |P(i)| is 0), never NaN
            za, pos, weight = za[keep], pos.select(keep), weight[keep]

        rows = self._rows(za, zc, pos, weight) * self.scale_factor()
        if not gathering:
            return rows.sum() / max(keep.numel(), 1)
        # DDP averages the ranks' losses (and gradients). Ranks may hold different numbers of valid anchors (uneven
        # batches, anchors without positives), so each rank returns sum(local rows) * world / N_global: the mean
        # over ranks of these is exactly the global mean over all valid anchors.
        n_global = float(distributed.all_reduce_sum(n_valid).item())
        return rows.sum() * (world / max(n_global, 1.0))

    def _positives(
        self, labels: torch.Tensor | None, b: int, v: int, offset: int, m: int, gathering: bool, device: torch.device
    ) -> Positives:
        """Ids or unit label vectors for the contrast rows and for this rank's anchors."""
        local = torch.arange(b * v, device=device)
        if self.contrast == "one":
            local = local[::v]
        self_col = local + offset
        if labels is None:  # SimCLR: the positives of a view are the other views of its image
            contrast_ids = torch.arange(m, device=device) // v
            return Positives(self_col // v, contrast_ids, None, None, self_col)
        all_labels = distributed.all_gather_no_grad(labels) if gathering else labels
        if labels.ndim == 1:
            _, compact = torch.unique(all_labels, return_inverse=True)
            contrast_ids = compact.repeat_interleave(v)
            return Positives(contrast_ids[self_col], contrast_ids, None, None, self_col)
        if labels.ndim == 3:  # per-view vectors (GenSCL mixes each view on its own): rows are sample-major already
            vecs = normalize(all_labels.to(torch.float64).reshape(-1, all_labels.shape[-1]))
        else:
            vecs = normalize(all_labels.to(torch.float64)).repeat_interleave(v, dim=0)
        return Positives(None, None, vecs[self_col], vecs, self_col)

    def _use_tiled(self, n: int, m: int) -> bool:
        return self.impl == "tiled" or (self.impl == "auto" and n * m > self.auto_threshold)

    def _rows(self, za: torch.Tensor, zc: torch.Tensor, pos: Positives, weight: torch.Tensor) -> torch.Tensor:
        """Per-anchor loss (unscaled) for anchors that all have positives."""
        inv_tau = 1.0 / self.temperature
        if za.shape[0] == 0:
            return za.sum(1) * 0.0 + zc.sum() * 0.0  # keeps the graph connected for DDP
        if self._use_tiled(za.shape[0], zc.shape[0]):
            lse_all, lse_pos = tiled.log_sum_exps(za, zc, pos, inv_tau, self.block_size, self.variant == "in")
        else:
            lse_all, lse_pos = _dense_log_sum_exps(za, zc, pos, inv_tau, self.variant == "in")
        if self.variant == "out":
            return lse_all - pos.weighted_sum(za, zc) * inv_tau / weight
        return lse_all - lse_pos + torch.log(weight)


def _dense_log_sum_exps(
    za: torch.Tensor, zc: torch.Tensor, pos: Positives, inv_tau: float, with_pos: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSE over the contrast set (self excluded) and, for L_in, log sum_c w_rc exp(s_rc), from the full logits."""
    n = za.shape[0]
    logits = torch.mm(za, zc.T).mul_(inv_tau)
    logits.index_put_((torch.arange(n, device=za.device), pos.self_col), logits.new_tensor(-math.inf))
    lse_all = torch.logsumexp(logits, dim=1)
    if not with_pos:
        return lse_all, None
    w = pos.block(slice(None), slice(None), za.dtype)
    w[torch.arange(n, device=za.device), pos.self_col] = 0.0
    lse_pos = torch.logsumexp(logits + torch.log(w), dim=1)  # log 0 = -inf drops non-positives
    return lse_all, lse_pos


def build(cfg) -> SupConLoss:
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
    )
