"""The linear probe's fit loops: a head on cached features (minibatch SGD/RMSProp, full-batch L-BFGS), or on a stream
of augmented images through the frozen encoder (the official stage 2, main_linear.py).

With a process group up each rank takes a slice of every global batch and the head's gradients are summed over
ranks. The optimizer and the LR schedule of each protocol come from linear_protocols.py (built by optim.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from supcon_scale import config, distributed
from supcon_scale.data.folder import FolderIndex
from supcon_scale.evaluation.linear_protocols import FAST_L2_GRID, Preset, lr_at, make_optimizer


def _sync_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over ranks: each rank's loss is its slice's sum divided by the *global* batch size."""
    for p in params:
        if p.grad is not None:
            p.grad.copy_(distributed.all_reduce_sum(p.grad))


def _update(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor) -> float:
    """One step on this rank's share of the batch; returns the batch loss summed over ranks."""
    opt.zero_grad(set_to_none=False)
    loss.backward()
    _sync_grads(params)
    opt.step()
    return float(distributed.all_reduce_sum(loss.detach()))


def _zero_head(dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    fc = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(fc.weight), nn.init.zeros_(fc.bias)
    return fc


# ---------------------------------------------------------------------------------------------------------------
# Heads on cached features


def fit_minibatch(
    preset: Preset, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, batch_size: int, lr: float,
    seed: int,
) -> tuple[nn.Linear, dict[str, Any]]:  # fmt: skip
    """SGD on cached features; every rank holds all rows and computes its slice of each global batch."""
    rank, world = distributed.world()
    torch.manual_seed(seed)
    fc = _zero_head(x.shape[1], num_classes, x.device)
    params = list(fc.parameters())
    opt = make_optimizer(preset, params, lr)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            batch = perm[s * batch_size : (s + 1) * batch_size]
            mine = batch.tensor_split(world)[rank]
            for g in opt.param_groups:
                g["lr"] = lr_at(preset, lr, step, steps_per_epoch, epochs * steps_per_epoch)
            logits = fc(x[mine])
            loss = F.cross_entropy(logits, y[mine], label_smoothing=preset.label_smoothing, reduction="sum")
            loss_sum += _update(opt, params, loss / len(batch))
            step += 1
    return fc, {"epochs": epochs, "final_train_loss": loss_sum / steps_per_epoch, "steps": step}


def _lbfgs(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int, init: nn.Linear | None = None
) -> tuple[nn.Linear, tuple[int, int]]:
    """Multinomial logistic regression, full batch: mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised); returns
    the head and (iterations, function evaluations): each iteration is one full-batch pass, an epoch here."""
    fc = _zero_head(x.shape[1], num_classes, x.device)
    if init is not None:  # warm start along the regularisation path: far fewer iterations per fit
        fc.load_state_dict(init.state_dict())
    # max_eval well above max_iter: the iteration count (`--epochs`) is the limit, not torch's default evaluation
    # budget of 1.25 x max_iter, which the line search's extra evaluations can reach an iteration or more earlier.
    opt = torch.optim.LBFGS(
        fc.parameters(), lr=1.0, max_iter=max_iter, max_eval=max_iter * 25, history_size=20,
        line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(fc(x), y) + 0.5 * l2 * fc.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    return fc, (int(state.get("n_iter", 0)), int(state.get("func_evals", 0)))


def fit_lbfgs(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, max_iter: int, seed: int
) -> tuple[nn.Linear, dict[str, Any]]:
    """Pick L2 on a stratified 20% of the train rows, then refit on all of them. Deterministic, so ranks agree."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    labels = y.cpu().numpy()
    stratify = labels if np.bincount(labels).min() >= 2 else None
    fit_idx, hold_idx = train_test_split(idx, test_size=0.2, stratify=stratify, random_state=seed)
    fit_idx, hold_idx = torch.as_tensor(fit_idx, device=x.device), torch.as_tensor(hold_idx, device=x.device)
    scores, fits, prev = {}, {}, None
    for l2 in sorted(FAST_L2_GRID, reverse=True):  # strongest first, each fit warm-starts the next
        prev, _ = _lbfgs(x[fit_idx], y[fit_idx], num_classes, l2, max_iter, init=prev)
        fits[l2] = prev
        with torch.no_grad():
            scores[l2] = float((prev(x[hold_idx]).argmax(1) == y[hold_idx]).float().mean())
    best = max(FAST_L2_GRID, key=lambda l2: (scores[l2], l2))  # ties go to the stronger regulariser
    fc, (iterations, evals) = _lbfgs(x, y, num_classes, best, max_iter, init=fits[best])
    # `epochs` is the iterations of the final fit (at most `--epochs`; fewer when it converged), not the function
    # evaluations, which count the first evaluation and the line search's (`--epochs 5` was reported as 6)
    info = {"epochs": iterations, "max_epochs": max_iter, "function_evaluations": evals}
    return fc, {**info, "l2": best, "l2_holdout_top1": {str(k): v for k, v in scores.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Heads on a stream of augmented images through the encoder


def stream_transform(preset: Preset, stage1: config.RunConfig | None, image_size: int) -> Callable:
    """One training view: the stage-1 augmentation (`stage1`), or main_linear.py's crop 0.2-1 + flip."""
    from torchvision.transforms import v2

    from supcon_scale.data.spec import spec_from_config
    from supcon_scale.data.torchvision import view_transform

    aug = stage1.data.augment if stage1 is not None else config.AugmentConfig()
    if preset.stream == "stage1":
        return view_transform(spec_from_config(aug, image_size))
    return v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std)),
    ])  # fmt: skip


