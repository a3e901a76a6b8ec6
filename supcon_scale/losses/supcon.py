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

A queue (MoCo, He et al. 2020; with labels PaCo, Cui et al. 2021; XBM, Wang et al. 2020): `keys` [K, D], unit rows
without gradient, V views per queued sample (row = sample * V + view), are contrast columns after the gathered
batch's; the anchors stay the local batch. A key is a positive of the anchors of its label (`key_labels`) and a
negative of the others; without key labels (SimCLR) the keys carry an id no anchor has, so they are only
negatives. Every option above holds over the larger contrast set; `positives_cap` ranks the queued samples after the
batch's, in the order the keys come (the queue's slot order). Dense concatenates the keys to the batch; tiled walks
them as a second, gradient-free part of the columns.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from supcon_scale import distributed
from supcon_scale.losses import dense, tiled
from supcon_scale.losses.positives import Positives, capped, compact_ids

Variant = Literal["out", "in"]
Contrast = Literal["all", "one"]
Scale = Literal["none", "temperature", "base_temperature"]
Impl = Literal["dense", "tiled", "auto"]
DenominatorMode = Literal["all", "one_positive", "only_negatives"]

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


_CHOICES = {
    "variant": ("out", "in"),
    "contrast": ("all", "one"),
    "scale": ("none", "temperature", "base_temperature"),
    "impl": ("dense", "tiled", "auto"),
    "denominator_mode": ("all", "one_positive", "only_negatives"),
}
_CONFIG_KEYS = {"variant", "contrast", "scale", "impl", "denominator_mode", "temperature", "base_temperature"}


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

    `use_labels=False` ignores the labels: the positives of a view are its image's other views (SimCLR). `name` only
    labels the convention a checkpoint records; the objective that builds the loss chooses both (`objectives/`).
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
        name: str = "supcon",
        denominator_mode: DenominatorMode = "all",
        positives_cap: int | None = None,
        equal_batches: bool = False,
        use_labels: bool = True,
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
        self.use_labels = use_labels
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

    def scale_factor(self) -> float:
        """none: Eq. 2 as written; temperature: x tau (official TF); base_temperature: x tau/base (HobbitLong)."""
        if self.scale == "temperature":
            return self.temperature
        if self.scale == "base_temperature":
            return self.temperature / self.base_temperature
        return 1.0

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss over this rank's anchors; `keys` [K, D] (a queue's, no gradient) and their `key_labels`
        [K // V] extend the contrast set (module docstring). Without keys (or K = 0) the loss is the plain one."""
        if features.ndim != 3:
            raise ValueError(f"features must be [batch, views, dim], got shape {tuple(features.shape)}")
        if not self.use_labels:
            labels, key_labels = None, None
        b, v, d = features.shape
        keys, key_labels = _check_keys(keys, key_labels, labels, v, d)
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
            if keys is None:
                return self._loss(features.to(dtype), labels, b, v)
            return self._loss(features.to(dtype), labels, b, v, keys.detach().to(dtype), key_labels)

    # ---------------------------------------------------------------------------------------------------------

    def _loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | None,
        b: int,
        v: int,
        zk: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        z = normalize(features).reshape(b * v, -1)  # sample-major rows: row = sample * V + view
        rank, world = distributed.world()
        gathering = self.gather and world > 1
        sizes = None
        if gathering:
            sizes = self._gather_sizes(b * v, z.device)
            zc, offset = distributed.all_gather_with_grad(z, sizes)
        else:
            zc, offset = z, 0
        keyed = (0, None) if zk is None else (zk.shape[0], key_labels)
        pos = self._positives(labels, b, v, offset, zc.shape[0], gathering, z.device, sizes, keyed)
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

        rows = self._rows(za, zc, pos, weight, zk) * self.scale_factor()
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
        keyed: tuple[int, torch.Tensor | None] = (0, None),
    ) -> Positives:
        """Ids or unit label vectors for the contrast rows (the batch's m, then a queue's k = keyed[0] keys with
        their labels keyed[1]) and for this rank's anchors."""
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
        k, key_labels = keyed
        if labels is None:  # SimCLR: the positives of a view are the other views of its image (a key's: none)
            contrast_ids = torch.arange(m, device=device) // v
            if k:  # every key: one id no anchor has (a key is never a positive)
                contrast_ids = torch.cat([contrast_ids, contrast_ids.new_full((k,), m // v)])
            return Positives(
                self_col // v, contrast_ids, None, None, self_col, views=v, self_col_host=host, num_ids=m // v + (k > 0)
            )
        all_labels = distributed.all_gather_no_grad(labels, [n // v for n in sizes]) if sizes else labels
        if labels.ndim == 1:
            ids = compact_ids(all_labels) if k == 0 else _sample_ids(all_labels, key_labels, k // v)
            contrast_ids = ids.repeat_interleave(v)
            pos = Positives(
                contrast_ids[self_col],
                contrast_ids,
                None,
                None,
                self_col,
                views=v,
                self_col_host=host,
                num_ids=all_labels.shape[0] + (k > 0),
            )
            return pos if self.positives_cap is None else capped(pos, ids, self.positives_cap // v)
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

    def _rows(
        self, za: torch.Tensor, zc: torch.Tensor, pos: Positives, weight: torch.Tensor, zk: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-anchor loss (unscaled) for anchors that all have positives; `zk`: a queue's keys (columns after zc)."""
        inv_tau = 1.0 / self.temperature
        if za.shape[0] == 0:
            return za.sum(1) * 0.0 + zc.sum() * 0.0  # keeps the graph connected for DDP
        use_tiled = self._use_tiled(za.shape[0], zc.shape[0] + (0 if zk is None else zk.shape[0]))
        if not use_tiled and zk is not None:  # dense: the keys are simply more (gradient-free) contrast rows
            zc, zk = torch.cat([zc, zk]), None
        inside = self.variant == "in"
        if self.denominator_mode == "one_positive":  # each positive has its own denominator: a second pass
            if use_tiled:
                (lse_n,) = tiled.row_stats(za, zc, pos, inv_tau, self.block_size, ("neg",), False, zk)
                part = tiled.one_positive(za, zc, lse_n, pos, inv_tau, self.block_size, inside, zk)
            else:
                part = dense.one_positive(za, zc, pos, inv_tau, inside)
            return torch.log(weight) - part if inside else part / weight
        # The denominator's columns: every one but self, the kept positives and the negatives (a cap drops the
        # others from the row), or the negatives only.
        den = "neg" if self.denominator_mode == "only_negatives" else "all" if pos.cap is None else "den"
        # L_out's positive sum: low rank without a cap; with one, the kept set depends on the anchor, so blockwise.
        linear = not inside and pos.cap is not None
        masks = (den, "pos") if inside else (den,)
        if use_tiled:
            stats = tiled.row_stats(za, zc, pos, inv_tau, self.block_size, masks, linear, zk)
        else:
            stats = dense.row_stats(za, zc, pos, inv_tau, self.block_size, masks, linear)
        if inside:
            return stats[0] - stats[1] + torch.log(weight)
        positive_sum = stats[1] if linear else pos.weighted_sum(za, zc, zk) * inv_tau
        return stats[0] - positive_sum / weight


def _check_keys(
    keys: torch.Tensor | None, key_labels: torch.Tensor | None, labels: torch.Tensor | None, v: int, d: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A queue's keys and labels checked against the batch's shapes; no keys (or K = 0) -> (None, None)."""
    if keys is None or keys.shape[0] == 0:
        return None, None
    if keys.ndim != 2 or keys.shape[1] != d or keys.shape[0] % v:
        raise ValueError(f"keys must be [K, {d}] with K a multiple of the {v} views, got shape {tuple(keys.shape)}")
    if labels is not None and labels.ndim != 1:
        raise ValueError("a queue's keys need integer labels or none (SimCLR); label vectors (GenSCL) have no queue")
    if key_labels is not None and (key_labels.shape != (keys.shape[0] // v,) or key_labels.is_floating_point()):
        raise ValueError(
            f"key_labels must be [{keys.shape[0] // v}] integers (one per queued sample), got "
            f"{tuple(key_labels.shape)} {key_labels.dtype}"
        )
    return keys, key_labels


def _sample_ids(labels: torch.Tensor, key_labels: torch.Tensor | None, queued: int) -> torch.Tensor:
    """Ids of the batch's B samples (compact, < B) then the `queued` samples': the id of the batch's samples of the
    same label, else (a label no anchor has, or no key labels) B, which no anchor has. Only equality with an anchor
    matters, so the class sums of the positive term stay [B + 1, D] however long the queue."""
    ids = compact_ids(labels)
    if key_labels is None:
        return torch.cat([ids, ids.new_full((queued,), labels.shape[0])])
    key_labels = key_labels.to(labels.dtype)
    sorted_labels, order = torch.sort(labels)
    at = torch.searchsorted(sorted_labels, key_labels).clamp_(max=labels.shape[0] - 1)
    key_ids = torch.where(sorted_labels[at] == key_labels, ids[order[at]], labels.shape[0])
    return torch.cat([ids, key_ids])
