"""Multi-crop views (issue 27 item 3; SwAV, Caron et al. 2020, sec. 3.2): `data.view_sizes` and
`data.augment.small_crop_scale` on the torchvision, DALI and synthetic backends, one encoder pass per size group,
a training run end to end, and the refusals.

The crop scale of each view is read from its pixels: on a colour gradient (R = 4x+2, G = 4y+2) a view's first and
last columns and rows give its crop box (tests/data_images.py `view_stats`), compared with a float64 brute force of
Inception's random-resized-crop at that view's scale range. The DALI CPU pipeline is built once for the module.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from data_images import GRADIENT_SIZE, MEAN, STD, reference_crop_area, view_stats, write_gradients

from supcon_scale import config, models, trainer
from supcon_scale.config import AugmentConfig, ConfigError, DataConfig
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context
from supcon_scale.hooks import Hook

REPO = Path(__file__).resolve().parents[1]
LARGE, SMALL = 32, 16
SIZES = [LARGE, LARGE, SMALL, SMALL, SMALL, SMALL]  # 2 large + 4 small views
LARGE_SCALE, SMALL_SCALE = (0.3, 1.0), (0.05, 0.14)  # disjoint, so a view cropped at the other's scale fails
RATIO = (3 / 4, 4 / 3)


def multicrop_cfg(root: Path, backend: str, **kw) -> DataConfig:
    aug = AugmentConfig(preset="none", crop_scale=LARGE_SCALE, small_crop_scale=SMALL_SCALE, flip_p=0.0)
    base = dict(root=str(root), backend=backend, global_batch_size=8, image_size=LARGE, views=len(SIZES))
    return DataConfig(**{**base, "view_sizes": SIZES, "workers": 0, "dali_threads": 1, "augment": aug, **kw})


@pytest.fixture(scope="module")
def gradients(tmp_path_factory) -> Path:
    return write_gradients(tmp_path_factory.mktemp("gradients"), count=24)


@pytest.fixture(scope="module")
def epochs(gradients) -> dict[str, list[list[torch.Tensor]]]:
    """One epoch of 24 gradient images per backend: each view position's tensors, batch after batch."""
    out = {}
    for backend in ("torchvision", "dali-cpu"):
        loader = build_train_loader(multicrop_cfg(gradients, backend), Context(), seed=5, out_dir=None)
        if backend == "dali-cpu":
            assert not loader.roi  # one batch holds one size: multi-crop takes the one-decode, V-branch layout
        loader.set_epoch(0)
        out[backend] = [list(vs) for vs in zip(*(views for views, _ in loader), strict=True)]
    return out


def _pixels(views: list[torch.Tensor]) -> np.ndarray:
    return ((torch.cat(views) * STD + MEAN) * 255).numpy().astype(np.float64)


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_each_view_has_its_size(epochs, backend):
    batches = epochs[backend]
    assert len(batches) == len(SIZES)
    for size, views in zip(SIZES, batches, strict=True):
        assert len(views) == 24 // 8
        assert all(v.shape == (8, 3, size, size) and v.dtype == torch.float32 for v in views)


@pytest.mark.parametrize("backend", ["torchvision", "dali-cpu"])
def test_large_and_small_views_crop_at_their_own_scale(epochs, backend):
    """Mean crop area of each kind against the brute force (48 large, 96 small views), and every small view's box
    inside the small range (the two ranges are disjoint)."""
    areas = {}
    for kind, size, scale in (("large", LARGE, LARGE_SCALE), ("small", SMALL, SMALL_SCALE)):
        views = [v for s, vs in zip(SIZES, epochs[backend], strict=True) if s == size for v in vs]
        stats = view_stats(_pixels(views))
        areas[kind] = stats["area"]
        expected = reference_crop_area(scale, RATIO, GRADIENT_SIZE)
        tolerance = 0.06 if kind == "large" else 0.02  # about 3.5 sigma of the mean of 48 / 96 uniform areas
        assert abs(stats["area"] - expected) < tolerance, (kind, stats, expected)
        if kind == "small":  # per view: w x h from the gradient's ends, as view_stats measures them
            assert _small_areas(views).max() < 0.2, _small_areas(views).max()
    assert areas["large"] > 3 * areas["small"]