class _AugmentedFolder(torch.utils.data.Dataset):
    """(view, label) of each image of `index`: one fresh `transform` of it per visit."""

    def __init__(self, index: FolderIndex, transform: Callable):
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.index.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.index.labels[i]


@contextlib.contextmanager
def bn_train_frozen(encoder: nn.Module, global_bn: bool) -> Iterator[None]:
    """Batch norm normalises with batch statistics but its running averages stay exactly as they were.

    The official stage 2 runs the encoder in training mode and drops its batch-norm update ops
    (stage_2_update_encoder_batch_norm=False). With `global_bn` and several ranks the statistics are the global
    batch's, as the official global batch norm computes them.
    """
    from supcon_scale.batchnorm import FrozenBatchNormStats, GlobalBatchNorm

    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    classes = [m.__class__ for m in norms]
    was_training = encoder.training
    if global_bn and distributed.world()[1] > 1:
        for m in norms:
            m.__class__ = GlobalBatchNorm
    encoder.train()
    try:
        with FrozenBatchNormStats(encoder):
            yield
    finally:
        for m, cls in zip(norms, classes, strict=True):
            m.__class__ = cls
        encoder.train(was_training)


def stream_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` global batches from one shuffled pass after another, crossing epoch ends as tf.data.repeat does."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.zeros(0, dtype=torch.long)
    for _ in range(steps):
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(n, generator=gen)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def fit_stream(
    preset: Preset, encoder: nn.Module, index: FolderIndex, transform: Callable, num_classes: int, dim: int,
    epochs: int, batch_size: int, lr: float, seed: int, device: torch.device, num_workers: int, normalize: bool,
    global_bn: bool,
) -> tuple[nn.Linear, dict[str, Any]]:  # fmt: skip
    """Head trained on freshly augmented train images through the frozen encoder (the official stage 2)."""
    rank, world = distributed.world()
    torch.manual_seed(distributed.rank_seed(seed, rank))  # augmentation differs per rank, the head starts equal
    fc = _zero_head(dim, num_classes, device)
    params = list(fc.parameters())
    opt = make_optimizer(preset, params, lr)
    dataset = _AugmentedFolder(index, transform)
    n = len(dataset)
    steps_per_epoch = n / batch_size
    total = max(1, int(epochs * steps_per_epoch))
    batches = [b.tensor_split(world)[rank].tolist() for b in stream_batches(n, batch_size, total, seed)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    bn = bn_train_frozen(encoder, global_bn) if preset.bn == "train_frozen" else contextlib.nullcontext()
    losses: list[float] = []
    with bn:
        for step, (images, labels) in enumerate(loader):
            for g in opt.param_groups:
                g["lr"] = lr_at(preset, lr, step, steps_per_epoch, total)
            with torch.no_grad():
                feats = encoder(images.to(device)).float()
            if normalize:
                feats = F.normalize(feats, dim=-1)
            logits = fc(feats)
            loss = F.cross_entropy(logits, labels.to(device), label_smoothing=preset.label_smoothing, reduction="sum")
            losses.append(_update(opt, params, loss / batch_size))
    last_epoch = losses[-max(1, math.ceil(steps_per_epoch)) :]
    return fc, {"epochs": epochs, "final_train_loss": sum(last_epoch) / len(last_epoch), "steps": total}
