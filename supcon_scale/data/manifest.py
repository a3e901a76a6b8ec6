"""The bad-file scan's memory: one row per sample (key, size, mtime, verdict); a later launch decodes only changes.

A manifest is a text file: a header line naming the format version, the dataset directory it covers and the
dataset's kind (folder or shards), then `key<TAB>size<TAB>mtime_ns<TAB>verdict[<TAB>offset<TAB>bytes<TAB>label]`
per sample, where the key is the path relative to that directory (for a shard's sample, `shard.tar:sample key`, with
the member's byte range and label so a warm start reads no tar header). An empty verdict means the sample decodes.
Training reads and writes `out_dir/data_manifest.tsv` (or `data.manifest`); `check-data DIR` writes
`DIR/.supcon_scale_manifest.tsv`, which a run over DIR (or a folder under it) reads when it has none of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from supcon_scale.files import write_replacing

# Bumped when the row layout or `check_file`'s verdicts change: an older manifest is refused, not trusted.
MANIFEST_VERSION = 1
MAGIC = "#supcon_scale data manifest"
RUN_MANIFEST = "data_manifest.tsv"
DATASET_MANIFEST = ".supcon_scale_manifest.tsv"

# key -> (size, mtime_ns, verdict, extra ints: shard members' offset, byte count, label)
Row = tuple[int, int, str, tuple[int, ...]]


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
                for key, (size, mtime, verdict, extra) in self.rows.items():
                    tail = "".join(f"\t{x}" for x in extra)
                    f.write(f"{key}\t{size}\t{mtime}\t{_clean(verdict)}{tail}\n")

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
                rows[parts[0]] = (int(parts[1]), int(parts[2]), parts[3], tuple(int(x) for x in parts[4:]))
            except (IndexError, ValueError):
                raise ValueError(f"data manifest {path}: line {n} is not a manifest row; {fix}") from None
    return manifest, prefix
