"""Models: every encoder the recipes name builds; activation checkpointing changes memory, not numbers."""

import functools
import re
from pathlib import Path

import pytest
import timm
import torch

from supcon_scale import batchnorm, config, models

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "resnet200"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_encoders_build_and_embed(name: str, head: str):
    cfg = config.ModelConfig(encoder=name, head=head, feat_dim=16)
    with torch.device("meta") if name != "resnet18" else torch.device("cpu"):
        model = models.build(cfg)
    assert model.encoder.num_features == (512 if name == "resnet18" else 2048)
    assert {k for k in model.encoder.state_dict()} == set(
        timm.create_model(name, num_classes=0, pretrained=False).state_dict()
    )
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
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # recomputation ran (and normalised with batch statistics) but running averages moved exactly once
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=name)
    assert ckpt.encoder.layer1[0].bn1.num_batches_tracked.item() == 1
    assert ckpt.encoder.layer1[0].bn1.momentum == 0.1


def test_sync_bn_conversion():
    model = models.build(config.ModelConfig(encoder="resnet18", sync_bn=True))
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {batchnorm.GlobalBatchNorm}  # torch.nn.SyncBatchNorm on CUDA, gloo-capable on CPU


def _global_bn_rank(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    x_full, w_full = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1, torch.randn(8, 3, 4, 4, dtype=torch.float64)
    bn = batchnorm.convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).double().train()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    x = x_full[part].clone().requires_grad_(True)
    y = bn(x)
    (y * w_full[part]).sum().backward()
    m = bn[0]
    return {
        "y": y.detach().tolist(),
        "x_grad": x.grad.tolist(),
        "w_grad": m.weight.grad.tolist(),
        "mean": m.running_mean.tolist(),
        "var": m.running_var.tolist(),
    }


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


# ---------------------------------------------------------------------------------------------------------------
# The official head and input normalisation; model.init_from; exported encoders in plain timm


def test_official_head_has_no_last_bias_and_sees_the_normalised_encoder_output():
    import torch.nn.functional as F

    cfg = config.ModelConfig(encoder="resnet18", head="linear", head_bias=False, normalize_encoder_output=True)
    model = models.build(cfg).eval()
    assert model.head.bias is None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = model.encoder(x)
        expected = F.normalize(model.head(F.normalize(h, dim=-1)), dim=-1)
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), F.normalize(model.head(h), dim=-1))  # the normalisation acts


def test_simclr_head_two_hidden_layers_with_batch_norm():
    cfg = config.ModelConfig(encoder="resnet18", head="mlp", head_hidden_dim=32, head_hidden_layers=2,
                             head_batch_norm=True, head_bias=False, feat_dim=8)  # fmt: skip
    head = models.build(cfg).head
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)  # hidden layers: BN's beta instead; last: the official none
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head) == 2


def _timm_file(tmp_path, name: str, state: dict) -> str:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return str(path)


def test_init_from_local_timm_and_safetensors_files(tmp_path):
    import timm

    torch.manual_seed(1)
    full = timm.create_model("resnet18", num_classes=10)  # a classifier checkpoint: its fc is dropped
    for name in ("weights.pth", "weights.safetensors"):
        path = _timm_file(tmp_path, name, full.state_dict())
        model = models.build(config.ModelConfig(encoder="resnet18", init_from=path))
        own = model.encoder.state_dict()
        assert all(torch.equal(own[k], v) for k, v in full.state_dict().items() if not k.startswith("fc."))
    for ref in ("hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/x", "https://example.com/w.pth"):
        with pytest.raises(ValueError, match="model.init_from.*only local files"):
            models.build(config.ModelConfig(encoder="resnet18", init_from=ref))
    with pytest.raises(ValueError, match="model.init_from: no file"):
        models.build(config.ModelConfig(encoder="resnet18", init_from=str(tmp_path / "missing.pth")))


