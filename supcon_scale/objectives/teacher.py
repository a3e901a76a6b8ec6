"""The frozen teacher of GenSCL's knowledge distillation: its softened predictions become label vectors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from supcon_scale import checkpoint, config, export, models, weights
from supcon_scale.objectives import cross_entropy


class Teacher(nn.Module):
    """Eval mode, no gradient, ever: `train()` is a no-op so the trainer's mode switches cannot reach it."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    def train(self, mode: bool = True) -> Teacher:
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Softened predictions of one batch, or of a step's views (rows view-major), one pass per size group."""
        groups = [x] if isinstance(x, torch.Tensor) else models.same_size_groups(x)
        logits = torch.cat([self.model(group).float() for group in groups])
        return torch.softmax(logits / self.temperature, dim=-1)

    @torch.no_grad()
    def check_sizes(self, sizes: Sequence[int], device: torch.device) -> None:
        """Refuse view sizes the teacher cannot label (a fixed-input-size family such as ViT, built for one size):
        one image of each size through it, before the first step."""
        for size in sizes:
            try:
                self.model(torch.zeros(1, 3, size, size, device=device))
            except Exception as exc:  # timm's families raise Assertion-, Runtime- or ValueErrors
                reason = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ValueError(
                    f"kd.teacher: the teacher cannot label the {size} px views of data.view_sizes "
                    f"({type(exc).__name__}: {reason}); use one view size or a teacher that takes any size"
                ) from None


def load(cfg: config.KDConfig, num_classes: int) -> Teacher:
    """A teacher from a supcon_scale cross-entropy run (checkpoint or run directory) or a timm name + weights file."""
    if cfg.teacher is None:
        raise ValueError("kd.teacher: set a timm model name (with kd.checkpoint) or a cross-entropy run directory")
    source = Path(cfg.teacher)
    if source.is_dir():
        model = _from_run(source)
    else:
        models.check_local_name(cfg.teacher, "kd.teacher")  # a hub name would fetch its config and weights
        try:
            model = timm.create_model(cfg.teacher, num_classes=num_classes, pretrained=False)
        except RuntimeError as exc:
            raise ValueError(f"kd.teacher: {exc}") from None
        if cfg.checkpoint is None:
            raise ValueError(f"kd.checkpoint: the timm teacher {cfg.teacher} needs a weights file")
        file = Path(cfg.checkpoint)
        if not file.is_file():
            raise ValueError(f"kd.checkpoint: file not found: {file}")
        weights.load_matching(model, weights.load_weights(file, "kd.checkpoint"), str(file))
    return Teacher(model, cfg.temperature)


def _from_run(path: Path) -> nn.Module:
    """A classifier trained by this project with `loss.name: cross_entropy` (its head is the linear classifier)."""
    ckpt = path if checkpoint.is_complete(path) else checkpoint.latest(path)
    if ckpt is None:
        raise ValueError(f"kd.teacher: no complete checkpoint in {path}")
    meta = checkpoint.read_meta(ckpt)
    if meta["config"]["loss"]["name"] != cross_entropy.NAME:
        raise ValueError(
            f"kd.teacher: {ckpt} is a {meta['config']['loss']['name']} run; a teacher must be a classifier"
        )
    state = weights.load_tensors(ckpt / "model.safetensors")
    if state.get("head.weight") is None or state["head.weight"].ndim != 2:
        raise ValueError(f"kd.teacher: {ckpt / 'model.safetensors'} has no classifier head.weight")
    encoder, _ = export.encoder_from_export(ckpt)  # rebuilt from the construction arguments the run recorded
    head = nn.Linear(*state["head.weight"].shape[::-1])
    weights.load_matching(head, {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}, str(ckpt))
    normalize_input = bool(meta["config"]["model"].get("normalize_encoder_output", False))
    return models.SupConModel(encoder, head, normalize=False, normalize_input=normalize_input)
