"""DeepSpeed engine: `deepspeed.initialize` with our optimizer (LARS/SGD/AdamW/LAMB) and LambdaLR as client objects.

Precision is DeepSpeed's `torch_autocast` section (bf16 activations, fp32 parameters, fp32 gradient reduction), not
its `bf16` section: that one casts the whole module, BatchNorm included, to bf16 and wraps the optimizer in
`BF16_Optimizer`, whose flattened fp32 partitions break layer-wise LARS exactly as ZeRO does (DeepSpeed #490).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from supcon_scale import optim
from supcon_scale.distributed import Context, all_reduce_min, single_process_group
from supcon_scale.engines.base import AUTOCAST_DTYPES, Engine, build_optimizer
from supcon_scale.engines.spec import EngineSpec
from supcon_scale.engines.zero_lars import ZeroLars, zero_layouts

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Sections of a user JSON that would replace what this engine owns (client optimizer, schedule, precision, batch).
OWNED_KEYS = ("optimizer", "scheduler", "fp16", "bf16", "amp", "train_batch_size", "train_micro_batch_size_per_gpu")


def import_deepspeed(device: torch.device) -> Any:
    """Import deepspeed (an optional extra) with the accelerator of the run's device, never a silent other one."""
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as exc:
        raise ImportError(
            f"engine.name=deepspeed needs DeepSpeed: pip install supcon_scale[deepspeed] ({exc})"
        ) from None
    chosen = get_accelerator().device_name()
    if chosen != device.type:
        raise ValueError(
            f"engine.name=deepspeed: DeepSpeed selected its {chosen!r} accelerator but the run's device is "
            f"{device.type!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}); unset DS_ACCELERATOR or set device"
        )
    return deepspeed


