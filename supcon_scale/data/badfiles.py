"""Find images that cannot be decoded before any loader sees them (a corrupt JPEG kills a DALI pipeline).

DALI cannot skip a corrupt file mid-run (the pipeline dies: DALI #211, #2019, #3913), so every backend indexes
through this scan (`data/index.py` splits it over the ranks and keeps its verdicts in a manifest): each sample is
read once (at most `folder.MAX_SAMPLE_BYTES`), digested, and fully decoded unless the manifest vouches for that
digest (JPEGs in draft mode, which still entropy-decodes the whole stream, so truncation is caught). The format is
Pillow's reading of the content, checked against what the run's backend decodes (`backend_problem`), never the
file's name. Bad samples are either skipped and listed in `bad_files.txt` or stop the run before training.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from supcon_scale import arguments
from supcon_scale.arguments import default_workers
from supcon_scale.data.folder import IMAGE_EXTENSIONS, read_bounded, too_large
from supcon_scale.data.manifest import Manifest, cache_manifest, known_of, load_manifest

BAD_FILES_NAME = "bad_files.txt"


@dataclass
class ScanReport:
    """Decodable paths and `(path, reason)` for the rest, both in input order."""

    good: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0  # files decoded (the rest had a verdict in the manifest)

    def to_dict(self) -> dict[str, object]:
        return {"good": len(self.good), "bad": [{"path": p, "reason": r} for p, r in self.bad]}


# Pillow's names of the formats each backend decodes (None: whatever Pillow decodes, the torchvision backend). DALI's
# image decoder (nvImageCodec; NVIDIA DALI docs, nvidia.dali.fn.decoders.image) takes JPEG, JPEG 2000, TIFF, PNG, BMP,
# PNM (Pillow's PPM: PBM, PGM, PPM) and WebP in its simple format (not animated); GIF, TGA, PCX or ICO bytes under a
# .jpg name pass Pillow but stop a DALI run at the step that reaches them. MPO is Pillow's name for a JPEG with
# extra frames (camera photos), which DALI decodes as the JPEG it starts with.
DALI_FORMATS = frozenset({"JPEG", "MPO", "JPEG2000", "TIFF", "PNG", "BMP", "PPM", "WEBP"})
DALI_NAMES = "JPEG, JPEG 2000, PNG, TIFF, BMP, PNM and WebP"


def backend_problem(fmt: str, backend: str) -> str | None:
    """Why a sample Pillow decodes as `fmt` is unusable by `backend` (data.backend), or None."""
    if not backend.startswith("dali") or fmt in DALI_FORMATS:
        return None
    return f"a {fmt or 'unknown'} image: the {backend} backend decodes only {DALI_NAMES}"


def _decode(data: bytes) -> tuple[str, str | None]:
    """(Pillow's format name, None) when `data` decodes to an image (any mode PIL can turn into RGB), else (format
    or '', a one-line reason). The format is read from the content, never from the file's name."""
    from PIL import Image

    fmt = ""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if fmt == "WEBP" and getattr(img, "is_animated", False):
                fmt = "WEBP (animated)"  # DALI decodes WebP's simple format only
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()  # raises on truncated data (PIL.ImageFile.LOAD_TRUNCATED_IMAGES is False by default)
            img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the file bad; the reason is reported
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the file", reason)  # the same text on every rank
        return fmt, f"cannot decode: {reason}"
    return fmt, None


# A sample to check: a file path, or (tar path, byte offset, byte count) of a shard's member.
Ref = str | tuple[str, int, int]
# What the manifest knew of a sample: (content digest, format, decoder's verdict ('' when it decodes)).
Known = tuple[str, str, str]
# A judged sample: (digest, format, verdict, whether it was judged now rather than vouched for by the manifest).
Judged = tuple[str, str, str, bool]


