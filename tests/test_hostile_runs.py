"""The bad-input matrix, round two (issue 25): ranks with different configs, preemption claims, resumes under a
changed config, rolled-back and damaged checkpoints, continual streams that changed.

Every row goes through the CLI (or the launcher script) and asserts the exit status, the one line naming the
culprit, no traceback, and the disk state afterwards. docs/RELIABILITY.md "Hostile input" lists the rows.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiproc import run_ranks
from test_hostile import REPO, TIMEOUT, _env, data16, one_line_error, train_args  # noqa: F401 (data16: a fixture)

# ---------------------------------------------------------------------------------------------------------------
# Ranks with different configs; preemption claims only what was written; the SLURM script requeues only on 3


def _train_rank(rank: int, world: int, args: list[str], extra: dict[int, list[str]]) -> tuple[int, str]:
    from supcon_scale.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([*args, *extra.get(rank, [])])
    return rc, err.getvalue()


@pytest.mark.parametrize(
    ("extra", "named"),
    [({1: ["loss.name=simclr"]}, "loss.name"), ({0: ["loss.temperature=0.2", "seed=3"]}, "loss.temperature")],
)
def test_ranks_with_different_configs_are_refused_naming_keys_and_ranks(extra, named, data16, tmp_path):  # noqa: F811
    """A rank with another loss name used to deadlock every rank until the 1,800 s collective timeout; another
    temperature or seed trained silently. Now every rank exits 2 at start, naming the keys and the ranks."""
    out = tmp_path / "out"
    results = run_ranks(_train_rank, 2, train_args(data16, out), extra, timeout=120)
    for rc, err in results:
        assert rc == 2, err[-3000:]
        line = one_line_error(err, "different configs", named)
        assert "rank 0" in line and "rank 1" in line
    if "seed=3" in extra.get(0, []):
        assert "seed: 3 on rank 0, 0 on rank 1" in results[0][1]
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


# A torchrun worker: it swallows the preemption signals (as a rank stuck in a collective does: its handler only
# sets a flag it never reads) or, given a step, records a finished preemption checkpoint as the trainer does.
WORKER = """
import pathlib, signal, sys, time
from supcon_scale import resilience
pathlib.Path(sys.argv[1]).touch()
if len(sys.argv) > 2:
    signal.signal(signal.SIGUSR1, lambda *a: None)
    while not pathlib.Path(sys.argv[1] + ".go").exists():
        time.sleep(0.05)
    resilience.notify_agent(resilience.Preempted("done", int(sys.argv[2]), "CKPT/step_00000005"))
    sys.exit(resilience.EXIT_PREEMPTED)
for name in resilience.PREEMPT_SIGNALS:
    signal.signal(getattr(signal, name), lambda *a: None)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("worker", ["stuck", "checkpointed"])
def test_the_agent_claims_a_checkpoint_only_when_a_worker_confirmed_one(worker, tmp_path):
    script, ready = tmp_path / "worker.py", tmp_path / "ready"
    script.write_text(WORKER)
    step = ["5"] if worker == "checkpointed" else []
    cmd = [sys.executable, "-m", "supcon_scale.cli", "torchrun", "--standalone", "--nproc-per-node", "1",
           "--shutdown-timeout", "2", str(script), str(ready), *step]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        if worker == "stuck":
            proc.send_signal(signal.SIGUSR1)
        else:
            Path(f"{ready}.go").touch()
        err = proc.communicate(timeout=TIMEOUT)[1]
    finally:
        proc.kill()
    assert "Traceback" not in err, err[-3000:]
    if worker == "stuck":  # killed after the shutdown timeout: no checkpoint, and no claim of one
        assert proc.returncode == 1, err[-3000:]
        assert "no worker confirmed a checkpoint" in err and "exit 3" not in err
    else:
        assert proc.returncode == 3, err[-3000:]
        assert "wrote checkpoint CKPT/step_00000005 (preempted at step 5); exit 3 (requeue)" in err


@pytest.mark.parametrize(("status", "requeued"), [(3, True), (1, False), (0, False)])
def test_slurm_script_requeues_only_a_confirmed_preemption(status, requeued, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fakes = {
        "srun": f"echo srun >> {calls}; exit {status}",
        "scontrol": f'echo "scontrol $*" >> {calls}; [ "$1" = show ] && echo node1; exit 0',
        "scancel": f"echo scancel >> {calls}",
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0")  # fmt: skip
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "configs/demo/digits.yaml"], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == status, proc.stderr
    assert ("scontrol requeue 42" in calls.read_text()) == requeued
