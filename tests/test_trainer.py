"""The training loop through its public entry points: resume equals an uninterrupted run; the real CLI trains."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from supcon_scale import checkpoint, config, distributed, export, models, trainer
from supcon_scale.hooks import Hook, StepInfo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(small_digits: Path) -> Path:
    return small_digits


def _cfg(digits: Path, out: Path, *extra: str) -> config.RunConfig:
    return config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [
            f"data.root={digits}",
            f"out_dir={out}",
            "data.global_batch_size=64",
            "data.image_size=16",
            "train.epochs=2",
            "train.warmup_epochs=1",
            "train.log_every=1",
            "train.progress=false",
            *extra,
        ],
    )


class Crash(Exception):
    pass


class CrashAt(Hook):
    """Raises `Crash` after step `step`, as a process dying there would (its checkpoints stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info: StepInfo) -> None:
        if info.step == self.step:
            raise Crash


class RecordRng(Hook):
    """The global torch / numpy / python RNG states after each step: what a resume must restore."""

    def __init__(self) -> None:
        self.states: dict[int, tuple] = {}

    def on_step(self, info: StepInfo) -> None:
        self.states[info.step] = (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def test_resume_after_epoch_one_matches_uninterrupted(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)
    full_rng = RecordRng()
    full = trainer.fit(_cfg(digits, tmp_path / "full"), ctx, hooks=[full_rng])
    steps_per_epoch = full.step // 2

    distributed.seed_everything(123)  # resume must not depend on the RNG state of the new process
    with pytest.raises(Crash):
        trainer.fit(_cfg(digits, tmp_path / "resumed"), ctx, hooks=[CrashAt(steps_per_epoch + 1)])
    assert checkpoint.latest(tmp_path / "resumed").name == f"step_{steps_per_epoch:08d}"
    distributed.seed_everything(456)
    resumed_rng = RecordRng()
    resumed = trainer.fit(_cfg(digits, tmp_path / "resumed", "train.resume=auto"), ctx, hooks=[resumed_rng])
    assert resumed.step == full.step
    # the global RNG streams continue where the checkpoint left them, not from the new process's seed
    assert sorted(resumed_rng.states) == list(range(steps_per_epoch + 1, full.step + 1))
    for step, (torch_state, np_state, py_state) in resumed_rng.states.items():
        assert torch.equal(torch_state, full_rng.states[step][0]), step
        assert np.array_equal(np_state, full_rng.states[step][1]) and py_state == full_rng.states[step][2], step

    a = load_file(str(checkpoint.latest(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # and the run actually trained: the weights moved away from their (seeded) initialisation
    torch.manual_seed(0)
    init = models.build(_cfg(digits, tmp_path).model).encoder.conv1.weight
    trained = load_file(str(tmp_path / "full/encoder.safetensors"))["conv1.weight"]
    assert not torch.allclose(trained, init)


def test_genscl_with_mixing_resumes_exactly(digits: Path, tmp_path: Path):
    """The Mixup/CutMix generator is part of the checkpoint: crashed and resumed equals uninterrupted, to the bit."""
    # torchvision: its resume is exact across epoch ends on its own (DALI's has its own tests in test_data*.py)
    extra = ("data.backend=torchvision", "loss.name=genscl", "mix.mixup_alpha=1.0", "mix.cutmix_alpha=1.0")
    ctx = distributed.init(seed=0)
    full = trainer.fit(_cfg(digits, tmp_path / "full", *extra), ctx)
    crash_at = full.step // 2 + 1  # the first step of the second epoch

    with pytest.raises(Crash):
        trainer.fit(_cfg(digits, tmp_path / "resumed", *extra), ctx, hooks=[CrashAt(crash_at)])
    distributed.seed_everything(7)
    trainer.fit(_cfg(digits, tmp_path / "resumed", *extra, "train.resume=auto"), ctx)
    a = load_file(str(checkpoint.latest(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "resumed") / "model.safetensors"))
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0


def test_metrics_config_and_encoder_written(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)
    result = trainer.fit(_cfg(digits, tmp_path, "train.max_steps=3"), ctx)
    assert result.step == 3 and torch.isfinite(torch.tensor(result.loss))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in rows)
    assert config.load(tmp_path / "config.yaml").train.max_steps == 3
    encoder, meta = export.encoder_from_export(tmp_path / "encoder.safetensors")
    assert meta["encoder"] == "resnet18" and export.input_size(meta) == 16
    import timm  # the run's timm folder loads offline into the same encoder

    plain = timm.create_model(f"local-dir:{tmp_path / 'encoder_timm'}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(plain(x), encoder(x))


def test_cross_entropy_baseline_trains(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)
    result = trainer.fit(_cfg(digits, tmp_path, "loss.name=cross_entropy", "train.max_steps=2"), ctx)
    meta = json.loads((checkpoint.latest(tmp_path) / "meta.json").read_text())
    assert result.step == 2 and meta["loss_convention"]["name"] == "cross_entropy"


def _cli(*args: str, env_extra: dict | None = None, module: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, *(module or ["-m", "supcon_scale.cli"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_cli_help_for_every_command():
    from supcon_scale.cli import DELEGATED

    for command in ["train", "make-demo-data", *DELEGATED]:
        proc = _cli(command, "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        assert "usage:" in proc.stdout


def test_cli_takes_the_deepspeed_launchers_local_rank(monkeypatch):
    from supcon_scale.cli import main, take_local_rank

    monkeypatch.setenv("LOCAL_RANK", "7")  # restored (to unset) after the test
    monkeypatch.delenv("LOCAL_RANK")
    assert take_local_rank(["--local_rank=1", "train", "seed=3"]) == ["train", "seed=3"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert take_local_rank(["--local-rank", "0", "knn"]) == ["knn"]
    assert os.environ["LOCAL_RANK"] == "1"  # the environment the launcher set wins
    assert main(["--local_rank=x", "train"]) == 2


@pytest.mark.parametrize(
    "override, message",
    [("loss.temprature=0.1", "did you mean loss.temperature?"), ("loss.temperature=0", "loss.temperature must be > 0")],
)
def test_cli_config_error_exits_2_with_one_line(override: str, message: str):
    proc = _cli("train", "--config", "demo/digits", override)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_trains_on_two_torchrun_ranks(digits: Path, tmp_path: Path):
    proc = _cli(
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "supcon_scale.cli",
        "train",
        "--config",
        "demo/digits",
        f"data.root={digits}",
        f"out_dir={tmp_path}",
        "train.max_steps=2",
        "train.progress=false",
        "data.global_batch_size=64",
        module=["-m", "torch.distributed.run"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((checkpoint.latest(tmp_path) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
    assert (tmp_path / "encoder.safetensors").is_file()


def test_cli_batch_not_divisible_by_world(digits: Path, tmp_path: Path):
    proc = _cli(
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "supcon_scale.cli",
        "train",
        "--config",
        "demo/digits",
        f"data.root={digits}",
        f"out_dir={tmp_path}",
        "data.global_batch_size=63",
        module=["-m", "torch.distributed.run"],
    )
    assert proc.returncode != 0
    assert "data.global_batch_size=63 is not divisible by the world size 2" in proc.stderr


def test_knn_monitor_logs_accuracy(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)
    trainer.fit(_cfg(digits, tmp_path, "train.epochs=1", "train.knn_every_epochs=1", "train.warmup_epochs=0"), ctx)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert len(knn) == 1 and 0.1 < knn[0]["knn_top1"] <= knn[0]["knn_top5"] <= 1.0  # above chance on 10 digits


def test_knn_monitor_leaves_the_encoder_training(digits: Path):
    """The monitor evaluates in eval mode and hands the encoder back in train mode (and its weights untouched)."""
    from supcon_scale.console import MetricsLog
    from supcon_scale.evaluation.knn import KnnMonitor

    torch.manual_seed(0)
    encoder = models.create_encoder("resnet18").train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    monitor = KnnMonitor(encoder, digits, image_size=16, every_steps=2, metrics=MetricsLog(None))
    monitor.on_step(StepInfo(2, 0, torch.tensor(1.0), True, 8, False, False))
    assert encoder.training and all(m.training for m in encoder.modules())
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k  # batch-norm running statistics included


def test_fresh_run_refuses_an_out_dir_with_checkpoints(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)
    trainer.fit(_cfg(digits, tmp_path, "train.max_steps=1"), ctx)
    before = sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir())
    with pytest.raises(
        ValueError, match=r"out_dir: .* already holds checkpoints \(newest step_00000001\); set train.resume=auto"
    ):
        trainer.fit(_cfg(digits, tmp_path, "train.max_steps=2"), ctx)
    assert sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir()) == before  # nothing touched


# A family this toolkit's code never names, trained from a config alone (issue 24: adding a timm family needs no
# code edit). The YAML is what a user writes: the timm name, its constructor arguments, the optimizer.
NEW_FAMILIES = {
    "vit": """
model:
  encoder: vit_tiny_patch16_224
  kwargs: {patch_size: 4, depth: 2, drop_path_rate: 0.1}   # img_size comes from data.image_size
  activation_checkpointing: true
optim: {name: adamw, base_lr: 0.001, weight_decay: 0.05, betas: [0.9, 0.95], layer_decay: 0.75}
""",
    "convnext": """
model:
  encoder: convnext_atto
  kwargs: {drop_path_rate: 0.1}
optim: {name: lamb, base_lr: 0.002, weight_decay: 0.05}
""",
}


@pytest.mark.parametrize("family", sorted(NEW_FAMILIES))
def test_a_timm_family_trains_on_the_digits_from_a_config_alone(digits: Path, tmp_path: Path, family: str):
    from supcon_scale.cli import main

    recipe = tmp_path / f"{family}.yaml"
    recipe.write_text(f"base: {REPO / 'supcon_scale/recipes/demo/digits.yaml'}\n{NEW_FAMILIES[family]}")
    out = tmp_path / "run"
    args = ["train", "--config", str(recipe), f"data.root={digits}", f"out_dir={out}", "data.backend=torchvision"]
    args += ["data.global_batch_size=16", "data.workers=0", "train.max_steps=3", "train.warmup_epochs=0"]
    assert main([*args, "train.progress=false", "train.log_every=1", "model.sync_bn=false"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    exported = load_file(out / "encoder.safetensors")
    cfg = config.load(recipe)
    ref = models.create_encoder(cfg.model.encoder, kwargs=models.encoder_kwargs(cfg.model, 32)).state_dict()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref.items()}
