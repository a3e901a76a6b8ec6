"""ImageNet-C style robustness: score checkpoints on a "-C" copy of a folder dataset, CE/mCE, the report and plots.

Writing and indexing a "-C" copy is `c_dataset.py`; the metrics and which baseline may normalise them are in
`mce.py` (Hendrycks & Dietterich 2019, ICLR, section 3).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from supcon_scale import arguments, distributed
from supcon_scale.config import IMAGENET_MEAN, IMAGENET_STD
from supcon_scale.data.folder import FolderIndex
from supcon_scale.evaluation.c_dataset import MANIFEST, generate_c, index_c
from supcon_scale.evaluation.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES
from supcon_scale.evaluation.mce import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    choose_baseline,
    corruption_errors_to_mce,
    defined_corruptions,
)
from supcon_scale.evaluation.splits import check_same_classes, check_splits, class_difference
from supcon_scale.files import write_text

# Relative CE divides each model's (corrupted - clean) error gap by the baseline's. Below this clean error the
# baseline's clean error is measured from a handful of mistakes (or none) on a small split, so its gap is noise-
# dominated and relative mCE is reported as undefined rather than as a number (docs/EVALUATION.md).
RELATIVE_MCE_MIN_BASELINE_CLEAN_ERROR = 0.01

__all__ = [
    "ALEXNET_ERRORS", "ALEXNET_CLEAN_ERROR", "CORRUPTIONS", "EXTRA_CORRUPTIONS", "corruption_errors_to_mce",
    "defined_corruptions",
    "evaluate_c", "robustness_report", "main",
]  # fmt: skip


class _CDataset(torch.utils.data.Dataset):
    """All (corruption, severity) folders as one dataset, so one sharded pass scores everything."""

    def __init__(self, indexes: list[FolderIndex], transform):
        self.items = [(p, y) for ix in indexes for p, y in zip(ix.paths, ix.labels, strict=True)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def _crop_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """ImageNet-C evaluation: the images are already sized, so centre-crop + normalise only (as the paper evaluates)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def evaluate_c(
    model: nn.Module,
    c_root: str | Path,
    *,
    image_size: int,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    classes: Sequence[str] | None = None,
    resize: bool = False,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, Any]:
    """Top-1 error per corruption and severity of `model` (images -> logits): {"errors": {c: [e_s...]}, "images_per_s"}.

    `resize=True` uses the clean resize + centre-crop view (for "-C" copies generated without `image_size`);
    `mean`/`std` the pre-training run's normalisation. Sharded over ranks when a process group is up.
    """
    from supcon_scale.data.eval import eval_transform
    from supcon_scale.evaluation.features import extract_features

    indexes = index_c(c_root, corruptions, severities)
    keys = list(indexes)
    for (c, s), ix in indexes.items():
        if classes is not None and list(ix.classes) != list(classes):
            diff = class_difference("the classifier's classes", list(classes), Path(c_root) / c / str(s), ix.classes)
            raise ValueError(f"--c-root: the class folders of {Path(c_root) / c / str(s)} differ ({diff})")
    norm = (tuple(mean), tuple(std))
    transform = eval_transform(image_size, *norm) if resize else _crop_transform(image_size, *norm)
    dataset = _CDataset([indexes[k] for k in keys], transform)
    logits, labels, timing = extract_features(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers
    )
    wrong = (logits.argmax(1) != labels).float()
    errors: dict[str, list[float]] = {c: [] for c in corruptions}
    start = 0
    for k in keys:
        n = len(indexes[k])
        errors[k[0]].append(float(wrong[start : start + n].mean()))
        start += n
    return {
        "errors": errors,
        "images": len(dataset),
        "seconds": timing["seconds"],
        "images_per_s": timing["images_per_s"],
    }


def check_inputs(
    checkpoints: Mapping[str, Any], c_root: Path, clean: Path, corruptions: Sequence[str], severities: Sequence[int]
) -> list[str]:
    """Before anything is scored: the clean splits and every "-C" folder hold the same classes; their names."""
    if not checkpoints:
        raise ValueError("--checkpoint: give at least one NAME=PATH")
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown:
        raise ValueError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(ALL_CORRUPTIONS)}")
    classes = check_splits(clean, "--clean")
    if not c_root.is_dir():
        raise ValueError(f"--c-root: directory not found: {c_root}")
    for c in corruptions:
        for s in severities:
            check_same_classes(clean / "train", c_root / c / str(s), "--c-root")
    return classes


