"""Contrastive losses: SupCon (L_out / L_in), SimCLR (no labels) and GenSCL (label vectors), dense or tiled."""

from supcon_scale.losses.supcon import SupConLoss

__all__ = ["SupConLoss"]
