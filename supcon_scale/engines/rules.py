"""The engine rules, each written once: combinations of precision, device, optimizer and engine an engine refuses.

`engines.build` runs `check` on every spec, and the trainer runs it right after `config.check_run`, before anything
is written; the continual config runs `check_deepspeed` and `check_replicated` when it is loaded. Each error is one
line naming the dotted config keys (a ConfigError, so a command exits 2).
"""

from __future__ import annotations

from supcon_scale.config import ConfigError, EngineConfig
from supcon_scale.engines.spec import EngineSpec

# A ResNet's last stage sees a 1x1 input at <= 16 px (it downsamples by 16 before layer4).
CPU_BF16_MIN_IMAGE_SIZE = 17


def check(spec: EngineSpec, device_type: str | None = None) -> None:
    """Every rule against `spec`; the device rule is skipped when `device_type` ("cuda", "cpu") is None."""
    check_cpu_bf16(spec.precision, spec.image_size, device_type)
    check_deepspeed(spec.engine, spec.precision, spec.optim.name)


def check_cpu_bf16(precision: str, image_size: int, device_type: str | None) -> None:
    """Refuse bf16 on the CPU at image sizes where torch's bf16 convolution returns garbage weight gradients.

    torch 2.14's CPU bf16 kernel leaves the weight gradient of a stride-2 3x3 convolution on a 1x1 input
    uninitialised (NaN or values up to 3e20 in 16 of 20 trials; docs/ENGINES.md "Known issue").
    """
    if precision == "bf16" and device_type == "cpu" and image_size < CPU_BF16_MIN_IMAGE_SIZE:
        raise ConfigError(
            f"precision=bf16 with {image_size} px views (data.image_size, data.view_sizes) "
            "on the CPU: torch's CPU bf16 convolution returns uninitialised weight gradients when layer4 sees a 1x1 "
            f"input; use views of >= {CPU_BF16_MIN_IMAGE_SIZE} px or precision=fp32"
        )


def check_deepspeed(engine: EngineConfig, precision: str, optimizer: str) -> None:
    """Refuse the DeepSpeed combinations this package cannot make exact, with the reason (docs/ENGINES.md)."""
    if engine.name != "deepspeed":
        return  # ZeRO's stage means nothing to ddp and fsdp
    if engine.zero_stage == 3:
        raise ConfigError(
            "engine.zero_stage=3 is refused: it partitions parameters layer by layer, which buys nothing for "
            "ResNets (ResNet-200 has 65M parameters) and is not checked here against one process; use 0, 1 or 2, "
            "or fsdp"
        )
    if optimizer == "lamb" and engine.zero_stage >= 1:
        # LAMB's trust ratio is per tensor; ZeRO hands the optimizer flat partitions (DeepSpeed #490).
        raise ConfigError(
            f"optim.name=lamb with engine.zero_stage={engine.zero_stage}: ZeRO steps flat partitions of many "
            "tensors, so LAMB's per-tensor trust ratios would be wrong; use engine.zero_stage=0, fsdp or ddp"
        )
    if precision == "fp16":
        # DeepSpeed's fp16 under torch_autocast scales per ZeRO partition: each rank's GradScaler finds infs in its
        # own partition only, so ranks can disagree about skipping a step (and ZeroLars's all-reduce would hang).
        raise ConfigError(
            "precision=fp16 with engine.name=deepspeed is not supported: DeepSpeed's autocast loss scaler decides "
            "skips per ZeRO partition, so ranks can disagree; use precision=bf16 (the paper's precision) or "
            "engine.name=ddp|fsdp, whose GradScaler checks every gradient"
        )


def check_replicated(engine: EngineConfig, why: str) -> None:
    """Refuse an engine that shards parameters (fsdp, ZeRO-3) where every rank needs the whole model (`why`)."""
    if engine.name == "fsdp" or (engine.name == "deepspeed" and engine.zero_stage == 3):
        raise ConfigError(
            f"engine.name={engine.name}: {why} need replicated parameters (ddp, or deepspeed with zero_stage <= 2)"
        )
