"""The bad-input matrix, round two (issue 25): ranks with different configs, preemption claims, resumes under a
changed config, rolled-back and damaged checkpoints, continual streams that changed.

Every row goes through the CLI (or the launcher script) and asserts the exit status, the one line naming the
culprit, no traceback, and the disk state afterwards. docs/RELIABILITY.md "Hostile input" lists the rows.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from multiproc import run_ranks
from test_hostile import REPO, TIMEOUT, _env, data16, one_line_error, run_cli, snapshot, train_args  # noqa: F401

from supcon_scale import checkpoint, distributed, export, resume
from supcon_scale.cli import main
from supcon_scale.hooks import Hook

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


# ---------------------------------------------------------------------------------------------------------------
# Resume: the config compared with the checkpoint's, train.allow_changes, the history; lineage; damaged files


@pytest.fixture(scope="module")
def run3(data16: Path, tmp_path_factory) -> Path:  # noqa: F811
    """Steps 1-3 of the 16 px digits, a checkpoint after each."""
    out = tmp_path_factory.mktemp("run3") / "run"
    assert (
        main(train_args(data16, out, "train.max_steps=3", "train.checkpoint_every_steps=1", "train.keep_last=5")) == 0
    )
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _resume(capsys, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    base = ("train.max_steps=3", "train.checkpoint_every_steps=1", "train.keep_last=5")
    return run_cli(capsys, train_args(data, out, *base, *extra))


REFUSED = [
    (["loss.temperature=0.2"], ["loss.temperature 0.5 -> 0.2"]),
    (["optim.name=adamw"], ['optim.name "lars" -> "adamw"']),  # was a KeyError traceback
    (["train.epochs=4"], ["train.epochs 15 -> 4"]),  # the cosine schedule would be recomputed
    (["data.image_size=32", "precision=bf16", "seed=1"], ["data.image_size", "precision", "seed"]),
    (["loss.temperature=0.2", "train.allow_changes=loss.variant"], ["loss.temperature"]),
]


@pytest.mark.parametrize(("extra", "named"), REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_resume_with_a_changed_config_is_refused_naming_the_keys(extra, named, run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    before = snapshot(out)
    rc, err = _resume(capsys, data16, out, "train.resume=auto", *extra)
    assert rc == 2
    line = one_line_error(err, "train.resume", "train.allow_changes=", *named)
    assert "train.log_every" not in line
    assert snapshot(out) == before  # config.yaml and everything else untouched: refused before any write


def test_allow_changes_naming_an_unknown_key_is_refused(run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    before = snapshot(out)
    rc, err = _resume(capsys, data16, out, "train.resume=auto", "train.allow_changes=optim.nme")
    assert rc == 2
    one_line_error(err, "train.allow_changes", "optim.nme", "did you mean optim.name")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("extra", "printed"),
    [
        (["loss.temperature=0.2", "train.allow_changes=loss,train.max_steps"], "loss.temperature: 0.5 -> 0.2"),
        (["optim.name=adamw", "train.allow_changes=optim.name,train.max_steps"], 'optim.name: "lars" -> "adamw"'),
    ],
)
def test_accepted_changes_are_printed_and_kept_in_the_history(extra, printed, run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    old_config = (out / "config.yaml").read_text()
    rc, err = _resume(capsys, data16, out, "train.resume=auto", "train.max_steps=4", "train.log_every=2", *extra)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "config change from step 4:" in line]
    assert any(printed in line for line in lines) and any("train.max_steps: 3 -> 4" in line for line in lines)
    assert any("train.log_every: 1 -> 2" in line for line in lines)  # a free key passes, and is said too
    kept = (out / "config_history" / "until_step_00000003.yaml").read_text()
    assert yaml.safe_load(kept) == yaml.safe_load(old_config)  # the replaced config, whole
    assert f"# from step 4 on: {printed}" in kept
    current = yaml.safe_load((out / "config.yaml").read_text())
    key, value = extra[0].split("=")
    assert str(current[key.split(".")[0]][key.split(".")[1]]) == value
    assert checkpoint.latest(out).name == "step_00000004"


def test_a_later_auto_resume_follows_the_lineage_that_went_on(run3, data16, tmp_path, capsys):  # noqa: F811
    """Roll back to step 1 and stop at step 2; `auto` then continues from that step 2, not the abandoned step 3."""
    out = _copy(run3, tmp_path)
    root = checkpoint.checkpoint_root(out)
    abandoned = {name: snapshot(root / name) for name in ("step_00000002", "step_00000003")}
    allow = "train.allow_changes=train.max_steps"
    rc, err = _resume(capsys, data16, out, f"train.resume={root / 'step_00000001'}", "train.max_steps=2", allow)
    assert rc == 0, err[-3000:]
    (aside,) = (root / "abandoned").iterdir()
    assert aside.name.startswith("after_step_00000001_") and "abandoned lineage" in err
    assert {name: snapshot(aside / name) for name in abandoned} == abandoned  # kept whole, out of auto's way
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002"]
    rc, err = _resume(capsys, data16, out, "train.resume=auto", allow)
    assert rc == 0, err[-3000:]
    assert f"resumed from {root / 'step_00000002'} at step 2" in err
    assert checkpoint.latest(out).name == "step_00000003"


def _foreign_rank_file(ckpt: Path) -> str:
    shutil.copyfile(ckpt.parent / "step_00000001" / "rank_0.pt", ckpt / "rank_0.pt")
    return "rank_0.pt"


def _garbage_train_state(ckpt: Path) -> str:
    (ckpt / "train_state.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return "train_state.pt"


def _list_as_rank_file(ckpt: Path) -> str:
    torch.save([1, 2, 3], ckpt / "rank_0.pt")
    return "rank_0.pt"


def _foreign_weights(ckpt: Path) -> str:
    shutil.copyfile(ckpt.parent / "step_00000002" / "model.safetensors", ckpt / "model.safetensors")
    return "model.safetensors"


@pytest.mark.parametrize("damage", [_foreign_rank_file, _garbage_train_state, _list_as_rank_file, _foreign_weights])
def test_checkpoint_files_from_elsewhere_or_malformed_are_one_line(damage, run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    ckpt = checkpoint.checkpoint_root(out) / "step_00000003"
    named = damage(ckpt)
    config_before = (out / "config.yaml").read_bytes()
    rc, err = _resume(capsys, data16, out, f"train.resume={ckpt}")
    assert rc == 2
    one_line_error(err, str(ckpt / named))
    assert (out / "config.yaml").read_bytes() == config_before
    assert checkpoint.latest(out) == ckpt  # nothing saved over it


@pytest.mark.parametrize("damage", ["truncated_weights", "foreign_rank_file", "missing_train_state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    ckpt = checkpoint.checkpoint_root(out) / "step_00000003"
    if damage == "truncated_weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "foreign_rank_file":
        _foreign_weights(ckpt)
    else:
        (ckpt / "train_state.pt").unlink()
    rc, err = _resume(capsys, data16, out, "train.resume=auto")
    assert rc == 0, err[-3000:]
    warned = [line for line in err.splitlines() if "warning" in line and str(ckpt) in line and "damaged" in line]
    assert warned, err[-3000:]
    assert f"resumed from {ckpt.parent / 'step_00000002'} at step 2" in err
    assert (ckpt.parent / "abandoned").is_dir()  # the damaged one moved aside, the lineage redid step 3
    assert checkpoint.latest(out).name == "step_00000003" and resume.damage(checkpoint.latest(out)) is None


def test_every_checkpoint_damaged_is_one_line(run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    for ckpt in checkpoint.checkpoint_root(out).glob("step_*"):
        (ckpt / "train_state.pt").unlink()
    rc, err = _resume(capsys, data16, out, "train.resume=auto")
    assert rc == 2
    one_line_error(err, "train.resume=auto", "every checkpoint", "damaged")


# ---------------------------------------------------------------------------------------------------------------
# One copy of the encoder per checkpoint (issue 26)


def test_a_checkpoint_keeps_the_encoder_once_and_still_loads_and_inspects(run3, capsys):
    ckpt = checkpoint.latest(run3)
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "model.safetensors", "rank_0.pt", "train_state.pt"]
    encoder, meta = export.encoder_from_export(ckpt)
    exported, _ = export.encoder_from_export(run3 / "encoder.safetensors")  # the run's export, made from the weights
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder(x), exported(x), rtol=0, atol=0)
    assert meta["encoder"] == "resnet18"
    rc, out = run_cli(capsys, ["inspect", ckpt])
    assert rc == 0 and "model.safetensors" in out and "encoder.safetensors" not in out


# ---------------------------------------------------------------------------------------------------------------
# Continual: a resume under a changed stream is refused at start, by name, before any run trains


def _continual_args(out: Path, data: Path, *extra: str) -> list[str]:
    """4 digits in 2 tasks, 4 incoming + 8 memory samples a step (12 steps a task), as tests/test_continual_run.py."""
    return [f"out_dir={out}", f"data.root={data}", "data.image_size=16", "stream.tasks=2",
            "stream.class_order=[0, 1, 2, 3]", "stream.batch_size=4", "memory.size=12", "memory.batch_size=8",
            "model.width=4", "model.feat_dim=16", "train.progress=false", "seeds=[0]", "methods=[er]",
            "train.resume=auto", *extra]  # fmt: skip


class _StopAfter(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, info) -> None:
        if info.step == self.step:
            raise RuntimeError(f"stopped after step {info.step}")


@pytest.mark.parametrize(
    ("stage", "change", "named"),
    [
        ("finished", "stream.tasks=4", "stream.tasks 2 -> 4"),  # kept a 2-task result under a 4-task config
        ("mid_run", "stream.class_order=[1, 0, 2, 3]", "stream.class_order"),  # trained to the end, then lost
    ],
)
def test_continual_resume_under_a_changed_stream_is_refused_at_start(stage, change, named, small_digits, tmp_path):
    from supcon_scale.continual import config as ccfg
    from supcon_scale.continual.learner import fit, run_dir

    out = tmp_path / "cont"
    args = _continual_args(out, small_digits, "train.checkpoint_every_steps=6")
    cfg = ccfg.load(None, args)
    if stage == "finished":
        fit(cfg, "er", 0, distributed.Context())
    else:
        with pytest.raises(RuntimeError, match="stopped after step 7"):
            fit(cfg, "er", 0, distributed.Context(), hooks=[_StopAfter(7)])
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "supcon_scale.cli", "continual", *args, change], capture_output=True,
                          text=True, cwd=REPO, env=_env(), timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line_error(proc.stderr, "train.resume", named)
    assert str(run_dir(cfg, "er", 0)) in line
    assert snapshot(out) == before  # nothing trained, nothing written


@pytest.mark.parametrize("where", ["config_history", "checkpoints/abandoned"])
def test_a_link_planted_where_a_resume_writes_a_folder_is_refused(where, run3, data16, tmp_path, capsys):  # noqa: F811
    out = _copy(run3, tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (out / where).symlink_to(victim, target_is_directory=True)
    before = snapshot(out)
    rc, err = _resume(capsys, data16, out, "train.resume=auto", "train.log_every=2")
    assert rc == 2
    one_line_error(err, str(out / where), "refusing to write through it")
    assert snapshot(out) == before and list(victim.iterdir()) == []
