"""Mixup and CutMix on device, after the loader, independently per view (GenSCL, arXiv 2206.00384), as label vectors.

Written here rather than taken from `timm.data.Mixup`: timm pairs every sample with its mirror in the batch
(`x.flip(0)`) and draws lambda from numpy's global RNG, so two views would share their partners; GenSCL mixes
each view with its own permutation and lambda.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from supcon_scale.config import MixConfig


def mixing(cfg: MixConfig) -> bool:
    """Whether `mix.*` mixes anything: a positive probability and at least one positive alpha."""
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


class ViewMixer:
    """`(views, labels[B]) -> (mixed views, label vectors [B, V, C])`; each row of the label vectors sums to 1."""

    def __init__(self, cfg: MixConfig, num_classes: int, seed: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def enabled(self) -> bool:
        return mixing(self.cfg)

    def get_state(self) -> torch.Tensor:
        """The generator's state: what a resumed run needs to draw the same lambdas, boxes and partners."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _beta(self, alpha: float) -> float:
        g1 = torch._standard_gamma(torch.tensor(alpha, dtype=torch.float64), generator=self.generator)
        g2 = torch._standard_gamma(torch.tensor(alpha, dtype=torch.float64), generator=self.generator)
        return float(g1 / (g1 + g2))

    def mix_view(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, str]:
        """Mix one view `x` [B, 3, H, W] with one-hot `y` [B, C]; returns (x, y, lambda as applied, kind)."""
        cfg = self.cfg
        if self._rand() >= cfg.prob:
            return x, y, 1.0, "none"
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or self._rand() < cfg.switch_prob)
        perm = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        if use_cutmix:
            lam = self._beta(cfg.cutmix_alpha)
            x, lam = self._paste_box(x, perm, lam)
            kind = "cutmix"
        else:
            lam = self._beta(cfg.mixup_alpha)
            x = x * lam + x[perm] * (1 - lam)
            kind = "mixup"
        return x, y * lam + y[perm] * (1 - lam), lam, kind

    def _paste_box(self, x: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
        """Paste a box of area (1 - lam) from the partner; lambda is corrected to the box actually pasted."""
        h, w = x.shape[-2:]
        cut_h, cut_w = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
        cy = int(torch.randint(h, (), generator=self.generator))
        cx = int(torch.randint(w, (), generator=self.generator))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        return x, 1 - (y1 - y0) * (x1 - x0) / (h * w)

    def __call__(self, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        one_hot = F.one_hot(labels, self.num_classes).float()
        mixed, vectors = [], []
        for v in views:
            x, y, _, _ = self.mix_view(v, one_hot)
            mixed.append(x)
            vectors.append(y)
        return mixed, torch.stack(vectors, dim=1)
