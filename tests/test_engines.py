"""Engines (ddp, fsdp, deepspeed) on 2 gloo ranks against one process on the global batch, refusals, SyncBN, bf16."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from multiproc import run_ranks
from timm.optim import Lamb, Lars
from torch.distributed.fsdp import FSDPModule

from supcon_scale import batchnorm, config, engines, models
from supcon_scale.distributed import (
    Context,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_mean,
    broadcast_object,
)
from supcon_scale.engines import EngineSpec

os.environ.setdefault("DS_ACCELERATOR", "cpu")

GLOBAL_B, VIEWS, SIZE, STEPS = 8, 2, 16, 3
ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(engine: str, *overrides: str) -> config.RunConfig:
    """resnet18 at 16 px, LARS with exclusions and a large LR so three steps move every weight.

    Without global batch norm each rank normalises with its own statistics, so the plain equivalence runs batch
    norm in eval mode (fixed statistics, the affine weights still trained and excluded from LARS): each sample's
    forward is then independent of the split. With `model.sync_bn=true` it runs in train mode (global statistics).
    """
    base = [
        f"engine.name={engine}",
        "engine.zero_stage=0",
        "model.encoder=resnet18",
        "model.head=linear",
        "model.feat_dim=16",
        "model.sync_bn=false",
        "model.channels_last=true",
        f"data.global_batch_size={GLOBAL_B}",
        f"data.image_size={SIZE}",
        "optim.name=lars",
        "optim.base_lr=8.0",
        "optim.weight_decay=0.001",
        "optim.schedule=constant",
    ]
    return config.load(None, base + list(overrides))


def batch(step: int, size: int = SIZE) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(GLOBAL_B, 3, size, size, generator=g) for _ in range(VIEWS)]
    return views, torch.randint(0, 3, (GLOBAL_B,), generator=g)


def contrastive_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SupCon L_out (Khosla et al. 2020, Eq. 2) over local anchors against the gathered contrast set, tau = 0.1.

    Written here, independently of supcon_scale.losses, in float64: the engines are what is under test.
    """
    b, v, _ = features.shape
    z = features.double().transpose(0, 1).reshape(v * b, -1)
    y = labels.repeat(v)
    all_z, offset = all_gather_with_grad(z)
    all_y = all_gather_no_grad(y)
    # rows: anchors of this rank (view-major locally), columns: global (rank-major, view-major inside a rank)
    logits = z @ all_z.T / 0.1
    own = torch.arange(z.shape[0]) + offset
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(z.shape[0]), own] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    pos = (y[:, None] == all_y[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~pos, 0).sum(1)) / pos.sum(1)
    return per_anchor.mean().float()


def local_views(views: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    n = GLOBAL_B // world
    return [v[rank * n : (rank + 1) * n] for v in views]


def step_once(engine: engines.Engine, views: list[torch.Tensor], labels: torch.Tensor) -> float:
    b = labels.shape[0]
    with engine.autocast():
        out = engine(torch.cat(views))
    feats = out.float().reshape(len(views), b, -1).transpose(0, 1)
    loss = contrastive_loss(feats, labels)
    engine.backward(loss)
    engine.step()
    return float(all_reduce_mean(loss.detach()))  # the global loss: the mean of the ranks' local-anchor means


def as_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items() if v.is_floating_point()}