def ds_config(spec: EngineSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config generated from the run config, with `engine.deepspeed_config` merged underneath."""
    user: dict[str, Any] = {}
    if spec.engine.deepspeed_config:
        path = Path(spec.engine.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"engine.deepspeed_config: file not found: {path}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"engine.deepspeed_config {path}: invalid JSON ({exc})") from None
        owned = [k for k in OWNED_KEYS if k in user]
        if owned:
            raise ValueError(
                f"engine.deepspeed_config {path}: remove {', '.join(owned)} -- the optimizer, schedule, precision "
                "and batch size come from the run config (optim.*, precision, data.global_batch_size)"
            )
        if user.get("gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                f"engine.deepspeed_config {path}: gradient_accumulation_steps must be 1 -- accumulating micro-batches "
                "does not give the same contrastive batch (each micro-batch only sees its own negatives)"
            )
    dtype = AUTOCAST_DTYPES.get(spec.precision)
    generated: dict[str, Any] = {
        "train_batch_size": spec.global_batch,
        "train_micro_batch_size_per_gpu": spec.global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": spec.engine.zero_stage},
        # Empty safe-module list: gradients are reduced in fp32 (DeepSpeed would otherwise reduce conv/linear
        # gradients in bf16).
        "torch_autocast": {
            "enabled": dtype is not None,
            "dtype": DTYPE_NAMES.get(dtype, "bfloat16"),
            "lower_precision_safe_modules": [],
        },
    }
    merged = dict(user)
    for key, value in generated.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


class DeepSpeedEngine(Engine):
    """DeepSpeed data parallelism, ZeRO stages 0-2 (LARS with whole-tensor trust ratios), over an existing group."""

    name = "deepspeed"

    def __init__(self, spec: EngineSpec, ctx: Context, model: nn.Module, total_steps: int, warmup_steps: int):
        super().__init__(spec, ctx)  # engines.build has refused what this engine cannot do (engines/rules.py)
        deepspeed = import_deepspeed(ctx.device)
        # No channels-last parameters: DeepSpeed broadcasts each parameter as a flat byte view, which needs a
        # contiguous tensor. Channels-last inputs still give channels-last activations.
        model = model.to(ctx.device)
        # ZeroLars steps like timm's Lars until it is told ZeRO's partition layout (below, stages 1-2).
        optimizer = build_optimizer(spec, model, lars_class=ZeroLars)
        scheduler = optim.build_scheduler(optimizer, spec.optim, total_steps, warmup_steps)
        if not dist.is_initialized():  # a plain `python` run: DeepSpeed still wants a (1-rank) group and LOCAL_RANK
            single_process_group(ctx.device)
            os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        self.zero_stage = spec.engine.zero_stage
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config(spec, ctx.world_size),
            dist_init_required=False,
        )
        if isinstance(optimizer, ZeroLars) and self.zero_stage >= 1:
            optimizer.attach(self.optimizer.single_partition_of_fp32_groups, zero_layouts(self.optimizer))
        self.model = model
        self.base_optimizer = optimizer
        self._skip = False

    @property
    def forward_module(self) -> nn.Module:
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed has no non-finite check outside fp16; ranks agree on the loss before any gradient is reduced, so
        # a bad step is skipped everywhere (bf16 has fp32's range: a finite loss gives finite gradients in practice).
        finite = torch.isfinite(loss.detach()).all().to(torch.int32)
        self._skip = not bool(all_reduce_min(finite).item())
        if not self._skip:
            self.engine.backward(loss)

    def step(self) -> bool:
        if self._skip:
            self._skip = False
            self.skipped_steps += 1
            self.engine.zero_grad()
            return False
        self.engine.step()  # optimizer step, zero_grad and lr_scheduler.step()
        return True

    def unwrapped(self) -> nn.Module:
        return self.model

    def zero_layout(self) -> list[list[tuple[str, int, torch.Size]]]:
        """Per ZeRO parameter group: (parameter name, offset in the group's flat buffer, shape), on every rank alike."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        zero = self.optimizer
        return [
            [(names[id(p)], int(offset), meta.shape) for p, offset, meta in zip(params, offsets, metas, strict=True)]
            for params, offsets, metas in zip(
                zero.round_robin_bit16_groups, zero.round_robin_bit16_offsets, zero.round_robin_bit16_meta, strict=True
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """Collective. Rank 0 gets the full model and, at ZeRO 1/2, the optimizer state consolidated by parameter name
        (fp32 master weights and per-element buffers as whole tensors), which any world size can re-partition."""
        model_sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.zero_stage == 0:
            optim_sd: dict[str, Any] = self.base_optimizer.state_dict()
        else:
            base = self.optimizer.optimizer
            mine = {
                "fp32": [t.detach().cpu() for t in self.optimizer.single_partition_of_fp32_groups],
                "state": [
                    {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in base.state[g["params"][0]].items()}
                    for g in base.param_groups
                ],
            }
            gathered: list[Any] | None = [None] * self.ctx.world_size if self.ctx.is_main else None
            if dist.is_initialized() and self.ctx.world_size > 1:
                dist.gather_object(mine, gathered, dst=0)
            else:
                gathered = [mine]
            optim_sd = {"zero_stage": self.zero_stage}
            if self.ctx.is_main:
                groups = [{k: v for k, v in g.items() if k != "params"} for g in base.state_dict()["param_groups"]]
                optim_sd.update(consolidate(gathered, self.zero_layout()), param_groups=groups)
        return {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "scaler": None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank passes the full saved state (as `checkpoint.load` gives it) and keeps its own ZeRO partition
        of it, whatever the world size that saved it."""
        self.model.load_state_dict(state["model"])
        optim_sd = state["optimizer"]
        if self.zero_stage == 0:
            self.base_optimizer.load_state_dict(optim_sd)
        else:
            self._load_consolidated(optim_sd)
        self.scheduler.load_state_dict(state["scheduler"])

    def _load_consolidated(self, optim_sd: dict[str, Any]) -> None:
        """Cut this rank's partition of every group out of the whole-tensor state (ZeRO's layout on this world)."""
        zero, base = self.optimizer, self.optimizer.optimizer
        if "params" not in optim_sd:  # what `state_dict` writes at ZeRO 1/2; a ZeRO-0 save holds torch's own form
            raise ValueError(
                f"the checkpoint's optimizer state was not saved at a ZeRO stage >= 1, as engine.zero_stage="
                f"{self.zero_stage} needs (keys: {', '.join(sorted(map(str, optim_sd))[:5])})"
            )
        params = optim_sd["params"]
        missing = sorted({name for group in self.zero_layout() for name, _, _ in group} - set(params))
        if missing or len(optim_sd["param_groups"]) != len(base.param_groups):
            raise ValueError(
                f"the checkpoint's ZeRO optimizer state does not fit this model (missing {', '.join(missing[:5])})"
            )
        states = {}
        for i, (layout, part) in enumerate(zip(self.zero_layout(), zero.single_partition_of_fp32_groups, strict=True)):
            lo = dist.get_rank(group=zero.real_dp_process_group[i]) * part.numel()
            part.data.copy_(partition_piece(params, "fp32", layout, lo, part.numel()))
            keys = {k for name, _, _ in layout for k in params[name] if k != "fp32"}
            states[i] = {k: partition_piece(params, k, layout, lo, part.numel()) for k in sorted(keys)}
            states[i] |= optim_sd["scalars"][i]
        groups = [{**g, "params": [i]} for i, g in enumerate(optim_sd["param_groups"])]
        base.load_state_dict({"state": states, "param_groups": groups})

    @property
    def lr(self) -> float:
        return optim.peak_lr(self.base_optimizer)


def consolidate(per_rank: list[dict[str, Any]], layout: list[list[tuple[str, int, torch.Size]]]) -> dict[str, Any]:
    """Whole-tensor optimizer state from every rank's ZeRO partitions: {"params": {name: {"fp32", buffer...}},
    "scalars": per group}. A buffer is per element when it has the partition's size (momentum, Adam's moments)."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    scalars = []
    for i, group in enumerate(layout):
        flat = {"fp32": torch.cat([r["fp32"][i] for r in per_rank])}
        size = per_rank[0]["fp32"][i].numel()
        state = per_rank[0]["state"][i]
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() == size and value.dim() == 1:
                flat[key] = torch.cat([r["state"][i][key] for r in per_rank])
        scalars.append({k: v for k, v in state.items() if k not in flat})
        for name, offset, shape in group:
            params[name] = {k: t[offset : offset + shape.numel()].reshape(shape).clone() for k, t in flat.items()}
    return {"params": params, "scalars": scalars}


def partition_piece(
    params: dict[str, dict[str, torch.Tensor]], key: str, layout: list[tuple[str, int, torch.Size]], lo: int, size: int
) -> torch.Tensor:
    """Elements [lo, lo + size) of a group's flat buffer of `key`, filled from whole tensors (ZeRO's padding: 0)."""
    out = torch.zeros(size, dtype=torch.float32)
    for name, offset, shape in layout:
        start, end = max(offset, lo), min(offset + shape.numel(), lo + size)
        if start < end:
            out[start - lo : end - lo] = params[name][key].reshape(-1)[start - offset : end - offset]
    return out
