"""`tools/bench_augment.py`: what the DALI and torchvision backends sample from one AugmentSpec, measured per view.

Many views of scikit-learn's two bundled photographs (centre squares resized to `--size` px) go through the real
training transforms of both backends (`data.dali.build_pipeline` on the CPU, `data.torchvision.view_transform`)
with the crop and the flip off, so each view lines up pixel for pixel with its source. Per view: mean brightness
(grayscale mean), RMS contrast (grayscale std), mean HSV saturation and the hue shift against the source (a
circular mean over coloured pixels, fraction of the circle). Reported per backend: mean, std, quantiles; between
backends: the two-sample Kolmogorov-Smirnov statistic per statistic. Specs: colour jitter alone at SimCLR strength
0.5 and 1.0, each jitter op alone, AutoAugment; `dali_fused` is the former DALI jitter (one `color_twist`) for the
record. The AutoAugment policies (torchvision's, DALI's, TF Model Garden's `v0`) are compared from their tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np

from supcon_scale.data.spec import AugmentSpec, preset

STATISTICS = ("brightness", "contrast", "saturation", "hue_shift")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
GRAY = np.array([0.2989, 0.587, 0.114])

# TF Model Garden's AutoAugment `policy_v0` (official/vision/ops/augment.py), the policy of the official SupCon
# run (`augment.AutoAugment()` in google-research supcon/preprocessing.py): (op, probability, level 0..10).
TF_POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
# Ops whose level the policies ignore (TF lists one anyway).
NO_MAGNITUDE = {"equalize", "autocontrast", "invert"}


def photos(size: int) -> list[np.ndarray]:
    """scikit-learn's two 427x640 photographs: centre squares resized to `size` px, uint8 HWC."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        left = (w - h) // 2
        square = Image.fromarray(np.ascontiguousarray(photo[:, left : left + h]))
        out.append(np.asarray(square.resize((size, size), Image.BILINEAR)))
    return out


def measure_spec(stages: tuple[str, ...], size: int, **overrides: Any) -> AugmentSpec:
    """A spec with `stages` only, no crop (the whole square), no flip, identity normalisation: views = pixels / 255."""
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return replace(preset("none", size), stages=stages, **{**base, **overrides})


