"""Tar shards in the WebDataset layout (`key.jpg` + `key.cls` in `.tar` files) with a JSON index of shards and counts.

`index.json` beside the shards: `{"format": "webdataset", "classes": [...], "shards": [{"path": "shard-000000.tar",
"samples": N}, ...]}`. The samples of the shards, in index order, are the dataset's samples 0..N-1, so the epoch
plan, the sharding over ranks and the resume position are those of an image folder: each rank reads its samples by
byte range (`os.pread` at the member's offset; no per-file open or stat on the storage, which is what makes millions
of small files slow on network file systems). `make-shards` writes a folder in its index order, so the shards and
the folder give the same sample for the same index.

DALI reads the same byte ranges through its `fn.external_source` (`data/dali.py`), not `fn.readers.webdataset`:
that reader shards and shuffles by whole tar files and a buffer, which would give each rank other samples than the
epoch plan's and break the exact, world-size-independent resume; with byte ranges the rule is the folder's (each
sample once per epoch across the ranks, drop-last aside). The `webdataset` package is not needed (`tarfile`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote_to_bytes

import numpy as np
from PIL import Image

from supcon_scale import arguments
from supcon_scale.data.folder import IMAGE_EXTENSIONS, FolderIndex, index_folder, read_bounded
from supcon_scale.files import write_replacing, write_text

INDEX_NAME = "index.json"
LABEL_EXT = "cls"
MAX_LABEL_BYTES = 64  # a `.cls` member holds one integer
_IMAGE_EXTS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}

# Open shard descriptors of this process; pread has no file position, so forked DataLoader workers may share them.
_FDS: dict[str, int] = {}


def _fd(path: str) -> int:
    fd = _FDS.get(path)
    if fd is None:
        if len(_FDS) >= 256:  # stay far below the usual 1024 open files
            for old in _FDS.values():
                os.close(old)
            _FDS.clear()
        fd = _FDS[path] = os.open(path, os.O_RDONLY)
    return fd


@dataclass
class ShardIndex:
    """The samples of a shard set: names `shard.tar:key`, labels, and each image member's (shard, offset, size)."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    files: list[str]  # the shard holding each sample
    offsets: list[int]
    nbytes: list[int]
    raw: ClassVar[bool] = False
    scan: object = None

    def __len__(self) -> int:
        return len(self.paths)

    def ref(self, i: int) -> tuple[str, int, int]:
        return self.files[i], self.offsets[i], self.nbytes[i]

    def encoded(self, i: int) -> np.ndarray:
        """The member's bytes as uint8; ValueError naming the sample if the shard ends early."""
        data = os.pread(_fd(self.files[i]), self.nbytes[i], self.offsets[i])
        if len(data) != self.nbytes[i]:
            raise ValueError(f"data.root: {self.paths[i]}: shard truncated ({len(data)} of {self.nbytes[i]} bytes)")
        return np.frombuffer(data, dtype=np.uint8)

    def image(self, i: int) -> Image.Image:
        with Image.open(io.BytesIO(self.encoded(i).tobytes())) as img:
            return img.convert("RGB")

    def subset(self, keep: list[int]) -> ShardIndex:
        def pick(xs: list) -> list:
            return [xs[i] for i in keep]

        return ShardIndex(
            pick(self.paths), pick(self.labels), self.classes, pick(self.files), pick(self.offsets), pick(self.nbytes)
        )


@dataclass
class Member:
    """One sample of a tar: its image's byte range, its label, and what is wrong with it (None when nothing)."""

    key: str
    offset: int = -1
    nbytes: int = 0
    label: int | None = None
    problem: str | None = None


@dataclass
class ShardTable:
    """The samples of one tar file in member order, and a shard-level problem (truncation) if any."""

    members: list[Member] = field(default_factory=list)
    problem: str | None = None


def read_shard(path: str, num_classes: int) -> ShardTable:
    """Walk one tar's headers: group members by WebDataset key, read labels, find what is missing or cut off."""
    size = os.path.getsize(path)
    table = ShardTable()
    by_key: dict[str, Member] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            while True:
                try:
                    m = tf.next()
                except tarfile.ReadError as exc:
                    table.problem = f"truncated shard ({exc})"
                    break
                if m is None:
                    # tarfile takes a short header read for the end: a tar cut at a member boundary ends without
                    # the two zero blocks every tar writer puts after the last member.
                    if tf.offset + 2 * tarfile.BLOCKSIZE > size:
                        last = table.members[-1].key if table.members else "the start"
                        table.problem = f"truncated shard (ends after {last} without the end-of-archive blocks)"
                    break
                if not m.isfile():
                    continue
                folder, _, name = m.name.rpartition("/")
                stem, _, ext = name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                member = by_key.get(key)
                if member is None:
                    member = by_key[key] = Member(key)
                    table.members.append(member)
                if m.offset_data + m.size > size:
                    member.problem = table.problem = f"truncated shard: {m.name} ends past the file's {size} bytes"
                    break
                ext = ext.lower()
                if ext == LABEL_EXT:
                    if m.size > MAX_LABEL_BYTES:  # never read a huge member whole
                        member.problem = f"label member {m.name} of {m.size:,} bytes (a label is a short integer)"
                        continue
                    text = tf.extractfile(m).read().strip()  # type: ignore[union-attr]
                    try:
                        member.label = int(text)
                    except ValueError:
                        member.problem = f"label {text[:20]!r} is not an integer"
                elif ext in _IMAGE_EXTS:
                    if member.offset >= 0:  # a.jpg and a.png under one key: neither is silently dropped
                        member.problem = f"two images under the key {key} (the second is {m.name})"
                    member.offset, member.nbytes = m.offset_data, m.size
    except tarfile.TarError as exc:
        raise ValueError(f"data.root: {path}: not a readable tar shard ({exc})") from None
    for member in table.members:
        if member.problem is not None:
            continue
        if member.offset < 0:
            member.problem = "no image member"
        elif member.label is None:
            member.problem = f"no label ({member.key}.{LABEL_EXT} missing)"
        elif not 0 <= member.label < num_classes:
            member.problem = f"label {member.label} outside 0..{num_classes - 1}"
    return table


