"""`make gpu-check`: the first run on a GPU node, one GPU, at most ten minutes, JSON after every part.

It asserts CUDA, runs the DALI GPU loader (layout, dtype, device, memory format, labels, a bit-identical resume
mid-epoch), times `once` against `roi` decoding, trains every engine end to end for 6 steps with a resume at step 3
(ddp bf16/fp16, fsdp bf16, deepspeed ZeRO-1/2, ddp compiled), checks the CUDA-only kernels (global batch norm
against `F.batch_norm`, the gradient-carrying gather) on a one-rank NCCL group, counts the synchronisations of a
training step (`torch.cuda.set_sync_debug_mode`), checks the momentum encoder's and the EMA's update on the device
(`momentum_step`), and runs `bench_train` (ResNet-50, then ViT-B/16: SupCon against cross-entropy, bf16),
`bench_loss` (tiled, M = 65,536) and a labelled queue's steps (`loss.queue_size`). A failing part is recorded and the
others still run; the exit status is 1 if any failed. `--smoke` runs the same parts tiny on the CPU (the CUDA-only
ones report "skipped"), as the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from supcon_scale import checkpoint, config, data, devices, distributed, engines, models, objectives, trainer
from supcon_scale.data.folder import make_demo_data

BUDGET_S = 600.0  # the whole check; a part that starts later than this is skipped


class Check:
    """The state the parts share: where they write, whether this is the CPU smoke, the data folder."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.device = devices.select_device("cpu" if smoke else "cuda", 0)
        self.size = 32 if smoke else 64
        self.batch = 16 if smoke else 64
        self.root = out / "digits"
        if not (self.root / "train").is_dir():
            make_demo_data(self.root, size=self.size)

    @property
    def backend(self) -> str:
        return "dali-cpu" if self.smoke else "dali-gpu"

    def data_cfg(self, **changes: Any) -> config.DataConfig:
        overrides = [
            f"data.root={self.root}",
            f"data.backend={self.backend}",
            f"data.global_batch_size={self.batch}",
            f"data.image_size={self.size}",
            "data.dali_threads=2",
            f"out_dir={self.out / 'loader'}",
        ]
        overrides += [f"data.{k}={v}" for k, v in changes.items()]
        return config.load(None, overrides).data


def part_cuda(check: Check) -> dict[str, Any]:
    """CUDA is usable (device=cuda would fail loudly otherwise) and what it is."""
    info: dict[str, Any] = {
        "report": devices.cuda_report(),
        "torch": torch.__version__,
        "device": str(check.device),
    }
    if check.device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(check.device)
        info["capability"] = list(torch.cuda.get_device_capability(check.device))
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        x = torch.randn(256, 256, device=check.device)
        assert torch.isfinite(x @ x).all()
    return info


def part_dali_loader(check: Check) -> dict[str, Any]:
    """One batch's layout, dtype, device, memory format and labels; a mid-epoch resume gives the same batch bits."""
    ctx = distributed.Context(device=check.device)
    cfg = check.data_cfg()
    loader = data.build_train_loader(cfg, ctx, 0, check.out / "loader")
    loader.set_epoch(0)
    it = iter(loader)
    views, labels = next(it)
    b = cfg.global_batch_size
    assert len(views) == cfg.views and all(v.shape == (b, 3, cfg.image_size, cfg.image_size) for v in views)
    assert all(v.dtype == torch.float32 and v.device.type == check.device.type for v in views)
    assert labels.dtype == torch.int64 and labels.shape == (b,) and 0 <= int(labels.min()) <= int(labels.max()) < 10
    next(it)
    state = loader.state_dict()
    expected = next(it)
    resumed = data.build_train_loader(cfg, ctx, 0, check.out / "loader")
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    same = all(torch.equal(a, g) for a, g in zip(expected[0], got[0], strict=True)) and torch.equal(expected[1], got[1])
    assert same, "the batch after a mid-epoch resume differs"
    return {
        "backend": cfg.backend,
        "channels_last": views[0].is_contiguous(memory_format=torch.channels_last),
        "resume_bit_identical": same,
    }