def _read_ref(ref: Ref) -> bytes:
    """The sample's encoded bytes, never more than MAX_SAMPLE_BYTES; ValueError with the reason otherwise."""
    if isinstance(ref, str):
        try:
            return read_bounded(ref)
        except OSError as exc:
            raise ValueError(f"unreadable: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(str(exc).rpartition(": ")[2]) from None
    path, offset, size = ref
    reason = too_large(size)
    if reason is not None:
        raise ValueError(reason)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as exc:
        raise ValueError(f"unreadable: {exc.strerror or exc}") from None
    if len(data) < size:
        raise ValueError(f"truncated: {len(data)} of {size} bytes in the shard")
    return data


def judge(ref: Ref, known: Known | None = None) -> Judged:
    """Read the sample once: its digest, and the manifest's verdict when the digest matches it, else a decode.

    The digest is blake2b over every byte of the sample, so a file corrupted in place with its size and mtime kept
    is decoded again (issue 25: the manifest vouched for it, DALI then crashed). Reading the bytes is the cost of
    a warm start; hashing (about 1 GB/s a core) is far cheaper than decoding, and runs in the same processes.
    """
    try:
        data = _read_ref(ref)
    except ValueError as exc:  # unreadable or too large: no digest, so judged again next time
        return "", "", str(exc), True
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if known is not None and known[0] == digest:
        return digest, known[1], known[2], False
    if not data:
        return digest, "", "empty file (0 bytes)", True
    fmt, reason = _decode(data)
    return digest, fmt, reason or "", True


def check_ref(ref: Ref) -> str | None:
    """None when the sample decodes to an image (any mode PIL can turn into RGB), else a one-line reason."""
    return judge(ref)[2] or None


def check_file(path: str) -> str | None:
    """`check_ref` of a file."""
    return check_ref(path)


def _judge_chunk(items: list[tuple[Ref, Known | None]]) -> list[Judged]:
    return [judge(ref, known) for ref, known in items]


def judge_refs(refs: list[Ref], known: list[Known | None], workers: int | None = None) -> list[Judged]:
    """`judge` every sample, in order, in `workers` processes for large lists."""
    workers = default_workers() if workers is None else workers
    items = list(zip(refs, known, strict=True))
    if workers <= 1 or len(items) < 512:
        return _judge_chunk(items)
    chunk = max(64, len(items) // (workers * 8))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(_judge_chunk, chunks) for r in part]


def check_paths(paths: list[str], workers: int | None = None, backend: str = "torchvision") -> ScanReport:
    """Decode every path (in `workers` processes for large lists) and split them into good and bad."""
    report = ScanReport()
    for path, (_, fmt, reason, _) in zip(paths, judge_refs(list(paths), [None] * len(paths), workers), strict=True):
        verdict = reason or backend_problem(fmt, backend)
        if verdict:
            report.bad.append((path, verdict))
        else:
            report.good.append(path)
    report.decoded = len(paths)
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


def scan(root: Path, workers: int | None = None, manifest: Path | None = None, backend: str = "dali") -> ScanReport:
    """Check every image file under `root` (recursively) for `backend`; with `manifest`, decode only files whose
    content it does not vouch for and write it back, the same manifest a training run over `root` reads."""
    paths = image_files(Path(root))
    if manifest is None:
        return check_paths(paths, workers, backend)
    old, prefix = load_manifest(manifest, "folder", root) if manifest.is_file() else (None, "")
    rows = old.rows if old is not None else {}
    out = Manifest(os.path.abspath(root) if old is None else old.root, "folder")
    base = len(str(root).rstrip(os.sep)) + 1
    keys = [prefix + p[base:] for p in paths]
    known = [known_of(rows.get(k)) for k in keys]
    report = ScanReport()
    for path, key, (digest, fmt, reason, decoded) in zip(paths, keys, judge_refs(paths, known, workers), strict=True):
        st = os.stat(path)
        out.rows[key] = (st.st_size, st.st_mtime_ns, digest, fmt, reason, ())
        verdict = reason or backend_problem(fmt, backend)
        report.decoded += decoded
        if verdict:
            report.bad.append((path, verdict))
        else:
            report.good.append(path)
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

    args = arguments.check_data().parse_args(argv)
    console = Console()
    manifest = None if args.no_manifest else (args.manifest or cache_manifest(args.dir))
    try:
        report = scan(args.dir, args.workers, manifest, args.backend)
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
