"""LARS with exclusion groups against a float64 update written here (You et al. 2017, in timm's form); the schedule."""

import math

import pytest
import torch
import torch.nn as nn

from supcon_scale import config, optim


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
