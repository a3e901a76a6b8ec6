"""Find images that cannot be decoded before any loader sees them (a corrupt JPEG kills a DALI pipeline).

DALI cannot skip a corrupt file mid-run (the pipeline dies: DALI #211, #2019, #3913), so every backend indexes
through this scan (`data/index.py` splits it over the ranks and keeps its verdicts in a manifest):
each file is fully decoded once (JPEGs in draft mode, which still entropy-decodes the whole stream, so truncation is
caught) and the bad ones are either skipped and listed in `bad_files.txt` or stop the run before training.
"""

from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from supcon_scale.data.folder import IMAGE_EXTENSIONS
from supcon_scale.data.manifest import DATASET_MANIFEST, Manifest, load_manifest

BAD_FILES_NAME = "bad_files.txt"


@dataclass
class ScanReport:
    """Decodable paths and `(path, reason)` for the rest, both in input order."""

    good: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0  # files decoded (the rest had a verdict in the manifest)

    def to_dict(self) -> dict[str, object]:
        return {"good": len(self.good), "bad": [{"path": p, "reason": r} for p, r in self.bad]}


def _decode(source: str | io.BytesIO) -> str | None:
    """None when `source` decodes to an image (any mode PIL can turn into RGB), else a one-line reason."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # raises on truncated data (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is False by default)
            img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file bad; the reason is reported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"cannot decode: {reason}"
    return None


def check_file(path: str) -> str | None:
    """None when `path` decodes to an image (any mode PIL can turn into RGB), else a one-line reason."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if size == 0:
        return "empty file (0 bytes)"
    return _decode(path)


def check_bytes(data: bytes) -> str | None:
    """`check_file` for an encoded image held in memory (a tar shard's member)."""
    return "empty file (0 bytes)" if not data else _decode(io.BytesIO(data))


# A sample to check: a file path, or (tar path, byte offset, byte count) of a shard's member.
Ref = str | tuple[str, int, int]


def check_ref(ref: Ref) -> str | None:
    """`check_file` for a path, `check_bytes` for the byte range of a shard member."""
    if isinstance(ref, str):
        return check_file(ref)
    path, offset, size = ref
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if len(data) < size:
        return f"truncated: {len(data)} of {size} bytes in the shard"
    return check_bytes(data)


def _check_chunk(refs: list[Ref]) -> list[str | None]:
    return [check_ref(r) for r in refs]


def default_workers(ranks_per_node: int = 1) -> int:
    """Decoding processes of one rank: the CPUs this process may use (not the machine's), shared by the node's ranks."""
    return max(1, min(32, len(os.sched_getaffinity(0)) // max(1, ranks_per_node)))


def check_refs(refs: list[Ref], workers: int | None = None) -> list[str | None]:
    """The `check_ref` verdict of every sample, in order, decoded in `workers` processes for large lists."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(refs) < 512:
        return _check_chunk(refs)
    chunk = max(64, len(refs) // (workers * 8))
    chunks = [refs[i : i + chunk] for i in range(0, len(refs), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(_check_chunk, chunks) for r in part]


def check_paths(paths: list[str], workers: int | None = None) -> ScanReport:
    """Decode every path (in `workers` processes for large lists) and split them into good and bad."""
    report = ScanReport()
    for path, reason in zip(paths, check_refs(list(paths), workers), strict=True):
        if reason is None:
            report.good.append(path)
        else:
            report.bad.append((path, reason))
    return report


def image_files(root: Path) -> list[str]:
    """Every file with an image extension under `root`, sorted (hidden folders skipped)."""
    if not root.is_dir():
        raise ValueError(f"check-data: directory not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in filenames if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(out)


def scan(root: Path, workers: int | None = None, manifest: Path | None = None) -> ScanReport:
    """Check every image file under `root` (recursively); with `manifest`, decode only files it does not vouch for
    (same size and mtime) and write it back, the same manifest a training run over `root` reads."""
    paths = image_files(Path(root))
    if manifest is None:
        return check_paths(paths, workers)
    known, prefix = load_manifest(manifest, "folder", root) if manifest.is_file() else (None, "")
    rows = known.rows if known is not None else {}
    out = Manifest(os.path.abspath(root) if known is None else known.root, "folder")
    base = len(str(root).rstrip(os.sep)) + 1
    stats = [os.stat(p) for p in paths]
    keys = [prefix + p[base:] for p in paths]
    verdicts = [
        None if (r := rows.get(k)) is None or r[:2] != (st.st_size, st.st_mtime_ns) else r[2]
        for k, st in zip(keys, stats, strict=True)
    ]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    for i, reason in zip(todo, check_refs([paths[i] for i in todo], workers), strict=True):
        verdicts[i] = reason or ""
    report = ScanReport()
    for path, key, st, verdict in zip(paths, keys, stats, verdicts, strict=True):
        out.rows[key] = (st.st_size, st.st_mtime_ns, verdict or "", ())
        if verdict:
            report.bad.append((path, verdict))
        else:
            report.good.append(path)
    report.decoded = len(todo)
    out.save(manifest)
    return report


def shown(path: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) written as `\\xff` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write_bad_list(bad: list[tuple[str, str]], out_dir: str | Path) -> Path:
    """`out_dir/bad_files.txt`: one `path<TAB>reason` per line (the run's deny-list), names in `shown` form, written
    through a fresh temporary renamed over it (a link planted there is replaced, never followed)."""
    from supcon_scale.files import write_text

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return write_text(Path(out_dir) / BAD_FILES_NAME, "".join(f"{shown(p)}\t{shown(r)}\n" for p, r in bad))


def write_bad_files(report: ScanReport, out_dir: Path) -> Path:
    """`write_bad_list` of a scan report."""
    return write_bad_list(report.bad, out_dir)


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale check-data DIR`: table of undecodable images; exit 1 when any is found, 2 on bad input."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="supcon-scale check-data", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="dataset folder, scanned recursively")
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding processes (default: the CPUs)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report as JSON")
    parser.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help=f"manifest to read and write (default DIR/{DATASET_MANIFEST}; training runs over DIR read it)",
    )
    parser.add_argument("--no-manifest", action="store_true", help="decode every file and write no manifest")
    args = parser.parse_args(argv)
    console = Console()
    manifest = None if args.no_manifest else (args.manifest or args.dir / DATASET_MANIFEST)
    try:
        report = scan(args.dir, args.workers, manifest)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    title = f"check-data {args.dir}: {len(report.good)} good, {len(report.bad)} bad"
    if manifest is not None:
        title += f" ({report.decoded} decoded, the rest vouched for by {manifest})"
    table = Table(title=title)
    table.add_column(f"bad file (under {args.dir})", overflow="fold")
    table.add_column("reason", overflow="fold")
    for p, r in report.bad:
        table.add_row(shown(os.path.relpath(p, args.dir)), shown(r))
    console.print(table)
    if args.json is not None:
        from supcon_scale.files import write_json

        write_json(args.json, {"root": str(args.dir), **report.to_dict()})
    return 1 if report.bad else 0