def _train_ranks(rank: int, world: int, engine_name: str, overrides: tuple[str, ...]) -> dict | None:
    """3 steps on this rank's share; then save, load into a fresh engine and check one more step matches."""
    cfg = tiny_cfg(engine_name, *overrides)
    train_mode = cfg.model.sync_bn
    ctx = Context(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(cfg.seed)
    engine = engines.build(
        engines.EngineSpec.from_run(cfg), ctx, models.build(cfg.model, image_size=cfg.data.image_size), 10, 0
    )
    engine.train(train_mode)
    losses = []
    for s in range(STEPS):
        views, labels = batch(s, cfg.data.image_size)
        n = GLOBAL_B // world
        losses.append(step_once(engine, local_views(views, rank, world), labels[rank * n : (rank + 1) * n]))
    state = engine.state_dict()
    weights = as_numpy(state["model"]) if rank == 0 else None
    # resume: a fresh engine with other initial weights loads the state and must take the same 4th step
    # a deep copy: state_dict() tensors may alias the live parameters and momentum buffers (the real flow saves them)
    full = copy.deepcopy(broadcast_object(state if rank == 0 else None))
    torch.manual_seed(cfg.seed + 1)
    fresh = engines.build(
        engines.EngineSpec.from_run(cfg), ctx, models.build(cfg.model, image_size=cfg.data.image_size), 10, 0
    )
    fresh.train(train_mode)
    fresh.load_state_dict(full)
    views, labels = batch(STEPS, cfg.data.image_size)
    n = GLOBAL_B // world
    mine = (local_views(views, rank, world), labels[rank * n : (rank + 1) * n])
    step_once(engine, *mine)
    step_once(fresh, *mine)
    after, after_fresh = engine.state_dict()["model"], fresh.state_dict()["model"]
    if rank != 0:
        return None
    resume_err = max(
        float((after[k].float() - after_fresh[k].float()).abs().max()) for k in after if after[k].is_floating_point()
    )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # > 0 only if train.compile traced the forward
    keys = sorted(state["model"])
    broadcast = getattr(engine.forward_module, "broadcast_buffers", None)  # DDP's; None under fsdp and deepspeed
    units = sum(isinstance(m, FSDPModule) for m in engine.unwrapped().modules())  # fully_shard'ed modules
    return {
        "weights": weights, "losses": losses, "resume_err": resume_err, "keys": keys, "graphs": graphs,
        "broadcast_buffers": broadcast, "fsdp_units": units,
    }  # fmt: skip


def reference_optimizer(model: nn.Module, cfg: config.RunConfig) -> torch.optim.Optimizer:
    """The optimizer written out from the recipe, not built by the library: timm's Lars (or torch's SGD) at
    base_lr x batch / 256, every 1-D tensor (batch-norm affines, biases) without weight decay or adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    lr = cfg.optim.base_lr * cfg.data.global_batch_size / 256
    if cfg.optim.name == "lars":
        return Lars(groups, lr=lr, momentum=cfg.optim.momentum, trust_coeff=cfg.optim.trust_coeff)
    assert cfg.optim.name == "sgd", cfg.optim.name
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum)


VIT_DEPTH = 2
# The tiny ViT: timm's ViT-Ti/16 cut to 2 blocks of 4 px patches (16 tokens at 16 px), AdamW with layer-wise decay.
# Adam's step m / (sqrt(v) + eps) is ~lr x sign(g) wherever |g| >> eps, so an element whose gradient is a
# cancellation (or exactly 0: the key bias, softmax being shift-invariant) would step by each engine's rounding:
# no qkv bias, and eps 1e-3 so each step is a smooth function of the gradient. Adam's own update is checked against
# the published one in tests/test_optim.py; here the engines, groups and layer scales are under test.
TINY_VIT = (
    "model.encoder=vit_tiny_patch16_224", "model.kwargs.patch_size=4", f"model.kwargs.depth={VIT_DEPTH}",
    "model.kwargs.qkv_bias=false", "optim.eps=1e-3",
    "optim.name=adamw", "optim.base_lr=0.1", "optim.weight_decay=0.05", "optim.layer_decay=0.5",
)  # fmt: skip


def vit_layer(name: str) -> int:
    """BEiT's layer of a ViT parameter, written out: embeddings 0, block i at i + 1, final norm and head on top."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    return int(name.split(".")[2]) + 1 if name.startswith("encoder.blocks.") else VIT_DEPTH + 1


def reference_vit_optimizer(model: nn.Module, cfg: config.RunConfig) -> torch.optim.Optimizer:
    """One group per tensor, written from the recipe: no weight decay for 1-D tensors, pos_embed and cls_token;
    lr x layer_decay ** (depth + 1 - layer); timm's Lars, torch's AdamW or timm's Lamb (no clipping) over them."""
    o = cfg.optim
    lr = o.base_lr * cfg.data.global_batch_size / 256
    groups = []
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or name in ("encoder.pos_embed", "encoder.cls_token")
        scale = (o.layer_decay or 1.0) ** (VIT_DEPTH + 1 - vit_layer(name))
        groups.append({"params": [p], "weight_decay": 0.0 if exempt else o.weight_decay, "lr": lr * scale})
    if o.name == "lars":
        return Lars(groups, lr=lr, momentum=o.momentum, trust_coeff=o.trust_coeff)
    eps = {} if o.eps is None else {"eps": o.eps}
    if o.name == "lamb":
        return Lamb(groups, lr=lr, betas=o.betas, max_grad_norm=None, **eps)
    assert o.name == "adamw", o.name
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, **eps)


