"""LARS with exclusion groups against a float64 update written here (You et al. 2017, in timm's form); the schedule."""

import math

import pytest
import torch
import torch.nn as nn

from supcon_scale import config, engines, optim


def _reference_lars_step(w, g, buf, lr, wd, eta, momentum, adapt):
    """apex/timm form: trust = eta*|w| / (|g| + wd*|w| + eps), 1 where a norm is 0; momentum after scaling."""
    if adapt:
        wn, gn = w.norm(), g.norm()
        trust = eta * wn / (gn + wd * wn + 1e-8) if wn > 0 and gn > 0 else torch.tensor(1.0, dtype=w.dtype)
        g = (g + wd * w) * trust
    buf = g.clone() if buf is None else buf * momentum + g
    return w - lr * buf, buf


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_matches_reference_with_exclusions(exclude: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()
    cfg = config.OptimConfig(name="lars", base_lr=0.4, weight_decay=1e-3, exclude_bn_bias=exclude)
    opt = optim.build_optimizer(model, cfg, global_batch_size=512)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)  # 0.4 x 512 / 256
    ref = {n: (p.detach().clone(), None) for n, p in model.named_parameters()}
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, (w, buf) in ref.items():
            excluded = exclude and w.ndim <= 1
            wd = 0.0 if excluded else 1e-3
            ref[n] = _reference_lars_step(w, grads[n], buf, 0.8, wd, 1e-3, 0.9, adapt=not excluded)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-12, atol=1e-12, msg=n)


def test_exclusion_groups_by_rank_not_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = optim.param_groups(model.named_parameters(), config.OptimConfig(weight_decay=0.1))
    assert [len(g["params"]) for g in groups] == [1, 3]  # linear weight | linear bias, bn weight, bn bias
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_warmup_then_cosine():
    f = lambda s: optim.lr_lambda(s, total_steps=110, warmup_steps=10, final_fraction=0.0, schedule="cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("final", [0.0, 0.1, 0.5])
def test_scheduler_decays_to_final_lr_fraction(final: float):
    """`optim.final_lr_fraction` through the built scheduler: peak x (final + (1 - final) x cosine)."""
    model = nn.Linear(2, 2)
    cfg = config.OptimConfig(name="sgd", base_lr=0.256, final_lr_fraction=final)
    opt = optim.build_optimizer(model, cfg, global_batch_size=256)
    sched = optim.build_scheduler(opt, cfg, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    peak = 0.256
    assert lrs[:4] == pytest.approx([peak * (s + 1) / 4 for s in range(4)])
    for s in range(4, 21):
        cosine = 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert lrs[s] == pytest.approx(peak * (final + (1 - final) * cosine)), s
    assert lrs[-1] == pytest.approx(peak * final, abs=1e-12)


def test_adamw_keeps_the_exclusion_groups_and_the_scaled_lr():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cfg = config.load(None, ["optim.name=adamw", "optim.base_lr=0.001", "optim.weight_decay=0.05"]).optim
    opt = optim.build_optimizer(model, cfg, global_batch_size=1024)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == pytest.approx(0.004) for g in opt.param_groups)  # 0.001 x 1024 / 256


# ---------------------------------------------------------------------------------------------------------------
# Transformers (issue 24): timm's no-weight-decay names, AdamW / LAMB, layer-wise LR decay


def _tiny_vit(depth: int = 2) -> nn.Module:
    from supcon_scale import models

    cfg = config.ModelConfig(encoder="vit_tiny_patch16_224", kwargs={"patch_size": 4, "depth": depth}, feat_dim=8)
    return models.build(cfg, image_size=16)


@pytest.mark.parametrize("name", ["lars", "adamw", "lamb"])
def test_pos_embed_and_cls_token_get_no_weight_decay(name: str):
    """A ViT's position embedding and class token (3-D tensors, so the 1-D rule misses them) are in a group with
    weight_decay 0, which timm's Lars also leaves unadapted; every other >= 2-D weight decays."""
    model = _tiny_vit()
    opt = optim.build_optimizer(model, config.OptimConfig(name=name, weight_decay=0.05), 256)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        exempt = p.ndim <= 1 or n in ("encoder.pos_embed", "encoder.cls_token")
        assert decay_of[id(p)] == (0.0 if exempt else 0.05), n
    assert model.encoder.pos_embed.ndim == 3 and model.encoder.cls_token.ndim == 3
    plain = optim.build_optimizer(model, config.OptimConfig(name=name, weight_decay=0.05, exclude_bn_bias=False), 256)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.05]  # the switch turns every exclusion off


