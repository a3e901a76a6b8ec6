"""Encoder (any timm model) + projection head, returning L2-normalised embeddings."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from supcon_scale import averaging
from supcon_scale.batchnorm import FrozenBatchNormStats, convert_global_batchnorm
from supcon_scale.config import ModelConfig, RunConfig


class Output(NamedTuple):
    """The model's output when a run asks for more than the embeddings: `z` the embeddings, `logits` a linear
    classifier on the encoder features trained with the loss (`loss.ce_weight`), `keys` the momentum encoder's
    embeddings of the same views (`model.momentum`; no gradient), `features` the encoder features, detached
    (`train.online_probe`). Rows follow the input's (view-major)."""

    z: torch.Tensor
    logits: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    features: torch.Tensor | None = None


def same_size_groups(views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of one spatial size, concatenated: the encoder runs once per size (SwAV's multi-crop)."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return [group[0] if len(group) == 1 else torch.cat(group) for group in groups]


def concat_outputs(outs: Sequence[torch.Tensor | Output]) -> torch.Tensor | Output:
    """The outputs of the size groups as one, rows in view order."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return Output(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs, strict=True)))


class SupConModel(nn.Module):
    """`encoder` maps images to pooled features h; `head` maps h to the embedding z (normalised in `forward`).

    After training the head is thrown away and the encoder alone is exported (the paper's protocol). The input is
    one batch or the list of a step's views; views of one size share a forward pass (and its batch-norm statistics).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        normalize: bool = True,
        normalize_input: bool = False,
        classifier: nn.Module | None = None,
        keep_features: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.normalize = normalize
        self.normalize_input = normalize_input  # the official normalize_embedding: h / |h| before the head
        # One-stage SupCon + CE (`loss.ce_weight`): a linear classifier on h beside the head, trained with the loss.
        self.classifier = classifier
        self.keep_features = keep_features  # `train.online_probe`: h, detached, for the probe hook

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | Output:
        if isinstance(x, torch.Tensor):
            return self.embed(x)
        return concat_outputs([self.embed(group) for group in same_size_groups(x)])

    def embed(self, x: torch.Tensor) -> torch.Tensor | Output:
        """One batch of same-sized images to embeddings, or an `Output` when the run asks for more: the classifier's
        logits (`loss.ce_weight`), the momentum sibling's keys, the detached encoder features (the online probe)."""
        h = self.encoder(x)
        z = self.project(h, self.head)
        momentum = averaging.sibling(self, "momentum")
        if self.classifier is None and not self.keep_features and momentum is None:
            return z
        return Output(
            z,
            logits=None if self.classifier is None else self.classifier(h),
            keys=None if momentum is None else averaging.keys(self, x),
            features=h.detach() if self.keep_features else None,
        )

    def project(self, h: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """`head(h)` for encoder features `h`, normalised as this model is: the online head, or a sibling's
        (averaging.keys)."""
        out = head(F.normalize(h.float(), dim=-1).to(h.dtype) if self.normalize_input else h)
        return F.normalize(out.float(), dim=-1) if self.normalize else out


def check_local_name(name: object, key: str = "model.encoder") -> str:
    """`name` when it is a model timm builds from its own registry; a hub (`hf-hub:`), `local-dir:` or URL name, or
    any name timm does not know, would make timm fetch or read a config that sets the constructor's arguments."""
    if not isinstance(name, str) or ":" in name or "/" in name:
        raise ValueError(
            f"{key}: {str(name)[:200]!r} is not a timm model name; hub (hf-hub:), local-dir: and URL names are "
            "refused (nothing is fetched when a model is built or a checkpoint opened)"
        )
    if not timm.is_model(name):
        raise ValueError(f"{key}: Unknown model {name[:200]!r} (not in timm's registry; see timm.list_models())")
    return name


def create_encoder(
    name: str, cifar_stem: bool = False, key: str = "model.encoder", kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A timm model without classifier (`num_classes=0`), built with `kwargs` (`model.kwargs`): its output is the
    pooled feature vector; never downloads (pretrained weights come from a local file, `model.init_from`)."""
    check_local_name(name, key)
    try:
        encoder = timm.create_model(name, num_classes=0, pretrained=False, **(kwargs or {}))
    except Exception as exc:  # timm's and the family constructor's errors differ (Type-, Assertion-, RuntimeError)
        raise ValueError(f"{key}: timm cannot build {name}{_with(kwargs)}: {_reason(exc)}") from None
    if cifar_stem:
        _to_cifar_stem(encoder)
    return encoder


def encoder_kwargs(cfg: ModelConfig, image_size: int | None = None) -> dict[str, Any]:
    """The arguments `cfg`'s encoder is built with (`fixed_size_kwargs` of `model.encoder` and `model.kwargs`)."""
    return fixed_size_kwargs(cfg.encoder, cfg.kwargs, image_size)


def fixed_size_kwargs(name: str, kwargs: Mapping[str, Any], image_size: int | None) -> dict[str, Any]:
    """`kwargs`, plus `img_size=image_size` for a family whose input size is fixed when it is built (timm's
    `fixed_input_size`: ViT, DeiT, Swin, ...) unless `kwargs` sets it; other families take any size."""
    kwargs = dict(kwargs)
    pretrained_cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    if image_size is not None and "img_size" not in kwargs and getattr(pretrained_cfg, "fixed_input_size", False):
        kwargs["img_size"] = image_size
    return kwargs


def _with(kwargs: dict[str, Any] | None) -> str:
    return f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _meta_problem(cfg: ModelConfig, image_size: int, view_sizes: Sequence[int] = ()) -> str | None:
    """Why timm cannot build `cfg`'s encoder or run it on `image_size` px images; None when it can. On the meta
    device: no memory is allocated and nothing is computed, so this takes a fraction of a second for any size.
    `view_sizes`: the other sizes the encoder built for `image_size` must take (multi-crop's small views)."""
    kwargs = encoder_kwargs(cfg, image_size)
    with torch.device("meta"):
        try:
            encoder = timm.create_model(cfg.encoder, num_classes=0, pretrained=False, **kwargs)
        except Exception as exc:  # as in create_encoder
            return _reason(exc)
        if cfg.cifar_stem:
            _to_cifar_stem(encoder)  # a family without the ResNet stem: ValueError naming model.cifar_stem
        for size, key in [(image_size, "data.image_size"), *((s, "data.view_sizes") for s in view_sizes)]:
            try:
                encoder(torch.empty(2, 3, size, size))
            except Exception as exc:  # a size the family refuses (ViT: "Input height (32) doesn't match model (224)")
                return f"{_reason(exc)} (at {key}={size})"
    return None


def _view_size_problem(cfg: RunConfig) -> str | None:
    """The multi-crop rule (`data.view_sizes`): the encoder built for `data.image_size` runs on every smaller view.

    A fixed-input-size family (ViT, Swin) takes other sizes only when built with `model.kwargs.dynamic_img_size:
    true` (timm interpolates its position embedding), and every family needs the size to survive its downsampling."""
    sizes = sorted({s for s in cfg.data.view_sizes or () if s != cfg.data.image_size}, reverse=True)
    if not sizes or _meta_problem(cfg.model, cfg.data.image_size) is not None:
        return None  # one size, or the model section's own problem, reported first (model.kwargs / model.encoder)
    problem = _meta_problem(cfg.model, cfg.data.image_size, sizes)
    if problem is None:
        return None
    hint = ""
    if getattr(timm.get_pretrained_cfg(cfg.model.encoder), "fixed_input_size", False):
        hint = "; this family's input size is fixed when built unless model.kwargs has dynamic_img_size: true"
    return f"data.view_sizes={cfg.data.view_sizes}: {cfg.model.encoder} cannot take the smaller views: {problem}{hint}"


def check(cfg: RunConfig) -> None:
    """The model section against timm, before anything is written (the trainer calls it beside `config.check_run`).

    A model timm cannot build or run at `data.image_size` names the `model.kwargs.KEY` without which it builds, else
    `model.encoder`; one that cannot run the smaller views of `data.view_sizes` names that key; `model.cifar_stem`
    on another family, and a family whose blocks cannot be found where activation checkpointing or FSDP2 needs
    them, name their key.
    """
    model = cfg.model
    check_local_name(model.encoder)
    problem = _meta_problem(model, cfg.data.image_size)
    if problem is not None:
        named = [k for k in model.kwargs if f"'{k}'" in problem]  # TypeError: unexpected keyword argument 'k'
        culprit = next(
            (
                k
                for k in named or model.kwargs
                if _meta_problem(
                    dataclasses.replace(model, kwargs={n: v for n, v in model.kwargs.items() if n != k}),
                    cfg.data.image_size,
                )
                is None
            ),
            None,
        )
        where = f"model.kwargs.{culprit}={model.kwargs[culprit]!r}" if culprit else f"model.encoder={model.encoder}"
        raise ValueError(f"{where}: timm cannot build {model.encoder}{_with(model.kwargs)}: {problem}")
    problem = _view_size_problem(cfg)
    if problem is not None:
        raise ValueError(problem)
    needs = [k for k, on in BLOCK_USERS.items() if on(cfg)]
    if needs:
        with torch.device("meta"):
            encoder = timm.create_model(
                model.encoder, num_classes=0, pretrained=False, **encoder_kwargs(model, cfg.data.image_size)
            )
        if not blocks(encoder):
            raise ValueError(
                f"{needs[0]}: cannot find the blocks of {model.encoder} (its timm group_matcher names none)"
            )


# The settings that need an encoder's blocks (`blocks`), by the key that names them in an error.
BLOCK_USERS = {
    "model.activation_checkpointing": lambda cfg: cfg.model.activation_checkpointing,
    "engine.name=fsdp": lambda cfg: cfg.engine.name == "fsdp",
    "optim.layer_decay": lambda cfg: cfg.optim.layer_decay is not None,
}


def blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in forward order, from timm's own map of the model: the outermost modules its
    `group_matcher(coarse=True)` "blocks" rules match (ResNet `layer1..4`, ViT `blocks.N`, ConvNeXt `stages.N`,
    Swin `layers.N`, EfficientNet `blocks.N`). The units of FSDP2, activation checkpointing and layer-wise LR decay.

    Rules with a fixed ordinal (ViT's `^norm`, EfficientNet's `conv_head`) place a module after the blocks for
    timm's layer decay; they are not blocks. A model without a `group_matcher` has none.
    """
    try:
        groups = encoder.group_matcher(coarse=True)
    except (AttributeError, AssertionError, NotImplementedError):  # no matcher, or no coarse grouping (RDNet)
        return []
    spec = groups.get("blocks", []) if isinstance(groups, dict) else []  # CaiT's is a function of names
    rules = [spec] if isinstance(spec, str) else [rule for rule, ordinal in spec if ordinal is None]
    patterns = [re.compile(rule) for rule in rules]

    def matched(name: str) -> bool:
        return any(p.match(name) for p in patterns)

    found = []
    for name, module in encoder.named_modules():
        parts = name.split(".")
        if name and matched(name) and not any(matched(".".join(parts[:i])) for i in range(1, len(parts))):
            found.append(module)
    return found


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's layer for layer-wise LR decay (BEiT, Bao et al. 2022, sec. 2.4; timm's
    `param_groups_layer_decay`), and the number of blocks n: 0 for what comes before the first block (patch
    embedding, position embedding, class token, a ResNet's stem), i + 1 in block i, n + 1 after (final norm, head).
    `model` is a SupConModel (its encoder's blocks) or a bare encoder; the names are `model.named_parameters()`'s."""
    encoder = getattr(model, "encoder", model)
    found = blocks(encoder)
    owner = {id(p): i + 1 for i, block in enumerate(found) for p in block.parameters()}
    in_encoder = {id(p) for p in encoder.parameters()}
    ids, seen_block = {}, False
    for name, p in model.named_parameters():
        layer = owner.get(id(p))
        if layer is not None:
            seen_block = True
        elif not seen_block and id(p) in in_encoder:
            layer = 0
        ids[name] = len(found) + 1 if layer is None else layer
    return ids, len(found)


def _to_cifar_stem(encoder: nn.Module) -> None:
    """3x3 stride-1 first conv without max-pool, the usual ResNet variant for 32 px images."""
    conv = getattr(encoder, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f"model.cifar_stem: {type(encoder).__name__} has no single conv1 stem to replace; it is for ResNet-style "
            "encoders only (set it false)"
        )
    encoder.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
    encoder.maxpool = nn.Identity()


def _checkpointed_forward(stage: nn.Module, forward, x: torch.Tensor) -> torch.Tensor:
    if not (stage.training and torch.is_grad_enabled()):
        return forward(x)
    contexts = lambda: (contextlib.nullcontext(), FrozenBatchNormStats(stage))  # noqa: E731
    return checkpoint(forward, x, use_reentrant=False, context_fn=contexts)


def enable_activation_checkpointing(encoder: nn.Module) -> int:
    """Recompute each block's activations (`blocks`) in backward instead of storing them; returns the block count.

    The block's `forward` is replaced on the instance, so parameter names (and exported state dicts) do not change.
    Not timm's `set_grad_checkpointing`: its recomputation folds batch statistics into the running averages twice.
    """
    found = blocks(encoder)
    if not found:
        raise ValueError(
            f"model.activation_checkpointing: cannot find the blocks of {type(encoder).__name__} "
            "(its timm group_matcher names none)"
        )
    for block in found:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
    return len(found)


def create_head(
    kind: str,
    in_dim: int,
    hidden_dim: int | None,
    out_dim: int,
    *,
    hidden_layers: int = 1,
    batch_norm: bool = False,
    bias: bool = True,
) -> nn.Module:
    """Projection head: one linear layer, or `hidden_layers` x (linear [-> BN] -> ReLU) then a linear layer.

    The official release's head (google-research/supcon projection_head.py) has no bias on its last layer and, with
    batch norm, none on the hidden layers either; the PyTorch reference (SupContrast) keeps every bias.
    """
    if kind == "linear":  # the official TF release: a single 2048 -> 128 layer
        return nn.Linear(in_dim, out_dim, bias=bias)
    hidden = hidden_dim or in_dim  # the PyTorch reference: 2048 -> 2048 -> 128
    layers: list[nn.Module] = []
    for i in range(hidden_layers):
        layers.append(nn.Linear(in_dim if i == 0 else hidden, hidden, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers, nn.Linear(hidden, out_dim, bias=bias))


HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://")


def load_init(encoder: nn.Module, path: str) -> None:
    """`model.init_from`: a local timm checkpoint (.pth/.pt/.bin, optionally under state_dict/model) or .safetensors
    (an exported encoder, or a checkpoint's model.safetensors, whose encoder entries it takes).

    The classifier of a full timm model is dropped (the encoder has none); every other key must fit, so a
    standard-stem ImageNet checkpoint refuses to load into a CIFAR-stem encoder (conv1 is 3x3 there).
    """
    from pathlib import Path

    from timm.models import load_state_dict

    if path.startswith(HUB_PREFIXES):
        raise ValueError(f"model.init_from={path!r}: only local files are loaded (no hub or URL download)")
    if not Path(path).is_file():
        raise ValueError(f"model.init_from: no file at {path}")
    try:
        state = load_state_dict(path, use_ema=False)
    except Exception as exc:  # a corrupt or foreign file: torch, safetensors and pickle errors differ
        raise ValueError(f"model.init_from: cannot read {path} ({type(exc).__name__}: {exc})") from None
    own = encoder.state_dict()
    if not own.keys() & state.keys():  # a checkpoint's model.safetensors (finetune): the encoder under `encoder.`
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")} or state
    classifier = str(getattr(encoder, "default_cfg", {}).get("classifier", "fc"))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier + ".")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        parts = [f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" for label, keys in found if keys]
        raise ValueError(f"model.init_from: {path} does not fit model.encoder: {' | '.join(parts)}")
    encoder.load_state_dict(state)


def build(
    cfg: ModelConfig,
    num_classes: int | None = None,
    image_size: int | None = None,
    ema_decay: float | None = None,
    *,
    ce_classes: int | None = None,
    features: bool = False,
) -> SupConModel:
    """The SupCon model; with `num_classes` a linear classifier replaces the projection (cross-entropy baseline).

    `image_size` (`data.image_size`) is the input size of a family that fixes it when built (`encoder_kwargs`);
    `ema_decay` (`train.ema_decay`) and `cfg.momentum` add the frozen siblings (averaging.py). `ce_classes` adds a
    linear classifier on the encoder features beside the projection (`loss.ce_weight`) and `features` returns those
    features, detached (`train.online_probe`): the forward then returns an `Output`."""
    encoder = create_encoder(cfg.encoder, cfg.cifar_stem, kwargs=encoder_kwargs(cfg, image_size))
    if cfg.init_from is not None:
        load_init(encoder, cfg.init_from)
    if num_classes is None:
        head = create_head(
            cfg.head, encoder.num_features, cfg.head_hidden_dim, cfg.feat_dim,
            hidden_layers=cfg.head_hidden_layers, batch_norm=cfg.head_batch_norm, bias=cfg.head_bias,
        )  # fmt: skip
        classifier = None if ce_classes is None else nn.Linear(encoder.num_features, ce_classes)
        model = SupConModel(
            encoder, head, normalize_input=cfg.normalize_encoder_output, classifier=classifier, keep_features=features
        )
    else:
        classifier = nn.Linear(encoder.num_features, num_classes)
        model = SupConModel(
            encoder, classifier, normalize=False, normalize_input=cfg.normalize_encoder_output, keep_features=features
        )
    if cfg.sync_bn:
        model = convert_global_batchnorm(model)
    averaging.attach(model, cfg.momentum, ema_decay)  # copies of the batch-norm-converted model, not checkpointed
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.encoder)
    return model