def reference(*overrides: str) -> tuple[dict[str, np.ndarray], list[float], list[str]]:
    """One process, plain BatchNorm, the whole global batch: what every engine must reproduce."""
    cfg = tiny_cfg("ddp", *overrides)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, image_size=cfg.data.image_size).to(memory_format=torch.channels_last)
    vit = cfg.model.encoder.startswith("vit")
    opt = reference_vit_optimizer(model, cfg) if vit else reference_optimizer(model, cfg)
    model.train(cfg.model.sync_bn)  # one process: global batch norm is plain batch norm on the global batch
    init = as_numpy(model.state_dict())
    losses = []
    for s in range(STEPS):
        views, labels = batch(s, cfg.data.image_size)
        out = model(torch.cat(views)).reshape(VIEWS, GLOBAL_B, -1).transpose(0, 1)
        loss = contrastive_loss(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    final = as_numpy(model.state_dict())
    moved = [float(np.abs(final[k] - init[k]).max()) > 0 for k in final if "running" not in k]
    assert sum(moved) >= 0.9 * len(moved)  # the comparison is of trained weights, not of the initial ones
    return final, losses, sorted(model.state_dict())


@pytest.fixture(scope="module")
def lars_reference():
    return reference()


def assert_same_weights(got: dict, ref: dict[str, np.ndarray], keys: list[str], ref_keys: list[str]) -> None:
    assert keys == ref_keys  # rank 0's full state uses the plain model's keys
    params = [k for k in ref if "running" not in k]
    for k in params:
        np.testing.assert_allclose(got["weights"][k], ref[k], rtol=2e-4, atol=2e-5, err_msg=k)
    assert got["resume_err"] < 1e-6


@pytest.mark.parametrize(
    "engine_name,overrides",
    [
        pytest.param("ddp", (), id="ddp"),
        pytest.param("fsdp", (), id="fsdp"),
        pytest.param("deepspeed", ("engine.zero_stage=0",), id="deepspeed-zero0"),
        # LARS on ZeRO's flat partitions: ZeroLars's whole-tensor trust ratios
        pytest.param("deepspeed", ("engine.zero_stage=1",), id="deepspeed-zero1"),
        pytest.param("deepspeed", ("engine.zero_stage=2",), id="deepspeed-zero2"),
        # the shipped communication settings (bucketed, overlapped reduce-scatter) change nothing in the numbers
        pytest.param(
            "deepspeed",
            ("engine.zero_stage=2", f"engine.deepspeed_config={ROOT / 'supcon_scale/recipes/deepspeed/zero2.json'}"),
            id="deepspeed-zero2-json",
        ),
    ],
)
def test_lars_engine_matches_one_process(engine_name, overrides, lars_reference):
    ref, ref_losses, ref_keys = lars_reference
    got = run_ranks(_train_ranks, 2, engine_name, overrides, timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)
    assert got["broadcast_buffers"] is (True if engine_name == "ddp" else None)  # per-rank BN: rank 0's buffers


def _train_without_launcher(rank: int, world: int, engine_name: str, overrides: tuple[str, ...]) -> dict | None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    return _train_ranks(rank, world, engine_name, overrides)


def test_deepspeed_in_a_plain_process_matches_one_process(lars_reference):
    """engine.name=deepspeed without a launcher (no RANK/LOCAL_RANK/MASTER_ADDR): a 1-rank group in memory."""
    ref, ref_losses, ref_keys = lars_reference
    got = run_ranks(_train_without_launcher, 1, "deepspeed", ("engine.zero_stage=1",), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)


def test_deepspeed_zero2_sgd_matches_one_process():
    over = ("optim.name=sgd", "optim.base_lr=0.5")
    ref, ref_losses, ref_keys = reference(*over)
    got = run_ranks(_train_ranks, 2, "deepspeed", (*over, "engine.zero_stage=2"), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)


def test_fsdp_lars_uses_global_norms_not_shard_norms():
    """timm's foreach LARS on FSDP2 DTensor shards: the trust ratio must use the whole tensor's norm."""
    out = run_ranks(_dtensor_norms, 2)
    w = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    assert out[0] == pytest.approx(float(w.norm()), rel=1e-6)
    assert out[0] == out[1]


def _dtensor_norms(rank: int, world: int) -> float:
    from torch.distributed.fsdp import fully_shard

    lin = nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(6, 4))
    fully_shard(lin)
    norm = torch._foreach_norm([lin.weight])[0]
    assert lin.weight.to_local().shape[0] == 3  # really sharded
    return float(norm.full_tensor())


