"""The training split's samples for `data.format` (folder | shards | cifar), after the bad-file scan split over ranks.

Start-up cost is what decides how an ImageNet-sized run restarts: rank 0 lists the samples once (one directory read
per class folder, or one header walk per shard) and compares them with the manifest (`data/manifest.py`); only
new or changed samples are decoded, each rank decoding 1/world of them, and the verdicts are all-gathered so every
rank applies the same `data.on_bad_file` policy. A warm start (nothing changed) decodes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.badfiles import (
    BAD_FILES_NAME,
    Judged,
    Known,
    backend_problem,
    default_workers,
    judge_refs,
    write_bad_list,
)
from supcon_scale.data.folder import FolderIndex, index_folder
from supcon_scale.data.manifest import (
    DATASET_MANIFEST,
    RUN_MANIFEST,
    Manifest,
    Row,
    cache_manifest,
    known_of,
    load_manifest,
)

log = logging.getLogger(__name__)


class Samples(Protocol):
    """What a loader reads, whatever `data.format`: names, labels, class names, and each sample's data.

    `encoded(i)` is what DALI takes: a file's bytes for folders and shards, an HWC uint8 array when `raw` (CIFAR).
    """

    paths: list[str]
    labels: list[int]
    classes: list[str]
    raw: bool

    def __len__(self) -> int: ...

    def encoded(self, i: int) -> np.ndarray: ...

    def image(self, i: int) -> Image.Image: ...


@dataclass
class ScanStats:
    """What a start-up's scan did: samples listed, decoded (all ranks / this rank), taken from the manifest, bad."""

    samples: int = 0
    decoded: int = 0
    decoded_here: int = 0
    reused: int = 0
    bad: int = 0
    manifest: str | None = None  # the manifest written, if any
    seconds: float = 0.0  # listing + manifest + decoding + all-gather, on this rank


def train_dir(root: str | Path) -> Path:
    """`root/train` when it exists (the ImageNet layout), else `root` itself holding the class folders."""
    root = Path(root)
    return root / "train" if (root / "train").is_dir() else root


def manifest_paths(cfg: DataConfig, out_dir: Path | None, directory: Path) -> tuple[Path | None, list[Path]]:
    """Where this run writes its manifest, and where it looks for one (its own, then one `check-data` wrote)."""
    write = Path(cfg.manifest) if cfg.manifest else (Path(out_dir) / RUN_MANIFEST if out_dir is not None else None)
    reads = [write] if write is not None else []
    for d in (Path(cfg.root), directory):
        for path in (cache_manifest(d), d / DATASET_MANIFEST):  # check-data's, then one an older version wrote
            if path not in reads:
                reads.append(path)
    return write, [p for p in reads if p.is_file()]


def _read_manifest(paths: list[Path], kind: str, directory: Path) -> tuple[Manifest | None, str, Path | None]:
    for path in paths:  # the first existing one decides; a foreign or outdated one is an error, never ignored
        manifest, prefix = load_manifest(path, kind, directory)
        return manifest, prefix, path
    return None, "", None


@dataclass
class Listing:
    """Rank 0's view of the split, broadcast to every rank: samples, what the manifest knew of each, and more."""

    samples: Any
    fixed: list[str | None]  # a problem found while listing (a shard member without label): not decoded
    known: list[Known | None]  # the manifest's (digest, format, verdict) of each sample, if any
    extra_bad: list[tuple[str, str]]  # problems that are not samples (a truncated shard's lost tail)
    rows: list[tuple[str, int, int, tuple[int, ...]]]  # manifest key, size, mtime, extra ints of each sample
    extra_rows: list[tuple[str, int, int, str]]  # manifest rows of extra_bad
    prefix: str
    read_from: str | None
    changed: bool = False  # a sample or shard the manifest did not list as it is now


def _list_folder(directory: Path, manifest: Manifest | None, prefix: str) -> Listing:
    index = index_folder(directory)
    base = len(str(directory)) + 1
    old = manifest.rows if manifest is not None else {}
    known: list[Known | None] = []
    rows = []
    changed = False
    assert index.sizes is not None and index.mtimes_ns is not None
    for path, size, mtime in zip(index.paths, index.sizes, index.mtimes_ns, strict=True):
        key = prefix + path[base:]
        row = old.get(key)
        known.append(known_of(row))  # the digest decides; size and mtime only tell whether to rewrite the row
        changed = changed or row is None or row[:2] != (size, mtime)
        rows.append((key, size, mtime, ()))
    return Listing(index, [None] * len(rows), known, [], rows, [], prefix, None, changed)


