"""Encoder (any timm model) + projection head, returning L2-normalised embeddings."""

from __future__ import annotations

import contextlib
import functools

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from supcon_scale.config import ModelConfig


class SupConModel(nn.Module):
    """`encoder` maps images to pooled features h; `head` maps h to the embedding z (normalised in `forward`).

    After training the head is thrown away and the encoder alone is exported (the paper's protocol).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.encoder(x))
        return F.normalize(out.float(), dim=-1) if self.normalize else out


def create_encoder(name: str, cifar_stem: bool = False, pretrained: bool = False) -> nn.Module:
    """A timm model without classifier (`num_classes=0`): its output is the pooled feature vector."""
    try:
        encoder = timm.create_model(name, num_classes=0, pretrained=pretrained)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"model.encoder: {exc}") from None
    if cifar_stem:
        _to_cifar_stem(encoder)
    return encoder


def _to_cifar_stem(encoder: nn.Module) -> None:
    """3x3 stride-1 first conv without max-pool, the usual ResNet variant for 32 px images."""
    conv = getattr(encoder, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError("model.cifar_stem: only ResNet-style encoders with a single conv1 stem support it")
    encoder.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    encoder.maxpool = nn.Identity()


class _FrozenBatchNormStats:
    """During recomputation, batch norm normalises with batch statistics as before but must not fold them into the
    running averages a second time (timm's `set_grad_checkpointing` updates them twice). Momentum 0 keeps the
    averages exactly (x*1 + 0*y); `track_running_stats=False` would change the saved tensors, which checkpoint
    rejects."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                      for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, count) in zip(self.norms, self.saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _checkpointed_forward(stage: nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    if not (stage.training and torch.is_grad_enabled()):
        return forward(x)
    contexts = lambda: (contextlib.nullcontext(), _FrozenBatchNormStats(stage))  # noqa: E731
    return checkpoint(forward, x, use_reentrant=False, context_fn=contexts)


def stages(encoder: nn.Module) -> list[nn.Module]:
    """The residual stages of a ResNet-style encoder (`layer1..4` in timm's ResNet, `stages` elsewhere)."""
    found = [getattr(encoder, f"layer{i}") for i in range(1, 5) if hasattr(encoder, f"layer{i}")]
    if not found and isinstance(getattr(encoder, "stages", None), nn.Sequential):
        found = list(encoder.stages)
    return found


def enable_activation_checkpointing(encoder: nn.Module) -> int:
    """Recompute each stage's activations in backward instead of storing them; returns the number of stages.

    The stage's `forward` is replaced on the instance, so parameter names (and exported state dicts) do not change.
    """
    found = stages(encoder)
    if not found:
        raise ValueError("model.activation_checkpointing: the encoder has no layer1..4 or stages to checkpoint")
    for stage in found:
        stage.forward = functools.partial(_checkpointed_forward, stage, stage.forward)
    return len(found)


def create_head(kind: str, in_dim: int, hidden_dim: int | None, out_dim: int) -> nn.Module:
    if kind == "linear":  # the official TF release: a single 2048 -> 128 layer
        return nn.Linear(in_dim, out_dim)
    hidden = hidden_dim or in_dim  # the PyTorch reference: 2048 -> 2048 -> 128
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def build(cfg: ModelConfig, num_classes: int | None = None) -> SupConModel:
    """The SupCon model; with `num_classes` a linear classifier replaces the projection (cross-entropy baseline)."""
    encoder = create_encoder(cfg.encoder, cfg.cifar_stem)
    if num_classes is None:
        model = SupConModel(encoder, create_head(cfg.head, encoder.num_features, cfg.head_hidden_dim, cfg.feat_dim))
    else:
        model = SupConModel(encoder, nn.Linear(encoder.num_features, num_classes), normalize=False)
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.encoder)
    return model