@pytest.mark.parametrize(
    "engine_name,overrides,message",
    [
        ("deepspeed", ("engine.zero_stage=3", "optim.name=sgd"), "engine.zero_stage=3"),
        ("deepspeed", ("precision=fp16",), "precision=fp16"),
        ("ddp", ("precision=bf16",), "precision=bf16 with 16 px views"),  # tiny_cfg's 16 px: the bf16 kernel bug
        ("fsdp", ("precision=bf16",), "precision=bf16 with 16 px views"),
    ],
)
def test_refused_combinations(engine_name, overrides, message):
    cfg = tiny_cfg(engine_name, *overrides)
    with pytest.raises(ValueError, match=message):
        engines.build(
            engines.EngineSpec.from_run(cfg), Context(), models.build(cfg.model), total_steps=10, warmup_steps=0
        )


def test_deepspeed_json_cannot_accumulate_gradients(tmp_path):
    from supcon_scale.engines.deepspeed import ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"gradient_accumulation_steps": 4}')
    cfg = tiny_cfg("deepspeed", f"engine.deepspeed_config={path}")
    with pytest.raises(ValueError, match="same contrastive batch"):
        ds_config(engines.EngineSpec.from_run(cfg), 2)
    path.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match="engine.deepspeed_config"):
        ds_config(engines.EngineSpec.from_run(cfg), 2)
    path.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": false}, "wall_clock_breakdown": false}')
    merged = ds_config(engines.EngineSpec.from_run(cfg), 2)
    assert merged["zero_optimization"] == {"stage": 0, "overlap_comm": False}  # the run config wins
    assert merged["train_micro_batch_size_per_gpu"] == GLOBAL_B // 2


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer", {"type": "Adam"}),
        ("scheduler", {"type": "WarmupLR"}),
        ("fp16", {"enabled": True}),
        ("bf16", {"enabled": True}),
        ("amp", {"enabled": True}),
        ("train_batch_size", 64),
        ("train_micro_batch_size_per_gpu", 8),
    ],
)
def test_deepspeed_json_refuses_what_the_run_config_owns(tmp_path, key, value):
    """The optimizer, schedule, precision and batch come from the run config; a JSON setting them is named."""
    from supcon_scale.engines.deepspeed import ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({key: value, "wall_clock_breakdown": False}))
    cfg = tiny_cfg("deepspeed", f"engine.deepspeed_config={path}")
    with pytest.raises(ValueError, match=f"engine.deepspeed_config {path}: remove {key} "):
        ds_config(engines.EngineSpec.from_run(cfg), 2)


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp", "deepspeed"])
def test_bf16_matches_fp32_one_process(engine_name):
    """bf16 autocast on 2 ranks takes the same three LARS steps as fp32 on one process, to bf16 accuracy.

    32 px, not 16: at 16 px layer4's stride-2 3x3 convolution sees a 1x1 input, and torch 2.14's CPU bf16
    convolution returns uninitialised memory for that weight gradient (docs/ENGINES.md), under every engine.
    """
    over = ("data.image_size=32",)
    ref, ref_losses, _ = reference(*over)
    cfg = tiny_cfg("ddp", *over)
    torch.manual_seed(cfg.seed)
    init = as_numpy(models.build(cfg.model).state_dict())  # what reference() and every rank start from
    got = run_ranks(_train_ranks, 2, engine_name, (*over, "precision=bf16"), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-3)  # seen: 2e-4
    # Each tensor's 3-step update against fp32's, as a relative error. Seen at 32 px: LARS-adapted weights <= 0.18
    # (median 0.006); the batch-norm affines and biases, plain SGD steps on small gradients, up to 0.55. The 16 px
    # kernel bug above gave layer4.0.conv1.weight 0.59 (finite garbage) or a skipped step (non-finite).
    errs = {}
    for k in (k for k in ref if "running" not in k):
        want, have = ref[k] - init[k], got["weights"][k] - init[k]
        errs[k] = float(np.linalg.norm(have - want) / max(np.linalg.norm(want), 1e-12))
    weights = {k: e for k, e in errs.items() if ref[k].ndim > 1}
    assert max(weights.values()) < 0.35, max(weights.items(), key=lambda kv: kv[1])
    assert np.median(list(weights.values())) < 0.02  # seen 0.006: most weights follow fp32 closely
    assert max(errs.values()) < 0.8 and np.median(list(errs.values())) < 0.15, max(errs.items(), key=lambda kv: kv[1])
    assert got["resume_err"] < 1e-6


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp", "deepspeed"])
def test_global_batch_norm_in_train_mode_matches_one_process(engine_name):
    """model.sync_bn on gloo: 2 ranks normalising with global statistics == plain BN on the global batch."""
    ref, ref_losses, ref_keys = reference("model.sync_bn=true")
    got = run_ranks(_train_ranks, 2, engine_name, ("model.sync_bn=true",), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)
    for k in (k for k in ref if "running" in k):  # running statistics are global too
        np.testing.assert_allclose(got["weights"][k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # equal on every rank already: DDP does not re-broadcast rank 0's buffers before each forward
    assert got["broadcast_buffers"] is (False if engine_name == "ddp" else None)


def test_sync_bn_conversion():
    cfg = tiny_cfg("ddp", "model.sync_bn=true")
    model = models.build(cfg.model)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, batchnorm.GlobalBatchNorm) for m in model.modules()) == 20  # resnet18: 20 BatchNorm layers