def normalise(models: dict[str, dict[str, Any]], baseline: str | None, corruptions: Sequence[str]) -> list[str]:
    """Add CE, mCE and relative CE/mCE against `baseline` ("alexnet", a model's name, or None: none) to every
    model; returns the corruptions scored (those with a defined CE)."""
    if baseline is None:
        return []
    if baseline == "alexnet":
        scored = [c for c in corruptions if c in ALEXNET_ERRORS]
        if not scored:
            raise ValueError("--corruptions: none of them has an AlexNet error (the 4 extra corruptions have none)")
        table: str | dict[str, Any] = "alexnet"
    else:
        b = models[baseline]
        scored = defined_corruptions({c: b["errors"][c] for c in corruptions})
        table = {**{c: b["errors"][c] for c in scored}, "clean": b["clean_error"]}
    undefined = baseline != "alexnet" and models[baseline]["clean_error"] < RELATIVE_MCE_MIN_BASELINE_CLEAN_ERROR
    for m in models.values():
        if not scored:  # the baseline model errs nowhere under any corruption: every CE divides by zero
            m["mce_undefined"] = f"the baseline {baseline} makes no error under any corruption scored"
            continue
        m.update(corruption_errors_to_mce({c: m["errors"][c] for c in scored}, None if undefined else m["clean_error"],
                                          table))  # fmt: skip
        if undefined:
            m["relative_mce_undefined"] = (
                f"the baseline's clean error {100 * models[baseline]['clean_error']:.2f}% is below "
                f"{100 * RELATIVE_MCE_MIN_BASELINE_CLEAN_ERROR:.0f}%"
            )
    return scored


def _score(
    name: str, path: str | Path, c_root: Path, clean_root: Path, generated: dict[str, Any] | None, **kw: Any
) -> dict[str, Any]:
    """One checkpoint: its probe (fitted, or saved in `kw["probes"]`), clean top-1 and errors on every folder."""
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.evaluation.features import extract_features
    from supcon_scale.evaluation.linear import (
        checkpoint_image_size,
        fit_linear_probe,
        load_probe,
        run_config,
        topk_accuracy,
    )
    from supcon_scale.export import encoder_from_export

    probes, batch_size, device, num_workers = kw["probes"], kw["batch_size"], kw["device"], kw["num_workers"]
    encoder, meta = encoder_from_export(path)
    # The pre-training run's normalisation (the linear evaluation's rule), not ImageNet's whatever the run used
    stage1 = run_config(path)
    norm = (stage1.data.augment.mean, stage1.data.augment.std) if stage1 is not None else (IMAGENET_MEAN, IMAGENET_STD)
    check_inputs({name: path}, c_root, clean_root, kw["corruptions"], kw["severities"])  # before any image is scored
    size = (
        kw["image_size"]
        or (generated or {}).get("image_size")
        or checkpoint_image_size(path, meta.get("cifar_stem") == "1")
    )
    if probes and name in probes:
        probe = load_probe(encoder, probes[name]).to(device or "cpu")
        f, y, _ = extract_features(
            probe, EvalDataset(clean_root, "val", size, mean=norm[0], std=norm[1]), batch_size=batch_size,
            device=device, num_workers=num_workers,
        )  # fmt: skip
        linear = {**topk_accuracy(f, y), "probe": str(probes[name]), "num_val": len(y)}
    else:
        probe, linear = fit_linear_probe(
            encoder, clean_root, image_size=size, preset=kw["preset"], batch_size=batch_size, device=device,
            num_workers=num_workers, stage1=stage1,
        )  # fmt: skip
    res = evaluate_c(
        probe, c_root, image_size=size, corruptions=kw["corruptions"], severities=kw["severities"],
        classes=probe.classes or None, resize=generated is not None and generated.get("image_size") is None,
        batch_size=batch_size, device=device, num_workers=num_workers, mean=norm[0], std=norm[1],
    )  # fmt: skip
    return {
        "checkpoint": str(path), "encoder": meta.get("encoder"), "image_size": size, "clean_top1": linear["top1"],
        "clean_error": 1.0 - linear["top1"], "linear": linear, **res,
    }  # fmt: skip


