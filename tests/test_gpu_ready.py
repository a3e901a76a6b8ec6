"""GPU readiness checked on the CPU: loud device selection, host reads per step, the launch scripts' lint."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from supcon_scale import config, devices, distributed, engines, models, objectives, trainer
from supcon_scale.resilience import NonFiniteGuard, PreemptionHandler

REPO = Path(__file__).resolve().parents[1]


def test_device_cuda_without_cuda_exits_2_naming_driver_cuda_and_visible_devices(tmp_path: Path):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so CUDA is unusable here on any machine, as under a broken driver.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    cmd = [
        sys.executable,
        "-m",
        "supcon_scale.cli",
        "train",
        "--config",
        str(REPO / "supcon_scale/recipes/demo/digits.yaml"),
        "device=cuda",
        f"out_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("supcon-scale: error: device=cuda: CUDA is not usable")
    assert "driver " in line and f"built for CUDA {torch.version.cuda or 'none'}" in line
    assert "CUDA_VISIBLE_DEVICES='';" in line
    assert not (tmp_path / "run").exists()  # nothing written before the device check


def test_auto_device_refuses_promised_gpus_that_cuda_cannot_use(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    if devices.cuda_problem() is None:  # a working GPU: auto picks it
        assert devices.select_device("auto", 0).type == "cuda"
        return
    with pytest.raises(ValueError, match=r"device=auto: CUDA is not usable .*CUDA_VISIBLE_DEVICES=0"):
        devices.select_device("auto", 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert devices.select_device("auto", 0) == torch.device("cpu")
    assert devices.select_device("cpu", 3) == torch.device("cpu")


def test_local_rank_to_cuda_index():
    assert devices.cuda_index(0, 1) == 0
    assert devices.cuda_index(5, 1) == 0  # Slurm --gpus-per-task=1: every task sees its own device 0
    assert devices.cuda_index(3, 8) == 3
    with pytest.raises(ValueError, match="local rank 5 but this process sees 4 GPUs"):
        devices.cuda_index(5, 4)


def test_device_and_tf32_are_schema_keys():
    keys = {k.key: k for k in config.schema()}
    assert keys["device"].default == "auto" and "one of auto, cuda, cpu" in keys["device"].range_text
    assert keys["tf32"].default is True
    with pytest.raises(config.ConfigError, match="device"):
        config.load(None, ["device=gpu"])


# ---------------------------------------------------------------------------------------------------------------
# Host reads per step: every call that copies a tensor's value to the host (a GPU synchronisation on CUDA)

_READS = [
    (torch.Tensor, n)
    for n in (
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "nonzero",
        "unique",
        "bincount",
        "cpu",
        "numpy",
    )
]
_READS += [(torch, n) for n in ("nonzero", "unique", "bincount", "argwhere", "masked_select")]


@contextlib.contextmanager
def count_host_reads():
    """Count host reads by name while the block runs (Python-level calls; torch's C++ ops are counted by op)."""
    counts: Counter = Counter()
    saved = [(owner, name, getattr(owner, name)) for owner, name in _READS]

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for owner, name, fn in saved:
        setattr(owner, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _parts(overrides: list[str]):
    cfg = config.load(
        None,
        [
            "data.global_batch_size=16",
            "data.image_size=32",
            "model.encoder=resnet18",
            "model.cifar_stem=true",
            "optim.name=sgd",
            "train.epochs=1",
            "train.warmup_epochs=0",
            *overrides,
        ],
    )
    ctx = distributed.Context()
    objective = objectives.build(cfg, 10, ctx)
    torch.manual_seed(0)
    model = models.build(cfg.model, objective.classifier_classes)
    engine = engines.build(engines.EngineSpec.from_run(cfg), ctx, model, 10, 0)
    engine.train()
    return cfg, engine, objective


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["loss.impl=tiled", "loss.variant=in", "loss.contrast=one"],
        ["loss.name=simclr"],
        ["loss.name=cross_entropy"],
        ["precision=fp16", "model.cifar_stem=false"],  # fp16 CPU convolutions are slow: 8 px maps after the stem
    ],
    ids=["supcon", "supcon-tiled-in-one", "simclr", "cross_entropy", "fp16-loss-scaling"],
)
def test_at_most_one_host_read_per_training_step(overrides: list[str]):
    """A step (train_step, the non-finite guard, the preemption check) reads one value back: the finite flag.

    A skipped step may read one more (the guard reads the loss to tell fp16 calibration from a real failure); fp16
    skips its first steps while the loss scale calibrates, so it runs until two steps have been taken.
    """
    cfg, engine, objective = _parts(overrides)
    guard = NonFiniteGuard(cfg.train.max_bad_steps, fp16=cfg.precision == "fp16")
    preemption = PreemptionHandler("SIGUSR2")
    g = torch.Generator().manual_seed(0)
    taken = []
    try:
        for step in range(1, 17):
            views = [torch.rand(16, 3, 32, 32, generator=g) for _ in range(cfg.data.views)]
            labels = torch.randint(0, 10, (16,), generator=g)
            with count_host_reads() as counts:
                loss, stepped, _ = trainer.train_step(engine, objective, views, labels)
                guard.update(step, loss, stepped, None)
                assert not preemption.requested()
            assert sum(counts.values()) <= (1 if stepped else 2), (step, stepped, dict(counts))
            taken.append(stepped)
            if sum(taken) == 2:
                break
    finally:
        preemption.close()
    assert sum(taken) == 2 and (cfg.precision == "fp16" or all(taken)), taken


def test_skipped_step_restores_batch_norm_statistics_exactly():
    cfg, engine, objective = _parts([])
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(16, 3, 32, 32, generator=g) for _ in range(2)]
    labels = torch.randint(0, 10, (16,), generator=g)
    trainer.train_step(engine, objective, views, labels)
    before = {k: v.clone() for k, v in engine.unwrapped().state_dict().items()}
    views[0][0, 0, 0, 0] = float("nan")
    _, stepped, _ = trainer.train_step(engine, objective, views, labels)
    assert not stepped
    after = engine.unwrapped().state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            assert torch.equal(after[k], v), k


# ---------------------------------------------------------------------------------------------------------------
# Shell scripts


def _shell_scripts() -> list[Path]:
    return sorted([*REPO.glob("launch/*.sh"), *REPO.glob("launch/*.sbatch"), *REPO.glob("tools/*.sh")])


def test_shellcheck_passes_on_launch_and_tools():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    exe = str(shellcheck) if shellcheck.exists() else "shellcheck"
    proc = subprocess.run(
        [exe, "--shell=bash", "--severity=style", *map(str, _shell_scripts())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_smoke_runs_every_part_and_writes_json(tmp_path: Path):
    """`make gpu-check SMOKE=1` (the module with --smoke): every part runs tiny on the CPU, JSON after each."""
    proc = subprocess.run(
        [sys.executable, "-m", "supcon_scale.bench.gpu_check", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    from supcon_scale.bench.gpu_check import PARTS

    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == [name for name, _ in PARTS]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    assert parts["dali_loader"]["resume_bit_identical"] is True
    assert parts["engines"]["ddp fp32"]["newest"] == "step_00000006"


def test_doctor_prints_its_table():
    proc = subprocess.run(
        [sys.executable, "-m", "supcon_scale.cli", "doctor"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode in (0, 1), proc.stderr
    for item in ("NVIDIA driver", "torch", "GPUs", "DALI", "DeepSpeed", "CPU affinity", "launcher"):
        assert item in proc.stdout, proc.stdout
    assert torch.__version__ in proc.stdout
    assert (proc.returncode == 1) == ("would fail" in proc.stderr)