@pytest.mark.parametrize("engine_name", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow), "deepspeed"])
def test_compiled_engine_matches_one_process(engine_name, lars_reference):
    """train.compile: torch.compile (inductor) around each engine's wrapper takes the eager reference's steps."""
    ref, ref_losses, ref_keys = lars_reference
    got = run_ranks(_train_ranks, 2, engine_name, ("train.compile=true",), timeout=480)[0]
    assert got["graphs"] > 0
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)


def test_partition_layout_cuts_parameters_at_partition_edges():
    from supcon_scale.engines.zero_lars import partition_layout

    # three tensors of 6, 4 and 5 elements at offsets 0, 8 (2 alignment padding) and 12; partitions of 6
    offsets, numels = [0, 8, 12], [6, 4, 5]
    assert partition_layout(offsets, numels, 6, 0).pieces == ((0, 0, 6),)
    assert partition_layout(offsets, numels, 6, 1).pieces == ((1, 2, 6),)  # elements 6-7 are padding
    assert partition_layout(offsets, numels, 6, 2).pieces == ((2, 0, 5),)
    assert partition_layout(offsets, numels, 6, 3).pieces == ()  # only the group's tail padding
    assert partition_layout([0, 10], [10, 2], 4, 1).pieces == ((0, 0, 4),)  # a tensor across three partitions