def torchvision_views(spec: AugmentSpec, images: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """`n` views [n, S, S, 3] in 0..255 (float) through the torchvision backend's transform; view i of image i % k."""
    import torch
    from PIL import Image

    from supcon_scale.data.torchvision import view_transform

    transform = view_transform(spec)
    pil = [Image.fromarray(im) for im in images]
    out = np.empty((n, spec.image_size, spec.image_size, 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            out[i] = transform(pil[i % len(pil)]).permute(1, 2, 0).numpy() * 255.0
    return out


def _fused_jitter(x: Any, spec: AugmentSpec) -> Any:
    """The DALI jitter before issue 14: one `color_twist`, fixed order, contrast about mid-grey, one clamp."""
    from nvidia.dali import fn

    from supcon_scale.data.dali import _coin_bool, _uniform

    b, c, s, h = spec.jitter
    if _coin_bool(spec.jitter_p):
        x = fn.color_twist(
            x,
            brightness=1.0 + _uniform(-b, b),
            contrast=1.0 + _uniform(-c, c),
            saturation=1.0 + _uniform(-s, s),
            hue=_uniform(-360.0 * h, 360.0 * h),
        )
    return x


def dali_views(
    spec: AugmentSpec, images: list[np.ndarray], n: int, seed: int, batch: int = 64, fused: bool = False
) -> np.ndarray:
    """`n` views [n, S, S, 3] in 0..255 through the DALI CPU training graph (`fused`: the former jitter instead)."""
    import nvidia.dali as dali
    from nvidia.dali import fn, types

    from supcon_scale.data import dali as dali_backend

    def source(info: Any) -> tuple[list[np.ndarray], np.ndarray]:
        first = info.iteration * batch
        return [images[(first + i) % len(images)] for i in range(batch)], np.zeros(batch, dtype=np.int32)

    if fused:

        @dali.pipeline_def(enable_conditionals=True)
        def graph():
            x, label = fn.external_source(
                source=source, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT32]
            )
            x = fn.random_resized_crop(x, size=(spec.image_size,) * 2, random_area=[1.0, 1.0], antialias=True)
            return dali_backend.flip_normalise(_fused_jitter(x, spec), spec), label

        pipe = graph(batch_size=batch, num_threads=2, device_id=None, seed=seed)
        pipe.build()
    else:
        pipe = dali_backend.build_pipeline(
            source, spec, views=1, batch_size=batch, device="cpu", device_id=None, num_threads=2, seed=seed,
            raw=True, roi=False,
        )  # fmt: skip
    out = []
    while sum(len(o) for o in out) < n:
        views = np.asarray(pipe.run()[0].as_tensor())
        out.append(views.transpose(0, 2, 3, 1) * 255.0)
    return np.concatenate(out)[:n].astype(np.float64)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (fraction of the circle), saturation and value of RGB in 0..1, along the last axis."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return np.where(delta > 0, hue, 0.0), sat, mx


def view_statistics(views: np.ndarray, sources: np.ndarray) -> dict[str, np.ndarray]:
    """Per view: brightness, RMS contrast (grayscale mean/std, 0..1), mean saturation, hue shift vs its source."""
    rgb, src = views / 255.0, sources / 255.0
    gray = rgb @ GRAY
    hue, sat, _ = _hsv(rgb)
    hue0, sat0, _ = _hsv(src)
    # Weight each pixel by how coloured it is in both images: grey pixels have no hue to shift.
    weight = sat * sat0
    angle = 2 * np.pi * (hue - hue0)
    shift = np.arctan2((weight * np.sin(angle)).sum((1, 2)), (weight * np.cos(angle)).sum((1, 2))) / (2 * np.pi)
    return {
        "brightness": gray.mean((1, 2)),
        "contrast": gray.std((1, 2)),
        "saturation": sat.mean((1, 2)),
        "hue_shift": shift,
    }


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_bound(n: int, m: int, alpha: float = 0.001) -> float:
    """The KS statistic two samples of one distribution exceed with probability `alpha` (asymptotic, Smirnov)."""
    return float(np.sqrt(-0.5 * np.log(alpha / 2) * (n + m) / (n * m)))


def summary(values: np.ndarray) -> dict[str, float]:
    qs = np.quantile(values, QUANTILES)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)),
        **{f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
    }