def _shard_members(path: str, n_classes: int, directory: Path, declared: int) -> tuple[list, list[str]]:
    """One tar's members `(key, offset, nbytes, label, problem)` and shard-level problems, from its headers."""
    from supcon_scale.data.shards import read_shard

    table = read_shard(path, n_classes)
    members = [(m.key, m.offset, m.nbytes, -1 if m.label is None else m.label, m.problem) for m in table.members]
    problems = [table.problem] if table.problem else []
    if not problems and len(members) != declared:
        problems = [f"{directory / 'index.json'} lists {declared} samples, the tar holds {len(members)}"]
    return members, problems


def _list_shards(directory: Path, manifest: Manifest | None, prefix: str, num_classes: int | None) -> Listing:
    from supcon_scale.data.shards import ShardIndex, read_index

    classes, shards = read_index(directory)
    n_classes = max(len(classes), num_classes or 0)
    old: dict[str, list[tuple[str, Row]]] = {}
    for key, row in manifest.rows.items() if manifest is not None else ():
        shard, _, member = key.partition(".tar:")
        old.setdefault(shard + ".tar", []).append((member, row))
    samples = ShardIndex([], [], classes, [], [], [])
    listing = Listing(samples, [], [], [], [], [], prefix, None)
    for path, declared in shards:
        st = os.stat(path)
        rel = prefix + os.path.relpath(path, directory)
        rows = old.get(rel, [])
        known: dict[str, Known | None] = {m: known_of(r) for m, r in rows}
        if rows and all(r[:2] == (st.st_size, st.st_mtime_ns) for _, r in rows):
            # an unchanged tar: its member table from the manifest (no header walk); listing problems kept
            members = [(m, *r[5][:3], None if r[2] else (r[4] or None)) for m, r in rows if m]
            problems = [r[4] for m, r in rows if not m]
        else:
            listing.changed = True
            members, problems = _shard_members(path, n_classes, directory, declared)
        for problem in problems:
            listing.extra_bad.append((path, problem))
            listing.extra_rows.append((f"{rel}:", st.st_size, st.st_mtime_ns, problem))
        for key, offset, nbytes, label, problem in members:
            samples.paths.append(f"{path}:{key}")
            samples.labels.append(label)
            samples.files.append(path)
            samples.offsets.append(offset)
            samples.nbytes.append(nbytes)
            listing.fixed.append(problem)
            listing.known.append(known.get(key))
            listing.rows.append((f"{rel}:{key}", st.st_size, st.st_mtime_ns, (offset, nbytes, label)))
    if not samples.paths and not listing.extra_bad:
        raise ValueError(f"data.root: the shards under {directory} hold no samples")
    return listing


def list_split(cfg: DataConfig, directory: Path, manifest_reads: list[Path]) -> Listing:
    """List the split with what the manifest knew of each sample (its digest, format and verdict)."""
    manifest, prefix, path = _read_manifest(manifest_reads, cfg.format, directory)
    if cfg.format == "shards":
        listing = _list_shards(directory, manifest, prefix, cfg.num_classes)
    else:
        listing = _list_folder(directory, manifest, prefix)
    listing.read_from = None if path is None else str(path)
    return listing


def _save_manifest(listing: Listing, judged: list[Judged | None], kind: str, directory: Path, path: Path) -> Path:
    root = os.path.abspath(directory)
    if listing.prefix:  # the keys are relative to the directory of the manifest read; keep that root
        root = root[: -len(listing.prefix.rstrip("/")) - 1]
    manifest = Manifest(root, kind)
    for (key, size, mtime, extra), fixed, j in zip(listing.rows, listing.fixed, judged, strict=True):
        digest, fmt, verdict = ("", "", fixed or "") if j is None else j[:3]
        manifest.rows[key] = (size, mtime, digest, fmt, verdict, extra)
    for key, size, mtime, problem in listing.extra_rows:
        manifest.rows[key] = (size, mtime, "", "", problem, (-1, 0, -1))
    return manifest.save(path)