def _zero_lars_against_timm(rank: int, world: int) -> float:
    """Each rank steps its slice of one flat buffer with ZeroLars; the result must be timm's Lars on whole tensors."""
    from timm.optim import Lars

    from supcon_scale.engines.zero_lars import ZeroLars, partition_layout

    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 3)]
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=g, dtype=torch.float64) * 10 ** (i - 1) for i, s in enumerate(shapes)]
        for _ in range(2)
    ]
    numels = [w.numel() for w in weights]
    offsets = [0, numels[0] + 1, numels[0] + 1 + numels[1]]  # one element of alignment padding after the first
    size = -(-(offsets[-1] + numels[-1]) // world)
    flat = torch.zeros(size * world, dtype=torch.float64)
    for w, o in zip(weights, offsets, strict=True):
        flat[o : o + w.numel()] = w.flatten()
    part = flat[rank * size : (rank + 1) * size].clone().requires_grad_()
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coeff=0.02)
    zero = ZeroLars([part], **kwargs)
    zero.attach([part], [partition_layout(offsets, numels, size, rank)])
    full = [w.clone().requires_grad_() for w in weights]
    ref = Lars(full, foreach=True, **kwargs)
    for step_grads in grads:
        flat_grad = torch.zeros_like(flat)
        for gr, o in zip(step_grads, offsets, strict=True):
            flat_grad[o : o + gr.numel()] = gr.flatten()
        part.grad = flat_grad[rank * size : (rank + 1) * size].clone()
        zero.step()
        for p, gr in zip(full, step_grads, strict=True):
            p.grad = gr.clone()
        ref.step()
    want = torch.zeros_like(flat)
    for p, o in zip(full, offsets, strict=True):
        want[o : o + p.numel()] = p.detach().flatten()
    return float((part.detach() - want[rank * size : (rank + 1) * size]).abs().max())


@pytest.mark.parametrize("world", [2, 3])
def test_zero_lars_on_partitions_equals_lars_on_whole_tensors(world):
    """Gradients of very different scales per tensor, so chunk-wise trust ratios would be far off."""
    errors = run_ranks(_zero_lars_against_timm, world)
    assert max(errors) < 1e-12


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 parameters are DTensor shards


def _fp16_ranks(rank: int, world: int, engine_name: str) -> dict:
    """fp16 (GradScaler) on this rank's share; at step 3 rank 0's loss is blown up so its fp16 gradients overflow."""
    cfg = tiny_cfg(engine_name, "data.image_size=32", "precision=fp16")
    torch.manual_seed(cfg.seed)
    engine = engines.build(
        engines.EngineSpec.from_run(cfg),
        Context(rank=rank, world_size=world, local_rank=rank),
        models.build(cfg.model),
        total_steps=10,
        warmup_steps=0,
    )
    engine.train(False)
    init_state = engine.state_dict()["model"]  # collective under FSDP: every rank takes part
    init = as_numpy(init_state) if rank == 0 else None
    n = GLOBAL_B // world
    stepped, moved, losses = [], [], []
    for s in range(6):
        before = [_local(p).detach().clone() for p in engine.unwrapped().parameters()]
        views, labels = batch(s, cfg.data.image_size)
        with engine.autocast():
            out = engine(torch.cat(local_views(views, rank, world)))
        feats = out.float().reshape(VIEWS, n, -1).transpose(0, 1)
        loss = contrastive_loss(feats, labels[rank * n : (rank + 1) * n]) * (1e30 if s == 3 and rank == 0 else 1.0)
        engine.backward(loss)
        stepped.append(engine.step())
        losses.append(float(loss.detach()))
        moved.append(
            any(not torch.equal(b, _local(p)) for b, p in zip(before, engine.unwrapped().parameters(), strict=True))
        )
    state = engine.state_dict()
    return {
        "stepped": stepped,
        "moved": moved,
        "losses": losses,
        "skipped": engine.skipped_steps,
        "scale": engine.scaler.get_scale(),
        "scheduler_steps": engine.scheduler.last_epoch,
        "weights": as_numpy(state["model"]) if rank == 0 else None,
        "init": init,
        "scaler_state": state["scaler"],
    }


class _Fp16Runs(dict):
    """Each engine's 2-rank fp16 run, made when a test first asks for it (the ddp case runs in make test-slow)."""

    def __missing__(self, name: str) -> list[dict]:
        self[name] = run_ranks(_fp16_ranks, 2, name, timeout=240)
        return self[name]