def compare(spec: AugmentSpec, images: list[np.ndarray], n: int, seed: int, fused: bool) -> dict[str, Any]:
    """Per-view statistics of `n` views through each backend, their summaries and KS statistics against torchvision."""
    sources = np.stack([images[i % len(images)] for i in range(n)]).astype(np.float64)
    draws = {
        "torchvision": lambda: torchvision_views(spec, images, n, seed),
        "dali": lambda: dali_views(spec, images, n, seed),
    }
    if fused:
        draws["dali_fused"] = lambda: dali_views(spec, images, n, seed, fused=True)
    stats, seconds = {}, {}
    for name, draw in draws.items():
        start = time.perf_counter()
        views = draw()
        seconds[name] = time.perf_counter() - start
        stats[name] = view_statistics(views, sources)
    out: dict[str, Any] = {"n": n, "seconds": seconds}
    for stat in STATISTICS:
        out[stat] = {name: summary(s[stat]) for name, s in stats.items()}
        out[stat]["ks_vs_torchvision"] = {
            name: ks_statistic(s[stat], stats["torchvision"][stat])
            for name, s in stats.items()
            if name != "torchvision"
        }
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def policy_tables() -> dict[str, Any]:
    """The three AutoAugment policies as (op, probability, level) rows, their op sets and per-op application rates."""
    from nvidia.dali.auto_aug import auto_augment
    from torchvision.transforms import v2

    dali_policy = auto_augment.get_image_net_policy(use_shape=True)
    tables = {
        "torchvision_imagenet": [[(_norm(op), p, m) for op, p, m in sub] for sub in v2.AutoAugment()._policies],
        "dali_imagenet": [[(_norm(aug.name), p, m) for aug, p, m in sub] for sub in dali_policy.sub_policies],
        "tf_v0": [[(_norm(op), p, m) for op, p, m in sub] for sub in TF_POLICY_V0],
    }
    out: dict[str, Any] = {}
    for name, table in tables.items():
        rate: dict[str, float] = {}
        for sub in table:
            for op, p, _ in sub:
                rate[op] = rate.get(op, 0.0) + p / len(table)  # one sub-policy drawn uniformly per image
        out[name] = {
            "sub_policies": len(table),
            "ops": sorted(rate),
            "applications_per_image": {k: round(v, 4) for k, v in sorted(rate.items())},
        }

    def rows(table: list) -> list:
        # An op of probability 0 never runs (DALI's table leaves TF's two such entries out).
        return [[(op, p, None if op in NO_MAGNITUDE else m) for op, p, m in sub if p > 0] for sub in table]

    tf = rows(tables["tf_v0"])
    for name in ("torchvision_imagenet", "dali_imagenet"):
        mine = rows(tables[name])
        out[name]["sub_policies_equal_to_tf_v0"] = sum(sub in tf for sub in mine)
        out[name]["ops_not_in_tf_v0"] = sorted(set(out[name]["ops"]) - set(out["tf_v0"]["ops"]))
        out[name]["tf_v0_ops_missing"] = sorted(set(out["tf_v0"]["ops"]) - set(out[name]["ops"]))
    out["dali_magnitude_ranges"] = {
        _norm(aug.name): list(aug.mag_range) if aug.mag_range is not None else None
        for sub in dali_policy.sub_policies
        for aug, _, _ in sub
    }
    return out


def run(n: int, size: int, seed: int) -> dict[str, Any]:
    """The whole measurement as one JSON-ready dict."""
    images = photos(size)
    jitter = ("jitter",)
    specs = {
        "jitter_0.5": (measure_spec(jitter, size, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0), True),
        "jitter_1.0": (measure_spec(jitter, size, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=1.0), True),
        "brightness_only": (measure_spec(jitter, size, jitter=(0.8, 0.0, 0.0, 0.0), jitter_p=1.0), False),
        "contrast_only": (measure_spec(jitter, size, jitter=(0.0, 0.8, 0.0, 0.0), jitter_p=1.0), False),
        "saturation_only": (measure_spec(jitter, size, jitter=(0.0, 0.0, 0.8, 0.0), jitter_p=1.0), False),
        "hue_only": (measure_spec(jitter, size, jitter=(0.0, 0.0, 0.0, 0.2), jitter_p=1.0), False),
        "autoaugment": (measure_spec(("autoaugment",), size), False),
    }
    import nvidia.dali
    import torchvision

    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"dali": nvidia.dali.__version__, "torchvision": torchvision.__version__},
        "n": n,
        "size": size,
        "seed": seed,
        "ks_bound_p0.001": ks_bound(n, n),
        "specs": {name: compare(spec, images, n, seed, fused) for name, (spec, fused) in specs.items()},
        "autoaugment_policies": policy_tables(),
    }


def main(argv: list[str] | None = None) -> int:
    """Per-view statistics of both backends' augmentations; JSON to --json (and stdout)."""
    p = argparse.ArgumentParser(prog="bench_augment", description=main.__doc__)
    p.add_argument("--views", type=int, default=2000, help="views per backend and spec")
    p.add_argument("--size", type=int, default=64, help="view side in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.views < 2:
        raise ValueError("--views must be at least 2")
    result = run(args.views, args.size, args.seed)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0
