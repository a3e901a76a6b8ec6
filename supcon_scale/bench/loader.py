"""`tools/bench_dataloader.py`: steady-state throughput of the training loaders on one spec, plus a DALI profile.

Every backend runs the same AugmentSpec over the same files in one process, alternating backends for `--repeats`
rounds (the best round counts, so background load hurts every backend alike). `--profile` times cumulative DALI CPU
pipelines (read, + decode, + crops, + each stage, + normalise) to show where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from supcon_scale import arguments
from supcon_scale.config import AugmentConfig, DataConfig
from supcon_scale.devices import select_device
from supcon_scale.distributed import Context

if TYPE_CHECKING:
    from typing import Self

    from rich.table import Table

SYNTHETIC_SIZE = (500, 375)


def write_synthetic(out: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """`n` realistic JPEGs (quality 90, 500x375): random crops and flips of scikit-learn's bundled photographs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs
    rng = np.random.default_rng(seed)
    w, h = SYNTHETIC_SIZE
    for i in range(n):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - h + 1)
        x = rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[y : y + h, x : x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        folder = out / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{i:06d}.jpg", quality=90)
    return out


class _Sampler:
    """Peak RSS of this process and its children (DataLoader workers), and GPU memory in use, sampled every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak_rss = 0
        self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gpu_used(self) -> int:
        import torch

        if not torch.cuda.is_available():
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            with contextlib.suppress(Exception):  # a worker that exits mid-sample
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_gpu = max(self.peak_gpu, self._gpu_used())
            self._stop.wait(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    import psutil

    proc = psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system
    for c in proc.children(recursive=True):
        with contextlib.suppress(Exception):  # a worker that exits mid-sample
            ct = c.cpu_times()
            total += ct.user + ct.system
    return total


def measure(cfg: DataConfig, warmup: int, batches: int, roi: bool = False) -> dict[str, Any]:
    """Images/s over `batches` batches after `warmup` (epochs wrap as needed), CPU use and peak memory."""
    import torch

    from supcon_scale.data import build_train_loader
    from supcon_scale.data.dali import DaliLoader

    # Batches are delivered where training would use them: on the GPU when there is one (dali-gpu needs it).
    ctx = Context(device=select_device("auto", 0))  # GPUs made visible but unusable: an error, not a CPU figure
    with _Sampler() as sampler:
        if cfg.backend.startswith("dali"):
            loader = DaliLoader(cfg, ctx, seed=0, out_dir=None, roi=roi)
        else:
            loader = build_train_loader(cfg, ctx, seed=0, out_dir=None)
        done, epoch, t0, cpu0 = 0, 0, time.perf_counter(), _cpu_seconds()  # warmup=0 times from here
        while done < warmup + batches:
            loader.set_epoch(epoch)
            for _views, _ in loader:
                done += 1
                if ctx.device.type == "cuda":  # the batch is really there, not just queued on a stream
                    torch.cuda.synchronize()
                if done == warmup:
                    t0, cpu0 = time.perf_counter(), _cpu_seconds()
                if done == warmup + batches:
                    break
            epoch += 1
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        del loader
    images = batches * cfg.global_batch_size
    return {
        "images_per_s": images / wall,
        "views_per_s": images * cfg.views / wall,
        "cpu_util_pct": 100.0 * cpu / wall / (os.cpu_count() or 1),
        "peak_rss_mib": sampler.peak_rss / 2**20,
        "peak_gpu_mib": sampler.peak_gpu / 2**20 if sampler.peak_gpu else None,
    }


def profile_dali(root: Path, cfg: DataConfig, batches: int, rounds: int = 2) -> list[dict[str, Any]]:
    """Cumulative DALI CPU pipelines: read, +decode, +V crops (+flip+normalise), +each stage; median batch of each."""
    from nvidia.dali import fn, pipeline_def, types

    from supcon_scale.data import dali as D
    from supcon_scale.data.folder import index_folder
    from supcon_scale.data.sharding import train_dir
    from supcon_scale.data.spec import spec_from_config

    index = index_folder(train_dir(root))
    spec = spec_from_config(cfg.augment, cfg.image_size)
    # The default DALI layout: with ROI decoding every view is a sample (files repeated, V times the batch).
    repeat = cfg.views if D.ROI_DECODE_DEFAULT else 1
    paths = [p for p in index.paths for _ in range(repeat)]
    batch, branches = cfg.global_batch_size * repeat, cfg.views // repeat
    # Every pipeline after the crops ends in flip+normalise, so all of them output the same float CHW views.
    steps: list[tuple[str, Any]] = [("read", None)]
    if D.ROI_DECODE_DEFAULT:
        steps.append(("ROI decodes+resize+flip+normalise", ()))
    else:
        steps += [("decode", None), ("crops+flip+normalise", ())]
    for k in range(1, len(spec.stages) + 1):
        steps.append(("+" + spec.stages[k - 1], spec.stages[:k]))

    def build(name: str, stages: tuple[str, ...] | None) -> Any:
        @pipeline_def(enable_conditionals=True)
        def pipe_fn():
            enc, _ = fn.readers.file(files=paths, name=D.READER, random_shuffle=False)
            if name == "read":
                return enc
            if name == "decode":
                return fn.decoders.image(enc, device="cpu", output_type=types.RGB)
            crops = D.crop_views(enc, [spec] * branches, "cpu", D.ROI_DECODE_DEFAULT, 0.0)
            return tuple(D.augment_view(c, replace(spec, stages=tuple(stages))) for c in crops)

        # Synchronous execution, so one run() is one batch's work.
        pipe = pipe_fn(
            batch_size=batch,
            num_threads=cfg.dali_threads,
            device_id=None,
            seed=0,
            exec_async=False,
            exec_pipelined=False,
            prefetch_queue_depth=1,
        )
        pipe.build()
        pipe.run()
        return pipe

    best = _lowest_median_ms([build(name, stages) for name, stages in steps], batches, rounds)
    rows, previous = [], 0.0
    for (name, _), ms in zip(steps, best, strict=True):
        rows.append({"step": name, "ms_per_batch": ms, "added_ms": ms - previous})
        previous = ms
    return rows


def _lowest_median_ms(pipes: list[Any], batches: int, rounds: int) -> list[float]:
    """Each pipeline's median ms per batch, the lowest over `rounds`; rounds alternate over the pipelines (resists
    background load)."""
    best = [float("inf")] * len(pipes)
    for _ in range(rounds):
        for k, pipe in enumerate(pipes):
            times = []
            for _ in range(batches):
                t0 = time.perf_counter()
                pipe.run()
                times.append(time.perf_counter() - t0)
            best[k] = min(best[k], float(np.median(times)) * 1000)
    return best


def main(argv: list[str] | None = None) -> int:
    """Benchmark the training data loaders (images/s, views/s, CPU, memory) and write a table and JSON."""
    from rich.console import Console

    args = arguments.bench_dataloader().parse_args(argv)
    console = Console()
    try:
        root, backends, formats = _inputs(args)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    roots = {"folder": Path(root)}
    if "shards" in formats:
        from supcon_scale.data.shards import write_shards

        roots["shards"] = write_shards(root, Path(f"{Path(root).resolve()}_shards"), args.shard_size)
    aug = AugmentConfig(preset=args.preset)  # type: ignore[arg-type]
    rows = _rows(_best(args, roots, _runs(formats, backends, args.dali_decode), aug), args)
    console.print(_table(rows, f"data loading: {root}, preset {args.preset}, batch {args.batch_size}, "
                               f"{args.threads} threads"))  # fmt: skip
    profile = None
    if args.profile:
        cfg = DataConfig(
            root=str(root),
            backend="dali-cpu",
            global_batch_size=args.batch_size,
            image_size=args.image_size,
            views=args.views,
            dali_threads=args.threads,
            augment=aug,
        )
        profile = profile_dali(Path(root), cfg, args.batches)
        console.print(_profile_table(profile))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "profile": profile, "cpu_count": os.cpu_count()}, indent=2))
    return 0


def _inputs(args: argparse.Namespace) -> tuple[Path, list[str], list[str]]:
    """The data folder (written first for `--synthetic`), the backends and the formats; a bad flag is a ValueError."""
    root = args.data
    if args.synthetic is not None:
        if args.synthetic < args.batch_size:
            raise ValueError(f"--synthetic {args.synthetic} is smaller than --batch-size")
        root = write_synthetic(args.synthetic_dir, args.synthetic)
    if not Path(root).is_dir():
        raise ValueError(f"--data: directory not found: {root}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"dali-gpu", "dali-cpu", "torchvision"}
    if unknown:
        raise ValueError(f"--backends: unknown {sorted(unknown)}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if set(formats) - {"folder", "shards"}:
        raise ValueError(f"--formats: unknown {sorted(set(formats) - {'folder', 'shards'})}")
    return root, backends, formats


def _runs(formats: list[str], backends: list[str], dali_decode: str) -> list[tuple[str, str, bool]]:
    """(format, backend, ROI decoding) of every case; only DALI has the decode modes of `--dali-decode`."""
    runs = []
    for fmt in formats:
        for b in backends:
            for mode in [m.strip() for m in dali_decode.split(",")] if b.startswith("dali") else ["once"]:
                runs.append((fmt, b, mode == "roi"))
    return runs


def _best(
    args: argparse.Namespace, roots: dict[str, Path], runs: list[tuple[str, str, bool]], aug: AugmentConfig
) -> dict[tuple[str, str, bool], dict[str, Any]]:
    """Each case's fastest of `--repeats` measurements, the cases interleaved (resists background load)."""
    best: dict[tuple[str, str, bool], dict[str, Any]] = {}
    for _ in range(args.repeats):
        for fmt, backend, roi in runs:
            cfg = DataConfig(
                root=str(roots[fmt]),
                format=fmt,  # type: ignore[arg-type]
                backend=backend,
                global_batch_size=args.batch_size,
                image_size=args.image_size,  # type: ignore[arg-type]
                views=args.views,
                workers=args.threads,
                dali_threads=args.threads,
                augment=aug,
                drop_last=True,
            )
            r = measure(cfg, args.warmup, args.batches, roi=roi)
            if (fmt, backend, roi) not in best or r["images_per_s"] > best[fmt, backend, roi]["images_per_s"]:
                best[fmt, backend, roi] = r
    return best


