"""LARS over DeepSpeed ZeRO-1/2 partitions, with the trust ratios of whole tensors.

ZeRO flattens each parameter group into one buffer, cuts it into equal partitions, and hands each rank's optimizer a
single 1-D tensor: its partition. A layer-wise optimizer stepping that tensor computes one "layer" norm over a chunk
of many layers (DeepSpeed #490). `ZeroLars` is timm's `Lars` plus the partition layout: it takes each parameter's
squared norms over the piece it holds, sums them across the data-parallel group with one all-reduce, and scales each
piece by its whole tensor's trust ratio. The update is then timm's, element for element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from timm.optim import Lars
from timm.optim.lars import _lars_trust_ratio, lars


@dataclass(frozen=True)
class PartitionLayout:
    """Where whole parameters lie in one rank's flat partition of a ZeRO parameter group.

    `pieces[k] = (param_index, start, end)`: elements [start, end) of the partition belong to parameter
    `param_index` of the group (an index every rank agrees on); `num_params` counts the group's parameters.
    """

    num_params: int
    pieces: tuple[tuple[int, int, int], ...]
    group: Any = None  # the data-parallel process group (None: the default group)


def partition_layout(
    offsets: list[int], numels: list[int], partition_size: int, partition_id: int, group: Any = None
) -> PartitionLayout:
    """The pieces of parameters (flat buffer offsets `offsets`, sizes `numels`) inside partition `partition_id`."""
    lo, hi = partition_id * partition_size, (partition_id + 1) * partition_size
    pieces = []
    for index, (offset, numel) in enumerate(zip(offsets, numels, strict=True)):
        start, end = max(offset, lo), min(offset + numel, hi)
        if start < end:
            pieces.append((index, start - lo, end - lo))
    return PartitionLayout(num_params=len(numels), pieces=tuple(pieces), group=group)


def zero_layouts(zero_optimizer: Any) -> list[PartitionLayout]:
    """Read each parameter group's layout from a DeepSpeed ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`).

    Uses its bookkeeping of the flat buffers: per-group parameter offsets (padding included) and shapes, the
    partition size and this rank's place in the group's data-parallel process group.
    """
    needed = ("round_robin_bit16_offsets", "round_robin_bit16_meta", "partition_size", "real_dp_process_group")
    missing = [name for name in needed if not hasattr(zero_optimizer, name)]
    if missing:
        raise ValueError(
            f"optim.name=lars with ZeRO: this DeepSpeed's {type(zero_optimizer).__name__} has no {', '.join(missing)}, "
            "so the partition layout LARS needs is unknown; use engine.zero_stage=0 or the DeepSpeed version in "
            "constraints.txt"
        )
    layouts = []
    for i, offsets in enumerate(zero_optimizer.round_robin_bit16_offsets):
        group = zero_optimizer.real_dp_process_group[i]
        numels = [meta.numel() for meta in zero_optimizer.round_robin_bit16_meta[i]]
        partition_id = dist.get_rank(group=group)
        layout = partition_layout(list(offsets), numels, int(zero_optimizer.partition_size[i]), partition_id, group)
        first = zero_optimizer.params_in_partition[i]
        assert len(layout.pieces) == len(first), "ZeRO's own partition bookkeeping disagrees with the layout"
        layouts.append(layout)
    return layouts


class ZeroLars(Lars):
    """timm's `Lars`; a parameter registered with `attach` is a ZeRO flat partition and gets whole-tensor ratios.

    Unregistered parameters (ZeRO stage 0, one process) step exactly as timm's `Lars` does.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layouts: dict[int, PartitionLayout] = {}
        self.piece_index: dict[int, torch.Tensor] = {}  # per partition: the parameter index of each piece
        # per partition: (g + wd * w) is written here, not into a fresh partition-sized tensor every step (on the CPU
        # a fresh one is a new mmap, page-faulted in each step: it made the step 1.6x slower than timm's for ResNet-50)
        self.scratch: dict[int, torch.Tensor] = {}

    def attach(self, flat_partitions: list[torch.Tensor], layouts: list[PartitionLayout]) -> None:
        """Register ZeRO's flat fp32 partitions (one per parameter group) with their layouts."""
        assert len(flat_partitions) == len(layouts)
        self.layouts = {id(p): layout for p, layout in zip(flat_partitions, layouts, strict=True)}
        self.piece_index = {
            id(p): torch.tensor([i for i, _, _ in layout.pieces], dtype=torch.long, device=p.device)
            for p, layout in zip(flat_partitions, layouts, strict=True)
        }

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not self.layouts:
            return super().step(closure)
        assert closure is None, "DeepSpeed steps its optimizer without a closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self.layouts.get(id(p))
                assert layout is not None, "a ZeRO-1/2 parameter group holds only its registered flat partition"
                grad = p.grad
                if group["weight_decay"] != 0 or group["always_adapt"]:
                    grad = self._adapted(p, grad, group, layout)
                state = self.state[p]
                buffers = [state.get("momentum_buffer")]
                # timm's update with the adaptation done: weight decay is already in `grad`.
                lars(
                    [p],
                    [grad],
                    buffers,
                    foreach=group["foreach"],
                    lr=group["lr"],
                    momentum=group["momentum"],
                    dampening=group["dampening"],
                    weight_decay=0.0,
                    nesterov=group["nesterov"],
                    trust_coeff=group["trust_coeff"],
                    eps=group["eps"],
                    trust_clip=group["trust_clip"],
                    always_adapt=False,
                )
                if group["momentum"] != 0:
                    state["momentum_buffer"] = buffers[0]
        return None

    def _adapted(self, p: torch.Tensor, grad: torch.Tensor, group: dict, layout: PartitionLayout) -> torch.Tensor:
        """(g + wd * w) scaled piecewise by trust_coeff * |w| / (|g| + wd * |w| + eps) of each whole tensor."""
        adapted = self.scratch.get(id(p))
        if adapted is None:
            adapted = self.scratch[id(p)] = torch.empty_like(p)
        torch.add(grad, p, alpha=group["weight_decay"], out=adapted)  # not in place: DeepSpeed owns p.grad
        dtype = torch.promote_types(p.dtype, torch.float32)  # master weights are fp32 (fp64 in the tests)
        sums = torch.zeros(2, layout.num_params, dtype=dtype, device=p.device)
        index = self.piece_index[id(p)]
        if layout.pieces:  # a rank can hold nothing but a group's padding; it still joins the all-reduce
            for row, flat in enumerate((p, grad)):
                norms = torch._foreach_norm([flat[s:e] for _, s, e in layout.pieces])
                sums[row].index_add_(0, index, torch.stack(norms).to(dtype).square())
        dist.all_reduce(sums, group=layout.group)  # a piece's squares + the other ranks' pieces = the whole tensor's
        if layout.pieces:
            w_norm, g_norm = sums.sqrt()
            ratios = _lars_trust_ratio(
                w_norm,
                g_norm,
                group["trust_coeff"],
                group["weight_decay"],
                group["eps"],
                group["trust_clip"],
                group["lr"],
            )
            pieces = [adapted[s:e] for _, s, e in layout.pieces]
            torch._foreach_mul_(pieces, list(ratios[index].to(p.dtype).unbind(0)))
        return adapted
