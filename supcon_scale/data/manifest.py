"""The bad-file scan's memory: one row per sample (key, size, mtime, content digest, format, verdict); a later launch
decodes only samples whose content changed.

A manifest is a text file: a header line naming the format version, the dataset directory it covers and the
dataset's kind (folder or shards), then `key<TAB>size<TAB>mtime_ns<TAB>digest<TAB>format<TAB>verdict[<TAB>offset
<TAB>bytes<TAB>label]` per sample, where the key is the path relative to that directory (for a shard's sample,
`shard.tar:sample key`, with the member's byte range and label so a warm start reads no tar header). The digest
(blake2b of the sample's bytes, `badfiles.judge`) decides whether a verdict still holds, not the size and mtime: a
file corrupted in place with both kept is decoded again. The format is Pillow's name for what the bytes are, so
each run applies its own backend's rule (`badfiles.backend_problem`); an empty verdict means the sample decodes.
Training reads and writes `out_dir/data_manifest.tsv` (or `data.manifest`), local to the run; `check-data DIR` writes
`--manifest PATH`, by default `cache_manifest(DIR)` in the user's cache, never inside the dataset folder (often
read-only or shared), which a run over DIR (or a folder under it) reads when it has none of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from supcon_scale.files import write_replacing

# Bumped when the row layout or `check_file`'s verdicts change: an older manifest is refused, not trusted.
MANIFEST_VERSION = 2  # 2: content digest and format columns
MAGIC = "#supcon_scale data manifest"
RUN_MANIFEST = "data_manifest.tsv"
DATASET_MANIFEST = ".supcon_scale_manifest.tsv"  # inside a dataset: read if an older check-data put one there


def cache_manifest(directory: str | Path) -> Path:
    """`check-data DIR`'s default manifest: `$XDG_CACHE_HOME/supcon_scale/manifests/` (else `~/.cache/...`), named
    by a digest of DIR's absolute path, so a run over DIR finds it and nothing is written into the dataset."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.blake2b(os.fsencode(os.path.abspath(directory)), digest_size=8).hexdigest()
    return Path(cache) / "supcon_scale" / "manifests" / f"{name}.tsv"


# key -> (size, mtime_ns, digest, format, verdict, extra ints: shard members' offset, byte count, label)
Row = tuple[int, int, str, str, str, tuple[int, ...]]


def known_of(row: Row | None) -> tuple[str, str, str] | None:
    """What a row vouches for, `(digest, format, verdict)`, or None when it has no digest to compare."""
    return None if row is None or not row[2] else (row[2], row[3], row[4])


def _clean(reason: str) -> str:
    return " ".join(reason.split())  # a verdict is one field of one line


@dataclass
class Manifest:
    """The verdicts of the samples under `root` (an absolute directory) of a dataset of `kind` folder | shards."""

    root: str
    kind: str
    rows: dict[str, Row] = field(default_factory=dict)

    def prefix_for(self, directory: str | Path) -> str:
        """The key prefix of `directory`'s samples ('' when it is the root), or ValueError if it lies outside."""
        directory = os.path.abspath(directory)
        if directory == self.root:
            return ""
        if directory.startswith(self.root.rstrip(os.sep) + os.sep):
            return directory[len(self.root.rstrip(os.sep)) + 1 :] + "/"
        raise ValueError(f"covers {self.root}, not {directory} (another dataset)")

    def save(self, path: Path) -> Path:
        """Write atomically (`files.write_replacing`), so a killed launch leaves the old one whole."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"version": MANIFEST_VERSION, "root": self.root, "kind": self.kind})

        def write(tmp: Path) -> None:
            # surrogateescape: a file name that is not UTF-8 round-trips as its bytes
            with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
                f.write(f"{MAGIC}\t{header}\n")
                for key, (size, mtime, digest, fmt, verdict, extra) in self.rows.items():
                    tail = "".join(f"\t{x}" for x in extra)
                    f.write(f"{key}\t{size}\t{mtime}\t{digest}\t{_clean(fmt)}\t{_clean(verdict)}{tail}\n")

        write_replacing(path, write)  # a link planted at the name is replaced; a device there is refused
        return path


def load_manifest(path: Path, kind: str, directory: str | Path) -> tuple[Manifest, str]:
    """The manifest at `path` and the key prefix of `directory` in it; ValueError naming the file when unusable.

    Refused: another format version, another kind of dataset, a dataset directory that does not hold `directory`,
    or an unreadable row. Delete the file and the next launch scans again and writes a new one.
    """
    path = Path(path)
    fix = "delete it and a new one is written by the next launch"
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        first = f.readline().rstrip("\n")
        magic, _, header = first.partition("\t")
        try:
            meta = json.loads(header) if magic == MAGIC else None
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict):
            raise ValueError(f"data manifest {path}: not a supcon_scale manifest (first line {first[:60]!r}); {fix}")
        if meta.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"data manifest {path}: version {meta.get('version')!r}, this supcon_scale reads version "
                f"{MANIFEST_VERSION}; {fix}"
            )
        if meta.get("kind") != kind:
            raise ValueError(f"data manifest {path}: written for data.format={meta.get('kind')}, not {kind}; {fix}")
        manifest = Manifest(str(meta.get("root")), kind)
        try:
            prefix = manifest.prefix_for(directory)
        except ValueError as exc:
            raise ValueError(f"data manifest {path}: {exc}; {fix} or set data.manifest") from None
        rows = manifest.rows
        for n, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            try:
                extra = tuple(int(x) for x in parts[6:])
                rows[parts[0]] = (int(parts[1]), int(parts[2]), parts[3], parts[4], parts[5], extra)
            except (IndexError, ValueError):
                raise ValueError(f"data manifest {path}: line {n} is not a manifest row; {fix}") from None
    return manifest, prefix