@pytest.fixture(scope="module")
def fp16_runs() -> dict[str, list[dict]]:
    return _Fp16Runs()


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp"])
def test_fp16_loss_scaling_skips_and_counts_overflowing_steps(engine_name, fp16_runs):
    """fp16 autocast (CPU) with torch's GradScaler: a step that overflows on one rank is skipped on every rank,
    leaves the weights and the LR schedule alone, halves the scale and is counted; every other step moves the
    weights. Under FSDP2 a rank sees only its gradient shards, so the skip must come from a global check."""
    ranks = fp16_runs[engine_name]
    r0 = ranks[0]
    assert r0["stepped"] == ranks[1]["stepped"] and not r0["stepped"][3] and r0["stepped"].count(True) >= 2
    assert r0["moved"] == r0["stepped"]  # a skipped step changes nothing, a taken one changes the weights
    skipped = r0["stepped"].count(False)
    assert r0["skipped"] == skipped and r0["scale"] == 65536.0 * 0.5**skipped  # no growth within 2000 steps
    assert r0["scheduler_steps"] == 6 - skipped
    assert all(np.isfinite(r["losses"]).all() for r in ranks)
    assert r0["scaler_state"]["scale"] == r0["scale"]  # saved with the checkpoint
    assert all(np.isfinite(w).all() for w in r0["weights"].values())


def test_fp16_fsdp_takes_the_steps_ddp_takes(fp16_runs):
    ddp, fsdp = fp16_runs["ddp"][0], fp16_runs["fsdp"][0]
    assert ddp["stepped"] == fsdp["stepped"] and ddp["scale"] == fsdp["scale"]
    # To fp16 rounding: FSDP2 keeps its parameters contiguous and DDP channels-last, so the fp16 convolution kernels
    # differ (seen: 2.7e-4 at most, on weights of magnitude ~0.1).
    for k, want in ddp["weights"].items():
        np.testing.assert_allclose(fsdp["weights"][k], want, rtol=1e-2, atol=1e-3, err_msg=k)
    # The updates themselves (w_end - w_0), so an engine that applied none cannot pass on small updates: each trained
    # tensor's FSDP update against DDP's, as a relative error.
    errs, trained = {}, [k for k in ddp["weights"] if "running" not in k and "num_batches" not in k]
    for k in trained:
        want = ddp["weights"][k]
        d_ddp, d_fsdp = want - ddp["init"][k], fsdp["weights"][k] - fsdp["init"][k]
        if not np.linalg.norm(d_ddp) > 0:  # fp16 underflow left a few batch-norm affines where they were
            assert np.linalg.norm(d_fsdp) == 0, k
            continue
        errs[k] = float(np.linalg.norm(d_fsdp - d_ddp) / np.linalg.norm(d_ddp))
    assert len(errs) >= 0.9 * len(trained)  # nearly every trained tensor moved
    # Seen: median 0.015, max 0.74 (a batch-norm affine with a tiny update); no update at all would read 1.0 everywhere.
    assert np.median(list(errs.values())) < 0.05 and max(errs.values()) < 0.9, max(errs.items(), key=lambda kv: kv[1])


# ---------------------------------------------------------------------------------------------------------------
# A tiny ViT (issue 24): timm's parameter groups, AdamW / LAMB / LARS and layer-wise decay on every engine


@pytest.fixture(scope="module")
def vit_reference():
    return reference(*TINY_VIT)


@pytest.mark.parametrize(
    "engine_name,overrides",
    [
        pytest.param("ddp", (), id="ddp"),
        pytest.param("fsdp", (), id="fsdp"),
        # ZeRO-1 partitions the optimizer state as ZeRO-2 does (and 80 s here): the duplicate runs in make test-slow
        pytest.param("deepspeed", ("engine.zero_stage=1",), id="deepspeed-zero1", marks=pytest.mark.slow),
        pytest.param("deepspeed", ("engine.zero_stage=2",), id="deepspeed-zero2"),
    ],
)
def test_tiny_vit_adamw_layer_decay_engine_matches_one_process(engine_name, overrides, vit_reference):
    """DDP = FSDP2 = DeepSpeed ZeRO-1/2 = one process on the global batch; FSDP2 shards one unit per block."""
    ref, ref_losses, ref_keys = vit_reference
    got = run_ranks(_train_ranks, 2, engine_name, (*TINY_VIT, *overrides), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)
    assert got["fsdp_units"] == (VIT_DEPTH + 1 if engine_name == "fsdp" else 0)  # each block, then the root