def part_decode(check: Check) -> dict[str, Any]:
    """Images/s of one decode + V crops (`once`) against V region-of-interest decodes (`roi`)."""
    from supcon_scale.bench import loader as bench_loader

    cfg = check.data_cfg(dali_threads=4 if not check.smoke else 2)
    batches = 3 if check.smoke else 30
    rows = {name: bench_loader.measure(cfg, 1, batches, roi=roi) for name, roi in (("once", False), ("roi", True))}
    return {name: row.get("images_per_s") for name, row in rows.items()} | {"rows": rows}


def _engine_cases(smoke: bool) -> list[tuple[str, list[str]]]:
    if smoke:
        return [("ddp fp32", ["engine.name=ddp", "precision=fp32"])]
    return [
        ("ddp bf16", ["engine.name=ddp", "precision=bf16"]),
        ("ddp fp16", ["engine.name=ddp", "precision=fp16"]),
        ("fsdp bf16", ["engine.name=fsdp", "precision=bf16"]),
        ("deepspeed zero1 bf16", ["engine.name=deepspeed", "engine.zero_stage=1", "precision=bf16"]),
        ("deepspeed zero2 bf16", ["engine.name=deepspeed", "engine.zero_stage=2", "precision=bf16"]),
        ("ddp bf16 compiled", ["engine.name=ddp", "precision=bf16", "train.compile=true"]),
    ]


def part_engines(check: Check) -> dict[str, Any]:
    """Every engine: 3 steps, a checkpoint, then a resumed run to step 6 (the trainer's CLI, in this process)."""
    from supcon_scale import cli

    results = {}
    for name, overrides in _engine_cases(check.smoke):
        out = check.out / "engines" / name.replace(" ", "_")
        common = [
            "--config",
            "demo/digits",
            f"out_dir={out}",
            f"data.root={check.root}",
            f"data.backend={check.backend.replace('-gpu', '')}",
            f"data.global_batch_size={check.batch}",
            f"data.image_size={check.size}",
            "train.epochs=1",
            "train.warmup_epochs=0",
            "train.checkpoint_every_steps=3",
            "train.progress=false",
            "train.log_every=3",
            f"device={check.device.type}",
            *overrides,
        ]
        start = time.perf_counter()
        first = cli.main(["train", *common, "train.max_steps=3"])
        second = cli.main(
            ["train", *common, "train.max_steps=6", "train.resume=auto", "train.allow_changes=train.max_steps"]
        )
        newest = checkpoint.latest(out)
        results[name] = {
            "exit": [first, second],
            "newest": newest.name if newest else None,
            "seconds": round(time.perf_counter() - start, 1),
        }
        assert first == 0 and second == 0 and newest is not None and newest.name.endswith("06"), results[name]
    return results


def part_kernels(check: Check) -> dict[str, Any]:
    """Global batch norm (torch's fused SyncBatchNorm kernels) and the gather, on a one-rank NCCL group."""
    if check.device.type != "cuda":
        return {"skipped": "CUDA-only kernels (the CPU tests cover the gloo paths)"}
    with distributed.temporary_single_process_group(check.device):
        torch.manual_seed(0)
        x = torch.randn(64, 32, 8, 8, device=check.device, requires_grad=True)
        bn = torch.nn.BatchNorm2d(32).to(check.device)
        ref = torch.nn.BatchNorm2d(32).to(check.device)
        ref.load_state_dict(bn.state_dict())
        y = distributed.cuda_sync_batch_norm(bn, x)
        y_ref = F.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias, True, 0.1, ref.eps)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
        bn_err = max(
            (y - y_ref).abs().max().item(),
            (gx - gx_ref).abs().max().item(),
            (bn.running_var - ref.running_var).abs().max().item(),
        )
        z = torch.randn(16, 8, device=check.device, requires_grad=True)
        gathered = distributed._GatherWithGrad.apply(z, [16])
        (gz,) = torch.autograd.grad(gathered.mul(2).sum(), z)
        assert torch.equal(gathered, z) and torch.equal(gz, torch.full_like(z, 2.0))
    assert bn_err < 1e-4, bn_err
    return {"batch_norm_max_abs_err": bn_err, "gather": "ok"}


