"""The SupCon row statistics from the full [anchors x contrast] logits: the reference `tiled.py` equals blockwise."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from supcon_scale.losses.positives import Positives


def row_stats(
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


def one_positive(za: torch.Tensor, zc: torch.Tensor, pos: Positives, inv_tau: float, inside: bool) -> torch.Tensor:
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