@pytest.mark.parametrize(
    "engine_name,optimizer",
    [
        pytest.param("fsdp", "lamb", id="fsdp-lamb"),  # LAMB's per-tensor trust ratios on DTensor shards
        pytest.param("deepspeed", "lars", id="deepspeed-zero2-lars"),  # ZeroLars over the layer-decay groups
    ],
)
def test_tiny_vit_trust_ratio_optimizers_match_one_process(engine_name, optimizer):
    over = (*TINY_VIT, f"optim.name={optimizer}", "optim.base_lr=2.0" if optimizer == "lars" else "optim.base_lr=0.1")
    ref, ref_losses, ref_keys = reference(*over)
    got = run_ranks(_train_ranks, 2, engine_name, (*over, "engine.zero_stage=2"), timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)


def test_convnext_fsdp_shards_each_stage_and_matches_one_process():
    """A second family (ConvNeXt: layer norms, no batch norm) at 32 px under FSDP2 with LARS: one unit per stage."""
    over = ("model.encoder=convnext_atto", "data.image_size=32", "optim.base_lr=2.0")
    ref, ref_losses, ref_keys = reference(*over)
    got = run_ranks(_train_ranks, 2, "fsdp", over, timeout=240)[0]
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-4)
    assert_same_weights(got, ref, got["keys"], ref_keys)
    assert got["fsdp_units"] == 4 + 1  # stages.0..3, then the root


def _full_encoder_ranks(rank: int, world: int) -> dict:
    """FSDP2 on 2 ranks, the steps of `reference()`; the engine's full encoder asked for before the last step and
    after it, then run by each rank on its own (a different number of calls per rank: no collective inside)."""
    cfg = tiny_cfg("fsdp")
    ctx = Context(rank=rank, world_size=world, local_rank=rank)
    torch.manual_seed(cfg.seed)
    engine = engines.build(
        EngineSpec.from_run(cfg), ctx, models.build(cfg.model, image_size=cfg.data.image_size), 10, 0
    )
    engine.train(False)
    n = GLOBAL_B // world
    for s in range(STEPS):
        if s == STEPS - 1:
            engine.full_encoder()  # an earlier copy: the later call must hold the later weights
        views, labels = batch(s, cfg.data.image_size)
        step_once(engine, local_views(views, rank, world), labels[rank * n : (rank + 1) * n])
    encoder = engine.full_encoder().eval()
    assert not any(hasattr(p, "full_tensor") for p in encoder.parameters())  # plain tensors, no DTensor shard
    x = batch(STEPS, cfg.data.image_size)[0][0]
    with torch.no_grad():
        for _ in range(rank + 1):
            features = encoder(x)
    return {"weights": as_numpy(encoder.state_dict()), "features": features.numpy()}


@pytest.mark.slow
def test_fsdp_full_encoder_is_the_unsharded_model(lars_reference):
    """`engine.full_encoder()` under FSDP2 at 2 ranks: on every rank, the weights and the features of the model one
    process trained on the global batch (written out in `reference`)."""
    ref, _, _ = lars_reference
    cfg = tiny_cfg("fsdp")
    plain = models.build(cfg.model, image_size=cfg.data.image_size)
    plain.load_state_dict({k: torch.from_numpy(v) for k, v in ref.items()}, strict=False)  # floats; counters aside
    x = batch(STEPS, cfg.data.image_size)[0][0]
    with torch.no_grad():
        want = plain.encoder.eval()(x).numpy()
    for got in run_ranks(_full_encoder_ranks, 2, timeout=240):
        ref_encoder = {k[len("encoder.") :]: v for k, v in ref.items() if k.startswith("encoder.")}
        assert sorted(got["weights"]) == sorted(ref_encoder)
        for k, v in ref_encoder.items():
            np.testing.assert_allclose(got["weights"][k], v, rtol=2e-4, atol=2e-5, err_msg=k)
        np.testing.assert_allclose(got["features"], want, rtol=1e-3, atol=1e-4)