def momentum_step(device: torch.device, steps: int = 3, total: int = 4) -> dict[str, Any]:
    """The momentum encoder and EMA on `device` (a ResNet-18 with both siblings, averaging.py): the keys carry no
    gradient; `steps` updates after moved weights against MoCo v3's cosine lerp and timm's EMA in float64 on the CPU;
    the update's time. tests/test_averaging.py runs it on the CPU."""
    import math

    from supcon_scale import averaging

    torch.manual_seed(0)
    cfg = config.ModelConfig(encoder="resnet18", cifar_stem=True, feat_dim=16, momentum=0.99)
    model = models.build(cfg, image_size=16, ema_decay=0.9).to(device).train()
    keys_grad = model([torch.randn(8, 3, 16, 16, device=device)] * 2).keys.requires_grad
    names = [n for n, _ in model.named_parameters() if n.startswith(("encoder.", "head."))]
    ref = {n: model.get_parameter(n).detach().double().cpu() for n in names}
    mom, ema, seconds = dict(ref), dict(ref), []
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).add_(torch.randn_like(model.get_parameter(n)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        averaging.update(model, t, total)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        m = 1 - (1 - 0.99) * (1 + math.cos(math.pi * t / total)) / 2
        for n in names:
            w = model.get_parameter(n).detach().double().cpu()
            mom[n], ema[n] = m * mom[n] + (1 - m) * w, 0.9 * ema[n] + 0.1 * w
    err = max(
        max((model.get_parameter(f"{name}.module.{n}").double().cpu() - want[n]).abs().max().item() for n in names)
        for name, want in (("momentum", mom), ("ema", ema))
    )
    return {"max_error": err, "keys_grad": keys_grad, "update_ms": round(1e3 * min(seconds), 3)}


def part_momentum(check: Check) -> dict[str, Any]:
    """The momentum encoder's keys and update, and the EMA's, on the device against the formulas (averaging.py)."""
    report = momentum_step(check.device)
    assert report["max_error"] < 1e-5 and report["keys_grad"] is False, report
    return report


@contextlib.contextmanager
def _count_syncs(device: torch.device) -> Iterator[list[str]]:
    """Synchronising CUDA calls while the block runs (torch's sync debug mode warns once per call)."""
    seen: list[str] = []
    if device.type != "cuda":
        yield seen
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def part_syncs(check: Check) -> dict[str, Any]:
    """Synchronisations per training step (ResNet-18 SupCon, bf16 on the GPU): the bound is one."""
    precision = "fp32" if check.smoke else "bf16"
    cfg = config.load(
        None,
        [
            f"data.global_batch_size={check.batch}",
            f"data.image_size={check.size}",
            "model.encoder=resnet18",
            f"precision={precision}",
            "optim.name=lars",
            "train.warmup_epochs=0",
        ],
    )
    ctx = distributed.Context(device=check.device)
    objective = objectives.build(cfg, 10, ctx)
    model = models.build(cfg.model, objective.classifier_classes, cfg.data.image_size)
    engine = engines.build(engines.EngineSpec.from_run(cfg), ctx, model, 10, 0)
    engine.train()
    views = [torch.rand(check.batch, 3, check.size, check.size, device=check.device) for _ in range(2)]
    labels = torch.randint(0, 10, (check.batch,), device=check.device)
    per_step = []
    for _ in range(3 if check.smoke else 4):
        with _count_syncs(check.device) as seen:
            trainer.train_step(engine, objective, views, labels)
        per_step.append(seen)
    counts = [len(s) for s in per_step[1:]]  # the first step builds buffers and autotunes
    if check.device.type == "cuda":
        assert max(counts) <= 1, per_step[-1]
    return {"syncs_per_step": counts, "calls": per_step[-1]}


def _bench_train(check: Check, name: str, smoke: list[str], gpu: list[str]) -> dict[str, Any]:
    """`bench_train` with `gpu`'s arguments (`smoke`'s tiny ones on the CPU); its JSON report."""
    from supcon_scale.bench import train as bench_train

    path = check.out / f"{name}.json"
    args = ["--device", check.device.type, "--json", str(path)]
    if check.smoke:
        args += [*smoke, "--batch-per-gpu", "4", "--image-size", "32", "--precision", "fp32", "--steps", "1"]
        args += ["--warmup", "0"]
    else:
        args += [*gpu, "--image-size", "224", "--precision", "bf16"]
    assert bench_train.main(args) == 0
    return json.loads(path.read_text())


def part_bench_train(check: Check) -> dict[str, Any]:
    """ResNet-50 SupCon against cross-entropy, bf16 (the smoke: ResNet-18)."""
    return _bench_train(
        check, "bench_train", ["--model", "resnet18"], ["--model", "resnet50", "--batch-per-gpu", "256"]
    )


# A tiny ViT for the smoke: timm's ViT-Ti/16 at 32 px with 4 px patches (64 tokens) and 2 blocks.
TINY_VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}


def part_bench_train_vit(check: Check) -> dict[str, Any]:
    """ViT-B/16 SupCon against cross-entropy, bf16, 64 images (128 views) per GPU (the smoke: the tiny ViT)."""
    vit_tiny = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT_KWARGS)]
    vit_base = ["--model", "vit_base_patch16_224", "--batch-per-gpu", "64"]
    return _bench_train(check, "bench_train_vit", [*vit_tiny, "--no-channels-last"], [*vit_base, "--no-channels-last"])