def test_init_from_refuses_a_standard_stem_for_a_cifar_stem_and_takes_its_own(tmp_path):
    from supcon_scale.export import encoder_metadata, export_encoder

    standard = _timm_file(tmp_path, "std.safetensors", models.create_encoder("resnet18").state_dict())
    with pytest.raises(ValueError, match=r"does not fit model.encoder: shape mismatch conv1.weight \(64, 3, 7, 7\)"):
        models.build(config.ModelConfig(encoder="resnet18", cifar_stem=True, init_from=standard))
    torch.manual_seed(2)
    cifar = models.create_encoder("resnet18", cifar_stem=True)
    path = export_encoder(cifar, tmp_path / "encoder.safetensors", encoder_metadata("resnet18", cifar_stem=True))
    model = models.build(config.ModelConfig(encoder="resnet18", cifar_stem=True, init_from=str(path)))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in cifar.state_dict().items())


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_exported_encoder_loads_into_plain_timm(tmp_path, cifar_stem):
    """The README's promise: timm.create_model(name, num_classes=0) takes the export as it is; a CIFAR-stem export
    needs the two stem modules swapped first (docs/EVALUATION.md), then gives the same features."""
    import timm
    from safetensors.torch import load_file

    from supcon_scale.export import encoder_metadata, export_encoder

    torch.manual_seed(3)
    ours = models.create_encoder("resnet18", cifar_stem=cifar_stem).eval()
    path = export_encoder(ours, tmp_path / "encoder.safetensors", encoder_metadata("resnet18", cifar_stem=cifar_stem))
    plain = timm.create_model("resnet18", num_classes=0)
    if cifar_stem:
        plain.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        plain.maxpool = torch.nn.Identity()
    plain.load_state_dict(load_file(str(path)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ours(x))


def test_head_hidden_dim_sets_the_mlp_width():
    from supcon_scale import config, models

    cfg = config.load(
        None, ["model.encoder=resnet18", "model.head=mlp", "model.head_hidden_dim=32", "model.feat_dim=8"]
    )
    linears = [m for m in models.build(cfg.model).head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 32), (32, 8)]


# ---------------------------------------------------------------------------------------------------------------
# Any timm family: model.kwargs, the image size, the blocks (issue 24)

TINY_VIT = ("model.encoder=vit_tiny_patch16_224", "model.kwargs.patch_size=4", "model.kwargs.depth=2")


def test_model_kwargs_and_the_image_size_reach_timm():
    """The tiny ViT of the engine tests is timm's own model built with the same arguments (img_size from data)."""
    cfg = config.load(None, [*TINY_VIT, "data.image_size=32", "model.feat_dim=8"])
    assert cfg.model.kwargs == {"patch_size": 4, "depth": 2}  # YAML-typed from the override text
    assert models.encoder_kwargs(cfg.model, 32) == {"patch_size": 4, "depth": 2, "img_size": 32}
    model = models.build(cfg.model, image_size=32)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=2)
    assert {k: v.shape for k, v in model.encoder.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    # a family whose input size is not fixed when built (ConvNeXt) gets no img_size
    assert models.encoder_kwargs(config.ModelConfig(encoder="convnext_atto"), 32) == {}
    # given in model.kwargs, it wins over data.image_size
    assert (
        models.encoder_kwargs(config.ModelConfig(encoder="vit_tiny_patch16_224", kwargs={"img_size": 48}), 32)[
            "img_size"
        ]
        == 48
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.kwargs=3",), "model.kwargs must be a mapping"),
        (("model.kwargs={1: 2}",), "model.kwargs: key 1 must be a Python identifier"),
        (("model.kwargs.drop_rate=.nan",), "model.kwargs.drop_rate must be finite"),
        (("model.kwargs.num_classes=10",), "model.kwargs.num_classes cannot be set"),
        (("model.kwargs.pretrained=true",), "model.kwargs.pretrained cannot be set"),
    ],
)
def test_model_kwargs_bad_config_names_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, list(overrides))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ((*TINY_VIT, "model.kwargs.bogus=1"), "model.kwargs.bogus=1: timm cannot build"),  # an unknown argument
        ((*TINY_VIT, "model.kwargs.img_size=64"), "model.kwargs.img_size=64: timm cannot build"),  # a bad value
        (("model.encoder=vit_nope_patch16",), "model.encoder: Unknown model"),
        ((*TINY_VIT, "model.cifar_stem=true"), "model.cifar_stem: VisionTransformer has no single conv1"),
        (("model.encoder=caformer_s18", "model.activation_checkpointing=true"), "model.activation_checkpointing:"),
        (("model.encoder=caformer_s18", "engine.name=fsdp"), "engine.name=fsdp: cannot find the blocks"),
    ],
)
def test_check_names_what_timm_refuses(overrides, key):
    """On the meta device: a model timm cannot build or run at data.image_size names the culprit key."""
    cfg = config.load(None, ["data.image_size=32", *overrides])
    with pytest.raises(ValueError, match=re.escape(key)):
        models.check(cfg)


