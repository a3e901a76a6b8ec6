"""Shard keys round-trip any file name and never collide silently (issue 28, item 5).

A WebDataset reader ends a sample's key at the first dot of a member's name, so `make-shards` encodes each stem;
here every name comes back byte for byte through a real tar written by `write_shards` and read by `read_shard`.
"""

from __future__ import annotations

import os
import random

import pytest
from PIL import Image

from supcon_scale.data.shards import decode_key, encode_key, read_shard, write_shards

NAMES = [
    "plain",
    "a.b",
    "a%2Eb",  # what "a.b" would become if '%' were not encoded
    "a%b",
    "many...dots.",
    ".hidden",
    "space and tab\t",
    "ünïcødé-名前",
    "emoji-🙂",
    "quote'\"#?&=+",
    "percent%25",
    os.fsdecode(b"not-utf8-\xff\xfe"),  # a byte that is not UTF-8: a surrogate escape in the str
]


def _random_names(n: int = 300) -> list[str]:
    rng = random.Random(0)
    alphabet = ".%/ -_~aZ9" + "é名🙂" + "".join(chr(c) for c in range(0xDC80, 0xDC90))  # surrogate escapes
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).replace("/", "_") for _ in range(n)]


def test_keys_round_trip_have_no_dot_and_never_collide():
    names = sorted(set(NAMES + _random_names()))
    keys = [encode_key(n) for n in names]
    assert all("." not in k and "/" not in k for k in keys)
    assert [decode_key(k) for k in keys] == names
    assert len(set(keys)) == len(keys)  # distinct names, distinct keys


def test_every_name_survives_a_real_shard(tmp_path):
    src = tmp_path / "src"
    for label, names in enumerate((NAMES[:6], NAMES[6:])):
        folder = src / f"class{label}"
        folder.mkdir(parents=True)
        for name in names:
            Image.new("RGB", (4, 4), (label, 0, 0)).save(folder / f"{name}.png")
    dst = write_shards(src, tmp_path / "shards", shard_size=5)
    members = [m for tar in sorted(dst.glob("*.tar")) for m in read_shard(str(tar), 2).members]
    assert all(m.problem is None for m in members), [m.problem for m in members]
    got = sorted((m.label, m.key.split("/", 1)[0], decode_key(m.key.split("/", 1)[1])) for m in members)
    want = sorted([(0, "class0", n) for n in NAMES[:6]] + [(1, "class1", n) for n in NAMES[6:]])
    assert got == want


def test_two_files_under_one_key_are_refused_naming_both(tmp_path):
    folder = tmp_path / "src" / "cat"
    folder.mkdir(parents=True)
    for name in ("x.png", "x.jpg"):
        Image.new("RGB", (4, 4)).save(folder / name)
    with pytest.raises(ValueError, match=r"make-shards: .*x\.jpg and .*x\.png would share the key cat/x; rename one"):
        write_shards(tmp_path / "src", tmp_path / "shards", shard_size=4)
    assert not (tmp_path / "shards").exists()
