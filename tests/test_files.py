"""supcon_scale/files.py: the one writer (regular files only, atomic, links replaced) and its full-disk reporting.

The out_dir lock, also in files.py, is tested in tests/test_checkpoint.py (`test_lock_*`); the CLI rows that go
through the writer are in tests/test_hostile_files.py.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from supcon_scale import files


def _write(data: bytes):
    return lambda tmp: Path(tmp).write_bytes(data)


def _full_disk(tmp: Path) -> None:
    Path(tmp).write_bytes(b"half")  # a partial write, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["missing", "file", "link"])
def test_a_missing_name_a_file_or_a_link_is_replaced_atomically(target, tmp_path):
    path, precious = tmp_path / "out.json", tmp_path / "precious"
    precious.write_bytes(b"keep")
    if target == "file":
        path.write_bytes(b"old")
    elif target == "link":
        path.symlink_to(precious)
    files.write_replacing(path, _write(b"new"))
    assert path.read_bytes() == b"new" and not path.is_symlink() and precious.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "precious"]  # no temporary left


@pytest.mark.parametrize("kind", ["character device", "FIFO", "directory", "socket"])
def test_anything_else_at_the_name_is_refused_and_left_as_it_was(kind, tmp_path):
    path = tmp_path / "out"
    if kind == "character device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    mode = os.lstat(path).st_mode
    for write in (lambda: files.write_replacing(path, _write(b"x")), lambda: files.open_append(path)):
        with pytest.raises(files.WriteError, match=f"{path} is a {kind}; refusing to replace it"):
            write()
    assert os.lstat(path).st_mode == mode and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_full_disk_keeps_the_old_file_and_names_the_new_one(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(b"old")
    with pytest.raises(files.WriteError) as err:
        files.write_replacing(path, _full_disk)
    assert str(err.value) == f"{path}: not written: No space left on device (the previous file, if any, is intact)"
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["report.json"]


class _FullDisk(io.RawIOBase):
    """A file whose every write fails as a full disk's does."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_full(tmp: Path) -> None:
    Path(tmp).write_bytes(b"partial")
    torch.save({"a": torch.zeros(4)}, _FullDisk())


def test_a_full_disk_is_found_behind_torch_and_safetensors_errors(tmp_path):
    with pytest.raises(Exception) as torch_err:  # noqa: PT011 - torch may wrap the OSError in a RuntimeError
        _torch_full(tmp_path / "a.pt")
    assert files.disk_full(torch_err.value).errno == errno.ENOSPC
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert files.disk_full(rust).errno == errno.ENOSPC  # safetensors' Rust error names the errno in its text
    assert files.disk_full(RuntimeError("shape mismatch")) is None
    with pytest.raises(files.WriteError, match="not written: No space left on device"):
        files.new_file(tmp_path / "b.pt", _torch_full)
    assert not (tmp_path / "b.pt").exists()  # the partial file removed
    files.new_file(tmp_path / "c.safetensors", lambda p: save_file({"a": torch.ones(2)}, str(p)))
    assert (tmp_path / "c.safetensors").stat().st_size > 0
