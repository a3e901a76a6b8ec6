"""Every file the package writes, written one way: regular files only, atomically, never through a planted link.

The rule, in one place: a missing name or a regular file is replaced atomically (a fresh `.tmp-<name>` beside it,
created with O_EXCL | O_NOFOLLOW, fsynced, renamed over the name); a symbolic link planted at the name is replaced
(the rename acts on the link, its target is never written); a device, FIFO, socket or directory at the name is
refused with one line naming the path (ValueError: exit 2). Renaming a regular file over `/dev/null` as root
replaces the machine's `/dev/null` (issue 25, item 1), so the check comes before anything is created.

A write that fails (a full disk, a quota, a file-size limit) removes its temporary and raises `WriteError`, a one-line
ValueError naming the file and the reason; the file that was there stays as it was.

Also here: the run's out_dir checked before anything is written (`check_out_dir`), and the out_dir lock with its
heartbeat thread (one trainer per `out_dir`, docs/RELIABILITY.md "One writer per out_dir").
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from supcon_scale import distributed

# A new file in a directory a run writes into: never an existing one, never through a link.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Errors that mean "the disk cannot hold it" rather than a bug: reported as one line, the old file kept.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(ValueError):
    """A file could not be written (a full disk, a quota, a special file at its name): one line naming it."""


def _kind(mode: int) -> str | None:
    """What a non-regular, non-link file is, or None for a regular file or a link (both may be replaced)."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_target(path: str | Path) -> Path:
    """`path` if it is missing, a regular file or a link (replaceable); WriteError naming it otherwise."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise WriteError(f"{path}: cannot write here ({exc.strerror})") from None
    kind = _kind(mode)
    if kind is not None:
        raise WriteError(f"{path} is {kind}; refusing to replace it with a regular file (choose another path)")
    return path


def _failed(path: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return WriteError(f"{path}: not written: {reason} (the previous file, if any, is intact)")
    what = "a symbolic link" if os.path.islink(path) else f"not writable ({reason})"
    return WriteError(f"{path}: {what}; refusing to write through it (remove it or choose another path)")


def fsync(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_file(path: str | Path, write: Callable[[Path], object], shown: Path | None = None) -> Path:
    """Write a file that must not exist yet (inside a directory this run created): `write(path)`, then fsync.

    A failed write (a full disk) removes the partial file and raises WriteError naming it (or `shown`, the name
    the caller is writing, when `path` is its temporary).
    """
    path = Path(path)
    try:
        os.close(os.open(path, _NEW_FILE, 0o644))
        write(path)
        fsync(path)
    except Exception as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        full = disk_full(exc)
        if full is not None:
            raise _failed(shown or path, full) from None
        if isinstance(exc, OSError):
            raise _failed(path, exc) from None
        raise
    return path


def write_replacing(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write `path` as `write(tmp)` into a fresh `.tmp-<name>` beside it, fsync, then rename it over `path`.

    Readers see the old file or the complete new one; a link planted at either name is replaced (the rename and
    the unlink act on the link itself), so its target is never written; anything else but a regular file at the
    name is refused (`check_target`).
    """
    path = check_target(path)
    tmp = check_target(path.with_name(f".tmp-{path.name}"))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a stale temporary or a planted link: the link goes, its target stays as it was
    except OSError as exc:
        raise _failed(tmp, exc) from None
    new_file(tmp, write, shown=path)
    try:
        check_target(path)  # again, just before the rename: the name may have changed while we wrote
        os.replace(tmp, path)
    except (OSError, WriteError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, WriteError):
            raise
        raise _failed(path, exc) from None
    return path


def write_text(path: str | Path, text: str, errors: str = "strict") -> Path:
    """`write_replacing` for a text file (config.yaml, bad_files.txt, a JSON report, a manifest)."""
    return write_replacing(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors=errors))