def _layer_of(name: str, depth: int) -> int:
    """BEiT / MAE's layer ids written out for a ViT: embeddings 0, block i at i + 1, the rest (norm, head) top."""
    if name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
@pytest.mark.parametrize("decay", [0.65, 1.0])
def test_layer_decay_gives_each_block_the_lr_of_the_formula(name: str, decay: float):
    from supcon_scale import models

    depth = 3
    model = _tiny_vit(depth)
    cfg = config.OptimConfig(name=name, base_lr=1e-3, layer_decay=decay)
    opt = optim.build_optimizer(model, cfg, 512, layers=models.layer_ids(model))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        want = 1e-3 * 512 / 256 * decay ** (depth + 1 - _layer_of(n, depth))  # layer_decay ** (num_layers + 1 - id)
        assert lr_of[id(p)] == pytest.approx(want, rel=1e-12), n
    assert optim.peak_lr(opt) == pytest.approx(2e-3)  # what the engines log: the schedule's LR
    sched = optim.build_scheduler(opt, cfg, total_steps=10, warmup_steps=2)
    opt.step()
    sched.step()
    for g in opt.param_groups:  # the schedule multiplies every group's own LR
        assert g["lr"] == pytest.approx(g["initial_lr"] * optim.lr_lambda(1, 10, 2, 0.0, "cosine"))


def _reference_adam_update(w, g, m, v, step, lr, betas, eps, wd, lamb):
    """Adam moments with bias correction; AdamW decays w by lr * wd first (Loshchilov & Hutter 2019, Alg. 2);
    LAMB adds wd * w to the update and scales it by |w| / |update| (You et al. 2020, Alg. 2; 1 where a norm is 0),
    except in the excluded groups (weight decay 0), which, as with LARS, are not adapted (timm's always_adapt=False)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
    if not lamb:
        return w * (1 - lr * wd) - lr * update, m, v
    update = update + wd * w
    wn, un = w.norm(), update.norm()
    trust = wn / un if wn > 0 and un > 0 and wd != 0 else 1.0
    return w - lr * trust * update, m, v


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adamw_and_lamb_match_the_published_updates(name: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    cfg = config.OptimConfig(name=name, base_lr=0.01, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-6)
    opt = optim.build_optimizer(model, cfg, 256)
    ref = {n: (p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)) for n, p in model.named_parameters()}
    for step in range(1, 4):
        grads = {n: torch.randn_like(p) * 10 ** (step - 2) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, (w, m, v) in ref.items():
            wd = 0.0 if w.ndim <= 1 else 0.05
            ref[n] = _reference_adam_update(w, grads[n], m, v, step, 0.01, (0.9, 0.95), 1e-6, wd, name == "lamb")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", ".inf"])
def test_layer_decay_outside_0_1_names_the_key(value: str):
    with pytest.raises(config.ConfigError, match=r"optim.layer_decay must be in \(0, 1\]|optim.layer_decay must be"):
        config.load(None, [f"optim.layer_decay={value}"])


def test_lamb_on_zero_partitions_is_refused():
    cfg = config.load(None, ["engine.name=deepspeed", "engine.zero_stage=1", "optim.name=lamb"])
    with pytest.raises(config.ConfigError, match="optim.name=lamb with engine.zero_stage=1"):
        engines.check(engines.EngineSpec.from_run(cfg))
    engines.check(
        engines.EngineSpec.from_run(
            config.load(None, ["engine.name=deepspeed", "engine.zero_stage=0", "optim.name=lamb"])
        )
    )
