"""The export that rebuilds itself (supcon_scale/export.py): construction arguments in encoder.safetensors, the timm
`local-dir:` folder, and `encoder_from_export` under every tool, on a tiny ViT at 32 px and a ConvNeXt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from supcon_scale import checkpoint, cli, config, export, models, weights

TINY_VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2})
CONVNEXT = ("convnext_atto", {})
# timm's widths: ViT-Tiny's embed_dim 192 (Touvron et al. 2021, Table 1); ConvNeXt-Atto's last stage 320 channels
WIDTH = {"vit_tiny_patch16_224": 192, "convnext_atto": 320, "resnet18": 512}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _trained(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """The encoder after two SGD steps, so its weights are no initialiser's."""
    torch.manual_seed(seed)
    encoder = models.create_encoder(name, kwargs=kwargs)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        encoder(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
    return encoder.eval()


def _export(folder: Path, name: str, kwargs: dict) -> tuple[torch.nn.Module, Path]:
    encoder = _trained(name, kwargs)
    meta = export.encoder_metadata(name, kwargs=kwargs, image_size=32, mean=MEAN, std=STD)
    folder.mkdir(parents=True, exist_ok=True)
    return encoder, export.export_encoder(encoder, folder / "encoder.safetensors", meta)


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny ViT (32 px, 4 px patches, 2 blocks) exported as a run would: encoder.safetensors in a folder."""
    return _export(tmp_path_factory.mktemp("vit"), *TINY_VIT)


@pytest.mark.parametrize("family", [TINY_VIT, CONVNEXT], ids=["vit", "convnext"])
def test_timm_folder_loads_offline_with_local_dir_and_gives_the_same_features(tmp_path, family):
    name, kwargs = family
    encoder, path = _export(tmp_path, name, kwargs)
    folder = export.write_timm_folder(path, tmp_path / "encoder_timm")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_features"] == WIDTH[name]
    args = cfg.get("model_args", {})
    for key, value in kwargs.items():
        assert args[key] == ([value, value] if key == "img_size" else value), key
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == list(MEAN) and pre["std"] == list(STD)
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", [TINY_VIT, CONVNEXT], ids=["vit", "convnext"])
def test_encoder_from_export_rebuilds_the_architecture_and_its_arguments(tmp_path, family):
    name, kwargs = family
    encoder, path = _export(tmp_path, name, kwargs)
    for source in (path, tmp_path):  # the file, or the run directory holding it
        rebuilt, meta = export.encoder_from_export(source)
        assert meta["encoder"] == name and json.loads(meta["kwargs"]).items() >= kwargs.items()
        assert export.input_size(meta) == 32 and int(meta["num_features"]) == WIDTH[name]
        assert json.loads(meta["mean"]) == list(MEAN) and json.loads(meta["std"]) == list(STD)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), encoder(x), rtol=0, atol=1e-6)


def test_an_old_export_with_only_name_and_stem_still_loads(tmp_path):
    torch.manual_seed(0)
    encoder = timm.create_model("resnet18", num_classes=0).eval()
    path = tmp_path / "encoder.safetensors"
    save_file(encoder.state_dict(), str(path), metadata={"encoder": "resnet18", "cifar_stem": "0"})
    rebuilt, meta = export.encoder_from_export(path)
    assert export.input_size(meta) is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), encoder(x))


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"kwargs": "[1, 2]"}, "metadata 'kwargs' is not a JSON dict"),
        ({"kwargs": '{"patch_sise": 4}'}, "patch_sise"),  # timm's TypeError, named
        ({"encoder": "hf-hub:timm/vit_tiny_patch16_224"}, "hub (hf-hub:), local-dir: and URL names are refused"),
    ],
)
def test_bad_export_metadata_is_one_line_naming_the_file(vit_export, tmp_path, metadata, message):
    _, path = vit_export
    meta = {**export.read_metadata(path), **metadata}
    bad = tmp_path / "bad.safetensors"
    save_file(weights.load_tensors(path), str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"checkpoint .*bad\.safetensors") as info:
        export.encoder_from_export(bad)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_records_the_construction_arguments_and_rebuilds_without_its_encoder_file(tmp_path):
    cfg = config.load(None, ["model.encoder=resnet18", "data.image_size=40", "data.augment.mean=[0.1, 0.2, 0.3]"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    state = {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}}
    ckpt = checkpoint.save(tmp_path, 1, 0, state, cfg.to_dict(), {})
    assert not (ckpt / "encoder.safetensors").exists()  # the encoder is stored once, in model.safetensors
    rebuilt, meta = export.encoder_from_export(ckpt)  # its construction arguments come from meta.json's config
    assert meta["encoder"] == "resnet18" and meta["cifar_stem"] == "0" and json.loads(meta["kwargs"]) == {}
    assert json.loads(meta["input_size"]) == [3, 40, 40] and json.loads(meta["mean"]) == [0.1, 0.2, 0.3]
    assert json.loads(meta["std"]) == list(config.IMAGENET_STD) and meta["num_features"] == "512"
    assert export.input_size(meta) == 40
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k


def test_cifar_stem_export_warns_and_writes_no_timm_folder(tmp_path, capsys):
    path = export.export_encoder(
        models.create_encoder("resnet18", cifar_stem=True),
        tmp_path / "encoder.safetensors",
        export.encoder_metadata("resnet18", cifar_stem=True),
    )
    assert export.write_timm_folder(path, tmp_path / "encoder_timm") is None
    assert not (tmp_path / "encoder_timm").exists()
    assert "timm cannot rebuild a CIFAR-stem encoder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Every tool on the tiny ViT export: the input size (32) comes from the export, never from a flag


def test_linear_eval_knn_and_embed_plot_run_on_the_vit_export(vit_export, small_digits, tmp_path):
    _, path = vit_export
    out = tmp_path / "linear.json"
    argv = ["linear-eval", "--checkpoint", str(path), "--data", str(small_digits), "--preset", "sgd", "--epochs", "1",
            "--batch-size", "64", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["image_size"] == 32 and result["encoder"] == "vit_tiny_patch16_224"
    assert cli.main(["knn", "--checkpoint", str(path), "--data", str(small_digits), "--k", "5",
                     "--json", str(tmp_path / "knn.json")]) == 0  # fmt: skip
    assert 0 <= json.loads((tmp_path / "knn.json").read_text())["top1"] <= 1
    png = tmp_path / "map.png"
    argv = ["embed-plot", "--checkpoint", str(path), "--data", str(small_digits), "--max-images", "60",
            "--method", "tsne", "--out", str(png)]  # fmt: skip
    assert cli.main(argv) == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_kd_teacher_rebuilds_a_vit_classifier_from_its_checkpoint(tmp_path):
    name, kwargs = TINY_VIT
    encoder = _trained(name, kwargs)
    head = torch.nn.Linear(WIDTH[name], 10)
    model = models.SupConModel(encoder, head, normalize=False)
    raw = config.load(None, [f"model.encoder={name}", "data.image_size=32", "loss.name=cross_entropy"]).to_dict()
    raw["model"]["kwargs"] = kwargs  # the key model.kwargs records in a run's resolved config
    state = {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}}
    checkpoint.save(tmp_path, 1, 0, state, raw, {})
    from supcon_scale.objectives import teacher

    loaded = teacher.load(config.KDConfig(teacher=str(tmp_path), temperature=2.0), num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(head(encoder(x)) / 2.0, dim=-1)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # imagenet-c generates a -C copy; finetune and continual train: about 40 s together
def test_imagenet_c_finetune_and_continual_run_on_the_vit_export(vit_export, small_digits, tmp_path):
    encoder, path = vit_export
    c_root = tmp_path / "digits-C"
    argv = ["imagenet-c", "--generate-from", str(small_digits / "val"), "--c-root", str(c_root),
            "--corruptions", "gaussian_noise", "--severities", "1", "--per-class", "2", "--checkpoint", f"vit={path}",
            "--clean", str(small_digits), "--baseline", "vit", "--out", str(tmp_path / "robustness")]  # fmt: skip
    assert cli.main(argv) == 0
    tuned = tmp_path / "tuned.safetensors"
    argv = ["finetune", "--checkpoint", str(path), "--data", str(small_digits), "--epochs", "1", "--batch-size", "32",
            "--save", str(tuned)]  # fmt: skip
    assert cli.main(argv) == 0
    assert export.read_metadata(tuned) == export.read_metadata(path)  # the re-export keeps the construction
    argv = ["continual", f"out_dir={tmp_path / 'continual'}", f"data.root={small_digits}", "data.image_size=32",
            f"model.encoder={path}", "stream.tasks=2", "stream.class_order=[0, 1, 2, 3]", "stream.batch_size=4",
            "memory.size=12", "memory.batch_size=8", "model.feat_dim=16", "train.progress=false", "seeds=[0]",
            "methods=[scr]"]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "continual" / "summary.json").read_text())["methods"]["scr"]


def test_a_trained_vit_run_exports_a_timm_folder_with_its_features(small_digits, tmp_path):
    """A training run of the tiny ViT (model.kwargs) writes encoder_timm/, which timm loads offline into the encoder
    of the run's last checkpoint (reference: plain timm with the same arguments and that checkpoint's weights)."""
    from safetensors.torch import load_file

    from supcon_scale import distributed, trainer

    name, kwargs = TINY_VIT
    cfg = config.load(
        Path(__file__).resolve().parents[1] / "supcon_scale/recipes/demo/digits.yaml",
        [f"data.root={small_digits}", f"out_dir={tmp_path}", f"model.encoder={name}", "model.channels_last=false",
         "model.kwargs={patch_size: 4, depth: 2}", "data.image_size=32", "data.global_batch_size=16",
         "train.max_steps=2", "train.warmup_epochs=0", "train.progress=false"],
    )  # fmt: skip
    trainer.fit(cfg, distributed.init(seed=0))
    reference = timm.create_model(name, num_classes=0, **kwargs).eval()
    model_state = load_file(str(checkpoint.latest(tmp_path) / "model.safetensors"))
    reference.load_state_dict({k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'encoder_timm'}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
    assert export.input_size(export.read_metadata(tmp_path / "encoder.safetensors")) == 32