def read_index(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """`(classes, [(shard path, samples)])` from `directory/index.json`; ValueError naming the file if unusable."""
    path = directory / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"data.root: data.format=shards needs {path} (write one with supcon-scale make-shards)")
    try:
        meta = json.loads(path.read_text())
        classes = [str(c) for c in meta["classes"]]
        shards = [(str(directory / s["path"]), int(s["samples"])) for s in meta["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"data.root: {path} is not a shard index ({type(exc).__name__}: {exc})") from None
    if not classes or not shards:
        raise ValueError(f"data.root: {path} lists no classes or no shards")
    for shard, _ in shards:
        if not os.path.isfile(shard):
            raise ValueError(f"data.root: {path} lists {shard}, which does not exist")
    return classes, shards


def encode_key(stem: str) -> str:
    """A file's stem as a WebDataset key: readers end the key at the first dot of a member's name, so a dot (and
    `%`, and any byte outside printable ASCII) is percent-encoded; `decode_key` gives the name back, byte for byte."""
    return quote(os.fsencode(stem), safe=" !#$&'()+,;=@[]^`{}").replace(".", "%2E")


def decode_key(key: str) -> str:
    """The file stem `encode_key` was given (names that are not UTF-8 come back with the same bytes)."""
    return os.fsdecode(unquote_to_bytes(key))


def _shard_keys(index: FolderIndex) -> list[str]:
    """Each sample's key `class/encoded stem`; two files of one class with the same stem are refused by name."""
    keys: list[str] = []
    first: dict[str, str] = {}
    for path, label in zip(index.paths, index.labels, strict=True):
        key = f"{index.classes[label]}/{encode_key(Path(path).stem)}"
        if key in first:
            raise ValueError(f"make-shards: {first[key]} and {path} would share the key {key}; rename one")
        first[key] = path
        keys.append(key)
    return keys


def _write_tar(tmp: Path, members: list[tuple[str, bytes]]) -> None:
    # PAX: names longer than 100 bytes are kept whole (USTAR would refuse them)
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))


def write_shards(src: str | Path, dst: str | Path, shard_size: int) -> Path:
    """Convert the folder `src` (`src/train` when present) into shards of `shard_size` samples in `dst`, each file
    written through `files.write_replacing` (a link planted at a shard's or the index's name is replaced)."""
    if shard_size < 1:
        raise ValueError(f"make-shards: --shard-size must be at least 1, got {shard_size}")
    src = Path(src)
    index = index_folder(src / "train" if (src / "train").is_dir() else src)
    keys = _shard_keys(index)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(index), shard_size):
        name = f"shard-{len(shards):06d}.tar"
        members: list[tuple[str, bytes]] = []
        for i in range(start, min(start + shard_size, len(index))):
            suffix = Path(index.paths[i]).suffix.lower()
            members.append((f"{keys[i]}{suffix}", read_bounded(index.paths[i])))
            members.append((f"{keys[i]}.{LABEL_EXT}", str(index.labels[i]).encode()))
        write_replacing(dst / name, lambda tmp, members=members: _write_tar(tmp, members))
        shards.append({"path": name, "samples": min(shard_size, len(index) - start)})
    meta = {"format": "webdataset", "classes": index.classes, "shards": shards}
    write_text(dst / INDEX_NAME, json.dumps(meta, indent=1) + "\n")
    return dst


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale make-shards SRC DST --shard-size N`: an image folder as WebDataset tar shards + index.json."""
    args = arguments.make_shards().parse_args(argv)
    out = write_shards(args.src, args.dst, args.shard_size)
    meta = json.loads((out / INDEX_NAME).read_text())
    n = sum(s["samples"] for s in meta["shards"])
    print(f"wrote {n} samples in {len(meta['shards'])} shards to {out} (point data.root there, data.format=shards)")
    return 0