def robustness_report(
    checkpoints: Mapping[str, str | Path],
    c_root: str | Path,
    clean_root: str | Path,
    out_dir: str | Path,
    baseline_name: str | None = None,
    *,
    image_size: int | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    preset: str = "fast",
    probes: Mapping[str, str | Path] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Score several checkpoints on a "-C" root side by side; write robustness.json and the PNG plots.

    Each encoder gets a linear probe (`preset`, trained on `clean_root/train`; or a saved head from `probes`), its
    clean error on `clean_root/val`, and its errors on every corruption and severity. CE/mCE are normalised by
    AlexNet only on ImageNet-C's 1,000 classes at all five severities, otherwise by the model named
    `baseline_name` (scored on the same severities, its own mCE is 100), or not at all; `baseline_why` says which
    and why (`mce.choose_baseline`).
    """
    from supcon_scale.evaluation.plots import plot_accuracy_vs_severity, plot_ce_bars

    c_root, clean_root, out_dir = Path(c_root), Path(clean_root), Path(out_dir)
    if not checkpoints:
        raise ValueError("--checkpoint: give at least one NAME=PATH")
    classes = check_splits(clean_root, "--clean")
    baseline, why = choose_baseline(baseline_name, list(checkpoints), severities, len(classes))
    manifest = c_root / MANIFEST
    generated = json.loads(manifest.read_text())["params"] if manifest.is_file() else None
    kw = dict(image_size=image_size, corruptions=corruptions, severities=severities, preset=preset, probes=probes,
              batch_size=batch_size, device=device, num_workers=num_workers)  # fmt: skip
    models = {name: _score(name, path, c_root, clean_root, generated, **kw) for name, path in checkpoints.items()}
    scored = normalise(models, baseline, corruptions)
    report = {
        "baseline": baseline, "baseline_why": why, "num_classes": len(classes), "c_root": str(c_root),
        "clean_root": str(clean_root), "corruptions": list(corruptions), "scored_corruptions": scored,
        "severities": list(severities), "generation": generated, "models": models,
    }  # fmt: skip
    plots = {"accuracy_vs_severity": str(out_dir / "accuracy_vs_severity.png")}
    if scored:
        plots["ce_per_corruption"] = str(out_dir / "ce_per_corruption.png")
    report["plots"] = plots
    report["json"] = str(out_dir / "robustness.json")
    if distributed.world()[0] == 0:  # every rank holds the same numbers; one writes
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_severity(models, plots["accuracy_vs_severity"], severities)
        if scored:
            reference = "AlexNet" if baseline == "alexnet" else str(baseline)
            plot_ce_bars(models, plots["ce_per_corruption"], reference=reference)
        write_text(out_dir / "robustness.json", json.dumps(report, indent=2))
    return report


def print_report(report: dict[str, Any]) -> None:
    """The table (clean top-1 with its interval, mean corrupted top-1, mCE, relative mCE), then which baseline
    normalised the CEs and why, and the plots."""
    from rich.console import Console
    from rich.table import Table

    from supcon_scale.evaluation.stats import format_accuracy

    baseline = {"alexnet": "AlexNet", None: "nothing"}.get(report["baseline"], report["baseline"])
    table = Table(title=f"Robustness (CE normalised by {baseline})")
    severities = ", ".join(str(s) for s in report["severities"])
    for col in ("model", "clean top-1 [95% CI] (n)", f"mean C top-1 (severities {severities})", "mCE",
                "relative mCE", "images/s"):  # fmt: skip
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in report["models"].items():
        mean_err = float(np.mean([e for es in m["errors"].values() for e in es]))
        clean = format_accuracy(m["clean_top1"], m["linear"]["num_val"])
        mce = f"{m['mce']:.1f}" if "mce" in m else "-"
        rel = f"{m['relative_mce']:.1f}" if "relative_mce" in m else "-"
        table.add_row(name, clean, f"{100 * (1 - mean_err):.2f}", mce, rel, f"{m['images_per_s']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"baseline: {baseline} ({report['baseline_why']})")
    for key, what in (("mce_undefined", "mCE"), ("relative_mce_undefined", "relative mCE")):
        why = next((m[key] for m in report["models"].values() if key in m), None)
        if why:
            console.print(f"{what} undefined: {why}")
    console.print(f"plots: {', '.join(report['plots'].values())}")


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag}: expected NAME=PATH, got {v!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    """`tools/imagenet_c.py` / `supcon-scale imagenet-c`: exit 0, or 2 with a one-line reason on bad input."""
    from rich.console import Console

    args = arguments.imagenet_c().parse_args(argv)
    corruptions = list(dict.fromkeys(args.corruptions + (list(EXTRA_CORRUPTIONS) if args.extra else [])))
    from supcon_scale.evaluation.features import check_args

    check_args(args)
    ctx = distributed.init(seed=args.seed)
    try:
        if args.generate_from:
            if ctx.is_main:
                g = generate_c(
                    args.generate_from, args.c_root, corruptions=corruptions, severities=args.severities,
                    image_size=args.image_size, work_size=args.work_size, seed=args.seed, workers=args.workers,
                    per_class=args.per_class,
                )  # fmt: skip
                Console().print(
                    f"generated {g['written']} images ({g['cached']} cached) in {g['seconds']:.1f} s, "
                    f"{g['images_per_s']:.0f} images/s -> {args.c_root}"
                )
            distributed.barrier()
        checkpoints = _pairs(args.checkpoint, "--checkpoint")
        if checkpoints:
            if not args.clean:
                raise ValueError("--clean: needed with --checkpoint (train/ for the probe, val/ for the clean error)")
            report = robustness_report(
                checkpoints, args.c_root, args.clean, args.out, args.baseline, image_size=args.image_size,
                corruptions=corruptions, severities=args.severities, preset=args.preset,
                probes=_pairs(args.probe, "--probe"), batch_size=args.batch_size, device=args.device or ctx.device,
                num_workers=args.workers or 0,
            )  # fmt: skip
            if ctx.is_main:
                print_report(report)
        elif not args.generate_from:
            raise ValueError("--checkpoint: nothing to do; give --generate-from and/or --checkpoint NAME=PATH")
    except ValueError as exc:
        print(f"imagenet_c: error: {exc}", file=sys.stderr)
        distributed.teardown()
        return 2
    distributed.teardown()
    return 0