def _judge_over_ranks(listing: Listing, ctx: distributed.Context, workers: int | None) -> tuple[list, int]:
    """Every sample without a listing problem judged (`badfiles.judge`), 1/world of them on each rank and all
    gathered: `(judged or None per sample, how many this rank decoded)`."""
    todo = [i for i, f in enumerate(listing.fixed) if f is None]
    mine = todo[ctx.rank :: ctx.world_size]
    if workers is None:
        workers = default_workers(distributed.launch_env().local_world_size)
    part = judge_refs([listing.samples.ref(i) for i in mine], [listing.known[i] for i in mine], workers)
    per_rank = distributed.all_gather_object(part) if ctx.distributed else [part]
    judged: list[Judged | None] = [None] * len(listing.fixed)
    for r, results in enumerate(per_rank):
        for i, result in zip(todo[r :: ctx.world_size], results, strict=True):  # type: ignore[call-overload]
            judged[i] = result
    return judged, sum(j[3] for j in part)


def scan_split(
    cfg: DataConfig, ctx: distributed.Context, out_dir: Path | None, workers: int | None = None
) -> tuple[Any, list[tuple[str, str]], ScanStats]:
    """Every sample of the split with its verdict for `data.backend`: `(samples, bad (name, reason), stats)`, the
    same on every rank."""
    t0 = time.perf_counter()
    directory = train_dir(cfg.root)
    write, reads = manifest_paths(cfg, out_dir, directory)
    payload: Listing | str
    if ctx.is_main:
        try:
            payload = list_split(cfg, directory, reads)
        except ValueError as exc:  # every rank raises it, none waits in a collective for a rank that died
            payload = str(exc)
    else:
        payload = ""
    if ctx.distributed:
        payload = distributed.broadcast_object(payload)  # type: ignore[assignment]
    if isinstance(payload, str):
        raise ValueError(payload)
    listing = payload
    judged, decoded_here = _judge_over_ranks(listing, ctx, workers)
    verdicts = [
        f if j is None else j[2] or backend_problem(j[1], cfg.backend)
        for f, j in zip(listing.fixed, judged, strict=True)
    ]
    bad = list(listing.extra_bad) + [(listing.samples.paths[i], v) for i, v in enumerate(verdicts) if v]
    decoded = sum(j[3] for j in judged if j is not None)
    n = len(verdicts)
    stats = ScanStats(n, decoded, decoded_here, n - decoded, len(bad))
    if ctx.is_main and write is not None and (decoded or listing.changed or listing.read_from != str(write)):
        stats.manifest = str(_save_manifest(listing, judged, cfg.format, directory, write))
    elif write is not None and write.is_file():
        stats.manifest = str(write)
    stats.seconds = time.perf_counter() - t0
    return listing.samples, bad, stats


def build_index(
    cfg: DataConfig, ctx: distributed.Context, out_dir: Path | None, workers: int | None = None
) -> tuple[Any, int]:
    """The good samples of the training split and the number skipped, after applying `data.on_bad_file`.

    A failure stops every rank before training, naming the first bad sample; with `skip` the bad ones are listed in
    `out_dir/bad_files.txt`. The samples carry `.scan` (ScanStats) for the logs, the tests and `bench_startup`.
    """
    if cfg.format == "cifar":
        from supcon_scale.data.cifar import cifar_index

        samples = cifar_index(cfg.root)  # pixel arrays, nothing to decode; labels and shapes checked on load
        samples.scan = ScanStats(samples=len(samples), reused=len(samples))
        return samples, 0
    samples, bad, stats = scan_split(cfg, ctx, out_dir, workers)
    samples.scan = stats
    if ctx.is_main:
        log.info(
            "data: %d samples, %d decoded over %d rank(s), %d verdicts from the manifest (%.2f s)",
            stats.samples,
            stats.decoded,
            ctx.world_size,
            stats.reused,
            stats.seconds,
        )
    if not bad:
        return samples, 0
    if cfg.on_bad_file == "fail":
        path, reason = bad[0]
        raise ValueError(f"data.on_bad_file=fail: {path}: {reason} ({len(bad)} bad file(s) in total)")
    if ctx.is_main:
        where = ""
        if out_dir is not None:
            write_bad_list(bad, out_dir)
            where = f", listed in {Path(out_dir) / BAD_FILES_NAME}"
        log.warning("skipping %d undecodable or unusable sample(s) of %d%s", len(bad), stats.samples, where)
    skip = {p for p, _ in bad}
    kept = samples.subset([i for i, p in enumerate(samples.paths) if p not in skip])
    kept.scan = stats
    if not len(kept):
        raise ValueError(f"data.root: every one of the {stats.samples} samples under {cfg.root} is bad")
    return kept, len(bad)


__all__ = ["FolderIndex", "Samples", "ScanStats", "build_index", "scan_split", "train_dir"]
