"""averaging.py: the momentum encoder (`model.momentum`) and the EMA weights (`train.ema_decay`), frozen siblings
inside the model: the update against the formulas written here (MoCo v3's cosine momentum, timm's ModelEmaV3),
the keys, the optimizer, the engines on 2 ranks against one process, resume, elastic resume and the export."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from safetensors.torch import load_file

from supcon_scale import averaging, checkpoint, config, distributed, engines, export, models, optim, trainer
from supcon_scale.bench.gpu_check import momentum_step
from supcon_scale.hooks import Hook

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
M0, DECAY = 0.9, 0.8


def tiny_model(momentum: float | None = M0, ema: float | None = DECAY) -> models.SupConModel:
    torch.manual_seed(0)
    cfg = config.ModelConfig(encoder="resnet18", cifar_stem=True, head="mlp", feat_dim=8, momentum=momentum)
    return models.build(cfg, image_size=8, ema_decay=ema)


def cosine_m(m0: float, t: int, total: int) -> float:
    """MoCo v3's adjust_moco_momentum (Chen et al. 2021): 1 - (1 - m0) (1 + cos(pi t / T)) / 2."""
    return 1 - (1 - m0) * (1 + math.cos(math.pi * t / total)) / 2


def f64(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() if v.is_floating_point() else v.clone() for k, v in state.items()}


def online_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "head."))}


def sibling_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}.module."
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_momentum_and_ema_updates_follow_the_formulas_in_float64():
    """k steps of moved weights: momentum = the cosine-m lerp of parameters with buffers copied, EMA = timm's
    d * ema + (1 - d) * w on every float entry with integer entries copied, both written out here."""
    model = tiny_model()
    params = {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "head."))}
    mom, ema = f64(online_state(model)), f64(online_state(model))
    total, g = 5, torch.Generator().manual_seed(1)
    for t in range(1, 4):
        with torch.no_grad():  # an optimizer step, and batch norm's running statistics moved, by hand
            for v in online_state(model).values():
                v.add_(torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.add_(1)
        averaging.update(model, t, total)
        w, m = f64(online_state(model)), cosine_m(M0, t, total)
        for k in w:
            mom[k] = m * mom[k] + (1 - m) * w[k] if k in params else w[k]
            ema[k] = DECAY * ema[k] + (1 - DECAY) * w[k] if w[k].is_floating_point() else w[k]
    for name, ref in (("momentum", mom), ("ema", ema)):
        got = sibling_state(model, name)
        assert got.keys() == ref.keys()
        for k, v in got.items():
            torch.testing.assert_close(v.double(), ref[k].double(), rtol=0, atol=1e-5, msg=f"{name} {k}")
    assert any(k.endswith("num_batches_tracked") for k in ema)  # the integer entries were checked (copied)
    assert averaging.momentum_at(M0, 0, total) == pytest.approx(M0) and averaging.momentum_at(M0, total, total) == 1


def test_siblings_are_frozen_and_in_no_optimizer_group():
    model = tiny_model()
    siblings = [p for name in averaging.SIBLINGS for p in getattr(model, name).parameters()]
    assert siblings and not any(p.requires_grad for p in siblings)
    cfg = config.OptimConfig(name="lars", layer_decay=0.5)
    opt = optim.build_optimizer(model, cfg, 256, layers=models.layer_ids(model))
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert not held & {id(p) for p in siblings}


def test_keys_have_no_gradient_and_equal_a_separate_forward_of_the_sibling():
    model = tiny_model().train()
    with torch.no_grad():  # a sibling that differs from the online weights
        for p in model.momentum.parameters():
            p.mul_(0.5)
    x = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)]
    out = model(x)
    assert out.keys is not None and not out.keys.requires_grad and out.z.requires_grad
    sib = copy.deepcopy(model.momentum.module).train()
    ref = torch.cat([sib.head(sib.encoder(torch.cat(x[:2]))), sib.head(sib.encoder(x[2]))])
    torch.testing.assert_close(out.keys, F.normalize(ref, dim=-1), rtol=0, atol=1e-6)
    out.z.sum().backward()
    assert all(p.grad is None for p in model.momentum.parameters())