@pytest.mark.parametrize(
    "encoder, kwargs, count",
    [
        ("resnet18", {}, 4),  # layer1..4
        ("vit_tiny_patch16_224", {"depth": 3}, 3),  # blocks.0..2
        ("convnext_atto", {}, 4),  # stages.0..3
        ("efficientnet_b0", {}, 7),  # blocks.0..6
        ("caformer_s18", {}, 0),  # MetaFormer: no group_matcher
    ],
)
def test_blocks_come_from_timms_group_matcher(encoder, kwargs, count):
    """The outermost modules of timm's coarse "blocks" rules, in forward order; written out here per family."""
    with torch.device("meta"):
        enc = timm.create_model(encoder, num_classes=0, **kwargs)
    named = {id(m): n for n, m in enc.named_modules()}
    names = [named[id(b)] for b in models.blocks(enc)]
    prefix = {"resnet18": "layer", "convnext_atto": "stages.", "caformer_s18": ""}.get(encoder, "blocks.")
    first = 1 if encoder == "resnet18" else 0
    assert names == [f"{prefix}{i + first}" for i in range(count)]


@pytest.mark.parametrize(
    "encoder, kwargs, size",
    [
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2, "drop_path_rate": 0.3}, 32),
        ("convnext_atto", {"drop_path_rate": 0.2}, 32),
    ],
)
def test_activation_checkpointing_per_block_gives_the_same_float64_gradients(encoder, kwargs, size):
    """Per-block recomputation (stochastic depth included: checkpoint restores the RNG) against a plain forward."""
    torch.manual_seed(0)
    cfg = config.ModelConfig(encoder=encoder, kwargs=kwargs, feat_dim=8)
    plain = models.build(cfg).double()
    ckpt = models.build(config.ModelConfig(encoder=encoder, kwargs=kwargs, feat_dim=8, activation_checkpointing=True))
    ckpt.double().load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    for m in (plain, ckpt):
        torch.manual_seed(1)  # the same drop-path draws in both
        m.train()
        m(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert sum(isinstance(b.forward, functools.partial) for b in models.blocks(ckpt.encoder)) == len(
        models.blocks(plain.encoder)
    )


def test_layer_ids_follow_timms_layer_map_and_beits_head_layer():
    """For a ViT, the layer of every encoder parameter is the one timm's map for `param_groups_layer_decay` gives it
    (`group_parameters` over `group_matcher(coarse=False)`): 0 the embeddings, i + 1 block i. The final norm is the
    exception: BEiT / MAE (util/lr_decay.py) give it the head's layer n + 1, timm the last block's."""
    from timm.models import group_parameters

    model = models.build(config.ModelConfig(encoder="vit_tiny_patch16_224", kwargs={"depth": 3}, feat_dim=8))
    ids, n = models.layer_ids(model)
    assert n == 3
    timm_ids = group_parameters(model.encoder, model.encoder.group_matcher(coarse=False), reverse=True)
    ours = {k.removeprefix("encoder."): v for k, v in ids.items() if k.startswith("encoder.")}
    assert set(ours) == set(timm_ids)
    assert {k: v for k, v in ours.items() if not k.startswith("norm.")} == {
        k: v for k, v in timm_ids.items() if not k.startswith("norm.")
    }
    assert {ours["norm.weight"], ours["norm.bias"]} == {n + 1}
    assert {v for k, v in ids.items() if k.startswith("head.")} == {n + 1}  # the projection head: the top layer


@pytest.mark.parametrize(
    "overrides, names",
    [
        ((*TINY_VIT, "model.kwargs.bogus=1"), ("model.kwargs.bogus", "unexpected keyword")),
        (("model.encoder=vit_tiny_patch16_224", "model.kwargs.img_size=64"), ("model.kwargs.img_size", "(32)")),
        ((*TINY_VIT, "model.cifar_stem=true"), ("model.cifar_stem",)),
        (("model.encoder=caformer_s18", "model.activation_checkpointing=true"), ("model.activation_checkpointing",)),
        (("model.encoder=caformer_s18", "optim.layer_decay=0.75"), ("optim.layer_decay", "blocks")),
        ((*TINY_VIT, "optim.layer_decay=1.5"), ("optim.layer_decay", "(0, 1]")),
    ],
)
def test_train_refuses_a_model_timm_cannot_build_before_writing(small_digits, tmp_path, capsys, overrides, names):
    """Through the CLI: exit 2, one line naming the key (and timm's reason), no traceback, nothing written."""
    from supcon_scale.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "supcon_scale/recipes/demo/digits.yaml"), f"data.root={small_digits}"]
    args += [f"out_dir={out}", "data.image_size=32", "data.workers=0", "train.progress=false", *overrides]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in names), err
    assert not out.exists()
