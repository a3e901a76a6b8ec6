"""The continual learners' networks: SCR's encoder + projection head, ER's encoder + linear classifier.

`ReducedResNet18` is the reduced ResNet-18 of the SCR paper and of GEM/MIR before it (the authors'
`models/resnet.py`): BasicBlocks [2, 2, 2, 2] of width w, 2w, 4w, 8w (w = 20: 160-d features), a 3x3 stride-1 stem
without max-pool, global average pooling. timm's ResNet fixes its stem at 64 channels, hence this module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale.batchnorm import convert_global_batchnorm
from supcon_scale.continual.config import ContinualModelConfig
from supcon_scale.export import encoder_from_export, names_export
from supcon_scale.models import SupConModel, create_encoder, create_head

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def wide(x: torch.Tensor) -> torch.Tensor:
    """Outputs in float32 at least (under autocast they may be bf16/fp16); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """Images [B, 3, H, W] -> pooled features [B, 8 * width] (`num_features`), as a timm encoder with num_classes=0."""

    def __init__(self, width: int = 20):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build(cfg: ContinualModelConfig, num_classes: int | None) -> SupConModel:
    """SCR (`num_classes=None`): projections (the loss normalises them); ER: logits over every class.

    `cfg.encoder` names reduced_resnet18, a timm model, or an exported encoder (a path: `encoder.safetensors` or the
    run directory holding it), which the learner then starts from."""
    if cfg.encoder == "reduced_resnet18":
        encoder = ReducedResNet18(cfg.width)
    elif names_export(cfg.encoder):  # an export: its architecture and weights
        encoder = encoder_from_export(cfg.encoder)[0].train()
    else:
        encoder = create_encoder(cfg.encoder, cfg.cifar_stem)
    dim = encoder.num_features
    if num_classes is None:
        # SupConLoss normalises the projections itself (SupConModel's own normalisation would cast to float32)
        model = SupConModel(encoder, create_head(cfg.head, dim, None, cfg.feat_dim), normalize=False)
    else:
        model = SupConModel(encoder, nn.Linear(dim, num_classes), normalize=False)
    if cfg.sync_bn:
        model = convert_global_batchnorm(model)
    return model.to(DTYPES[cfg.dtype])
