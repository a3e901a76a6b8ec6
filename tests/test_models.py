"""Models: every encoder the recipes name builds; activation checkpointing changes memory, not numbers."""

import pytest
import timm
import torch

from supcon_scale import config, models


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "resnet200"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_encoders_build_and_embed(name: str, head: str):
    cfg = config.ModelConfig(encoder=name, head=head, feat_dim=16)
    with torch.device("meta") if name != "resnet18" else torch.device("cpu"):
        model = models.build(cfg)
    assert model.encoder.num_features == (512 if name == "resnet18" else 2048)
    assert {k for k in model.encoder.state_dict()} == set(timm.create_model(name, num_classes=0, pretrained=False).state_dict())
    if name == "resnet18":
        z = model(torch.randn(3, 3, 32, 32))
        assert z.shape == (3, 16)
        torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def test_unknown_encoder_names_the_key():
    with pytest.raises(ValueError, match="model.encoder: Unknown model"):
        models.build(config.ModelConfig(encoder="resnet_does_not_exist"))


def test_cifar_stem():
    model = models.build(config.ModelConfig(encoder="resnet18", cifar_stem=True))
    assert model.encoder.conv1.stride == (1, 1) and isinstance(model.encoder.maxpool, torch.nn.Identity)


def test_activation_checkpointing_same_grads_and_bn_stats_updated_once():
    torch.manual_seed(0)
    plain = models.build(config.ModelConfig(encoder="resnet18", feat_dim=8))
    ckpt = models.build(config.ModelConfig(encoder="resnet18", feat_dim=8, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    for m in (plain, ckpt):
        m.train()
        m(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # recomputation ran (and normalised with batch statistics) but running averages moved exactly once
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)
    assert ckpt.encoder.layer1[0].bn1.num_batches_tracked.item() == 1
    assert ckpt.encoder.layer1[0].bn1.momentum == 0.1


def test_sync_bn_conversion():
    model = models.build(config.ModelConfig(encoder="resnet18", sync_bn=True))
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {models.GlobalBatchNorm}  # torch.nn.SyncBatchNorm on CUDA, gloo-capable on CPU


def _global_bn_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    x_full, w_full = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1, torch.randn(8, 3, 4, 4, dtype=torch.float64)
    bn = models.convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).double().train()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    x = x_full[part].clone().requires_grad_(True)
    y = bn(x)
    (y * w_full[part]).sum().backward()
    m = bn[0]
    return {"y": y.detach().tolist(), "x_grad": x.grad.tolist(), "w_grad": m.weight.grad.tolist(),
            "mean": m.running_mean.tolist(), "var": m.running_var.tolist()}


def test_global_batchnorm_on_gloo_equals_one_process_batchnorm():
    from multiproc import run_ranks

    ranks = run_ranks(_global_bn_rank, 2)
    torch.manual_seed(0)
    x_full, w_full = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1, torch.randn(8, 3, 4, 4, dtype=torch.float64)
    ref = torch.nn.BatchNorm2d(3).double().train()
    x = x_full.clone().requires_grad_(True)
    y = ref(x)
    (y * w_full).sum().backward()
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(torch.cat([t(r["y"]) for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([t(r["x_grad"]) for r in ranks]), x.grad)
    torch.testing.assert_close(t(ranks[0]["w_grad"]) + t(ranks[1]["w_grad"]), ref.weight.grad)
    for r in ranks:
        torch.testing.assert_close(t(r["mean"]), ref.running_mean)
        torch.testing.assert_close(t(r["var"]), ref.running_var)
