"""The bad-input matrix, round two (issue 25): output paths that are devices, a full disk, formats the scan must
refuse, shard names, CIFAR arrays, sizes, and YAML rules, each through the CLI.

Every row asserts the exit status, the one-line message naming the culprit, no traceback, and the disk state (a
device node made with mknod stays a device; nothing outside the output folder is touched). docs/RELIABILITY.md
"Hostile input" lists the rows. The fixtures (the digits at 16 px, one trained run) are test_hostile.py's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_hostile import data16, one_line_error, run16, run_cli, snapshot, train_args

from supcon_scale import checkpoint

__all__ = ["data16", "run16"]  # module fixtures shared with test_hostile.py


def _device(path: Path) -> Path:
    """A character device node (the numbers of /dev/null), made where the test says, never at a system path."""
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return path


def _special(kind: str, path: Path) -> Path:
    if kind == "device":
        return _device(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


def _is_kind(kind: str, path: Path) -> bool:
    mode = os.lstat(path).st_mode
    return {"device": stat.S_ISCHR, "fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR}[kind](mode)


# ---------------------------------------------------------------------------------------------------------------
# Item 1: one writer, regular files only


def _writer_args(tool: str, target: Path, run16: Path, data16: Path, tmp: Path) -> list:
    enc = run16 / "encoder.safetensors"
    return {
        "check-data": ["check-data", data16 / "val", "--no-manifest", "--workers", "1", "--json", target],
        "knn": ["knn", "--checkpoint", enc, "--data", data16, "--k", "5", "--json", target],
        "linear-eval": ["linear-eval", "--checkpoint", enc, "--data", data16, "--protocol", "fast", "--json", target],
        "linear-eval --save-probe": ["linear-eval", "--checkpoint", enc, "--data", data16, "--protocol", "fast",
                                     "--save-probe", target],
        "finetune": ["finetune", "--checkpoint", enc, "--data", data16, "--epochs", "1", "--image-size", "16",
                     "--json", target],
        "embed-plot": ["embed-plot", "--checkpoint", enc, "--data", data16, "--method", "tsne", "--out", target],
        "data.manifest": train_args(data16, tmp / "out", f"data.manifest={target}"),
        "continual": ["continual", "--json", target, f"out_dir={tmp / 'out'}", f"data.root={data16}"],
    }[tool]  # fmt: skip


WRITER_ROWS = [(tool, "device") for tool in ("check-data", "knn", "linear-eval", "finetune", "embed-plot")] + [
    ("check-data", "fifo"),
    ("knn", "directory"),
    ("linear-eval --save-probe", "directory"),
    ("data.manifest", "device"),
    ("data.manifest", "fifo"),
    ("continual", "device"),
]


@pytest.mark.parametrize(("tool", "kind"), WRITER_ROWS, ids=[f"{t}-{k}" for t, k in WRITER_ROWS])
def test_an_output_path_that_is_not_a_regular_file_is_refused(tool, kind, run16, data16, tmp_path, capsys):
    target = _special(kind, tmp_path / ("report.png" if tool == "embed-plot" else "report"))
    before = snapshot(run16)
    rc, err = run_cli(capsys, _writer_args(tool, target, run16, data16, tmp_path))
    assert rc == 2, err[-3000:]
    one_line_error(err, str(target), {"device": "character device", "fifo": "FIFO"}.get(kind, kind))
    assert _is_kind(kind, target)  # still what it was, not a regular file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == [target.name]  # no temporary left
    assert snapshot(run16) == before


def test_embed_plot_out_without_a_suffix_writes_a_png_named_so(run16, data16, tmp_path, capsys):
    args = ["embed-plot", "--checkpoint", run16 / "encoder.safetensors", "--data", data16, "--method", "tsne",
            "--out", tmp_path / "map"]  # fmt: skip
    rc, out = run_cli(capsys, args)
    assert rc == 0, out[-3000:]
    assert str(tmp_path / "map.png") in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]  # no 0-byte `map`, no temporary left
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_lr_beyond_float32_is_one_line(run16, data16, tmp_path, capsys):
    rc, err = run_cli(capsys, ["finetune", "--checkpoint", run16 / "encoder.safetensors", "--data", data16,
                               "--epochs", "1", "--lr", "1e300", "--json", tmp_path / "r.json"])  # fmt: skip
    assert rc == 2
    one_line_error(err, "--lr", "1e+300", "float32")
    assert not list(tmp_path.iterdir())


def test_a_fifo_at_metrics_jsonl_is_refused_before_anything_is_written(data16, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "metrics.jsonl")  # appended to, so it cannot be replaced: opening it would block the run
    rc, err = run_cli(capsys, train_args(data16, out))
    assert rc == 2
    one_line_error(err, "out_dir", str(out / "metrics.jsonl"), "FIFO")
    assert os.listdir(out) == ["metrics.jsonl"] and stat.S_ISFIFO(os.lstat(out / "metrics.jsonl").st_mode)


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """A real write failure: while the block runs, RLIMIT_FSIZE makes any write past `limit` bytes fail with EFBIG
    (Python ignores SIGXFSZ), the errno a full disk's ENOSPC shares its handling with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run16, data16, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run16, out)
    previous = checkpoint.latest(out)
    before = snapshot(previous)
    with _file_size_limit(2 << 20):  # the 45 MB model.safetensors of step 2 cannot be written
        rc, err = run_cli(
            capsys,
            train_args(data16, out, "train.resume=auto", "train.max_steps=2", "train.allow_changes=train.max_steps"),
        )
    assert rc == 1, err[-3000:]
    one_line_error(err, str(out), "not written", "File too large")
    assert checkpoint.latest(out) == previous and snapshot(previous) == before  # the previous one intact