def part_bench_loss(check: Check) -> dict[str, Any]:
    from supcon_scale.bench import loss as bench_loss

    path = check.out / "bench_loss.json"
    views = "256" if check.smoke else "65536"
    args = ["--device", check.device.type, "--views", views, "--impls", "tiled", "--repeats", "2", "--json", str(path)]
    assert bench_loss.main(args) == 0
    return {"rows": json.loads(path.read_text())}


def queue_steps(device: torch.device, steps: int, batch: int, queue: int, dim: int) -> dict[str, Any]:
    """`steps` SupCon steps (tiled loss) of a linear encoder with a labelled key queue of `queue` keys on `device`:
    the keys enter after each applied step (`objectives.queue.KeyQueue`). The CPU tests run it too."""
    from supcon_scale.hooks import StepInfo

    cfg = config.load(None, [f"model.feat_dim={dim}", f"loss.queue_size={queue}", "loss.impl=tiled"])
    objective = objectives.build(cfg, 10, distributed.Context(device=device))
    (keys,) = objective.hooks()
    g = torch.Generator(device=device).manual_seed(0)
    model = torch.nn.Linear(32, dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(1, steps + 1):
        x = torch.randn(batch, 2, 32, device=device, generator=g)
        y = torch.randint(0, 10, (batch,), device=device, generator=g)
        loss = objective(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        keys.on_step(StepInfo(step, 0, loss.detach(), True, 2 * batch, False, step == steps))
        losses.append(loss.item())
    return {"losses": losses, "filled": keys.filled, "finite": all(map(math.isfinite, losses))}


def part_queue(check: Check) -> dict[str, Any]:
    """The labelled queue on the device: steps that fill and wrap it (on a GPU 10 steps of 4,096 images, 2 views,
    into 65,536 keys of 128)."""
    if check.smoke:
        return queue_steps(check.device, 4, 16, 48, 16)
    result = queue_steps(check.device, 10, 4096, 65536, 128)
    if not result["finite"] or result["filled"] != 32768:
        raise AssertionError(f"the queue step went wrong: {result}")
    return result


PARTS: list[tuple[str, Callable[[Check], dict[str, Any]]]] = [
    ("cuda", part_cuda),
    ("dali_loader", part_dali_loader),
    ("decode_once_vs_roi", part_decode),
    ("engines", part_engines),
    ("kernels", part_kernels),
    ("momentum", part_momentum),
    ("syncs_per_step", part_syncs),
    ("bench_train", part_bench_train),
    ("bench_train_vit", part_bench_train_vit),
    ("bench_loss", part_bench_loss),
    ("queue", part_queue),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script itself")
    p.add_argument("--parts", default=",".join(n for n, _ in PARTS), help="comma list of the parts to run")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": platform.node(), "smoke": args.smoke, "parts": {}}
    path = args.out / "gpu_check.json"
    start = time.perf_counter()
    try:
        check = Check(args.out, args.smoke)
    except ValueError as exc:  # no usable CUDA: the one-line reason, in the JSON too
        report["parts"]["cuda"] = {"status": "failed", "error": str(exc)}
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 1
    wanted = set(args.parts.split(","))
    failed = False
    for name, fn in PARTS:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        if t0 - start > BUDGET_S:
            entry: dict[str, Any] = {"status": "skipped", "error": f"over the {BUDGET_S:.0f} s budget"}
        else:
            try:
                entry = {"status": "ok", **fn(check)}
            except Exception as exc:  # noqa: BLE001 - a part's failure is a finding; the other parts still run
                failed = True
                entry = {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=6),
                }
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = entry
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")  # after every part
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
    print(f"gpu_check: JSON in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