def _rows(best: dict[tuple[str, str, bool], dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The JSON rows: each case's figures with its settings and its ratios to torchvision and to the folder format."""
    rows = []
    for (fmt, backend, roi), r in best.items():
        base = best.get((fmt, "torchvision", False))
        folder = best.get(("folder", backend, roi))
        rows.append(
            {
                "format": fmt,
                "backend": backend,
                "decode": "roi" if roi else ("once" if backend != "torchvision" else "pil"),
                "preset": args.preset,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "views": args.views,
                "image_size": args.image_size,
                **r,
                "vs_torchvision": r["images_per_s"] / base["images_per_s"] if base else None,
                "vs_folder": r["images_per_s"] / folder["images_per_s"] if folder else None,
            }
        )
    return rows


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    cols = (
        "format",
        "backend",
        "decode",
        "images/s",
        "views/s",
        "x torchvision",
        "x folder",
        "CPU %",
        "RSS MiB",
        "GPU MiB",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["format"],
            r["backend"],
            r["decode"],
            f"{r['images_per_s']:.1f}",
            f"{r['views_per_s']:.1f}",
            f"{r['vs_torchvision']:.2f}" if r["vs_torchvision"] else "-",
            f"{r['vs_folder']:.2f}" if r["vs_folder"] else "-",
            f"{r['cpu_util_pct']:.0f}",
            f"{r['peak_rss_mib']:.0f}",
            f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] else "-",
        )
    return table


def _profile_table(profile: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    table = Table(title="DALI CPU profile (cumulative pipelines)")
    for col in ("step", "ms/batch", "added ms"):
        table.add_column(col, justify="right")
    for r in profile:
        table.add_row(r["step"], f"{r['ms_per_batch']:.1f}", f"{r['added_ms']:.1f}")
    return table
