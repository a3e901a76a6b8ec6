"""Batch norm across ranks and held still: the paper's global (cross-replica) batch norm on any device and process
group, and the running averages frozen while a block is recomputed or a probe's encoder runs."""

from __future__ import annotations

import torch
import torch.nn as nn

from supcon_scale import distributed


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch (the paper's cross-replica BN) on any device and process group.

    On CUDA the statistics go through torch's fused SyncBatchNorm kernels. Those are CUDA-only, and DDP refuses
    `nn.SyncBatchNorm` modules on CPU, so on a CPU (gloo) group they are combined here: one differentiable
    all-reduce of per-channel sums, sums of squares and counts, so gradients flow through the global mean and
    variance as on the GPU. Single process or eval mode: plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = distributed.world()
        if not self.training or world == 1:
            return super().forward(x)
        if x.is_cuda:
            return distributed.cuda_sync_batch_norm(self, x)
        dims = [d for d in range(x.ndim) if d != 1]
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in fp32 at least, as under autocast
        count = torch.full((1,), x.numel() / x.shape[1], dtype=xf.dtype, device=x.device)
        stats = distributed.all_reduce_sum_with_grad(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():  # running variance is unbiased, as in torch's batch norm
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm*d becomes a GlobalBatchNorm in place (same parameters and buffers: state dicts unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = GlobalBatchNorm
    return module


class FrozenBatchNormStats:
    """Batch norm's running averages held still while the block runs (the linear probe's frozen encoder uses it too).

    During recomputation, batch norm normalises with batch statistics as before but must not fold them into the
    running averages a second time (timm's `set_grad_checkpointing` updates them twice). Momentum 0 keeps the
    averages exactly (x*1 + 0*y); `track_running_stats=False` would change the saved tensors, which checkpoint
    rejects."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self) -> None:
        self.saved = [
            (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
            for m in self.norms
        ]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, count) in zip(self.norms, self.saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