def _small_areas(views: list[torch.Tensor]) -> np.ndarray:
    """Each small view's crop area (fraction of the gradient image), from its first and last columns and rows."""
    x = _pixels(views)
    w = np.abs(x[:, 0, :, -1].mean(1) - x[:, 0, :, 0].mean(1)) / 4 * SMALL / (SMALL - 1)
    h = np.abs(x[:, 1, -1, :].mean(1) - x[:, 1, 0, :].mean(1)) / 4 * SMALL / (SMALL - 1)
    return w * h / GRADIENT_SIZE**2


def test_dali_multicrop_on_arrays(gradients):
    """The CIFAR path (HWC arrays, no decoder) crops each view at its own size and scale too."""
    from PIL import Image

    from supcon_scale.data import dali
    from supcon_scale.data.spec import view_specs

    image = np.asarray(Image.open(next((gradients / "train" / "g0").iterdir())))
    pipe = dali.build_pipeline(
        lambda info: ([image] * 6, np.zeros(6, np.int32)),
        view_specs(multicrop_cfg(gradients, "dali-cpu")),
        views=len(SIZES), batch_size=6, device="cpu", device_id=None, num_threads=1, seed=1, raw=True, roi=False,
    )  # fmt: skip
    out = pipe.run()
    views = [torch.from_numpy(np.asarray(out[v].as_tensor())) for v in range(len(SIZES))]
    assert [tuple(v.shape) for v in views] == [(6, 3, s, s) for s in SIZES]
    assert _small_areas(views[2:]).max() < 0.2 and view_stats(_pixels(views[:2]))["area"] > 0.3


def test_dali_multicrop_resumes_mid_epoch(gradients):
    cfg = multicrop_cfg(gradients, "dali-cpu")
    loader = build_train_loader(cfg, Context(), seed=2, out_dir=None)
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    expected, _ = next(batches)
    resumed = build_train_loader(cfg, Context(), seed=2, out_dir=None)
    resumed.load_state_dict(state)
    got, _ = next(iter(resumed))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_synthetic_views_have_their_sizes():
    cfg = DataConfig(backend="synthetic", global_batch_size=4, image_size=LARGE, views=len(SIZES), view_sizes=SIZES)
    views, _ = next(iter(build_train_loader(cfg, Context(), 0, None)))
    assert [tuple(v.shape) for v in views] == [(4, 3, s, s) for s in SIZES]


def test_without_view_sizes_every_view_is_the_large_one(tmp_path):
    """No `data.view_sizes`: the views are those of before (one spec, the DALI ROI layout), small_crop_scale unused."""
    from supcon_scale.data.spec import view_specs

    cfg = multicrop_cfg(tmp_path, "torchvision", views=3, view_sizes=None)
    specs = view_specs(cfg)
    assert len(specs) == 3 and all(s is specs[0] for s in specs)
    assert specs[0].image_size == LARGE and specs[0].crop_scale == LARGE_SCALE
    aug = AugmentConfig(small_crop_scale=(0.1, 0.2))  # set, but no view is small
    with pytest.warns(UserWarning, match="data.augment.small_crop_scale only acts on views smaller"):
        view_specs(multicrop_cfg(tmp_path, "torchvision", views=2, view_sizes=[LARGE, LARGE], augment=aug))
    specs = view_specs(multicrop_cfg(tmp_path, "torchvision"))
    assert [(s.image_size, s.crop_scale) for s in specs] == [
        (s, LARGE_SCALE if s == LARGE else SMALL_SCALE) for s in SIZES
    ]


# --- the model: one encoder pass per run of same-sized views ---------------------------------------------------


def _views(batch: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, s, s, generator=g) for s in SIZES]


def test_the_encoder_runs_once_per_size_and_equals_separate_forwards():
    torch.manual_seed(0)
    model = models.build(config.ModelConfig(encoder="test_resnet", feat_dim=8))
    reference = copy.deepcopy(model)  # the same weights and batch-norm statistics
    calls = []
    model.encoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    views = _views()
    out = model(views)
    assert calls == [(6, 3, LARGE, LARGE), (12, 3, SMALL, SMALL)]  # 2 passes, not 6
    # Train mode: batch norm normalises each size group over its own views, as separate per-size forwards do.
    expected = torch.cat([reference(torch.cat(views[:2])), reference(torch.cat(views[2:]))])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Eval mode: every view alone (the running statistics, no batch dependence) gives the same rows.
    model.eval(), reference.eval()
    alone = torch.cat([reference(v) for v in views])
    torch.testing.assert_close(model(views), alone, rtol=1e-5, atol=1e-6)
    assert out.shape == (3 * len(SIZES), 8)


