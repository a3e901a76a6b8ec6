"""The out_dir lock's pid-reuse rule with real processes (issue 28, item 5).

A pid names a live process only together with its start time: the holder's pid may be reused by a process started
after the holder died. psutil (an independent reader of /proc) dates each process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from supcon_scale import files

SLEEP = "import time; time.sleep(120)"


def _start_ticks_by_psutil(pid: int) -> float:
    """psutil's start time of `pid` in clock ticks since boot (its create_time is boot time + ticks / CLK_TCK)."""
    return (psutil.Process(pid).create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")


def _lock_record(lock: files.OutDirLock, pid: int, pid_start: str | None) -> None:
    record = {"host": socket.gethostname(), "pid": pid, "pid_start": pid_start, "started": time.time() - 5}
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({**record, "heartbeat": time.time(), "job": {}}))


def test_a_pid_reused_by_a_later_process_is_not_the_holder(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", SLEEP])
    holder_start = files._pid_start(holder.pid)
    holder.kill()
    holder.wait()
    time.sleep(0.05)  # a clock tick or more: the next process starts later
    later = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        assert files._pid_start(later.pid) != holder_start
        lock = files.OutDirLock(tmp_path)
        # the holder's record, its pid now naming the later process (a reused pid)
        _lock_record(lock, later.pid, holder_start)
        assert lock.takeover_reason(lock.read()) == f"its holder (pid {later.pid}) is no longer alive"
        assert lock.acquire() is None and json.loads(lock.path.read_text())["pid"] == os.getpid()
        lock.release()
        # the same pid with its own start time is a live writer: refused
        _lock_record(lock, later.pid, files._pid_start(later.pid))
        assert f"pid {later.pid}," in lock.acquire()
    finally:
        later.kill()
        later.wait()


def test_start_time_is_read_past_a_command_name_with_parentheses_and_spaces():
    """/proc/PID/stat's second field is the command name in parentheses, which may itself hold ') ' and spaces."""
    code = "open('/proc/self/comm', 'w').write('a) b (c'); print(flush=True); import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # the name is set
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "a) b (c"
        assert abs(int(files._pid_start(proc.pid)) - _start_ticks_by_psutil(proc.pid)) <= 2
    finally:
        proc.kill()
        proc.wait()