def test_without_siblings_the_forward_is_a_plain_tensor_bit_for_bit():
    model = tiny_model(None, None).eval()
    assert not averaging.has_siblings(model) and not any(k.startswith(averaging.SIBLINGS) for k in model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    out = model(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, F.normalize(model.head(model.encoder(x)), dim=-1))


def test_fill_missing_adds_a_new_sibling_from_the_online_entries_and_drops_a_removed_one():
    w, b = torch.ones(2), torch.zeros(2)
    saved = {"encoder.w": w, "head.b": b, "ema.module.encoder.w": 2 * w, "ema.module.head.b": b}
    own = dict.fromkeys(["encoder.w", "head.b", "momentum.module.encoder.w", "momentum.module.head.b"])
    got = averaging.fill_missing(saved, own)
    assert got.keys() == own.keys() and got["momentum.module.encoder.w"] is w and got["momentum.module.head.b"] is b
    assert averaging.fill_missing({"encoder.w": w, "extra": b}, {"encoder.w": None}) == {"encoder.w": w, "extra": b}


def test_gpu_check_momentum_step_on_the_cpu():
    """The device check's step (bench/gpu_check.py) on the CPU: its update equals the formula."""
    report = momentum_step(torch.device("cpu"))
    assert report["max_error"] < 1e-6 and report["keys_grad"] is False


# ---------------------------------------------------------------------------------------------------------------
# engines: 2 ranks against one process, siblings included


STEPS, TOTAL = 3, 4
SIB = ("model.momentum=0.9", "train.ema_decay=0.8")


def _ranks(rank: int, world: int, engine_name: str, overrides: tuple[str, ...]) -> dict | None:
    """3 steps on this rank's share with the siblings updated after each; the full state and each step's keys."""
    from test_engines import GLOBAL_B, as_numpy, batch, contrastive_loss, local_views, tiny_cfg

    cfg = tiny_cfg(engine_name, *SIB, *overrides)
    ctx = distributed.Context(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, image_size=cfg.data.image_size, ema_decay=cfg.train.ema_decay)
    engine = engines.build(engines.EngineSpec.from_run(cfg), ctx, model, 10, 0)
    engine.train(False)  # per-rank batch norm in eval mode: each sample's forward is independent of the split
    n = GLOBAL_B // world
    keys = []
    for s in range(STEPS):
        views, labels = batch(s, cfg.data.image_size)
        out = engine(local_views(views, rank, world))
        b = n
        feats = out.z.float().reshape(len(views), b, -1).transpose(0, 1)
        engine.backward(contrastive_loss(feats, labels[rank * n : (rank + 1) * n]))
        assert engine.step()
        averaging.update(engine.unwrapped(), s + 1, TOTAL)
        local = out.keys.reshape(len(views), b, -1).transpose(0, 1).contiguous()
        keys.append(distributed.all_gather_no_grad(local))  # [global batch, V, D], rank-major as the batch
    state = engine.state_dict()["model"]
    return {"weights": as_numpy(state), "keys": [k.numpy() for k in keys]} if rank == 0 else None


def _one_process() -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The plain model and optimizer on the global batch; the siblings written out with the formulas."""
    from test_engines import GLOBAL_B, VIEWS, as_numpy, batch, contrastive_loss, reference_optimizer, tiny_cfg

    cfg = tiny_cfg("ddp")
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, image_size=cfg.data.image_size).to(memory_format=torch.channels_last).eval()
    opt = reference_optimizer(model, cfg)
    mom, ema = copy.deepcopy(model), copy.deepcopy(model)
    keys = []
    for s in range(STEPS):
        views, labels = batch(s, cfg.data.image_size)
        with torch.no_grad():
            k = mom(torch.cat(views)).reshape(VIEWS, GLOBAL_B, -1).transpose(0, 1)
        keys.append(k.numpy())
        out = model(torch.cat(views)).reshape(VIEWS, GLOBAL_B, -1).transpose(0, 1)
        opt.zero_grad()
        contrastive_loss(out, labels).backward()
        opt.step()
        m = cosine_m(0.9, s + 1, TOTAL)
        with torch.no_grad():
            for pm, p in zip(mom.parameters(), model.parameters(), strict=True):
                pm.copy_(m * pm + (1 - m) * p)
            for e, w in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
                e.copy_(0.8 * e + 0.2 * w if w.is_floating_point() else w)
    weights = as_numpy(model.state_dict())
    weights |= {f"momentum.module.{k}": v for k, v in as_numpy(mom.state_dict()).items()}
    weights |= {f"ema.module.{k}": v for k, v in as_numpy(ema.state_dict()).items()}
    return weights, keys


@pytest.fixture(scope="module")
def one_process():
    return _one_process()


@pytest.mark.parametrize(
    "engine_name,overrides",
    [
        pytest.param("ddp", (), id="ddp"),
        pytest.param("fsdp", (), id="fsdp", marks=pytest.mark.slow),
        pytest.param("deepspeed", ("engine.zero_stage=2",), id="deepspeed-zero2", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_with_siblings_match_one_process(engine_name, overrides, one_process):
    ref, ref_keys = one_process
    got = run_ranks(_ranks, 2, engine_name, overrides, timeout=600)[0]
    assert sorted(got["weights"]) == sorted(ref)
    for k in ref:
        if "running" not in k:
            np.testing.assert_allclose(got["weights"][k], ref[k], rtol=2e-4, atol=2e-5, err_msg=k)
    for step, (a, b) in enumerate(zip(got["keys"], ref_keys, strict=True)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"keys of step {step}")


# ---------------------------------------------------------------------------------------------------------------
# whole runs: resume, export, the evaluation tools, a checkpoint without siblings


def _cfg(digits: Path, out: Path, *extra: str) -> config.RunConfig:
    return config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [
            f"data.root={digits}", f"out_dir={out}", "data.global_batch_size=64", "data.image_size=16",
            "train.epochs=2", "train.warmup_epochs=1", "train.log_every=1", "train.progress=false",
            "model.sync_bn=false", "model.head=linear", "model.feat_dim=16", *SIB, *extra,
        ],
    )  # fmt: skip


@pytest.mark.slow  # resume in general: tests/test_trainer.py; the siblings loaded on resume: the test below
@pytest.mark.filterwarnings("ignore:model.momentum")
def test_resume_with_siblings_equals_the_uninterrupted_run(small_digits, tmp_path):
    from test_trainer import Crash, CrashAt

    ctx = distributed.init(seed=0)
    full = trainer.fit(_cfg(small_digits, tmp_path / "full"), ctx)
    per_epoch = full.step // 2
    with pytest.raises(Crash):
        trainer.fit(_cfg(small_digits, tmp_path / "resumed"), ctx, hooks=[CrashAt(per_epoch + 1)])
    trainer.fit(_cfg(small_digits, tmp_path / "resumed", "train.resume=auto"), ctx)
    a = load_file(str(checkpoint.latest(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(checkpoint.latest(tmp_path / "resumed") / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("momentum.") for k in a) and any(k.startswith("ema.") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    for k in (k for k in a if k.startswith("momentum.module.encoder.") and k.endswith("conv1.weight")):
        assert not torch.equal(a[k], a[k.removeprefix("momentum.module.")]), k  # a sibling, not a copy


@pytest.mark.filterwarnings("ignore:model.momentum")
def test_siblings_added_on_resume_only_when_allowed_and_the_ema_encoder_exported(small_digits, tmp_path):
    """A checkpoint without siblings is refused (one line naming the keys) by a run that has them, unless
    train.allow_changes lists them: then they start from its online weights. The run exports encoder_ema.safetensors,
    which encoder_from_export and the knn tool read."""
    ctx = distributed.init(seed=0)
    out = tmp_path / "run"
    trainer.fit(_cfg(small_digits, out, "model.momentum=null", "train.ema_decay=null", "train.max_steps=2"), ctx)
    assert not (out / export.EMA_FILE).exists()
    with pytest.raises(ValueError, match="train.allow_changes=model.momentum,train.ema_decay") as err:
        trainer.fit(_cfg(small_digits, out, "train.resume=auto", "train.max_steps=2"), ctx)
    assert "\n" not in str(err.value)
    saved = load_file(str(checkpoint.latest(out) / "model.safetensors"))
    allowed = "train.allow_changes=model.momentum,train.ema_decay,train.max_steps"
    with pytest.warns(UserWarning, match="model.momentum"):  # nothing consumes the keys without the queue
        trainer.fit(_cfg(small_digits, out, "train.resume=auto", "train.max_steps=3", allowed), ctx)
    model = load_file(str(checkpoint.latest(out) / "model.safetensors"))
    assert any(k.startswith("ema.module.") for k in model)
    # The new momentum sibling started as the checkpoint's online weights; T = 3 steps, so m_3 = 1 kept them.
    for k in (k for k in model if k.startswith("momentum.module.") and k.endswith("weight") and "bn" not in k):
        assert torch.equal(model[k], saved[k.removeprefix("momentum.module.")]), k

    ema_file = out / export.EMA_FILE
    online, ema = load_file(str(out / "encoder.safetensors")), load_file(str(ema_file))
    assert online.keys() == ema.keys()
    for k in online:  # encoder.safetensors holds the online encoder only, encoder_ema.safetensors the EMA's
        assert torch.equal(online[k], model[f"encoder.{k}"]) and torch.equal(ema[k], model[f"ema.module.encoder.{k}"])
    assert not torch.equal(online["conv1.weight"], ema["conv1.weight"])
    encoder, meta = export.encoder_from_export(ema_file)
    assert meta == export.read_metadata(out / "encoder.safetensors")
    assert torch.equal(encoder.conv1.weight, ema["conv1.weight"])

    from supcon_scale.evaluation import knn

    report = tmp_path / "knn.json"
    assert (
        knn.main(["--checkpoint", str(ema_file), "--data", str(small_digits), "--k", "5", "--json", str(report)]) == 0
    )
    assert report.is_file()


# ---------------------------------------------------------------------------------------------------------------
# elastic resume: 2 -> 3 -> 1 ranks, the siblings loaded whole on each new world size


class ResumedSiblings(Hook):
    """On resume, the engine's siblings (gathered whole) against the checkpoint's, exactly."""

    def __init__(self, out: Path) -> None:
        self.out, self.engine, self.compared = out, None, []

    def on_resume(self, step: int, epoch: int) -> None:
        if step == 0:
            return
        state = self.engine.state_dict()["model"]  # a collective: every rank
        if self.engine.ctx.is_main:
            saved = load_file(str(self.out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
            names = [k for k in saved if k.startswith(averaging.SIBLINGS)]
            self.compared.append((step, len(names), all(torch.equal(state[k].cpu(), saved[k]) for k in names)))


def _fit_checked(rank: int, world: int, overrides: list[str]) -> list:
    ctx = distributed.init(seed=0)
    cfg = config.load(None, overrides)
    hook = ResumedSiblings(Path(cfg.out_dir))
    parts = trainer.build(cfg, ctx, [hook])
    hook.engine = parts.engine
    trainer.run_loop(parts)
    return hook.compared


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, extra",
    [
        pytest.param("ddp", (), id="ddp"),
        pytest.param("fsdp", (), id="fsdp"),
        pytest.param("deepspeed", ("engine.zero_stage=2",), id="deepspeed-zero2"),
    ],
)
def test_siblings_resume_whole_on_three_then_one_rank(tmp_path, engine, extra):
    from data_images import write_coded
    from test_elastic import _overrides

    root = write_coded(tmp_path / "data", 4, 9)
    out = tmp_path / "run"
    compared = []
    for world, stop in [(2, "train.max_steps=2"), (3, "train.max_steps=8"), (1, None)]:
        overrides = _overrides(root, out, engine, *SIB, *extra, *([stop] if stop else []))
        compared += run_ranks(_fit_checked, world, overrides, timeout=600)[0]
    assert [(step, ok) for step, _, ok in compared] == [(2, True), (8, True)] and all(n > 0 for _, n, _ in compared)
    final = load_file(str(checkpoint.latest(out) / "model.safetensors"))
    k = next(k for k in final if k.startswith("encoder.") and k.endswith("conv1.weight"))
    assert not torch.equal(final[f"momentum.module.{k}"], final[k]) and not torch.equal(
        final[f"ema.module.{k}"], final[k]
    )
