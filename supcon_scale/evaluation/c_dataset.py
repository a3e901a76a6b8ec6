"""A "-C" copy of a folder dataset on disk: written from a clean split (cached, reproducible, parallel), then indexed.

Layout: `ROOT/<corruption>/<severity>/<class>/<image>` (the ImageNet-C release, Hendrycks & Dietterich 2019);
`ROOT/_generation.json` records the settings, so a re-run with others is refused. Scoring is in `robustness.py`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from supcon_scale.data.folder import FolderIndex, index_folder
from supcon_scale.evaluation.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, MIN_SIDE, SEVERITIES, corrupt, image_seed
from supcon_scale.files import write_replacing, write_text

MANIFEST = "_generation.json"


def _prepare(image, image_size: int | None):
    """The ImageNet-C geometry before corrupting: resize short side to size/0.875, centre-crop `image_size`.

    torchvision's Resize + CenterCrop, as ImageNet-C's own make_imagenet_c.py (`trn.Resize(256)`, `trn.CenterCrop
    (224)`): its long side is truncated and its crop offset rounded, which `round` and `//` missed by a pixel.
    """
    from torchvision.transforms import v2

    if image_size is None:
        return image
    return v2.CenterCrop(image_size)(v2.Resize(round(image_size / 0.875), antialias=True)(image))


def _generate_one(
    task: tuple[str, str, list[str], list[int], int | None, int, int, str, int],
) -> tuple[int, int, str | None]:
    """Worker: decode one image once, write every (corruption, severity) copy that is not there yet; (written,
    cached, why the source could not be decoded or None)."""
    from PIL import Image

    src, rel, corruptions, severities, image_size, work_size, seed, out_dir, quality = task
    todo = [(c, s) for c in corruptions for s in severities if not (Path(out_dir) / c / str(s) / rel).is_file()]
    if not todo:
        return 0, len(corruptions) * len(severities), None
    try:
        with Image.open(src) as img:
            img = _prepare(img.convert("RGB"), image_size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # as the training scan: skip it
        return 0, 0, f"cannot decode: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    size = img.size
    up = work_size / min(size) if min(size) < work_size else 1.0
    work = img.resize((math.ceil(size[0] * up), math.ceil(size[1] * up)), Image.BICUBIC) if up > 1 else img
    arr = np.asarray(work, dtype=np.uint8)
    for c, s in todo:
        out = Image.fromarray(corrupt(arr, c, s, seed=image_seed(seed, rel, c, s)))
        if up > 1:  # back to the stored size: a small image is corrupted at work_size, then shrunk (area filter)
            out = out.resize(size, Image.BOX)
        dst = Path(out_dir) / c / str(s) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        # complete or absent (an interrupted run resumes where it stopped); a planted link replaced, a device refused
        write_replacing(dst, lambda tmp, out=out: out.save(tmp, format="JPEG", quality=quality))
    return len(todo), len(corruptions) * len(severities) - len(todo), None


def generate_c(
    source: str | Path,
    out_dir: str | Path,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    image_size: int | None = None,
    work_size: int = MIN_SIDE,
    seed: int = 0,
    workers: int | None = None,
    quality: int = 85,
    per_class: int | None = None,
) -> dict[str, Any]:
    """Write `out_dir/<corruption>/<severity>/<class>/<image>.jpg` for every image of the split folder `source`.

    Cached (existing files are kept, so a re-run is cheap and an interrupted one resumes), reproducible (each
    image's seed derives from `seed`, its relative path, corruption and severity, whatever the worker count),
    parallel (`workers` processes). `image_size` applies ImageNet-C's resize + centre-crop before corrupting.
    Images with a side below `work_size` (at least 32, imagecorruptions' minimum) are upscaled (bicubic),
    corrupted, and shrunk back (area filter). JPEG quality 85 as in the ImageNet-C release. `per_class` keeps the
    first N images of each class (a faster subset, recorded in the manifest).
    """
    _check_choices(corruptions, severities, work_size)
    source, out_dir = Path(source), Path(out_dir)
    params = {
        "source": str(source.resolve()),
        "image_size": image_size,
        "work_size": work_size,
        "seed": seed,
        "quality": quality,
        "per_class": per_class,
    }
    manifest = out_dir / MANIFEST
    old = _previous(manifest, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(path, rel, list(corruptions), list(severities), image_size, work_size, seed, str(out_dir), quality)
             for path, rel in _sources(index_folder(source), per_class)]  # fmt: skip
    workers = workers if workers is not None else min(len(os.sched_getaffinity(0)), 8)  # the CPUs this job may use
    start = time.perf_counter()
    written, cached, bad = _run(tasks, workers)
    seconds = time.perf_counter() - start
    info = {
        "params": params,
        "corruptions": sorted(set(old["corruptions"]) | set(corruptions)) if old else list(corruptions),
        "severities": sorted(set(old["severities"]) | set(severities)) if old else list(severities),
        "images": len(tasks) - len(bad),
    }
    if bad:
        info["skipped"] = _list_bad(bad, source, out_dir)
    write_text(manifest, json.dumps(info, indent=2))
    return {
        "written": written,
        "cached": cached,
        "seconds": seconds,
        "images_per_s": written / max(seconds, 1e-9),
        "workers": workers,
        **info,
    }


def _previous(manifest: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """What an earlier generation into the same folder recorded (None: the first); other settings are refused."""
    if not manifest.is_file():
        return None
    old = json.loads(manifest.read_text())
    diff = [k for k in params if old.get("params", {}).get(k) != params[k]]
    if diff:
        raise ValueError(
            f"--c-root: {manifest.parent} was generated with other settings ({', '.join(diff)}); use a new folder"
        )
    return old


def _list_bad(bad: list[tuple[str, str]], source: Path, out_dir: Path) -> int:
    """The undecodable source images listed beside the copy (as the training scan lists them), with a warning."""
    from supcon_scale.console import warn
    from supcon_scale.data.badfiles import BAD_FILES_NAME, write_bad_list

    write_bad_list(bad, out_dir)
    warn(f"skipped {len(bad)} undecodable image(s) of {source}, listed in {out_dir / BAD_FILES_NAME}")
    return len(bad)


def _check_choices(corruptions: Sequence[str], severities: Sequence[int], work_size: int) -> None:
    """The corruptions, severities and working size a generation may use, each refused naming its flag."""
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown:
        raise ValueError(f"--corruptions: unknown {', '.join(unknown)}; choose from {', '.join(ALL_CORRUPTIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f"--severities: must be in 1..5, got {bad}")
    if work_size < MIN_SIDE:
        raise ValueError(f"work_size must be >= {MIN_SIDE} (imagecorruptions' minimum), got {work_size}")


def _sources(index: FolderIndex, per_class: int | None) -> list[tuple[str, str]]:
    """(source image, its path under a corruption/severity folder) of every image kept: the first `per_class` of
    each class, or all."""
    out, seen = [], {}
    for path, label in zip(index.paths, index.labels, strict=True):
        seen[label] = seen.get(label, 0) + 1
        if per_class is None or seen[label] <= per_class:
            out.append((path, str(Path(index.classes[label]) / (Path(path).stem + ".jpg"))))
    return out


def _run(tasks: list[tuple], workers: int) -> tuple[int, int, list[tuple[str, str]]]:
    """Every image's copies, in `workers` spawned processes (in this one for 1): (written, cached, undecodable)."""
    written = cached = 0
    if workers <= 1:
        results = map(_generate_one, tasks)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        results = pool.map(_generate_one, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
    bad: list[tuple[str, str]] = []
    try:
        for task, (w, c, why) in zip(tasks, results, strict=True):
            written, cached = written + w, cached + c
            if why is not None:
                bad.append((task[0], why))
    finally:
        if workers > 1:
            pool.shutdown()
    return written, cached, bad


def index_c(
    root: str | Path, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES
) -> dict[tuple[str, int], FolderIndex]:
    """Index `root/<corruption>/<severity>/`; a missing corruption or severity folder is a ValueError naming it."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--c-root: directory not found: {root}")
    out = {}
    for c in corruptions:
        if c not in ALL_CORRUPTIONS:
            raise ValueError(f"--corruptions: unknown {c!r}; choose from {', '.join(ALL_CORRUPTIONS)}")
        if not (root / c).is_dir():
            raise ValueError(f"--c-root: missing corruption folder {root / c}")
        for s in severities:
            if not (root / c / str(s)).is_dir():
                raise ValueError(f"--c-root: missing severity folder {root / c / str(s)}")
            out[(c, s)] = index_folder(root / c / str(s))
    return out