def write_json(path: str | Path, value: Any) -> Path:
    """`write_text` of `value` as indented JSON, creating the folder (a `--json` report)."""
    path = check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"{path}: {path.parent} is not a directory") from None
    return write_text(path, json.dumps(value, indent=2))


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy a file so that `dst` is either the old file or the complete new one, never a partial copy (nor a write
    through a link planted at `dst` or its temporary)."""
    return write_replacing(dst, lambda tmp: shutil.copyfile(src, tmp))


def open_append(path: str | Path) -> IO[str]:
    """`path` opened for appending text, created if missing; a link or any non-regular file there is refused."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as exc:
        raise _failed(path, exc) from None
    if stat.S_ISLNK(mode):
        raise WriteError(f"{path}: a symbolic link; refusing to write through it (remove it or choose another path)")
    check_target(path)
    try:  # O_NONBLOCK: a FIFO swapped in after the check fails instead of blocking; dropped once opened
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise _failed(path, exc) from None
    kind = _kind(os.fstat(fd).st_mode)
    if kind is not None:  # swapped in between the check and the open
        os.close(fd)
        raise WriteError(f"{path} is {kind}; refusing to replace it with a regular file (choose another path)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


_OS_ERROR = re.compile(r"os error (\d+)")  # how safetensors' Rust writer reports an errno


def disk_full(exc: BaseException) -> OSError | None:
    """The full-disk OSError (ENOSPC, EDQUOT, EFBIG) behind `exc`, or None: torch.save raises a RuntimeError whose
    context is the OSError (when given a file object), safetensors a SafetensorError saying `(os error 28)`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen
        match = _OS_ERROR.search(str(seen))
        if match and int(match.group(1)) in DISK_FULL:
            return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
        seen = seen.__cause__ or seen.__context__
    return None


# ---------------------------------------------------------------------------------------------------------------
# The run's out_dir: checked before anything is written; one writer per out_dir

METRICS = "metrics.jsonl"  # the run's metrics, one JSON record a line (console.MetricsLog appends to it)
# Files a run appends to (they cannot be replaced by a rename): a link planted at one is refused up front.
APPENDED = (METRICS,)


def check_out_dir(path: str | Path, key: str = "out_dir") -> Path:
    """Refuse an `out_dir` that is a file, or a directory (or the nearest existing parent) this user cannot write,
    or one holding a link where the run appends, before anything is written; nothing is created here."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link
            raise ValueError(f"{key}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{key}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: {probe} is not writable by this user")
    for name in APPENDED:
        if (path / name).is_symlink():
            raise ValueError(f"{key}: {path / name} is a symbolic link; refusing to write through it (remove it)")
        try:
            check_target(path / name)  # a FIFO here would block the first log line; a device would take it
        except WriteError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return path


LOCK = "lock.json"
HEARTBEAT_S = 30.0  # how often the holder refreshes its heartbeat (a thread: long saves and evaluations included)
STALE_S = 300.0  # a lock whose heartbeat is older than this is taken over (its holder is dead or frozen)
NO_RUN_ID = ("", "none")  # torchrun's default --rdzv-id: it does not identify a job


def _pid_start(pid: int) -> str | None:
    """The process's start time (Linux /proc, in clock ticks since boot), so a reused pid is not taken as alive."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing, partial or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _job() -> dict[str, Any]:
    """This torchrun job and attempt: run id, rendezvous store address and restart count."""
    launch = distributed.launch_env()
    return {"run_id": launch.run_id, "store": launch.store, "restart": launch.restart_count}


class OutDirLock:
    """`out_dir/lock.json` naming the one process that writes the run (host, pid, start time, heartbeat).

    Taken with O_EXCL by the main rank before anything is written. An existing lock is taken over only when its
    holder is this process, an earlier attempt of the same torchrun job (same run id and store, lower restart
    count: torchrun stops every worker before it restarts them, wherever rank 0 lands), a dead process on this
    host, or silent for `STALE_S` seconds; otherwise the second trainer refuses with a message naming the holder.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid())}
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        return {**self.me, "started": self.started, "heartbeat": time.time(), "job": _job()}

    def read(self) -> dict[str, Any]:
        """The lock's content; an unreadable one (a writer killed mid-write) is dated by the file's mtime."""
        holder = _read_json(self.path)
        if holder:
            return holder
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return {"host": "?", "pid": -1, "started": mtime, "heartbeat": mtime, "job": {}}

    def takeover_reason(self, holder: dict[str, Any]) -> str | None:
        """Why `holder`'s lock may be taken over, or None when it belongs to a live writer."""
        same_host = holder.get("host") == self.me["host"]
        if same_host and holder.get("pid") == self.me["pid"]:
            return "held by this process"
        theirs, mine = holder.get("job") or {}, _job()
        if (
            mine["run_id"] not in NO_RUN_ID
            and theirs.get("run_id") == mine["run_id"]
            and theirs.get("store") == mine["store"]
            and int(theirs.get("restart", 0)) < mine["restart"]
        ):
            return f"held by attempt {theirs.get('restart', 0)} of this torchrun job"
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"], holder.get("pid_start")):
            return f"its holder (pid {holder['pid']}) is no longer alive"
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def refusal(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
        return (
            f"out_dir: {self.path.parent} is in use by another trainer (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {started}, heartbeat {age:.0f} s ago); wait for it, choose another "
            f"out_dir, or delete {self.path} if that job is dead"
        )

    def acquire(self) -> str | None:
        """Take the lock and start the heartbeat; None when taken, else the one-line refusal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, _NEW_FILE, 0o644)
            except FileExistsError:
                holder = self.read()
                reason = self.takeover_reason(holder)
                if reason is None:
                    return self.refusal(holder)
                # Move the old lock aside: of two processes taking over at once, one rename wins; the other
                # finds no file (or the winner's fresh lock) and goes round again.
                aside = self.path.with_name(f".{LOCK}.stale-{self.me['pid']}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                moved = _read_json(aside)
                if moved and (moved.get("pid"), moved.get("started")) != (holder.get("pid"), holder.get("started")):
                    # Another trainer took it over between our read and our rename: give its lock back.
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    return self.refusal(moved)
                aside.unlink(missing_ok=True)
                print(f"out_dir lock {self.path} taken over: {reason}", file=sys.stderr, flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record()))
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="supcon-lock-heartbeat", daemon=True)
            self._thread.start()
            return None
        return self.refusal(self.read())

    def owned(self) -> bool:
        """Whether the lock still names this process (False once another trainer took it over)."""
        holder = self.read()
        mine = (self.me["host"], self.me["pid"], self.started)
        if (holder.get("host"), holder.get("pid"), holder.get("started")) == mine:
            return True
        self.lost = holder
        return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.owned():
                return
            tmp = self.path.with_name(f".{LOCK}.tmp-{self.me['pid']}")
            try:
                tmp.unlink(missing_ok=True)  # never write through a link planted at the temporary's name
                tmp.write_text(json.dumps(self.record()))
                os.replace(tmp, self.path)
            except OSError:  # a full or vanished disk: the next save reports it
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if self.owned():
                self.path.unlink(missing_ok=True)


def take_lock(lock: OutDirLock | None) -> None:
    """Collective: the main rank takes `lock` (None on the other ranks); every rank raises the same refusal."""
    refusal = lock.acquire() if lock is not None else None
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise ValueError(refusal)


def check_lock_held(lock: OutDirLock | None, out_dir: Path, stopping: str) -> None:
    """Collective: a one-line ValueError on every rank when another trainer took `out_dir` over (this one was frozen
    past STALE_S), so nothing is written over its files; `stopping` says what this trainer does not do."""
    lost = lock.lost if lock is not None and not lock.owned() else None
    lost = distributed.broadcast_object(lost)
    if lost is not None:
        raise ValueError(
            f"out_dir: {out_dir} was taken over by another trainer (host {lost.get('host')}, pid "
            f"{lost.get('pid')}) while this one was silent; {stopping}"
        )