def test_the_genscl_teacher_labels_each_size_and_refuses_a_fixed_size_family():
    from supcon_scale.objectives.teacher import Teacher

    torch.manual_seed(0)
    teacher = Teacher(timm.create_model("test_resnet", num_classes=5), temperature=2.0)
    views = _views()
    expected = torch.cat([torch.softmax(teacher.model(v).float() / 2.0, dim=-1) for v in views])
    torch.testing.assert_close(teacher(views), expected, rtol=1e-5, atol=1e-6)
    teacher.check_sizes([LARGE, SMALL], torch.device("cpu"))
    vit = Teacher(timm.create_model("vit_tiny_patch16_224", img_size=LARGE, patch_size=8, depth=1, num_classes=5), 1.0)
    vit.check_sizes([LARGE], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"kd.teacher: the teacher cannot label the 16 px views of data.view_sizes"):
        vit.check_sizes([LARGE, SMALL], torch.device("cpu"))


# --- a run ----------------------------------------------------------------------------------------------------


class RecordShapes(Hook):
    def __init__(self) -> None:
        self.shapes: list[list[tuple[int, ...]]] = []

    def on_batch(self, step, views, labels):
        self.shapes.append([tuple(v.shape) for v in views])
        return views, labels


def test_a_multicrop_run_trains_end_to_end(small_digits: Path, tmp_path: Path):
    """trainer.fit on the torchvision backend, 2 x 16 px + 3 x 8 px views: the loss sees 5 views per image, the
    encoder is exported at data.image_size."""
    out, sizes = tmp_path / "run", [16, 16, 8, 8, 8]
    cfg = config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [
            f"data.root={small_digits}", f"out_dir={out}", "data.backend=torchvision", "data.workers=0",
            "data.global_batch_size=8", "data.image_size=16", "data.views=5", f"data.view_sizes={sizes}",
            "model.encoder=test_resnet", "model.sync_bn=false",
            "train.max_steps=2", "train.warmup_epochs=0", "train.log_every=1", "train.progress=false",
        ],
    )  # fmt: skip
    record = RecordShapes()
    result = trainer.fit(cfg, Context(), hooks=[record])
    assert result.step == 2 and np.isfinite(result.loss)
    assert record.shapes == [[(8, 3, s, s) for s in sizes]] * 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    exported = json.loads((out / "encoder_timm" / "config.json").read_text())
    assert exported["pretrained_cfg"]["input_size"] == [3, 16, 16]


# --- refusals: one line naming the key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.view_sizes=[224, 96, 96]"], r"data.view_sizes has 3 sizes but data.views=2"),
        (["data.views=3", "data.view_sizes=[96, 224, 224]"], r"data.view_sizes must be non-increasing"),
        (["data.views=2", "data.view_sizes=[160, 96]"], r"largest view \(160\) must equal data.image_size=224"),
        (["data.views=2", "data.view_sizes=[224, 4]"], r"data.view_sizes\[1\] must be in \[8, 4096\], got 4"),
        (["data.views=2", "data.view_sizes=[224, 5000]"], r"data.view_sizes\[1\] must be in \[8, 4096\]"),
        (["data.augment.small_crop_scale=[0.3, 0.1]"], r"data.augment.small_crop_scale must satisfy 0 < min"),
    ],
)
def test_bad_view_sizes_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


VIT = ["model.encoder=vit_tiny_patch16_224", "data.image_size=32", "data.views=3", "data.view_sizes=[32, 16, 16]"]


def test_a_fixed_size_encoder_needs_dynamic_img_size_for_smaller_views(capsys, tmp_path):
    from supcon_scale.cli import main

    with pytest.raises(ValueError, match=r"data.view_sizes=\[32, 16, 16\]: vit_tiny_patch16_224 cannot take.*"):
        models.check(config.load(None, [*VIT, "model.kwargs={patch_size: 8, depth: 1}"]))
    models.check(config.load(None, [*VIT, "model.kwargs={patch_size: 8, depth: 1, dynamic_img_size: true}"]))
    models.check(config.load(None, ["model.encoder=test_resnet", *VIT[1:]]))  # a ResNet takes any size
    args = ["train", f"out_dir={tmp_path / 'run'}", *VIT, "model.kwargs={patch_size: 8, depth: 1}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.view_sizes" in err[0] and "dynamic_img_size: true" in err[0]
    assert not (tmp_path / "run").exists()