# ---------------------------------------------------------------------------------------------------------------
# Item 11 (sizes) and 12 (YAML rules): the config


BOUND_ROWS = [
    ("model.feat_dim=1000000", "model.feat_dim"),
    ("data.image_size=100000", "data.image_size"),
    ("data.views=100000", "data.views"),
    ("data.workers=100000", "data.workers"),
    ("train.epochs=1:30", "train.epochs"),  # YAML 1.1 would read the base-60 integer 90
]


@pytest.mark.parametrize(("override", "named"), BOUND_ROWS)
def test_sizes_are_bounded_and_overrides_follow_yaml_1_2(override, named, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, [*train_args(tmp_path / "data", out), override])
    assert rc == 2
    one_line_error(err, named)
    assert not out.exists()


def _shown(capsys, *args: str) -> dict:
    rc, out = run_cli(capsys, ["config", "show", "--json", *args])
    assert rc == 0, out
    return {row["key"]: row["value"] for row in json.loads(out)}


def test_override_numbers_and_section_merges(capsys):
    recipe = ["--config", "configs/demo/digits.yaml"]
    base = _shown(capsys, *recipe)
    assert _shown(capsys, *recipe, "seed=012")["seed"] == 12  # YAML 1.2: decimal, not the octal 10
    merged = _shown(capsys, *recipe, "loss={variant: in}")
    assert merged["loss.variant"] == "in"
    assert {k: v for k, v in merged.items() if k != "loss.variant"} == {
        k: v for k, v in base.items() if k != "loss.variant"
    }  # the recipe's other loss keys (its temperature) kept, not reset to the defaults
    assert base["loss.temperature"] != 0.07  # the digits recipe sets its own, so the check above means something


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("seed: 1\nout_dir: a\nseed: 2\n", ["duplicate key 'seed'", "line 3"]),
        ("loss:\n  temperature: 0.1\ntrain:\n  epochs: 2\nloss:\n  variant: in\n", ["duplicate key 'loss'", "line 5"]),
        ("loss:\n  temperature: 0.1\n  temperature: 0.2\n", ["duplicate key 'temperature'", "line 3"]),
    ],
    ids=["key", "section", "nested"],
)
def test_yaml_duplicate_keys_are_refused_naming_key_and_line(text, named, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    rc, err = run_cli(capsys, ["config", "show", "--config", path])
    assert rc == 2
    one_line_error(err, str(path), *named)


def test_a_large_config_without_aliases_is_not_taken_for_an_alias_bomb(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    # the old check refused any document over 10,000 nodes, aliases or not (a 1 MB one reads the same way, slowly)
    rows = "".join(f"  k{i}: [{i}, {i}]\n" for i in range(5_000))  # 20,000 nodes, no alias
    path.write_text("seed: 1\nnotes:\n" + rows)
    rc, err = run_cli(capsys, ["config", "show", "--config", path])
    assert rc == 2
    line = one_line_error(err, "unknown config key notes")  # read in full, refused for what it says
    assert "alias" not in line


# ---------------------------------------------------------------------------------------------------------------
# Item 9: CIFAR archives checked by shape, dtype and range


def _cifar_damage(d: Path, how: str) -> tuple[str, str]:
    """Damage one file of a CIFAR-10 archive; (the file, the field) the error must name."""
    batch_file = d / "data_batch_2"
    batch = pickle.loads(batch_file.read_bytes(), encoding="bytes")
    if how == "meta_without_names":
        (d / "batches.meta").write_bytes(pickle.dumps({b"num_vis": 3072}, protocol=2))
        return "batches.meta", "label_names"
    if how == "float_pixels":
        batch[b"data"] = batch[b"data"].astype(np.float32) / 255  # would be cast to zeros
    elif how == "int64_wrap":
        batch[b"data"] = batch[b"data"].astype(np.int64) + 256  # would wrap to the same bytes
    elif how == "fewer_labels":
        batch[b"labels"] = batch[b"labels"][:-1]  # would shift every later label
    elif how == "labels_2d":
        batch[b"labels"] = np.asarray(batch[b"labels"])[:, None]
    batch_file.write_bytes(pickle.dumps(batch, protocol=2))
    return "data_batch_2", "labels" if "labels" in how else "data"


@pytest.mark.parametrize("how", ["float_pixels", "int64_wrap", "fewer_labels", "labels_2d", "meta_without_names"])
def test_cifar_arrays_are_checked_not_cast(how, tmp_path, capsys):
    from test_data_cifar import write_cifar10

    root = write_cifar10(tmp_path / "cifar")
    file, field = _cifar_damage(root / "cifar-10-batches-py", how)
    before = snapshot(root)
    rc, err = run_cli(capsys, [*train_args(root, tmp_path / "out"), "data.format=cifar", "data.global_batch_size=8"])
    assert rc == 2
    one_line_error(err, str(root / "cifar-10-batches-py" / file), f"'{field}'")
    assert snapshot(root) == before


# ---------------------------------------------------------------------------------------------------------------
# Item 4 (and issue 26): the scan checks what the backend decodes, the manifest is keyed on content and lives
# outside the dataset


def _odd_format_data(root: Path, data16: Path, fmt: str) -> Path:
    """A copy of the digits' class folders with one image saved as `fmt` under a .jpg name."""
    from PIL import Image

    shutil.copytree(data16 / "train", root)
    src = sorted((root / "0").glob("*.jpg"))[0]
    with Image.open(src) as img:
        img.convert("RGB").save(root / "1" / "odd.jpg", format=fmt)
    return root / "1" / "odd.jpg"


@pytest.mark.parametrize("fmt", ["GIF", "TGA", "PCX", "ICO"])
def test_a_format_dali_cannot_decode_under_a_jpg_name_is_listed(fmt, data16, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    odd = _odd_format_data(tmp_path / "data", data16, fmt)
    before = snapshot(tmp_path / "data")
    rc, out = run_cli(capsys, ["check-data", tmp_path / "data", "--workers", "1", "--json", tmp_path / "r.json"])
    assert rc == 1 and "Traceback" not in out
    [bad] = json.loads((tmp_path / "r.json").read_text())["bad"]
    assert bad["path"] == str(odd) and f"a {fmt} image" in bad["reason"] and "dali" in bad["reason"]
    rc, out = run_cli(capsys, ["check-data", tmp_path / "data", "--workers", "1", "--backend", "torchvision"])
    assert rc == 0, out  # Pillow, the torchvision backend's decoder, reads it
    assert snapshot(tmp_path / "data") == before  # nothing written into the dataset


def test_a_dali_run_stops_naming_a_gif_named_jpg(data16, tmp_path, capsys):
    odd = _odd_format_data(tmp_path / "data" / "train", data16, "GIF")
    args = train_args(tmp_path / "data", tmp_path / "out", "data.backend=dali-cpu", "data.on_bad_file=fail")
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, "data.on_bad_file=fail", str(odd), "a GIF image")


def test_a_file_corrupted_in_place_with_size_and_mtime_kept_is_rescanned(data16, tmp_path, capsys):
    shutil.copytree(data16 / "val", tmp_path / "data")
    manifest = tmp_path / "run" / "scan.tsv"
    base = ["check-data", tmp_path / "data", "--workers", "1", "--manifest", manifest]
    assert run_cli(capsys, [*base])[0] == 0
    victim = sorted((tmp_path / "data" / "3").glob("*.jpg"))[1]
    st = victim.stat()
    victim.write_bytes(b"\xff\xd8" + b"x" * (st.st_size - 2))  # the same size, garbage after the JPEG marker
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, out = run_cli(capsys, [*base, "--json", tmp_path / "run" / "r.json"])
    assert rc == 1, out
    assert "(1 decoded" in out  # the only file whose content changed
    assert [b["path"] for b in json.loads((tmp_path / "run" / "r.json").read_text())["bad"]] == [str(victim)]


# ---------------------------------------------------------------------------------------------------------------
# Item 8: make-shards keys round-trip any file name; one key, one image; written through the one writer

NAMES = ["cat.1.jpg", "a b.jpg", "ünï çødé.jpg", "v1.2.final.JPG", "100%.jpg"]


def test_make_shards_keys_round_trip_any_file_name(data16, tmp_path, capsys):
    from supcon_scale.data.shards import decode_key

    src = tmp_path / "src"
    shutil.copytree(data16 / "train", src)
    first = sorted((src / "2").glob("*.jpg"))[0]
    for name in NAMES:
        shutil.copyfile(first, src / "2" / name)
    stems = {os.fsencode(p.stem) for p in (src / "2").iterdir()}
    rc, out = run_cli(capsys, ["make-shards", src, tmp_path / "shards", "--shard-size", "16"])
    assert rc == 0, out
    keys = set()
    for tar in sorted((tmp_path / "shards").glob("shard-*.tar")):
        with tarfile.open(tar) as tf:
            keys |= {m.name.split("/", 1)[1].split(".")[0] for m in tf if m.name.startswith("2/")}
    assert {os.fsencode(decode_key(k)) for k in keys} == stems  # every name back, byte for byte
    rc, err = run_cli(capsys, [*train_args(tmp_path / "shards", tmp_path / "out"), "data.format=shards"])
    assert rc == 0, err[-3000:]
    assert "skipping" not in err  # no sample dropped


def test_make_shards_refuses_two_images_under_one_key(data16, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(data16 / "train", src)
    first = sorted((src / "4").glob("*.jpg"))[0]
    shutil.copyfile(first, first.with_suffix(".png"))
    rc, err = run_cli(capsys, ["make-shards", src, tmp_path / "shards"])
    assert rc == 2
    one_line_error(err, str(first), str(first.with_suffix(".png")))
    assert not (tmp_path / "shards").exists()  # refused before anything is written


def test_a_shard_with_two_images_under_one_key_names_it(data16, tmp_path, capsys):
    root = tmp_path / "shards"
    root.mkdir()
    jpgs = sorted((data16 / "train" / "0").glob("*.jpg"))
    members = [("c/a.jpg", jpgs[0].read_bytes()), ("c/a.png", jpgs[1].read_bytes()), ("c/a.cls", b"0")]
    members += [(f"d/{i}.jpg", p.read_bytes()) for i, p in enumerate(jpgs[2:6])]
    members += [(f"d/{i}.cls", b"1") for i in range(4)]
    with tarfile.open(root / "shard-000000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index = {"format": "webdataset", "classes": ["c", "d"], "shards": [{"path": "shard-000000.tar", "samples": 5}]}
    (root / "index.json").write_text(json.dumps(index))
    args = [*train_args(root, tmp_path / "out", "data.on_bad_file=fail"), "data.format=shards"]
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, "shard-000000.tar:c/a", "two images under the key c/a")


def test_make_shards_replaces_planted_links_never_their_targets(data16, tmp_path, capsys):
    dst = tmp_path / "shards"
    dst.mkdir()
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    for name in ("index.json", "shard-000000.tar", ".tmp-index.json"):
        (dst / name).symlink_to(precious)
    rc, out = run_cli(capsys, ["make-shards", data16, dst, "--shard-size", "1000"])
    assert rc == 0, out
    assert precious.read_text() == "keep me"
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert json.loads((dst / "index.json").read_text())["shards"][0]["path"] == "shard-000000.tar"


# ---------------------------------------------------------------------------------------------------------------
# Item 11: bounded reads


def _sparse_tail(path: Path, size: int) -> None:
    """Grow a file to `size` bytes without writing them (a sparse tail: no disk used, reads return zeros)."""
    os.truncate(path, size)


def test_a_jpeg_with_a_huge_tail_is_refused_unread(data16, tmp_path, capsys):
    from supcon_scale.data.folder import MAX_SAMPLE_BYTES

    shutil.copytree(data16 / "train", tmp_path / "data" / "train")
    victim = sorted((tmp_path / "data" / "train" / "5").glob("*.jpg"))[0]
    _sparse_tail(victim, MAX_SAMPLE_BYTES + 1)
    args = train_args(tmp_path / "data", tmp_path / "out", "data.on_bad_file=fail")
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, str(victim), "limit for one image")


def _sparse_tar(path: Path, member_size: int) -> None:
    """A tar whose image member `c/a.jpg` claims (and holds, sparsely) `member_size` zero bytes, after its label."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("c/a.cls")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"0"))
        big = tarfile.TarInfo("c/a.jpg")
        big.size = member_size
        f = tf.fileobj
        f.write(big.tobuf(tarfile.USTAR_FORMAT))
        end = f.tell() + member_size + (-member_size % tarfile.BLOCKSIZE)
    _sparse_tail(path, end + 2 * tarfile.BLOCKSIZE)  # the member's zeros, then the two end-of-archive blocks


def test_a_huge_shard_member_is_refused_unread(tmp_path, capsys):
    from supcon_scale.data.folder import MAX_SAMPLE_BYTES

    root = tmp_path / "shards"
    root.mkdir()
    _sparse_tar(root / "shard-000000.tar", MAX_SAMPLE_BYTES + 1)
    index = {"format": "webdataset", "classes": ["c", "d"], "shards": [{"path": "shard-000000.tar", "samples": 1}]}
    (root / "index.json").write_text(json.dumps(index))
    args = [*train_args(root, tmp_path / "out", "data.on_bad_file=fail"), "data.format=shards"]
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, "shard-000000.tar:c/a", "limit for one image")
